"""Stress helper (not collected by pytest): run the 2-process gloo fixture of test_distributed.py N times, each with a
short timeout, and print the stacks of every process of a run that hangs.

    /work/venv/bin/python tests/distributed_stress.py [runs] [timeout seconds] [new|old] [busy processes]

`old` runs the teardown order the test had before (destroy_process_group while the DDP wrapper is still alive), to
show the deadlock; `busy processes` adds that many spinning processes, as other jobs on a shared CI machine would.
A hang prints the native stacks (gdb) and Python stacks (faulthandler on SIGUSR1) of the processes still alive.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as multiprocessing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_distributed  # noqa: E402


def _old_worker(rank: int, output_dir: str):
    """The worker as it was: the group destroyed in `finally`, then DDP's reducer freed when the frame is left."""
    torch.set_num_threads(1)
    init_method = f"file://{os.path.join(output_dir, 'rendezvous')}"
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        for negatives in ("global", "local"):
            model = test_distributed.make_model(negatives)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            batch = test_distributed.make_batch(model.config)
            output = ddp(**test_distributed.shard_of(batch, rank), return_dict=True)
            output.loss.backward()
            torch.save(output.loss.detach(), os.path.join(output_dir, f"{negatives}_rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _worker(rank: int, output_dir: str, mode: str):
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    (_old_worker if mode == "old" else test_distributed._worker)(rank, output_dir)


def _spin():
    while True:
        pass


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 60
    mode = sys.argv[3] if len(sys.argv) > 3 else "new"
    busy = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(busy)]
    for spinner in spinners:
        spinner.start()
    hangs = 0
    for run in range(runs):
        output_dir = Path(tempfile.mkdtemp(prefix="ddp_stress_"))
        started = time.monotonic()
        context = multiprocessing.start_processes(
            _worker, args=(str(output_dir), mode), nprocs=2, join=False, start_method="spawn"
        )
        while not context.join(timeout=1):
            if time.monotonic() - started > timeout:
                print(f"run {run}: HANG after {time.monotonic() - started:.0f} s", flush=True)
                import signal
                import subprocess

                for process in context.processes:
                    if process.is_alive() and hangs == 0:  # the first hang only: the stacks are long
                        print(f"  pid {process.pid} alive; native stacks:", flush=True)
                        subprocess.run(["gdb", "-p", str(process.pid), "-batch", "-ex", "thread apply all bt 25"])
                        os.kill(process.pid, signal.SIGUSR1)
                        time.sleep(2)
                for path in sorted(output_dir.glob("stacks_rank*.txt")):
                    print(f"--- {path.name}\n{path.read_text()}", flush=True)
                for process in context.processes:
                    process.kill()
                hangs += 1
                break
        else:
            print(f"run {run}: ok in {time.monotonic() - started:.1f} s", flush=True)
    print(f"{hangs} hangs in {runs} runs ({mode})", flush=True)
    sys.exit(1 if hangs else 0)


if __name__ == "__main__":
    main()
