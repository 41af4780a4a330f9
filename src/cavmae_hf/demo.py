"""
Watch CAV-MAE learn, on the CPU, in a few minutes: synthetic audio-visual clips -> pretraining -> masked
reconstruction and retrieval -> fine-tuning -> a saved classifier -> a prediction on an mp4 file, and a picture of
it all.

    cavmae demo                      # or: python -m cavmae_hf.demo
    cavmae demo --output-dir runs/demo --pretrain-epochs 30
    cavmae demo --quick              # tiny sizes, well under a minute (what the test suite runs)

Steps:
1. write a synthetic set as mp4 files (each class a sound paired with a picture, see `cavmae_hf.synthetic`);
2. build a `datasets.Dataset` from the video folder, decode each clip once, split train / test;
3. measure audio -> visual retrieval of the untrained model (chance level);
4. pretrain a small CAV-MAE (masked reconstruction + contrastive) with the `Trainer`;
5. measure how well it fills in removed patches of the test clips, against predicting the training clips' mean,
   and retrieval again;
6. fine-tune a classifier from the pretrained weights and measure its accuracy (10-frame evaluation);
7. save it with `save_pretrained`, classify one mp4 through `pipeline("audio-visual-classification")`, and draw
   `demo.png` (see `cavmae_hf.demo_figure`). Numbers, and the time each step took, go to `results.json`.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import transformers
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .configuration_cav_mae import CavMaeConfig
from .data import (
    AudioVisualDataCollator,
    AudioVisualTransform,
    dataset_from_folder,
    decode_clips,
    finetuning_transforms,
    label_set_of,
)
from .demo_figure import DemoPictures, relative_change, render_figure
from .feature_extraction_cav_mae import CavMaeFeatureExtractor
from .metrics import classification_metrics, retrieval_metrics, true_pair_ranks
from .modeling_cav_mae import CavMaeForAudioVisualClassification, CavMaeForPreTraining
from .synthetic import write_synthetic_videos
from .training import (
    CavMaeTrainer,
    CavMaeTrainingArguments,
    evaluate_retrieval,
    retrieval_embeddings,
)

# The demo's two sizes, one row per setting: (full, quick). "full", the default, learns to fill in removed patches
# and to retrieve in a few minutes on 2 CPU cores; "quick", for tests, takes seconds and still beats the baselines.
_SIZE_NAMES = ("full", "quick")
_SIZE_TABLE = {
    "num_classes": (10, 4),
    "clips_per_class": (64, 30),
    "duration": (2.56, 2.56),
    "fps": (4, 4),
    "audio_length": (256, 256),
    "num_mel_bins": (64, 32),
    "image_size": (96, 64),
    "patch_size": (16, 16),
    "hidden_size": (64, 32),
    "num_attention_heads": (2, 2),
    "num_modality_specific_layers": (4, 2),
    "decoder_hidden_size": (64, 32),
    "decoder_num_hidden_layers": (2, 2),
    "batch_size": (32, 16),
    "pretrain_epochs": (40, 100),
    "finetune_epochs": (4, 4),
    "learning_rate": (5e-3, 5e-3),
    "finetune_learning_rate": (2e-4, 1e-3),
    "processes": (2, 1),
}
SIZES = {size: {name: row[column] for name, row in _SIZE_TABLE.items()} for column, size in enumerate(_SIZE_NAMES)}


@dataclass
class DemoSettings:
    output_dir: str
    num_classes: int
    clips_per_class: int
    duration: float
    fps: int
    audio_length: int
    num_mel_bins: int
    image_size: int
    patch_size: int
    hidden_size: int
    num_attention_heads: int
    num_modality_specific_layers: int
    decoder_hidden_size: int
    decoder_num_hidden_layers: int
    batch_size: int
    pretrain_epochs: int
    finetune_epochs: int
    learning_rate: float
    finetune_learning_rate: float
    processes: int = 1
    contrastive_loss_weight: float = 1.0
    test_share: float = 0.2
    seed: int = 0
    progress: bool = True
    quick: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (used by `cavmae demo` and `python -m cavmae_hf.demo`)."""
    full, quick = SIZES["full"], SIZES["quick"]

    def default(name):
        return f"default {full[name]}; quick: {quick[name]}"

    parser.add_argument("--output-dir", default="cavmae-demo", help="where videos, models and demo.png go")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in well under a minute")
    parser.add_argument("--num-classes", type=int, help=f"synthetic classes ({default('num_classes')})")
    parser.add_argument("--clips-per-class", type=int, help=f"clips per class ({default('clips_per_class')})")
    parser.add_argument("--pretrain-epochs", type=int, help=f"pretraining epochs ({default('pretrain_epochs')})")
    parser.add_argument("--finetune-epochs", type=int, help=f"fine-tuning epochs ({default('finetune_epochs')})")
    parser.add_argument("--batch-size", type=int, help=f"batch size ({default('batch_size')})")
    parser.add_argument("--learning-rate", type=float, help=f"pretraining learning rate ({default('learning_rate')})")
    parser.add_argument("--contrastive-loss-weight", type=float, default=1.0,
                        help="weight of the contrastive loss (the paper uses 0.01 with far longer training; 1.0 "
                        "makes retrieval appear within minutes)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data and the training")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: timed at start-up, one thread or all cores, whichever is "
                        "faster; busy cores make multi-threaded steps many times slower)")
    parser.add_argument("--processes", type=int,
                        help=f"processes that write and decode the clips ({default('processes')})")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


