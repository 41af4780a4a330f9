"""
A tiny, fully augmented CAV-MAE pretraining run, the same in the test process and in the subprocesses of
test_reliability_training.py (a run killed with SIGKILL, a `torchrun` run with a failing rank).

    python tests/training_run.py DATA_DIR OUTPUT_DIR [--max_steps N] [--save_steps K] [--block_after_save STEP]
        [--fail_on_rank R --fail_at_step S] [--ddp_timeout SECONDS] [--workers W] [--break_clips I,J]
        [--evaluate_broken I]

DATA_DIR is a decoded clip dataset written by `datasets.Dataset.save_to_disk` (so every process reads the same
bytes). `--block_after_save STEP` writes `OUTPUT_DIR/blocked` once checkpoint-STEP is saved and then sleeps, to
be killed; `--fail_on_rank R --fail_at_step S` raises on process R at the start of step S; `--break_clips` points
those rows at a file that does not exist (skipped by the transform); `--evaluate_broken I` evaluates, after
training, on the clips with row I broken. A run that ends normally ends the distributed run as the examples do
([`end_distributed_run`]) and reports on stderr how many gloo threads are left.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config_kwargs  # noqa: E402

from cavmae_hf import CavMaeConfig, CavMaeFeatureExtractor, CavMaeForPreTraining  # noqa: E402
from cavmae_hf.data import AudioVisualTransform  # noqa: E402
from cavmae_hf.distributed import end_distributed_run  # noqa: E402
from cavmae_hf.training import CavMaeTrainer, CavMaeTrainingArguments, streaming_training_set  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

BLOCKED_MARKER = "blocked"
INJECTED_FAILURE = "injected failure for the test"
COLLECTIVE_THREADS_MARKER = "gloo threads left at exit:"


class RecordingTransform(AudioVisualTransform):
    """An [`AudioVisualTransform`] that records the clip ids of every training batch it builds (the data order)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def __call__(self, batch):
        self.batches.append(list(batch["clip_id"]))
        return super().__call__(batch)


def augmented_transform(extractor) -> RecordingTransform:
    """Every training augmentation on: random frame, SpecAugment, mixup (of the inputs) and noise + roll."""
    return RecordingTransform(extractor, training=True, freqm=4, timem=8, mixup=0.5, noise=True)


def build_trainer(clips, output_dir, callbacks=(), streaming_buffer: int | None = None, **overrides) -> CavMaeTrainer:
    """A deterministic tiny pretraining Trainer over `clips` (a decoded clip dataset); with `streaming_buffer`, over
    the clips streamed as a shuffled IterableDataset (`streaming_training_set`) with that shuffle buffer."""
    torch.manual_seed(0)
    extractor = CavMaeFeatureExtractor(max_length=64, num_mel_bins=32, image_size=32)
    model = CavMaeForPreTraining(CavMaeConfig(**tiny_config_kwargs(contrastive_loss_weight=0.1)))
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=3,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        use_cpu=True,
    )
    values.update(overrides)
    args = CavMaeTrainingArguments(**values)
    if streaming_buffer is None:
        train = clips.with_transform(augmented_transform(extractor))
    else:
        train = streaming_training_set(clips, args, augmented_transform(extractor), streaming_buffer)
    return CavMaeTrainer(model=model, args=args, train_dataset=train, callbacks=list(callbacks))


def break_clips(clips, indices, missing_file):
    """`clips` with the rows `indices` pointing at `missing_file` instead of their decoded audio and frames."""
    import datasets

    rows = clips.to_dict()
    for index in indices:
        rows["video"][index], rows["audio"][index], rows["frames"][index] = str(missing_file), None, []
    return datasets.Dataset.from_dict(rows, features=clips.features)


def losses(trainer_or_history) -> dict[int, float]:
    """`{step: loss}` of the training logs of a Trainer (or of a `log_history` list)."""
    history = getattr(getattr(trainer_or_history, "state", None), "log_history", trainer_or_history)
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


class BlockAfterSave(TrainerCallback):
    """Once checkpoint-`step` is saved: write the marker file, then wait to be killed."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)


class FailOnRank(TrainerCallback):
    """Raise on process `rank` at the start of step `step` (the others carry on into their next collective)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        if args.process_index == self.rank and state.global_step == self.step:
            raise RuntimeError(INJECTED_FAILURE)


def main(argv=None) -> int:
    import datasets

    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--block_after_save", type=int, default=None)
    parser.add_argument("--fail_on_rank", type=int, default=None)
    parser.add_argument("--fail_at_step", type=int, default=1)
    parser.add_argument("--ddp_timeout", type=int, default=1800)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--break_clips", default="")
    parser.add_argument("--evaluate_broken", type=int, default=None)
    parser.add_argument("--streaming_buffer", type=int, default=None, help="stream the clips with this shuffle buffer")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    callbacks = []
    if args.block_after_save is not None:
        callbacks.append(BlockAfterSave(args.block_after_save, Path(args.output_dir) / BLOCKED_MARKER))
    if args.fail_on_rank is not None:
        callbacks.append(FailOnRank(args.fail_on_rank, args.fail_at_step))
    clips = datasets.load_from_disk(args.data_dir)
    if args.break_clips:
        indices = [int(index) for index in args.break_clips.split(",")]
        clips = break_clips(clips, indices, Path(args.output_dir) / "missing.mp4")
    trainer = build_trainer(
        clips,
        args.output_dir,
        callbacks,
        streaming_buffer=args.streaming_buffer,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        ddp_timeout=args.ddp_timeout,
        dataloader_num_workers=args.workers,
    )
    print(f"training set: {type(trainer.train_dataset).__name__}", file=sys.stderr, flush=True)
    trainer.train()
    if args.evaluate_broken is not None:
        evaluation = break_clips(clips, [args.evaluate_broken], Path(args.output_dir) / "missing.mp4")
        extractor = CavMaeFeatureExtractor(max_length=64, num_mel_bins=32, image_size=32)
        print(trainer.evaluate(evaluation.with_transform(AudioVisualTransform(extractor))))
    end_distributed_run(trainer)
    print(f"{COLLECTIVE_THREADS_MARKER} {len(gloo_threads())}", file=sys.stderr, flush=True)
    return 0


def gloo_threads() -> list[str]:
    """The names of this process's native gloo threads (Linux names them; none are found without /proc)."""
    names = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [name for name in names if "gloo" in name]


if __name__ == "__main__":
    sys.exit(main())
