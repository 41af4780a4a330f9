"""
Training CAV-MAE with the Hugging Face `Trainer`, the way the reference recipes train it.

- [`CavMaeTrainingArguments`]: `TrainingArguments` plus the reference's knobs: `head_lr` (learning-rate ratio
  of the new classification head), `freeze_base` (linear probing), the step schedule (`lr_schedule=
  "reference_step"`: the learning rate is multiplied by `lr_decay` every `lr_decay_every` epochs from epoch
  `lr_decay_start`), the reference optimizer (Adam, betas (0.95, 0.999), L2 weight decay 5e-7 on every parameter),
  balanced sampling, and checkpoint weight averaging over a range of epochs (`weight_averaging`, `wa_start`,
  `wa_end`). Defaults that differ from `TrainingArguments`: `remove_unused_columns=False` (the transforms need the
  raw columns), `adam_beta1=0.95`, `weight_decay=5e-7`.
- Callbacks that work with any `Trainer` (`callbacks=[...]`): [`SkippedClipsCallback`] (clips that failed to load,
  summed over processes: `skipped_clips` in the training logs, `eval_skipped_clips` in evaluation),
  [`AugmentationEpochCallback`] (seeds the training augmentation and tells it the epoch, so that resuming repeats
  it), [`WeightAveragingCallback`] and [`average_checkpoints`] (the reference's `wa`, the mean of the weights at
  the end of epochs `wa_start..wa_end`, kept in memory during training and saved with each checkpoint so that
  resuming continues it, or of saved checkpoints afterwards).
- [`CavMaeTrainer`]: a `Trainer` that adds those callbacks, logs every loss component of pretraining (`mae_loss`,
  `audio_mae_loss`, `visual_mae_loss`, `contrastive_loss`, `contrastive_accuracy`) in training and evaluation,
  evaluates pretraining models on their loss, and builds the optimizer and schedule above, through the Trainer's
  public extension points (one private hook, the training sampler, says why). It runs unchanged under `torchrun`
  or `accelerate launch` (DDP); the contrastive loss then takes its negatives from the whole global batch unless
  `config.contrastive_negatives="local"`.
- Argument dataclasses shared by `examples/pretrain.py` and `examples/finetune.py`, dataset loading by path, and
  retrieval evaluation ([`evaluate_retrieval`]).

Faults: clips that fail to load are skipped, logged and counted ([`SkippedClipsCallback`]) or stop the run, as
`DataArguments.on_error` says; a run resumed from a checkpoint
repeats the data order, augmentation and masking of the uninterrupted run (the augmentation is seeded per batch, see
[`AudioVisualTransform`]); `--resume_from_checkpoint last` takes the newest *complete* checkpoint (a run killed while
writing one leaves it half-written); the final `save_model` writes into a staging folder and moves the files into
place, so a failure never leaves a half-written model; and under `torchrun` a failing process names its rank.
"""

import json
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, WeightedRandomSampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
from transformers.utils import logging

from .configuration_cav_mae import CavMaeConfig, CavMaeConfigError, CavMaeError
from .data import (
    DEFAULT_NUM_FRAMES,
    ON_ERROR_CHOICES,
    SKIPPED_CLIPS,
    AudioVisualDataCollator,
    AudioVisualTransform,
    CavMaeDataError,
    LabelSet,
    attached_transforms,
    balanced_sample_weights,
    dataset_from_csv,
    dataset_from_folder,
    dataset_from_reference_json,
    read_label_csv,
    with_transform,
)
from .metrics import retrieval_metrics
from .pipelines import CheckpointLoadError

logger = logging.get_logger(__name__)

LOSS_COMPONENTS = ("mae_loss", "audio_mae_loss", "visual_mae_loss", "contrastive_loss", "contrastive_accuracy")
HEAD_PREFIX = "classifier."
WEIGHT_AVERAGE_FILE = "weight_average.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
WEIGHTS_PATTERN = re.compile(r"^(pytorch_)?model(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
DECODE_ON_ERROR = {"raise": "raise", "skip": "skip", "stand_in": "keep"}
DISTRIBUTED_EVALUATION_SKIP = (
    "it cannot be skipped in distributed evaluation, which gathers equal batches from every process. Remove "
    "broken clips from the evaluation set first: decode_clips(eval_set, on_error='skip') (--decode_once) drops them"
)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CavMaeTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the CAV-MAE reference's optimisation options (see the module docstring)."""

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the raw columns: the on-the-fly transforms decode them."}
    )
    adam_beta1: float = field(default=0.95, metadata={"help": "Adam beta1 (reference: 0.95)."})
    weight_decay: float = field(default=5e-7, metadata={"help": "Weight decay (reference: 5e-7)."})
    reference_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Use torch.optim.Adam with L2 weight decay on every parameter, as the reference; otherwise the "
            "optimizer named by --optim (decoupled decay, none on biases and LayerNorms)."
        },
    )
    head_lr: float = field(
        default=1.0,
        metadata={
            "help": "Learning-rate multiplier of the new classification head (reference: 100 on AudioSet-20K, 50 on "
            "AudioSet-2M, 10 on VGGSound)."
        },
    )
    freeze_base: bool = field(
        default=False, metadata={"help": "Train only the classification head (linear probing)."}
    )
    lr_schedule: str = field(
        default="reference_step",
        metadata={
            "help": "'reference_step': multiply the learning rate by lr_decay every lr_decay_every epochs from "
            "epoch lr_decay_start (after warmup_steps/warmup_ratio, if any); 'transformers': use lr_scheduler_type.",
            "choices": ["reference_step", "transformers"],
        },
    )
    lr_decay_start: int = field(
        default=10, metadata={"help": "Epoch after which the first decay applies (reference lrscheduler_start)."}
    )
    lr_decay_every: int = field(default=5, metadata={"help": "Epochs between decays (reference lrscheduler_step)."})
    lr_decay: float = field(default=0.5, metadata={"help": "Decay factor (reference lrscheduler_decay)."})
    steps_per_epoch: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps per epoch when the training set has no length (streaming): the Trainer's epochs "
            "(reshuffling, resuming) and the step schedule. --streaming sets it from the number of clips."
        },
    )
    balanced_sampling: bool = field(
        default=False, metadata={"help": "Sample clips with class-balancing weights (reference --bal bal)."}
    )
    weight_averaging: bool = field(
        default=False, metadata={"help": "Average the weights at the end of epochs wa_start..wa_end (reference wa)."}
    )
    wa_start: int = field(default=1, metadata={"help": "First epoch (1-based) of the weight average."})
    wa_end: int = field(default=10, metadata={"help": "Last epoch (inclusive) of the weight average."})

    def __post_init__(self):
        super().__post_init__()
        if self.lr_schedule not in ("reference_step", "transformers"):
            raise CavMaeConfigError(f"lr_schedule must be 'reference_step' or 'transformers', got {self.lr_schedule!r}.")
        if self.lr_decay_every < 1:
            raise CavMaeConfigError(f"lr_decay_every must be at least 1, got {self.lr_decay_every}.")
        if self.weight_averaging and not 1 <= self.wa_start <= self.wa_end:
            raise CavMaeConfigError(f"Need 1 <= wa_start <= wa_end, got {self.wa_start} and {self.wa_end}.")