_OVERRIDABLE = (
    "num_classes", "clips_per_class", "pretrain_epochs", "finetune_epochs", "batch_size", "learning_rate", "processes"
)


def settings_from_args(args) -> DemoSettings:
    sizes = dict(SIZES["quick" if args.quick else "full"])
    for name in _OVERRIDABLE:
        if getattr(args, name, None) is not None:
            sizes[name] = getattr(args, name)
    sizes["processes"] = max(1, min(sizes["processes"], os.cpu_count() or 1))
    return DemoSettings(
        output_dir=args.output_dir,
        contrastive_loss_weight=args.contrastive_loss_weight,
        seed=args.seed,
        progress=not args.no_progress,
        quick=args.quick,
        **sizes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Progress: a line per step with its wall and CPU time, and the time left
# ----------------------------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished child processes."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


MAX_PACE_CORRECTION = 1.5


class _Progress:
    """Numbered steps: what each does, how long it took (wall and CPU time) and an estimate of the time left.
    `expected` gives each step's expected seconds, in order; the estimate scales what is left by how the finished
    steps compared with their expectation (by at most `MAX_PACE_CORRECTION`)."""

    def __init__(self, expected: dict[str, float]):
        self.expected = expected
        self.timings: dict[str, dict[str, float]] = {}
        self.start_wall, self.start_cpu = time.perf_counter(), cpu_seconds()
        self.current = None

    def begin(self, name: str, text: str):
        self.current, self.step_wall, self.step_cpu = name, time.perf_counter(), cpu_seconds()
        number = list(self.expected).index(name) + 1
        print(f"\n[{number}/{len(self.expected)}] {text}  (about {_duration(self.seconds_left())} left)", flush=True)

    def done(self, text: str = ""):
        wall, cpu = time.perf_counter() - self.step_wall, cpu_seconds() - self.step_cpu
        # unrounded: the steps' times then add up to at most the total, which 0.01 s roundings of each did not keep
        self.timings[self.current] = {"wall_seconds": wall, "cpu_seconds": cpu}
        print(f"      {text}{' ' if text else ''}({wall:.1f} s, CPU {cpu:.1f} s)", flush=True)

    def seconds_left(self) -> float:
        finished_expected = sum(self.expected[name] for name in self.timings)
        finished_actual = sum(timing["wall_seconds"] for timing in self.timings.values())
        pace = finished_actual / finished_expected if finished_expected > 0 and finished_actual > 0 else 1.0
        # the first steps (writing and decoding files) say little about training: trust them within limits
        pace = min(max(pace, 1 / MAX_PACE_CORRECTION), MAX_PACE_CORRECTION)
        return pace * sum(seconds for name, seconds in self.expected.items() if name not in self.timings)

    def summary(self) -> dict:
        return {
            "steps": self.timings,
            "total_wall_seconds": time.perf_counter() - self.start_wall,
            "total_cpu_seconds": cpu_seconds() - self.start_cpu,
        }


# What each step costs, in forward + backward passes of the demo's pretraining model (timed at start-up) per unit of
# work, from the CPU times of a full run: a clip written or decoded (per process), a pretraining step (with the
# optimizer and the data), a fine-tuning step (with its evaluations), a clip evaluated.
_COST_PER_UNIT = {"write": 0.2, "decode": 0.15, "pretrain_step": 1.3, "finetune_step": 3.2, "eval_clip": 0.04}
_FIXED_COST = {"figure": 24.0}  # loading the pipeline, classifying a video, drawing and saving the figure


def expected_seconds(settings: DemoSettings, seconds_per_step: float) -> dict[str, float]:
    """The expected seconds of each step of the run, from the time of one pretraining step."""
    clips = settings.num_classes * settings.clips_per_class
    train_clips = clips - math.ceil(clips * settings.test_share)
    steps_per_epoch = math.ceil(train_clips / settings.batch_size)
    cost = _COST_PER_UNIT
    units = {
        "write": cost["write"] * clips / settings.processes,
        "decode": cost["decode"] * clips / settings.processes,
        "retrieval": cost["eval_clip"] * clips * settings.test_share,
        "pretrain": cost["pretrain_step"] * steps_per_epoch * settings.pretrain_epochs,
        "evaluate": cost["eval_clip"] * clips * 2,
        "finetune": cost["finetune_step"] * steps_per_epoch * settings.finetune_epochs,
        "figure": _FIXED_COST["figure"],
    }
    return {name: count * seconds_per_step for name, count in units.items()}


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------
def make_datasets(settings: DemoSettings, video_dir: Path):
    dataset = dataset_from_folder(video_dir)
    options = {"num_proc": settings.processes if settings.processes > 1 else None}
    if settings.progress:
        decoded = decode_clips(dataset, desc="Decoding mp4 files", **options)
    else:
        decoded = _quietly(decode_clips, dataset, **options)
    split = decoded.shuffle(seed=settings.seed).train_test_split(test_size=settings.test_share, seed=settings.seed)
    return split["train"], split["test"]


def _quietly(function, *args, **kwargs):
    datasets.disable_progress_bars()
    try:
        return function(*args, **kwargs)
    finally:
        datasets.enable_progress_bars()


def _passed_on(settings: DemoSettings, *names: str) -> dict:
    """The settings `names` as keyword arguments of the same names."""
    return {name: getattr(settings, name) for name in names}


# the settings that are CavMaeConfig arguments of the same name
_MODEL_SETTINGS = (
    "hidden_size",
    "num_attention_heads",
    "num_modality_specific_layers",
    "patch_size",
    "image_size",
    "num_mel_bins",
    "audio_length",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "contrastive_loss_weight",
)


def model_config(settings: DemoSettings, **overrides):
    return CavMaeConfig(
        **_passed_on(settings, *_MODEL_SETTINGS),
        intermediate_size=4 * settings.hidden_size,
        num_shared_layers=1,
        decoder_num_attention_heads=max(1, settings.decoder_hidden_size // 32),
        decoder_intermediate_size=4 * settings.decoder_hidden_size,
        norm_pix_loss=False,  # the model predicts the patches themselves: demo.png shows them as they are
        **overrides,
    )


def training_arguments(settings: DemoSettings, output_dir: Path, epochs: int, learning_rate: float, **overrides):
    return CavMaeTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=2 * settings.batch_size,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not settings.progress,
        dataloader_pin_memory=False,
        seed=settings.seed,
        **overrides,
    )


def _quiet_trainer(trainer, settings: DemoSettings, keys: dict[str, str], every: int = 1):
    """Replace the Trainer's printing of every log dict by one compact line every `every` epochs."""
    trainer.remove_callback(PrinterCallback)
    if settings.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_SilentProgressCallback())
    trainer.add_callback(_EpochSummary(keys, every))
    return trainer


