"""
Two processes (gloo, CPU, localhost) with DDP give the loss and gradients of one process on the concatenated batch:
the reconstruction losses are per-process means over equal numbers of removed patches, and the contrastive loss
gathers the embeddings of both processes with gradient (`contrastive_negatives="global"`). With `"local"` each
process keeps its own negatives, and the contrastive loss differs.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as multiprocessing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config_kwargs  # noqa: E402

from cavmae_hf import CavMaeConfig, CavMaeForPreTraining  # noqa: E402

WORLD_SIZE = 2
BATCH_PER_PROCESS = 3
TIMEOUT_SECONDS = 420  # generous: on a loaded 2-core machine the spawn + gloo start-up alone can take minutes


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


def _worker(rank: int, output_dir: str):
    import faulthandler

    torch.set_num_threads(1)
    # if the run hangs, every process writes where it is stuck shortly before the test gives up
    stacks = open(os.path.join(output_dir, f"stacks_rank{rank}.txt"), "w")  # noqa: SIM115 - open until exit
    faulthandler.dump_traceback_later(TIMEOUT_SECONDS - 15, file=stacks)
    # a file rendezvous: no port to pick, so no race with other processes taking it meanwhile
    init_method = f"file://{os.path.join(output_dir, 'rendezvous')}"
    torch.distributed.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
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
    finally:
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
    waited = 0
    while not context.join(timeout=1):
        waited += 1
        if waited >= TIMEOUT_SECONDS:
            for process in context.processes:
                process.terminate()
            stacks = "\n".join(path.read_text()[-2000:] for path in sorted(output_dir.glob("stacks_rank*.txt")))
            pytest.fail(f"the 2-process run did not finish within {TIMEOUT_SECONDS} s; where it was:\n{stacks}")
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
    import subprocess

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
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # 8 clips, 2 per process and step, 2 processes: 2 optimizer steps, each logged with its loss components
    state = (tmp_path / "out" / "trainer_state.json").read_text()
    assert state.count('"contrastive_accuracy"') == 2 and '"global_step": 2' in state
    assert (tmp_path / "out" / "model.safetensors").is_file()
