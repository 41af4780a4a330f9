"""
Two processes (gloo, CPU, localhost) with DDP give the loss and gradients of one process on the concatenated batch:
the reconstruction losses are per-process means over equal numbers of removed patches, and the contrastive loss
gathers the embeddings of both processes with gradient (`contrastive_negatives="global"`). With `"local"` each
process keeps its own negatives, and the contrastive loss differs.
"""

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import traceback
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as multiprocessing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config_kwargs  # noqa: E402

from cavmae_hf import CavMaeConfig, CavMaeForPreTraining  # noqa: E402

WORLD_SIZE = 2
BATCH_PER_PROCESS = 3
# The 2-process run takes ~4 s on an idle 2-core machine (spawn, imports, gloo start-up, two tiny steps), but the
# start (two interpreters importing torch and Transformers) took over 90 s with other jobs busy on both cores. So the
# start has its own generous limit; once both processes are at the start line, a hang must not cost more than about
# a minute and a half, and must say where every process was:
STARTUP_TIMEOUT_SECONDS = 600  # spawn and imports, until both processes have arrived
COLLECTIVE_TIMEOUT_SECONDS = 60  # gloo rendezvous and collectives raise after this instead of waiting forever
WORKER_TIMEOUT_SECONDS = 75  # each worker then writes its Python stacks and exits (faulthandler, exit=True)
TIMEOUT_SECONDS = 90  # the test gives up on the run and fails with those stacks
TORCHRUN_TIMEOUT_SECONDS = 600  # the same for a whole torchrun job, start included


def make_model(negatives: str) -> CavMaeForPreTraining:
    torch.manual_seed(0)
    config = CavMaeConfig(**tiny_config_kwargs(contrastive_loss_weight=0.5, contrastive_negatives=negatives))
    return CavMaeForPreTraining(config)


def make_batch(config: CavMaeConfig) -> dict[str, torch.Tensor]:
    """The full batch of both processes, with fixed masking noise so that every process masks the same patches."""
    generator = torch.Generator().manual_seed(1)
    size = WORLD_SIZE * BATCH_PER_PROCESS
    return {
        "input_features": torch.randn(size, config.audio_length, config.num_mel_bins, generator=generator),
        "pixel_values": torch.randn(size, 3, config.image_size, config.image_size, generator=generator),
        "audio_noise": torch.rand(size, config.num_audio_patches, generator=generator),
        "visual_noise": torch.rand(size, config.num_visual_patches, generator=generator),
    }