class _SilentProgressCallback(ProgressCallback):
    """The Trainer's progress bar without the log dicts printed under it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


class _EpochSummary(TrainerCallback):
    """Prints the mean of the logged values of `keys` (`{log key: label}`) every `every` epochs (after the epoch's
    evaluation, when there is one)."""

    def __init__(self, keys: dict[str, str], every: int):
        self.keys = keys
        self.every = every
        self.values = {key: [] for key in keys}
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.keys:
            if logs and key in logs:
                self.values[key].append(logs[key])

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "no":
            self._summarise(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.training:
            self._summarise(args, state)

    def _summarise(self, args, state):
        epoch, last = round(state.epoch or 0), int(args.num_train_epochs)
        if epoch % self.every and epoch != last:
            return
        parts = [f"{label} {sum(v) / len(v):.3f}" for key, label in self.keys.items() if (v := self.values[key])]
        _write(f"      epoch {epoch:>3}/{last}: " + ", ".join(parts))
        self.values = {key: [] for key in self.keys}


def _write(text: str):
    tqdm.write(text)
    sys.stdout.flush()


PRETRAINING_SUMMARY = {
    "audio_mae_loss": "audio MAE",
    "visual_mae_loss": "visual MAE",
    "contrastive_loss": "contrastive",
    "contrastive_accuracy": "contrastive acc.",
}
FINETUNING_SUMMARY = {"loss": "training loss", "eval_loss": "test loss", "eval_accuracy": "test accuracy (1 frame)"}


class ComputedClips(torch.utils.data.Dataset):
    """Clips whose model inputs were computed once: each item is a clip's `input_features` with one of its frames
    (`pixel_values` `[N, F, 3, H, W]`), a random one unless `frame_index` is given. Pretraining epochs then skip
    decoding and the fbank; without augmentation of the sound the inputs are the same every epoch anyway."""

    def __init__(self, input_features: torch.Tensor, pixel_values: torch.Tensor, frame_index: int | None = None):
        self.input_features, self.pixel_values, self.frame_index = input_features, pixel_values, frame_index

    def __len__(self) -> int:
        return len(self.input_features)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: values[0] for name, values in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A batch at once (the DataLoader's batched fetch): model inputs that the collator passes through."""
        indices = torch.as_tensor(indices)
        frames = self.pixel_values[indices]
        if self.frame_index is not None:
            chosen = torch.full((len(indices),), self.frame_index)
        else:
            chosen = torch.randint(frames.shape[1], (len(indices),))
        return {
            "input_features": self.input_features[indices],
            "pixel_values": frames[torch.arange(len(indices)), chosen].float(),
        }