@dataclass
class DataArguments:
    """Where the clips are and how they become model inputs (shared by the example scripts)."""

    train_data: str = field(
        metadata={"help": "Training clips: a folder of videos (class sub-folders), a CSV (video,labels) or a "
        "reference data JSON."}
    )
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation clips, in any of the same layouts."})
    label_csv: str | None = field(default=None, metadata={"help": "Label CSV index,mid,display_name."})
    audio_length: int | None = field(
        default=None,
        metadata={"help": "Fbank frames per clip (reference target_length). Default: the model's (its saved feature "
        "extractor, else its config; 1024 for a new model)."},
    )
    num_mel_bins: int | None = field(default=None, metadata={"help": "Mel bins. Default: the model's."})
    image_size: int | None = field(default=None, metadata={"help": "Side of the square frames. Default: the model's."})
    dataset_mean: float | None = field(
        default=None,
        metadata={"help": "Fbank normalisation mean. Default: the saved feature extractor's, else AudioSet's -5.081."},
    )
    dataset_std: float | None = field(
        default=None, metadata={"help": "Fbank normalisation std. Default: the saved extractor's, else 4.4849."}
    )
    num_frames: int = field(default=DEFAULT_NUM_FRAMES, metadata={"help": "Frames per clip to choose from."})
    noise: bool = field(default=True, metadata={"help": "Noise + time-roll augmentation in training."})
    decode_once: bool = field(
        default=False,
        metadata={"help": "Decode every video once before training into what the reference's extraction scripts "
        "wrote (16-bit WAV, 224-pixel JPEG frames): faster epochs, the same model inputs."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for decode_once."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Iterate the training set as an IterableDataset (no random access): shuffled through a buffer, "
            "reshuffled every epoch; an epoch is --steps_per_epoch optimizer steps (default: as many full global "
            "batches as the set holds) and --max_steps defaults to num_train_epochs of them."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "With --streaming: clips in the shuffle buffer (1: no shuffling)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training clips."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation clips."})
    on_error: str = field(
        default="skip",
        metadata={
            "help": "A clip that fails to load (missing, truncated, corrupt, no audio track): 'skip' it with a "
            "warning naming it (counted in the logs as skipped_clips), 'raise' an error naming it, or 'stand_in' "
            "(the reference's constant stand-in, only to reproduce it). With --decode_once, 'skip' drops broken "
            "clips while decoding.",
            "choices": list(ON_ERROR_CHOICES),
        },
    )
    max_skipped: int | None = field(
        default=None, metadata={"help": "Stop with an error once more clips than this failed to load."}
    )
    max_skipped_fraction: float | None = field(
        default=0.5,
        metadata={"help": "Stop with an error once more than this share of the clips seen failed to load."},
    )
    restrict_data_paths: bool = field(
        default=False,
        metadata={
            "help": "Refuse data files whose paths (video, wav, frame folders) resolve, after '..' and symlinks, "
            "outside the folder of the data file (or --allowed_data_root)."
        },
    )
    allowed_data_root: str | None = field(
        default=None,
        metadata={"help": "Refuse any referenced file that resolves outside this folder (implies the check)."},
    )

    def __post_init__(self):
        if self.on_error not in ON_ERROR_CHOICES:
            raise CavMaeDataError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {self.on_error!r}.")

    def input_sizes(self) -> dict:
        """The model input sizes given on the command line (`audio_length`, `num_mel_bins`, `image_size`), as
        config fields; the others are left to the model."""
        sizes = {"audio_length": self.audio_length, "num_mel_bins": self.num_mel_bins, "image_size": self.image_size}
        return {name: value for name, value in sizes.items() if value is not None}

    def feature_extractor_overrides(self) -> dict:
        """The feature extractor fields given on the command line, as `CavMaeFeatureExtractor` arguments."""
        given = {
            "max_length": self.audio_length,
            "num_mel_bins": self.num_mel_bins,
            "image_size": self.image_size,
            "audio_mean": self.dataset_mean,
            "audio_std": self.dataset_std,
        }
        return {name: value for name, value in given.items() if value is not None}

    @property
    def allowed_root(self):
        """The `allowed_root` of the dataset builders: a folder, True (each data file's own folder) or None."""
        return self.allowed_data_root or (True if self.restrict_data_paths else None)


def transform_options(data_args: DataArguments) -> dict:
    """The [`AudioVisualTransform`] options of `data_args` (`on_error`, `max_skipped`, `max_skipped_fraction`), for
    `pretraining_transforms(..., **transform_options(data_args))` and `finetuning_transforms`."""
    return {
        "on_error": data_args.on_error,
        "max_skipped": data_args.max_skipped,
        "max_skipped_fraction": data_args.max_skipped_fraction,
    }


# ----------------------------------------------------------------------------------------------------------------
# Datasets by path
# ----------------------------------------------------------------------------------------------------------------
def load_clip_dataset(
    path,
    label_csv=None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    label_set: LabelSet | None = None,
    allowed_root=None,
    max_samples: int | None = None,
):
    """A clip dataset from a folder of videos, a CSV of videos (`.csv`) or a reference data file (`.json`).
    `allowed_root` (a folder, or True for the data file's own folder) refuses paths that resolve outside it;
    `max_samples` keeps only the first clips."""
    path = Path(path)
    if label_set is None and label_csv is not None:
        label_set = read_label_csv(label_csv)
    if path.is_dir():
        clips = dataset_from_folder(path, label_set=label_set, allowed_root=allowed_root)
    elif path.suffix.lower() == ".csv":
        clips = dataset_from_csv(path, label_set=label_set, allowed_root=allowed_root)
    elif path.suffix.lower() == ".json":
        clips = dataset_from_reference_json(
            path, label_csv=label_csv, num_frames=num_frames, allowed_root=allowed_root
        )
    else:
        raise CavMaeDataError(f"{path}: expected a folder of videos, a .csv or a reference .json data file.")
    if max_samples is not None:
        clips = clips.select(range(min(max_samples, len(clips))))
    return clips


def load_train_and_eval_datasets(data_args: DataArguments, training_args: TrainingArguments):
    """The (train, eval) clip datasets of the example scripts: loaded by path, cut to `max_*_samples` and decoded once
    with `decode_once` (on the main process first, the others then read the cache). `eval` is None without
    `eval_data`. (With `--streaming`, [`streaming_training_set`] then streams the training set.)"""
    from .data import decode_clips

    def load(path, max_samples):
        return load_clip_dataset(
            path, data_args.label_csv, data_args.num_frames, allowed_root=data_args.allowed_root, max_samples=max_samples
        )

    train = load(data_args.train_data, data_args.max_train_samples)
    evaluation = load(data_args.eval_data, data_args.max_eval_samples) if data_args.eval_data else None
    if data_args.decode_once:
        with training_args.main_process_first(desc="decoding clips"):
            options = {
                "num_proc": data_args.preprocessing_num_workers,
                "on_error": DECODE_ON_ERROR[data_args.on_error],
                "max_skipped": data_args.max_skipped,
                "max_skipped_fraction": data_args.max_skipped_fraction,
            }
            train = decode_clips(train, data_args.num_frames, **options)
            if evaluation is not None:
                evaluation = decode_clips(evaluation, data_args.num_frames, desc="Decoding eval", **options)
    return train, evaluation


def streaming_training_set(
    clips, training_args: TrainingArguments, transform: AudioVisualTransform, shuffle_buffer_size: int = 1000
):
    """
    `clips` (a map-style clip dataset) streamed for training: a `datasets.IterableDataset` with one shard per
    DataLoader worker and a shuffle buffer seeded by `data_seed` (or `seed`) and reshuffled every epoch, decoded by
    `transform` (a [`TransformedStream`]). Its length is one epoch: `steps_per_epoch` full global batches (when not
    given: as many as `clips` holds), which is how the Trainer counts epochs, reshuffles and resumes as with a
    map-style set; `max_steps` defaults to `num_train_epochs` epochs.
    """
    if shuffle_buffer_size < 1:
        raise CavMaeDataError(f"shuffle_buffer_size must be at least 1, got {shuffle_buffer_size}.")
    global_batch = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    if getattr(training_args, "steps_per_epoch", None) is None:
        if len(clips) < global_batch:
            raise CavMaeDataError(
                f"{len(clips)} training clips do not fill one global batch of {global_batch} (per-device batch x "
                "processes x gradient accumulation): nothing to stream."
            )
        training_args.steps_per_epoch = len(clips) // global_batch  # full batches only: every epoch alike
    if training_args.max_steps is None or training_args.max_steps <= 0:
        training_args.max_steps = math.ceil(training_args.num_train_epochs * training_args.steps_per_epoch)
    stream = clips.to_iterable_dataset(num_shards=max(1, training_args.dataloader_num_workers))
    if shuffle_buffer_size > 1:
        seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    num_examples = training_args.steps_per_epoch * global_batch
    return with_transform(stream, transform, training_args.per_device_train_batch_size, num_examples=num_examples)


def feature_extractor_for_model(model_name_or_path, config: CavMaeConfig, data_args: DataArguments | None = None):
    """
    The feature extractor of a training script: the one saved with the starting checkpoint (its
    `preprocessor_config.json`), else one that fits `config`; the fields given in `data_args` (`--audio_length`,
    `--num_mel_bins`, `--image_size`, `--dataset_mean`, `--dataset_std`) override it. Raises when the result does
    not fit the model's input sizes.
    """
    from .feature_extraction_cav_mae import CavMaeFeatureExtractor
    from .pipelines import load_feature_extractor

    if model_name_or_path and Path(model_name_or_path).is_dir():
        extractor = load_feature_extractor(model_name_or_path, config)
    else:
        extractor = CavMaeFeatureExtractor.from_model_config(config)
    for name, value in (data_args.feature_extractor_overrides() if data_args is not None else {}).items():
        setattr(extractor, name, value)
    data_config_consistent(config, extractor.max_length, extractor.num_mel_bins, extractor.image_size)
    return extractor


def is_complete_checkpoint(folder) -> bool:
    """Whether a Trainer checkpoint folder was written to the end: it holds model weights and a readable
    `trainer_state.json` (the Trainer writes that last; a run killed while saving leaves a folder without it)."""
    folder = Path(folder)
    try:
        json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(WEIGHTS_PATTERN.match(path.name) for path in folder.iterdir())


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest complete checkpoint (see [`is_complete_checkpoint`]) in `output_dir`, or None; newer incomplete
    ones (a run killed while writing them) are named in a warning and left alone."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(path.name))]
    for _, path in sorted(found, key=lambda item: item[0], reverse=True):
        if path.is_dir() and is_complete_checkpoint(path):
            return str(path)
        logger.warning(f"{path} is incomplete (the run was probably stopped while writing it); skipping it.")
    return None


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint PATH`, or `last` for the newest complete checkpoint in `output_dir`."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint in ("last", "true", "True"):
        checkpoint = last_complete_checkpoint(training_args.output_dir)
        if checkpoint is None:
            raise CavMaeError(f"--resume_from_checkpoint last: no complete checkpoint in {training_args.output_dir}.")
    elif checkpoint is not None and not is_complete_checkpoint(checkpoint):
        raise CavMaeError(
            f"--resume_from_checkpoint {checkpoint}: not a complete Trainer checkpoint (it needs model weights and a "
            "readable trainer_state.json; a run stopped while saving leaves them out). Use an older one, or `last`."
        )
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------------------------
def reference_step_multiplier(
    step: int, steps_per_epoch: int, decay_start: int, decay_every: int, decay: float, warmup_steps: int = 0
) -> float:
    """
    The reference's `MultiStepLR(milestones=range(decay_start, 1000, decay_every), gamma=decay)` stepped once per
    epoch, per optimizer step: after `e` completed epochs the factor is `decay ** n` with `n` the milestones
    `<= e`. A linear warmup over `warmup_steps` (Transformers' convention: from 0) multiplies it.
    """
    completed_epochs = step // max(steps_per_epoch, 1)
    decays = 0 if completed_epochs < decay_start else (completed_epochs - decay_start) // decay_every + 1
    warmup = step / warmup_steps if step < warmup_steps else 1.0
    return warmup * decay**decays


def reference_step_schedule(optimizer, steps_per_epoch, decay_start, decay_every, decay, warmup_steps=0):
    """A `LambdaLR` applying [`reference_step_multiplier`] to every parameter group's own learning rate."""

    def multiplier(step: int) -> float:
        return reference_step_multiplier(step, steps_per_epoch, decay_start, decay_every, decay, warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# ----------------------------------------------------------------------------------------------------------------
# Model preparation
# ----------------------------------------------------------------------------------------------------------------
def is_head_parameter(name: str) -> bool:
    """Whether a parameter belongs to the classification head (new at fine-tuning: `head_lr`, never frozen)."""
    return name.startswith(HEAD_PREFIX) or f".{HEAD_PREFIX}" in name


def freeze_backbone(model: torch.nn.Module) -> int:
    """Stop gradients to everything but the classification head (linear probing). Returns the trainable count."""
    trainable = 0
    for name, parameter in model.named_parameters():
        keep = is_head_parameter(name)
        parameter.requires_grad_(keep)
        trainable += parameter.numel() if keep else 0
    if trainable == 0:
        raise CavMaeConfigError("freeze_base: the model has no classification head to train.")
    return trainable


def is_pretraining_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "decoder") and hasattr(model, "cav_mae")


# ----------------------------------------------------------------------------------------------------------------
# Weight averaging
# ----------------------------------------------------------------------------------------------------------------
def _floating_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {name: tensor.detach().float().cpu() for name, tensor in state.items() if tensor.is_floating_point()}


class WeightAveragingCallback(TrainerCallback):
    """
    The reference's weight averaging (`--wa True --wa_start S --wa_end E`): the mean of the model's weights at the
    end of epochs S..E (1-based, inclusive), loaded into the model when training ends (`apply_at_end`). The running
    sum is kept on the CPU and written into every checkpoint (`weight_average.safetensors`) before the Trainer
    writes it (so that `trainer_state.json`, written last, marks a checkpoint that holds the average too). A resumed
    run continues the average of `output_dir/checkpoint-<step>` (the checkpoint of the step it resumes from), or of
    the checkpoint given to [`load_from_checkpoint`] before `train()` ([`CavMaeTrainer`] does that). Works with any
    `Trainer`: `callbacks=[WeightAveragingCallback(3, 15)]`.
    """

    def __init__(self, start_epoch: int = 1, end_epoch: int = 10, apply_at_end: bool = True):
        if not 1 <= start_epoch <= end_epoch:
            raise CavMaeConfigError(f"Need 1 <= start_epoch <= end_epoch, got {start_epoch} and {end_epoch}.")
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.apply_at_end = apply_at_end
        self.sums: dict[str, torch.Tensor] = {}
        self.epochs: list[int] = []
        self._restored = False

    @property
    def count(self) -> int:
        return len(self.epochs)

    def average(self) -> dict[str, torch.Tensor]:
        """The averaged floating-point weights (empty before the first epoch in range)."""
        return {name: total / self.count for name, total in self.sums.items()}

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._restored:
            self.sums, self.epochs = {}, []
            if state.global_step > 0:  # resumed: the checkpoint of this step, where the Trainer saves them
                self.load_from_checkpoint(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._restored = False

    def on_step_end(self, args, state, control, **kwargs):
        self._save_if_saving(args, state, control)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = int(round(state.epoch or 0))
        if model is not None and self.start_epoch <= epoch <= self.end_epoch and epoch not in self.epochs:
            for name, tensor in _floating_state(model).items():
                self.sums[name] = self.sums[name] + tensor if name in self.sums else tensor.clone()
            self.epochs.append(epoch)
        self._save_if_saving(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        # a save decided after these events (save_strategy="best") gets the average after its trainer_state.json
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and folder.is_dir() and not (folder / WEIGHT_AVERAGE_FILE).is_file():
            self.save_to_checkpoint(folder)

    def _save_if_saving(self, args, state, control) -> None:
        """The Trainer saves a checkpoint right after the event that set `control.should_save` (its flow callback
        runs first): write the average into that checkpoint's folder now."""
        if control.should_save and args.should_save:
            self.save_to_checkpoint(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def save_to_checkpoint(self, folder) -> None:
        """Write the running sum into the checkpoint `folder` (created if needed), under a temporary name first."""
        if not self.sums:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{WEIGHT_AVERAGE_FILE}.partial"
        tensors = {name: tensor.contiguous() for name, tensor in self.sums.items()}
        save_file(tensors, partial, metadata={"epochs": json.dumps(self.epochs)})
        os.replace(partial, folder / WEIGHT_AVERAGE_FILE)

    def load_from_checkpoint(self, checkpoint) -> bool:
        """Continue the running sum saved in `checkpoint`; returns whether there was one."""
        path = Path(checkpoint) / WEIGHT_AVERAGE_FILE
        if not path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            self.epochs = json.loads(handle.metadata()["epochs"])
        self.sums = load_file(str(path))
        self._restored = True
        return True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.apply_at_end or model is None:
            return
        if not self.epochs:
            logger.warning(
                f"Weight averaging: no epoch in {self.start_epoch}..{self.end_epoch} was completed; weights unchanged."
            )
            return
        missing = [e for e in range(self.start_epoch, self.end_epoch + 1) if e not in self.epochs]
        if missing:
            logger.warning(f"Weight averaging: epochs {missing} were not reached; averaging epochs {self.epochs}.")
        self.load_average_into(model)
        logger.info(f"Loaded the average of the weights of epochs {self.epochs}.")

    def load_average_into(self, model: torch.nn.Module):
        state = model.state_dict()
        averaged = {name: value.to(state[name].device, state[name].dtype) for name, value in self.average().items()}
        model.load_state_dict(averaged, strict=False)


def checkpoint_epochs(output_dir) -> dict[int, Path]:
    """`{epoch: checkpoint folder}` of the Trainer checkpoints in `output_dir` saved at the end of an epoch
    (read from each checkpoint's `trainer_state.json`)."""
    found = {}
    for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        state_file = folder / "trainer_state.json"
        if not state_file.is_file():
            continue
        epoch = json.loads(state_file.read_text()).get("epoch")
        if epoch is not None and abs(epoch - round(epoch)) < 1e-6:
            found[int(round(epoch))] = folder
    return dict(sorted(found.items()))


def average_checkpoints(checkpoints) -> dict[str, torch.Tensor]:
    """
    The element-wise mean of the floating-point weights saved in `checkpoints` (folders holding
    `model.safetensors`, e.g. Trainer checkpoints or `save_pretrained` outputs); non-floating tensors are taken
    from the first. Load it with `model.load_state_dict(average, strict=False)`.
    """
    checkpoints = [Path(path) for path in checkpoints]
    if not checkpoints:
        raise CavMaeConfigError("average_checkpoints needs at least one checkpoint.")
    total = None
    for folder in checkpoints:
        weights = load_file(str(folder / "model.safetensors"))
        if total is None:
            total = {name: t.double() if t.is_floating_point() else t for name, t in weights.items()}
            dtypes = {name: tensor.dtype for name, tensor in weights.items()}
            continue
        if weights.keys() != total.keys():
            raise CheckpointLoadError(f"{folder} holds other weights than {checkpoints[0]}.")
        for name, tensor in weights.items():
            if tensor.is_floating_point():
                total[name] += tensor.double()
    return {
        name: (tensor / len(checkpoints)).to(dtypes[name]) if tensor.is_floating_point() else tensor
        for name, tensor in total.items()
    }


def average_epoch_checkpoints(output_dir, start_epoch: int, end_epoch: int) -> dict[str, torch.Tensor]:
    """[`average_checkpoints`] over the end-of-epoch checkpoints of epochs `start_epoch..end_epoch` (inclusive)."""
    by_epoch = checkpoint_epochs(output_dir)
    wanted = list(range(start_epoch, end_epoch + 1))
    missing = [epoch for epoch in wanted if epoch not in by_epoch]
    if missing:
        raise CheckpointLoadError(
            f"No end-of-epoch checkpoint for epochs {missing} in {output_dir} (save_strategy='epoch' and a "
            "save_total_limit that keeps them are needed)."
        )
    return average_checkpoints([by_epoch[epoch] for epoch in wanted])


# ----------------------------------------------------------------------------------------------------------------
# Sampling, augmentation seeds
# ----------------------------------------------------------------------------------------------------------------
class EpochSeededWeightedSampler(WeightedRandomSampler):
    """
    `WeightedRandomSampler` (with replacement) whose draws for epoch `e` depend only on `seed + e` once
    `set_epoch(e)` is called (the Trainer does, before every epoch), so that a resumed run draws the same clips as
    the uninterrupted one. Without `set_epoch`, every iteration continues the generator.
    """

    def __init__(self, weights, num_samples: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        super().__init__(torch.as_tensor(weights, dtype=torch.double), num_samples, True, generator)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))


def data_seed(args: TrainingArguments) -> int:
    return args.data_seed if args.data_seed is not None else args.seed


class AugmentationEpochCallback(TrainerCallback):
    """
    Makes the training augmentation repeatable, so that a resumed run repeats the uninterrupted one: gives the
    training transforms (see [`cavmae_hf.data.AudioVisualTransform`]) whose `seed` is None the run's `data_seed`
    (or `seed`), and tells them the epoch at the start of each. Works with any `Trainer` whose training set carries
    its transform (`with_transform`); [`CavMaeTrainer`] adds it.
    """

    def __init__(self):
        self.epoch = None
        self.transforms: list[AudioVisualTransform] = []
        # samplers with `set_epoch` the Trainer may not reach (accelerate forwards the epoch to a batch sampler
        # only, not to the sampler inside a plain one): CavMaeTrainer registers its weighted sampler here
        self.samplers = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.transforms = attached_transforms(getattr(train_dataloader, "dataset", None))
        for transform in self.transforms:
            if transform.seed is None:
                transform.seed = data_seed(args)
        self.epoch = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        # the first epoch of a (resumed) run is where the state stands; each later one is the next
        self.epoch = int(math.floor((state.epoch or 0) + 1e-9)) if self.epoch is None else self.epoch + 1
        for transform in self.transforms:
            transform.set_epoch(self.epoch)
        for sampler in self.samplers:
            sampler.set_epoch(self.epoch)


def evaluation_prefix(logs: dict) -> str | None:
    """The metric prefix of an evaluation's logs (`eval` for `eval_loss`, `eval_runtime`, ...), None for others."""
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("_runtime")]
    return None


class SkippedClipsCallback(TrainerCallback):
    """
    Logs the clips that the transforms skipped (failed to load, see [`cavmae_hf.data.AudioVisualTransform`]),
    summed over processes and their DataLoader workers: `skipped_clips`, the run's running total (continued when
    resuming), with every training log, and `<prefix>_skipped_clips` (`eval_skipped_clips`) with every evaluation's
    metrics. With a plain `Trainer`: `callbacks=[SkippedClipsCallback()]`; the counts then reach the log history,
    `trainer_state.json` and the printed logs, and the reporting integrations (TensorBoard, ...) with
    [`CavMaeTrainer`], which adds the callback and puts the counts in its logs before they are reported.

    Counts are taken when a clip is decoded, so a log also counts the clips of batches the DataLoader has prepared
    ahead, and a resumed run counts again those of the batches it skips past.
    """

    def __init__(self):
        self.total = None
        self.train_transforms: list[AudioVisualTransform] = []
        self.eval_transforms: list[AudioVisualTransform] = []
        self._eval_loader = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.train_transforms = attached_transforms(getattr(train_dataloader, "dataset", None))
        logged = [entry[SKIPPED_CLIPS] for entry in state.log_history if SKIPPED_CLIPS in entry]
        self.total = int(logged[-1]) if logged else 0
        for transform in self.train_transforms:
            transform.skip_counter.take()  # what earlier runs with this transform counted

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if eval_dataloader is not self._eval_loader:
            self._eval_loader = eval_dataloader
            self.eval_transforms = attached_transforms(getattr(eval_dataloader, "dataset", None))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        added = {}
        if "loss" in logs and SKIPPED_CLIPS not in logs:
            added[SKIPPED_CLIPS] = self.training_total(args)
        prefix = evaluation_prefix(logs)
        if prefix is not None and f"{prefix}_{SKIPPED_CLIPS}" not in logs:
            added[f"{prefix}_{SKIPPED_CLIPS}"] = self.evaluation_count(args)
        logs.update(added)
        if added and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)

    def training_total(self, args) -> int:
        """The run's total of skipped training clips, over all processes (a collective: every process calls it)."""
        self.total = (self.total or 0) + _summed_over_processes(self.train_transforms, args)
        return self.total

    def evaluation_count(self, args, dataloader=None) -> int:
        """Clips skipped since the last call by the evaluation set's transforms (those of `dataloader` if given),
        over all processes (a collective)."""
        transforms = self.eval_transforms if dataloader is None else attached_transforms(dataloader.dataset)
        return _summed_over_processes(transforms, args)


def _summed_over_processes(transforms: list[AudioVisualTransform], args) -> int:
    count = sum(transform.skip_counter.take() for transform in transforms)
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        total = torch.tensor(count, dtype=torch.long, device=args.device)
        torch.distributed.all_reduce(total)
        count = int(total)
    return count


# ----------------------------------------------------------------------------------------------------------------
# Atomic saving
# ----------------------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _replace_entry(source: Path, target: Path) -> None:
    """Move `source` onto `target` atomically for files; a folder is swapped with a rename and the old one
    removed."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def move_into_place(staging, target) -> None:
    """
    Publish the completely written folder `staging` as `target`. A new `target` is one atomic rename. An existing
    one (an `output_dir` that also holds checkpoints and logs) gets each staged file by an atomic `os.replace`:
    the weights first, then the other files with `config.json` last, and weight files of the previous save that the
    new one does not have (old shards) are removed; anything else in `target` is left alone. A failure before this
    point leaves `target` as it was.
    """
    staging, target = Path(staging), Path(target)
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)
    if not target.exists():
        os.replace(staging, target)
        _fsync(target.parent)
        return
    if not target.is_dir():
        raise CavMaeError(f"Cannot save a model to {target}: it exists and is not a folder.")
    entries = list(staging.iterdir())
    weights = [entry for entry in entries if WEIGHTS_PATTERN.match(entry.name)]
    others = sorted((entry for entry in entries if entry not in weights), key=lambda path: path.name == "config.json")
    for entry in weights:
        _replace_entry(entry, target / entry.name)
    new_names = {entry.name for entry in entries}
    for stale in target.iterdir():  # once all new weights are in, drop the old save's other weight files
        if WEIGHTS_PATTERN.match(stale.name) and stale.name not in new_names and stale.is_file():
            stale.unlink()
    for entry in others:
        _replace_entry(entry, target / entry.name)
    _fsync(target)


@contextmanager
def staged_directory(target):
    """
    Yield a fresh staging folder beside `target` (same file system, so renames are atomic); when the block ends
    without an error, its content is moved into place with [`move_into_place`]. The staging folder is removed in
    every other case, so a failed write leaves `target` untouched and no half-written folder behind (a process
    killed outright leaves `target` untouched too, and a hidden `.<name>.saving-*` folder beside it to delete).
    """
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        yield staging
        move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------
class CavMaeTrainer(Trainer):
    """
    `Trainer` for CAV-MAE pretraining and fine-tuning. With [`CavMaeTrainingArguments`] it builds the reference
    optimizer, head learning rate, step schedule, balanced sampler, backbone freezing and weight averaging; with
    plain `TrainingArguments` it behaves as `Trainer` apart from the loss-component logging.

    It adds the callbacks a plain `Trainer` can be given by hand: [`SkippedClipsCallback`] (clips the transforms
    skipped, logged as `skipped_clips`, the run's total over all processes, and `eval_skipped_clips`),
    [`AugmentationEpochCallback`] (training transforms whose `seed` is None get `data_seed`, or `seed`, and the
    epoch, so that a resumed run repeats the uninterrupted one's augmentation) and, with `weight_averaging`,
    [`WeightAveragingCallback`]. `train(resume_from_checkpoint=True)` takes the newest complete checkpoint;
    `save_model` never leaves a half-written model (see [`move_into_place`]); under `torch.distributed` an
    exception is logged with, and noted on, the failing rank.

    Args:
        sample_weights (*optional*): per-clip sampling weights (overrides `balanced_sampling`'s own).
        Other arguments: as `Trainer`; `data_collator` defaults to [`AudioVisualDataCollator`].
    """

    def __init__(self, *args, sample_weights=None, **kwargs):
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = AudioVisualDataCollator()
        callbacks = list(kwargs.get("callbacks") or [])
        self.skipped_clips_callback = _find_or_add(callbacks, SkippedClipsCallback)
        self.augmentation_epoch_callback = _find_or_add(callbacks, AugmentationEpochCallback)
        kwargs["callbacks"] = callbacks
        super().__init__(*args, **kwargs)
        self.sample_weights = sample_weights
        self._component_totals = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._component_counts = {"train": defaultdict(int), "eval": defaultdict(int)}
        self._batches_per_epoch = None
        self._created_reference_schedule = False
        if getattr(self.args, "freeze_base", False):
            trainable = freeze_backbone(self.model)
            logger.info(f"freeze_base: only the classification head is trained ({trainable:,} parameters).")
        self.weight_averaging_callback = next((cb for cb in callbacks if isinstance(cb, WeightAveragingCallback)), None)
        if getattr(self.args, "weight_averaging", False) and self.weight_averaging_callback is None:
            self.weight_averaging_callback = WeightAveragingCallback(self.args.wa_start, self.args.wa_end)
            self.add_callback(self.weight_averaging_callback)

    # Training entry point ------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise CavMaeError(f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir}.")
        if resume_from_checkpoint and self.weight_averaging_callback is not None:
            self.weight_averaging_callback.load_from_checkpoint(resume_from_checkpoint)
        if self._created_reference_schedule:  # a new run gets a new schedule, as the Trainer's own
            self.lr_scheduler, self._created_reference_schedule = None, False
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except Exception as error:
            self._name_failing_process(error)
            raise

    def _name_failing_process(self, error: BaseException) -> None:
        """Under torch.distributed, say which process failed: in the log and as a note on the exception (the other
        processes then fail in their next collective, or are stopped by torchrun)."""
        if self.args.world_size <= 1:
            return
        where = (
            f"process rank {self.args.process_index} (local rank {self.args.local_process_index}) of "
            f"{self.args.world_size}, at global step {self.state.global_step}"
        )
        logger.error(f"Training failed on {where}: {type(error).__name__}: {error}")
        if hasattr(error, "add_note"):
            error.add_note(f"cavmae-hf: raised on {where}.")

    # Optimizer and schedule -------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        args = self.args
        head_lr = args.learning_rate * getattr(args, "head_lr", 1.0)
        named = [(name, p) for name, p in opt_model.named_parameters() if p.requires_grad]
        if getattr(args, "reference_optimizer", False):
            groups = [
                {"params": [p for name, p in named if not is_head_parameter(name)], "lr": args.learning_rate},
                {"params": [p for name, p in named if is_head_parameter(name)], "lr": head_lr},
            ]
            self.optimizer = torch.optim.Adam(
                [group for group in groups if group["params"]],
                lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
            )
            return self.optimizer
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = []
        for head in (False, True):
            for decays in (True, False):
                params = [p for name, p in named if is_head_parameter(name) == head and (name in decay) == decays]
                if params:
                    groups.append(
                        {
                            "params": params,
                            "lr": head_lr if head else args.learning_rate,
                            "weight_decay": args.weight_decay if decays else 0.0,
                        }
                    )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None or getattr(self.args, "lr_schedule", "transformers") != "reference_step":
            return super().create_scheduler(num_training_steps, optimizer)
        steps_per_epoch = self.args.steps_per_epoch or self._update_steps_per_epoch() or num_training_steps
        self.lr_scheduler = reference_step_schedule(
            optimizer or self.optimizer,
            steps_per_epoch,
            self.args.lr_decay_start,
            self.args.lr_decay_every,
            self.args.lr_decay,
            warmup_steps=self.args.get_warmup_steps(num_training_steps),
        )
        self._created_reference_schedule = True
        return self.lr_scheduler

    def _update_steps_per_epoch(self) -> int | None:
        """Optimizer steps in one pass over the training DataLoader, as the Trainer counts them."""
        if self._batches_per_epoch is None:
            return None
        accumulation = self.args.gradient_accumulation_steps
        return max(math.ceil(self._batches_per_epoch / accumulation), 1)

    # Sampling -----------------------------------------------------------------------------------------------------
    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        self._batches_per_epoch = len(dataloader) if has_length(dataloader) else None
        # PyTorch draws each DataLoader iterator's worker seed from the loader's `generator`, by default torch's
        # global one, which also drives the masking. A private one keeps the global sequence independent of when
        # iterators are created (persistent workers create one per run, not per epoch), so resuming repeats it.
        loader = getattr(dataloader, "base_dataloader", dataloader)  # accelerate wraps the DataLoader
        if isinstance(loader, DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(data_seed(self.args))
        return dataloader

    def _get_train_sampler(self, train_dataset=None):
        # Private, as no public route exists: `Trainer` builds the training DataLoader itself (column removal,
        # worker seeding, accelerate's sharding) and this is the one hook for its sampler; overriding
        # get_train_dataloader instead would mean rebuilding that DataLoader by hand.
        weights = self.sample_weights
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if weights is None and getattr(self.args, "balanced_sampling", False):
            weights = balanced_sample_weights(dataset)
        if weights is None:
            return super()._get_train_sampler(train_dataset)
        # the same draws on every process (accelerate shards the batches), and per epoch (resuming repeats them)
        sampler = EpochSeededWeightedSampler(weights, len(weights), data_seed(self.args))
        self.augmentation_epoch_callback.samplers = [sampler]
        return sampler

    # Loss components ---------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._record_components(outputs, "train" if model.training else "eval")
        return (loss, outputs) if return_outputs else loss

    def _record_components(self, outputs, split: str):
        if not isinstance(outputs, dict):
            return
        for name in LOSS_COMPONENTS:
            value = outputs.get(name)
            if value is not None:
                self._component_totals[split][name] += value.detach().float()
                self._component_counts[split][name] += 1

    def _pop_component_means(self, split: str) -> dict[str, float]:
        """Means of the recorded components since the last call, averaged over processes."""
        totals, counts = self._component_totals[split], self._component_counts[split]
        means = {}
        for name in LOSS_COMPONENTS:
            if counts.get(name):
                mean = torch.as_tensor(totals[name] / counts[name], device=self.args.device).float()
                means[name] = float(self.accelerator.reduce(mean, reduction="mean"))
        totals.clear()
        counts.clear()
        return means

    # Logging ------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            if self._component_counts["train"]:
                logs.update(self._pop_component_means("train"))
            # here rather than in the callback's on_log, so that the reporting integrations see it too
            logs[SKIPPED_CLIPS] = self.skipped_clips_callback.training_total(self.args)
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        prefix = metric_key_prefix
        if self.args.world_size > 1:  # a skipped clip would leave this process a smaller batch to gather
            for transform in attached_transforms(dataloader.dataset):
                transform.skip_forbidden = DISTRIBUTED_EVALUATION_SKIP
        self._component_totals["eval"].clear()
        self._component_counts["eval"].clear()
        self.skipped_clips_callback.evaluation_count(self.args, dataloader)  # from here on
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._pop_component_means("eval").items():
            output.metrics[f"{prefix}_{name}"] = value
        output.metrics[f"{prefix}_{SKIPPED_CLIPS}"] = self.skipped_clips_callback.evaluation_count(
            self.args, dataloader
        )
        return output

    # Saving -------------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        `Trainer.save_model`, written into a staging folder beside `output_dir` and moved into place when complete
        (see [`move_into_place`]): a failure or a kill while writing leaves the previous model as it was. Trainer
        checkpoints (`_internal_call`, the Trainer's own argument of this public method) and DeepSpeed / FSDP / XLA
        saves, where every process writes, are written as by `Trainer`; resuming skips incomplete checkpoints (see
        [`last_complete_checkpoint`]).
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call or not self.args.should_save or not self._saves_from_one_process():
            return super().save_model(output_dir, _internal_call=_internal_call)
        with staged_directory(output_dir) as staging:
            super().save_model(str(staging), _internal_call=True)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _saves_from_one_process(self) -> bool:
        """Whether `save_model` writes from the main process alone (plain or DDP training)."""
        from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

        sharded = getattr(self, "is_distributed_loading_by_transformers", False)
        return not (
            self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or sharded
            or is_torch_xla_available()
            or is_sagemaker_mp_enabled()
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if is_pretraining_model(self.accelerator.unwrap_model(model)):
            # Pretraining models are evaluated on their (masked) losses; their patch predictions are not gathered.
            # (The Trainer's own step computes no loss for a model without labels or a `return_loss` argument.)
            inputs = {name: value.to(self.args.device) for name, value in inputs.items()}
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None
        # classifiers: the Trainer's step, which leaves out config.keys_to_ignore_at_inference (the per-frame logits)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


def _find_or_add(callbacks: list, callback_class):
    """The instance of `callback_class` in `callbacks`, appended if there is none."""
    found = next((cb for cb in callbacks if isinstance(cb, callback_class)), None)
    if found is None:
        found = callback_class()
        callbacks.append(found)
    return found


# ----------------------------------------------------------------------------------------------------------------
# Retrieval evaluation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def retrieval_embeddings(
    model, dataset, batch_size: int = 32, device=None, progress: bool = False, num_workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Pooled audio and visual embeddings `[N, D]` of a transformed dataset (the unmasked modality streams,
    mean-pooled, as the reference's retrieval; several frames of a clip are averaged). `model` is any CAV-MAE
    model (its `cav_mae` encoder is used).
    """
    encoder = getattr(model, "cav_mae", model)
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=AudioVisualDataCollator(), num_workers=num_workers)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="Embedding clips", unit="batch")
    audio, visual = [], []
    for batch in loader:
        encoded = encoder(
            input_features=batch["input_features"].to(device),
            pixel_values=batch["pixel_values"].to(device),
            streams=("audio", "visual"),
        )
        visual_embeds = encoded.visual_embeds
        audio.append(encoded.audio_embeds.float().cpu())
        visual.append((visual_embeds.mean(dim=1) if visual_embeds.dim() == 3 else visual_embeds).float().cpu())
    encoder.train(was_training)
    return torch.cat(audio), torch.cat(visual)


def evaluate_retrieval(model, dataset, batch_size: int = 32, device=None, progress: bool = False) -> dict[str, float]:
    """Audio -> visual and visual -> audio R@1/5/10 and median rank over a transformed dataset (see
    [`cavmae_hf.metrics.retrieval_metrics`])."""
    audio, visual = retrieval_embeddings(model, dataset, batch_size=batch_size, device=device, progress=progress)
    return retrieval_metrics(audio, visual)


# ----------------------------------------------------------------------------------------------------------------
# Configuration helpers
# ----------------------------------------------------------------------------------------------------------------
def parse_script_arguments(dataclass_types, argv=None) -> tuple:
    """
    The argument dataclasses of a training script from `argv` (default: the command line), or from one JSON file
    given as the only argument; then sets up logging (per process, as `TrainingArguments` says) and the seed.
    The last dataclass must be a `TrainingArguments`.
    """
    import logging as std_logging
    import sys

    import transformers
    from transformers import HfArgumentParser, set_seed

    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        arguments = parser.parse_json_file(argv[0])
    else:
        arguments = parser.parse_args_into_dataclasses(argv)
    training_args = arguments[-1]
    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=std_logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    return tuple(arguments)


def train_save_and_evaluate(trainer: Trainer, feature_extractor) -> None:
    """
    `trainer.train()` (resuming as `--resume_from_checkpoint` says), the final model (the weight average, with
    `--weight_averaging`) and the feature extractor saved to `output_dir`, train metrics and state saved, then one
    evaluation when the trainer has an evaluation set.
    """
    training_args = trainer.args
    result = trainer.train(resume_from_checkpoint=resolve_checkpoint(training_args))
    trainer.save_model()
    if trainer.is_world_process_zero():
        feature_extractor.save_pretrained(training_args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


def parse_config_overrides(text: str | None) -> dict:
    """`"hidden_size=192,num_attention_heads=3,norm_pix_loss=false"` -> a dict of typed values."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise CavMaeConfigError(f"config override {item!r} is not name=value.")
        name, value = (piece.strip() for piece in item.split("=", 1))
        overrides[name] = json.loads(value.lower()) if value.lower() in ("true", "false", "null") else _number(value)
    return overrides


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def data_config_consistent(config: CavMaeConfig, audio_length: int, num_mel_bins: int, image_size: int):
    """Raise if the data arguments do not fit the model's input sizes."""
    given = {"audio_length": audio_length, "num_mel_bins": num_mel_bins, "image_size": image_size}
    expected = {name: getattr(config, name) for name in given}
    wrong = {name: (given[name], expected[name]) for name in expected if given[name] != expected[name]}
    if wrong:
        details = ", ".join(f"{name}={g} but the model has {e}" for name, (g, e) in wrong.items())
        raise CavMaeConfigError(f"Data arguments do not fit the model: {details}.")


__all__ = [
    "AugmentationEpochCallback",
    "CavMaeTrainer",
    "CavMaeTrainingArguments",
    "DataArguments",
    "EpochSeededWeightedSampler",
    "LOSS_COMPONENTS",
    "WeightAveragingCallback",
    "average_checkpoints",
    "average_epoch_checkpoints",
    "checkpoint_epochs",
    "data_config_consistent",
    "evaluate_retrieval",
    "feature_extractor_for_model",
    "freeze_backbone",
    "is_complete_checkpoint",
    "is_head_parameter",
    "last_complete_checkpoint",
    "load_clip_dataset",
    "load_train_and_eval_datasets",
    "move_into_place",
    "parse_config_overrides",
    "reference_step_multiplier",
    "reference_step_schedule",
    "resolve_checkpoint",
    "retrieval_embeddings",
    "SkippedClipsCallback",
    "staged_directory",
    "streaming_training_set",
    "transform_options",
]