def shard_of(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The part of the full batch that process `rank` trains on."""
    start = rank * BATCH_PER_PROCESS
    return {name: value[start : start + BATCH_PER_PROCESS] for name, value in batch.items()}


def _train_and_save(rank: int, output_dir: str):
    """One DDP step per negatives mode on this process's shard; saves losses and (all-reduced) gradients. Every
    object holding the process group (DDP's C++ reducer) dies with this frame, before the group is destroyed."""
    for negatives in ("global", "local"):
        model = make_model(negatives)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batch = make_batch(model.config)
        shard = shard_of(batch, rank)
        output = ddp(**shard, return_dict=True)
        output.loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        result = {
            "loss": output.loss.detach(),
            "mae_loss": output.mae_loss.detach(),
            "contrastive_loss": output.contrastive_loss.detach(),
            "gradients": gradients,
        }
        torch.save(result, os.path.join(output_dir, f"{negatives}_rank{rank}.pt"))
    return weakref.ref(ddp)


def _arrived(output_dir, rank=None) -> list[Path]:
    """The marks of the processes (or of `rank`) that are imported and at the start line."""
    return sorted(Path(output_dir).glob("arrived_rank*" if rank is None else f"arrived_rank{rank}"))


def _wait_for_peers(rank: int, output_dir: str):
    """Start together: a slow start (imports on a loaded machine) must not use up the rendezvous timeout."""
    Path(output_dir, f"arrived_rank{rank}").touch()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while len(_arrived(output_dir)) < WORLD_SIZE:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other process did not start within {STARTUP_TIMEOUT_SECONDS} s")
        time.sleep(0.05)


def _worker(rank: int, output_dir: str):
    import faulthandler

    torch.set_num_threads(1)
    # if the run hangs, every process writes where it is stuck and exits, shortly before the test gives up
    stacks = open(os.path.join(output_dir, f"stacks_rank{rank}.txt"), "w")  # noqa: SIM115 - open until exit
    try:
        _wait_for_peers(rank, output_dir)
        faulthandler.dump_traceback_later(WORKER_TIMEOUT_SECONDS, exit=True, file=stacks)
        # a file rendezvous in a fresh directory: no port to pick, so no race with other processes taking it
        init_method = f"file://{os.path.join(output_dir, 'rendezvous')}"
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS)
        torch.distributed.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE, timeout=timeout
        )
        ddp = _train_and_save(rank, output_dir)
        gc.collect()
        if ddp() is not None:
            raise RuntimeError("the DistributedDataParallel wrapper outlived the run")
    except BaseException:
        # no teardown after a failure: the other process may be inside a collective, and destructors may block
        Path(output_dir, f"error_rank{rank}.txt").write_text(traceback.format_exc())
        stacks.flush()
        os._exit(1)
    # Only now, with no DDP reducer left, destroy the group. The order matters: gloo's destructor joins its worker
    # threads, and the last of them may still hold the last reference to a backward all-reduce, whose captured
    # thread-local state holds a Python object (torch stashes a contextvars.Context there during backward). When
    # DDP's reducer dropped the last reference to the group, that destructor ran with the GIL held and the worker
    # thread waited for the GIL forever (1 run in ~6-8 hung so). The group's Python object releases the GIL first.
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict[str, list[dict]]:
    """Both negatives modes, run once by 2 spawned processes: `{"global": [rank 0, rank 1], "local": [...]}`."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    output_dir = tmp_path_factory.mktemp("ddp")
    context = multiprocessing.start_processes(
        _worker, args=(str(output_dir),), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline, started = time.monotonic() + STARTUP_TIMEOUT_SECONDS, False
    try:
        while not context.join(timeout=1, grace_period=5):
            if not started and len(_arrived(output_dir)) == WORLD_SIZE:  # the run's own limit starts now
                deadline, started = min(deadline, time.monotonic() + TIMEOUT_SECONDS), True
            if time.monotonic() > deadline:
                limit = f"{TIMEOUT_SECONDS} s after both started" if started else f"{STARTUP_TIMEOUT_SECONDS} s"
                raise TimeoutError(f"the 2-process run did not finish within {limit}")
    except Exception as error:  # a hang, or a process that failed (its traceback is in its error file)
        for process in context.processes:
            if process.is_alive():
                process.kill()
        reports = [
            f"--- {path.name}:\n{path.read_text()[-3000:]}"
            for pattern in ("error_rank*.txt", "stacks_rank*.txt")
            for path in sorted(output_dir.glob(pattern))
            if path.stat().st_size
        ]
        pytest.fail(f"{error}; where the processes were:\n" + "\n".join(reports or ["(no report written)"]))
    return {
        negatives: [torch.load(output_dir / f"{negatives}_rank{rank}.pt") for rank in range(WORLD_SIZE)]
        for negatives in ("global", "local")
    }


def single_process_reference(negatives: str) -> tuple[object, dict[str, torch.Tensor]]:
    model = make_model(negatives)
    output = model(**make_batch(model.config), return_dict=True)
    output.loss.backward()
    return output, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_two_processes_match_one_process_on_the_concatenated_batch(two_process_results):
    results = two_process_results["global"]
    reference, reference_gradients = single_process_reference("global")

    # every process computes the global contrastive loss; the MAE losses average to the full batch's
    for result in results:
        torch.testing.assert_close(result["contrastive_loss"], reference.contrastive_loss, rtol=1e-5, atol=1e-6)
    mean_loss = sum(result["loss"] for result in results) / WORLD_SIZE
    torch.testing.assert_close(mean_loss, reference.loss, rtol=1e-5, atol=1e-6)
    mean_mae = sum(result["mae_loss"] for result in results) / WORLD_SIZE
    torch.testing.assert_close(mean_mae, reference.mae_loss, rtol=1e-5, atol=1e-6)

    # DDP all-reduces (averages) gradients: both processes hold the single-process gradient
    assert results[0]["gradients"].keys() == reference_gradients.keys()
    for result in results:
        for name, gradient in reference_gradients.items():
            torch.testing.assert_close(result["gradients"][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_local_negatives_keep_per_process_contrastive_losses(two_process_results):
    results = two_process_results["local"]
    reference, _ = single_process_reference("local")  # one process: all clips are negatives of each other
    model = make_model("local")
    batch = make_batch(model.config)
    for rank, result in enumerate(results):
        shard = shard_of(batch, rank)
        with torch.no_grad():
            alone = model(**shard, return_dict=True)
        torch.testing.assert_close(result["contrastive_loss"], alone.contrastive_loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results[0]["contrastive_loss"], reference.contrastive_loss)


def test_example_pretraining_script_runs_unchanged_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 examples/pretrain.py ...` (gloo on CPU): both processes train and log."""
    import shutil

    from cavmae_hf.synthetic import write_synthetic_videos

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    videos = write_synthetic_videos(tmp_path / "videos", num_classes=2, clips_per_class=4, duration=0.7, image_size=32)
    overrides = ",".join(
        f"{name}={value}"
        for name, value in tiny_config_kwargs().items()
        if name not in ("image_size", "num_mel_bins", "audio_length")
    )
    command = [
        torchrun, "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        str(Path(__file__).resolve().parents[1] / "examples" / "pretrain.py"),
        "--train_data", str(videos), "--output_dir", str(tmp_path / "out"), "--config_overrides", overrides,
        "--audio_length", "64", "--num_mel_bins", "32", "--image_size", "32", "--decode_once",
        "--per_device_train_batch_size", "2", "--num_train_epochs", "1", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--use_cpu", "true",
        "--save_strategy", "no",
    ]  # fmt: skip
    # PYTHONFAULTHANDLER: on a hang, SIGABRT makes torchrun and both workers write their Python stacks to stderr
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=TORCHRUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        for stop in (signal.SIGABRT, signal.SIGKILL):  # the whole session: torchrun and its workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, stop)
            time.sleep(2)
        _, stderr = process.communicate()
        message = f"torchrun did not finish within {TORCHRUN_TIMEOUT_SECONDS} s; its stderr, with the stacks:"
        pytest.fail(f"{message}\n{stderr[-6000:]}")
    assert process.returncode == 0, stderr[-3000:]
    # 8 clips, 2 per process and step, 2 processes: 2 optimizer steps, each logged with its loss components
    state = (tmp_path / "out" / "trainer_state.json").read_text()
    assert state.count('"contrastive_accuracy"') == 2 and '"global_step": 2' in state
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_end_distributed_run_releases_the_ddp_wrapper_then_joins_the_gloo_threads(tmp_path, caplog):
    """The group is destroyed only once the trainer's DDP wrapper is gone (its reducer holds the group); then no gloo
    thread is left to take the GIL while the interpreter shuts down (see cavmae_hf.distributed)."""
    from types import SimpleNamespace

    from training_run import gloo_threads

    from cavmae_hf.distributed import end_distributed_run

    assert end_distributed_run() is False  # outside torch.distributed: nothing to do
    init_method = f"file://{tmp_path / 'rendezvous'}"
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(2, 2)
        prepared = [torch.nn.parallel.DistributedDataParallel(model)]
        accelerator = SimpleNamespace(free_memory=prepared.clear)  # as accelerate's: drops the prepared objects
        trainer = SimpleNamespace(model=model, model_wrapped=prepared[0], accelerator=accelerator)
        kept = trainer.model_wrapped  # a reference the function cannot drop
        assert gloo_threads()
        assert end_distributed_run(trainer) is False
        assert torch.distributed.is_initialized() and "still referenced outside the trainer" in caplog.text
        trainer.model_wrapped = kept  # wrapped and prepared again, now referenced by the trainer alone
        prepared.append(kept)
        del kept
        assert end_distributed_run(trainer) is True
        assert trainer.model_wrapped is model and not prepared
        assert not torch.distributed.is_initialized() and gloo_threads() == []
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