def pretrain(settings, train_inputs: dict, test_inputs: dict, feature_extractor, output_dir: Path):
    """Pretrain on inputs computed once (see [`model_inputs`]): a random frame of each clip per epoch, as the
    reference, but without its noise + time-roll augmentation of the fbank, which wraps the end of a clip onto its
    start and breaks the pulses the reconstruction learns from (measured: audio MSE 0.55 instead of 0.74 of the
    mean clip's)."""
    model = CavMaeForPreTraining(model_config(settings))
    args = training_arguments(
        settings, output_dir, settings.pretrain_epochs, settings.learning_rate,
        lr_schedule="transformers", lr_scheduler_type="cosine", warmup_steps=50,
    )
    trainer = CavMaeTrainer(
        model=model,
        args=args,
        train_dataset=ComputedClips(train_inputs["input_features"], train_inputs["pixel_values"]),
        eval_dataset=ComputedClips(test_inputs["input_features"], test_inputs["pixel_values"][:, None], frame_index=0),
    )
    _quiet_trainer(trainer, settings, PRETRAINING_SUMMARY, every=max(1, settings.pretrain_epochs // 5))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir))
    feature_extractor.save_pretrained(str(output_dir))
    return model, trainer.state.log_history, metrics


def finetune(settings, train_set, test_set, feature_extractor, pretrained_dir: Path, output_dir: Path, label_names):
    model = CavMaeForAudioVisualClassification.from_pretrained(
        str(pretrained_dir),
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        problem_type="single_label_classification",
        trainable_position_embeddings=True,  # as the reference's fine-tuning
    )
    # the reference's fine-tuning augmentation, with the masks scaled to these input sizes
    train_transform, all_frames = finetuning_transforms(
        feature_extractor,
        num_labels=len(label_names),
        freqm=round(48 * settings.num_mel_bins / 128),
        timem=round(192 * settings.audio_length / 1024),
        mixup=0.5,
        label_smoothing=0.1,
        eval_frames="all",
    )
    middle_frame = AudioVisualTransform(feature_extractor, frame_index="middle", num_labels=len(label_names))
    args = training_arguments(
        settings, output_dir, settings.finetune_epochs, settings.finetune_learning_rate, head_lr=10.0,
        eval_strategy="epoch", warmup_steps=10, lr_decay_start=max(1, int(settings.finetune_epochs * 0.75)),
        lr_decay_every=max(1, settings.finetune_epochs // 8), lr_decay=0.5,
    )
    trainer = CavMaeTrainer(
        model=model,
        args=args,
        train_dataset=train_set.with_transform(train_transform),
        eval_dataset=test_set.with_transform(middle_frame),  # the curve: one frame per clip, cheap
        compute_metrics=classification_metrics("single_label_classification"),
    )
    _quiet_trainer(trainer, settings, FINETUNING_SUMMARY, every=1)
    trainer.train()
    # the final number: every clip on its 10 frames, per-frame probabilities averaged (the reference's evaluation)
    prediction = trainer.predict(test_set.with_transform(all_frames), metric_key_prefix="test")
    probabilities = torch.as_tensor(prediction.predictions).float().softmax(-1)
    return trainer, trainer.state.log_history, prediction.metrics, probabilities


def classify_video(model_dir: Path, video: Path):
    """Top-3 predictions for one mp4, through the registered pipeline (or the model directly if it is absent)."""
    try:
        from transformers import (
            pipeline,  # the task is registered by `import cavmae_hf`
        )

        classifier = pipeline("audio-visual-classification", model=str(model_dir))
        return classifier(str(video), top_k=3), "pipeline('audio-visual-classification')"
    except (ImportError, KeyError) as error:  # pragma: no cover - only without the pipelines module
        return _classify_directly(model_dir, video), f"the model directly ({error})"


def _classify_directly(model_dir: Path, video: Path):  # pragma: no cover - fallback
    from .media import load_video

    model = CavMaeForAudioVisualClassification.from_pretrained(str(model_dir)).eval()
    extractor = CavMaeFeatureExtractor.from_pretrained(str(model_dir))
    clip = load_video(video, num_frames=10)
    inputs = extractor(audio=clip.audio, images=[clip.frames], sampling_rate=clip.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)[0]
    scores, ids = probabilities.topk(3)
    return [{"label": model.config.id2label[int(i)], "score": float(s)} for s, i in zip(scores, ids)]


# ----------------------------------------------------------------------------------------------------------------
# What the pretrained model does: fill in removed patches, retrieve
# ----------------------------------------------------------------------------------------------------------------
def model_inputs(dataset, feature_extractor, frame_index="middle", batch_size: int = 64) -> dict[str, torch.Tensor]:
    """`input_features` `[N, T, F]` and `pixel_values` of every clip of a decoded dataset, as the evaluation
    transform makes them: `[N, 3, H, W]` for one frame (`"middle"`), `[N, F, 3, H, W]` in float16 for `"all"`."""
    transformed = dataset.with_transform(AudioVisualTransform(feature_extractor, frame_index=frame_index))
    collate = AudioVisualDataCollator()
    features, frames = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate(transformed[start : start + batch_size])
        features.append(batch["input_features"])
        frames.append(batch["pixel_values"].half() if frame_index == "all" else batch["pixel_values"])
    return {"input_features": torch.cat(features), "pixel_values": torch.cat(frames)}


def _middle_frames(pixel_values: torch.Tensor) -> torch.Tensor:
    """`[N, F, 3, H, W]` -> the middle frames `[N, 3, H, W]` (frame 5 of 10, as the evaluation transform)."""
    return pixel_values[:, pixel_values.shape[1] // 2] if pixel_values.dim() == 5 else pixel_values


def reconstruction_quality(model, train_inputs: dict, test_inputs: dict, seed: int = 0) -> dict[str, float]:
    """Mean squared error on the removed patches of the test clips (75 % of each modality), of the model and of
    predicting the mean training clip (the mean spectrogram and the mean frame), with the same masks; and how much
    lower the model's error is (`*_reduction`, 0.4 = 40 % below the baseline)."""
    from .reconstruction import masked_patch_errors

    errors = masked_patch_errors(
        model,
        test_inputs["input_features"],
        test_inputs["pixel_values"],
        audio_baseline=train_inputs["input_features"].mean(dim=0),
        visual_baseline=_middle_frames(train_inputs["pixel_values"]).float().mean(dim=0),
        seed=seed,
    )
    for modality in ("audio", "visual"):
        errors[f"{modality}_reduction"] = 1.0 - errors[f"{modality}_mse"] / errors[f"{modality}_baseline_mse"]
    return errors


def reconstructions_of(model, test_inputs: dict, feature_extractor, count: int = 2, seed: int = 0):
    """Masked reconstructions (75 % of both modalities) of the first `count` test clips."""
    from .reconstruction import reconstruct

    model.eval()
    return reconstruct(
        model,
        test_inputs["input_features"][:count],
        test_inputs["pixel_values"][:count],
        seed=seed,
        **display_units(feature_extractor),
    )


def display_units(feature_extractor) -> dict:
    """The feature extractor's normalisation, to undo for pictures."""
    return {
        "audio_mean": feature_extractor.audio_mean,
        "audio_std": feature_extractor.audio_std,
        "image_mean": feature_extractor.image_mean,
        "image_std": feature_extractor.image_std,
    }


def retrieval_examples(audio_embeds, visual_embeds, clip_ids, num_queries: int = 4, top_k: int = 5) -> list[dict]:
    """Audio -> visual searches of the first `num_queries` test clips among all test frames: each query's
    `hits` (gallery position, cosine score), best first, and the rank of its own frame."""
    from .retrieval import RetrievalIndex

    index = RetrievalIndex([str(position) for position in range(len(clip_ids))], {"visual": visual_embeds})
    results = index.search(audio_embeds[:num_queries], "visual", top_k=top_k)
    ranks = true_pair_ranks(audio_embeds, visual_embeds)[:num_queries]
    return [
        {
            "query": position,
            "clip_id": clip_ids[position],
            "hits": [(int(hit.key), hit.score) for hit in hits],
            "true_rank": int(rank),
        }
        for position, (hits, rank) in enumerate(zip(results, ranks))
    ]


def classification_examples(probabilities: torch.Tensor, labels, label_names, count: int = 4, top_k: int = 3):
    """The top scores of the first `count` test clips: `{"position", "true_label", "top": [(label, p)]}`."""
    examples = []
    for position in range(min(count, len(probabilities))):
        scores, ids = probabilities[position].topk(min(top_k, probabilities.shape[-1]))
        examples.append(
            {
                "position": position,
                "true_label": label_names[labels[position]],
                "top": [(label_names[int(i)], float(s)) for s, i in zip(scores, ids)],
            }
        )
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def seconds_per_pretraining_step(settings: DemoSettings, threads: int, repeats: int = 2) -> float:
    """Wall time of one forward and backward pass of the demo's pretraining model on a batch, with `threads`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    model = CavMaeForPreTraining(model_config(settings))
    inputs = {
        "input_features": torch.randn(settings.batch_size, settings.audio_length, settings.num_mel_bins),
        "pixel_values": torch.randn(settings.batch_size, 3, settings.image_size, settings.image_size),
    }
    try:
        model(**inputs).loss.backward()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model(**inputs).loss.backward()
        return (time.perf_counter() - start) / repeats
    finally:
        torch.set_num_threads(previous)


def choose_threads(settings: DemoSettings) -> tuple[int, float]:
    """One thread or all of them, whichever runs a pretraining step of the demo model faster, and that step's
    seconds. On idle cores all threads win; when other programs keep the cores busy, multi-threaded steps wait on
    descheduled threads and one thread is several times faster."""
    most = torch.get_num_threads()
    candidates = (most, 1) if most > 1 and not settings.quick else (1,)
    timings = {threads: seconds_per_pretraining_step(settings, threads) for threads in candidates}
    best = min(timings, key=timings.get)
    return best, timings[best]


def _retrieval_line(metrics: dict) -> str:
    return (
        f"audio->visual R@1 {metrics['a2v_R@1']:.1%}  R@5 {metrics['a2v_R@5']:.1%}  R@10 {metrics['a2v_R@10']:.1%}  "
        f"median rank {metrics['a2v_median_rank']:g} | visual->audio R@1 {metrics['v2a_R@1']:.1%}  "
        f"R@10 {metrics['v2a_R@10']:.1%} | chance R@1 {metrics['chance_R@1']:.1%}"
    )


def _reconstruction_line(quality: dict) -> str:
    return (
        f"MSE on removed patches (test clips): audio {quality['audio_mse']:.3f} vs {quality['audio_baseline_mse']:.3f} "
        f"for the mean training clip ({relative_change(quality['audio_reduction'])}), frames "
        f"{quality['visual_mse']:.3f} vs {quality['visual_baseline_mse']:.3f} "
        f"({relative_change(quality['visual_reduction'])})"
    )


@contextmanager
def _quiet_libraries():
    """Transformers' warnings and weight loading/saving bars off while the demo prints its own story."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


def run_demo(settings: DemoSettings, threads: int | None = None) -> dict:
    """Run every step; returns the numbers (also written to `output_dir/results.json`). `threads`: torch CPU
    threads (default: [`choose_threads`]); the previous setting is restored afterwards."""
    previous_threads = torch.get_num_threads()
    try:
        with _quiet_libraries():
            return _run_steps(settings, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run_steps(settings: DemoSettings, threads: int | None) -> dict:
    load_at_start = _load_average()
    if threads:
        step_seconds = seconds_per_pretraining_step(settings, threads)
    else:
        threads, step_seconds = choose_threads(settings)
    torch.set_num_threads(threads)
    progress = _Progress(expected_seconds(settings, step_seconds))
    print(
        f"CAV-MAE demo: {threads} CPU thread(s), {settings.processes} process(es) for the clips, output in "
        f"{settings.output_dir}; about {_duration(progress.seconds_left())} in all",
        flush=True,
    )
    transformers.set_seed(settings.seed)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    num_clips = settings.num_classes * settings.clips_per_class

    progress.begin("write", f"Writing {num_clips} synthetic clips ({settings.num_classes} classes: a sound paired "
                   f"with a picture) as mp4 files in {output / 'videos'}")
    video_dir = write_synthetic_videos(
        output / "videos",
        num_proc=settings.processes,
        **_passed_on(settings, "num_classes", "clips_per_class", "duration", "image_size", "fps", "seed", "progress"),
    )
    progress.done()

    progress.begin("decode", "Building a datasets.Dataset from the video folder, decoding every clip once and "
                   "computing the model inputs (fbank and frames)")
    train_set, test_set = make_datasets(settings, video_dir)
    label_names = label_set_of(train_set).names
    extractor = CavMaeFeatureExtractor(
        max_length=settings.audio_length, num_mel_bins=settings.num_mel_bins, image_size=settings.image_size
    )
    train_inputs, test_inputs = model_inputs(train_set, extractor, "all"), model_inputs(test_set, extractor)
    progress.done(f"{len(train_set)} training and {len(test_set)} test clips;")

    progress.begin("retrieval", "Retrieval with the untrained model (test clips, audio -> visual and visual -> audio)")
    retrieval_set = ComputedClips(test_inputs["input_features"], test_inputs["pixel_values"][:, None], frame_index=0)
    torch.manual_seed(settings.seed)
    before = evaluate_retrieval(CavMaeForPreTraining(model_config(settings)), retrieval_set)
    print("      " + _retrieval_line(before))
    progress.done()

    progress.begin("pretrain", f"Pretraining CAV-MAE ({settings.pretrain_epochs} epochs: masked reconstruction of 75 % "
                   "of the patches + contrastive)")
    pretrained_dir = output / "pretrained"
    pretrained, pretrain_history, pretrain_metrics = pretrain(
        settings, train_inputs, test_inputs, extractor, pretrained_dir
    )
    progress.done()

    progress.begin("evaluate", "What pretraining learnt: filling in removed patches, and retrieval")
    pretrained.eval()
    quality = reconstruction_quality(pretrained, train_inputs, test_inputs, seed=settings.seed)
    print("      " + _reconstruction_line(quality))
    audio_embeds, visual_embeds = retrieval_embeddings(pretrained, retrieval_set)
    after = retrieval_metrics(audio_embeds, visual_embeds)
    print("      " + _retrieval_line(after))
    searches = retrieval_examples(audio_embeds, visual_embeds, test_set["clip_id"])
    progress.done()

    progress.begin("finetune", f"Fine-tuning a classifier from the pretrained weights ({settings.finetune_epochs} "
                   "epochs)")
    classifier_dir = output / "classifier"
    trainer, finetune_history, finetune_metrics, probabilities = finetune(
        settings, train_set, test_set, extractor, pretrained_dir, output / "finetuning", label_names
    )
    accuracy = finetune_metrics["test_accuracy"]
    print(f"      test accuracy (10 frames per clip): {accuracy:.1%} (chance {1 / settings.num_classes:.1%})")
    progress.done()

    progress.begin("figure", f"Saving the classifier to {classifier_dir}, classifying an mp4 and drawing the figure")
    trainer.save_model(str(classifier_dir))
    extractor.save_pretrained(str(classifier_dir))
    video = next(video_dir.glob(f"*/{test_set[0]['clip_id']}.mp4"))
    predictions, how = classify_video(classifier_dir, video)
    true_label = video.parent.name
    print(f"      {video.name} (true class: {true_label}) via {how}:")
    for prediction in predictions:
        print(f"        {prediction['label']:<28} {prediction['score']:.3f}")
    test_labels = [labels[0] for labels in test_set["labels"]]
    results = {
        "num_classes": settings.num_classes,
        "train_clips": len(train_set),
        "test_clips": len(test_set),
        "retrieval_before": before,
        "retrieval_after": after,
        "reconstruction": quality,
        "pretraining_eval": pretrain_metrics,
        "accuracy": accuracy,
        "finetuning_eval": finetune_metrics,
        "example_video": str(video),
        "example_true_label": true_label,
        "example_predictions": predictions,
        "retrieval_examples": searches,
        "classification_examples": classification_examples(probabilities, test_labels, label_names),
        "settings": asdict(settings),
    }
    pictures = DemoPictures.from_inputs(
        test_inputs,
        display_units(extractor),
        reconstructions=reconstructions_of(pretrained, test_inputs, extractor, seed=settings.seed),
        retrieval=searches,
        classification=results["classification_examples"],
    )
    figure_path = render_figure(output / "demo.png", pretrain_history, finetune_history, results, pictures)
    progress.done(f"figure: {figure_path};")
    results["timings"] = {
        **progress.summary(),
        "threads": threads,
        "processes": settings.processes,
        "seconds_per_pretraining_step_at_start": round(step_seconds, 4),
        "load_average_at_start": load_at_start,
        "load_average_at_end": _load_average(),
    }
    results["seconds"] = results["timings"]["total_wall_seconds"]
    (output / "results.json").write_text(json.dumps(results, indent=2, default=float))

    print(f"\nDone in {_duration(results['seconds'])} (CPU {_duration(results['timings']['total_cpu_seconds'])}).")
    for name, timing in progress.timings.items():
        print(f"  {name:<10} {timing['wall_seconds']:>7.1f} s  (CPU {timing['cpu_seconds']:.1f} s)")
    print(
        f"Removed patches: the model's audio MSE is {relative_change(quality['audio_reduction'])} and its frame MSE "
        f"{relative_change(quality['visual_reduction'])} that of predicting the mean clip.\nRetrieval R@1 (audio -> "
        f"visual) {before['a2v_R@1']:.1%} -> {after['a2v_R@1']:.1%} (chance {after['chance_R@1']:.1%}); "
        f"classification accuracy {accuracy:.1%} (chance {1 / settings.num_classes:.1%}).\nModel: {classifier_dir}  "
        f"Figure: {figure_path}  Numbers: {output / 'results.json'}"
    )
    return results


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None


def run(args) -> int:
    """Entry point of `cavmae demo`: run the demo with parsed `args`; returns the exit code."""
    run_demo(settings_from_args(args), threads=args.threads)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cavmae_hf.demo", description=__doc__.strip().split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
