"""Stress helper (not collected by pytest): run a 2-process gloo scenario N times, each with a short timeout; count
the runs that hang or fail, and print the stacks of the first hang.

    python tests/distributed_stress.py [runs] [timeout seconds] [new|old|exit-new|exit-old] [busy processes]

`new` / `old`: the 2-process DDP fixture of test_distributed.py, with its teardown (the DDP wrapper gone, then
destroy_process_group) or the order it had before (destroy_process_group while the wrapper is alive), which
deadlocked ~1 run in 7. `exit-new` / `exit-old`: the end of a `Trainer` run, under `torchrun`: an all-gather of
tensors made in Python (the last collective of `Trainer.train`) and the interpreter's exit, with
`cavmae_hf.distributed.end_distributed_run()` first or with the group left to interpreter shutdown, which aborts
(SIGABRT, "terminate called without an active exception") in some runs on a loaded 2-core machine.
`busy processes` adds that many spinning processes, as other jobs on a shared CI machine would. A hang prints the
native stacks (gdb) and Python stacks (faulthandler on SIGUSR1) of the processes still alive.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as multiprocessing

sys.path.insert(0, str(Path(__file__).resolve().parent))

EXIT_MODES = ("exit-new", "exit-old")


def _old_worker(rank: int, output_dir: str):
    """The worker as it was: the group destroyed in `finally`, then DDP's reducer freed when the frame is left."""
    import test_distributed

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

    import test_distributed

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    (_old_worker if mode == "old" else test_distributed._worker)(rank, output_dir)


def _exit_worker(mode: str):
    """One process of an `exit-*` run (`torchrun ... distributed_stress.py --exit-worker MODE`): the last
    collective of `Trainer.train` (its FLOP count), then the end of the script. `exit-old` is a plain torch script;
    `exit-new` imports the package's function first (before the collective, so that the import does not widen the
    gap between the collective and the exit)."""
    if mode == "exit-new":
        from cavmae_hf.distributed import end_distributed_run

    torch.distributed.init_process_group("gloo")
    scalar = torch.tensor([1.0])
    gathered = [scalar.clone() for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, scalar)
    torch.cat(gathered).sum().item()
    if mode == "exit-new":
        end_distributed_run()


def _run_exit_scenario(mode: str, timeout: float) -> str | None:
    """One `exit-*` run under `torchrun` (as a user's job runs); None if it succeeds, else what went wrong."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--exit-worker", mode]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return "HANG"
    if process.returncode == 0:
        return None
    aborted = "terminate called without an active exception" in stderr
    causes = sorted(set(re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)))
    summary = f"torchrun exit {process.returncode}, worker exit codes {causes}"
    return summary + (" (abort: terminate called)" if aborted else "")


def _run_fixture_scenario(mode: str, timeout: float, first_hang: bool) -> str | None:
    """One `new` / `old` run; None if it finishes, else what went wrong (a hang prints the stacks the first time)."""
    output_dir = Path(tempfile.mkdtemp(prefix="ddp_stress_"))
    started = time.monotonic()
    context = multiprocessing.start_processes(
        _worker, args=(str(output_dir), mode), nprocs=2, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=1):
            if time.monotonic() - started > timeout:
                break
        else:
            return None
    except Exception as error:  # a process that raised or died
        return f"failed: {type(error).__name__}: {error}"
    for process in context.processes:
        if process.is_alive() and first_hang:  # the first hang only: the stacks are long
            print(f"  pid {process.pid} alive; native stacks:", flush=True)
            subprocess.run(["gdb", "-p", str(process.pid), "-batch", "-ex", "thread apply all bt 25"])
            os.kill(process.pid, signal.SIGUSR1)
            time.sleep(2)
    for path in sorted(output_dir.glob("stacks_rank*.txt")):
        print(f"--- {path.name}\n{path.read_text()}", flush=True)
    for process in context.processes:
        process.kill()
    return f"HANG after {time.monotonic() - started:.0f} s"


def _spin():
    while True:
        pass


def main():
    if sys.argv[1:2] == ["--exit-worker"]:
        return _exit_worker(sys.argv[2])
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 60
    mode = sys.argv[3] if len(sys.argv) > 3 else "new"
    busy = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(busy)]
    for spinner in spinners:
        spinner.start()
    failures = 0
    for run in range(runs):
        started = time.monotonic()
        if mode in EXIT_MODES:
            problem = _run_exit_scenario(mode, timeout)
        else:
            problem = _run_fixture_scenario(mode, timeout, first_hang=failures == 0)
        failures += problem is not None
        print(f"run {run}: {problem or 'ok'} in {time.monotonic() - started:.1f} s", flush=True)
    print(f"{failures} failed or hung in {runs} runs ({mode}, {busy} busy processes)", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
