"""
Watch CAV-MAE learn, on the CPU, in a few minutes: synthetic audio-visual clips -> pretraining -> retrieval ->
fine-tuning -> a saved classifier -> a prediction on an mp4 file, and a picture of it all.

    cavmae demo                      # or: python -m cavmae_hf.demo
    cavmae demo --output-dir runs/demo --pretrain-epochs 30
    cavmae demo --quick              # tiny sizes, well under a minute (what the test suite runs)

Steps:
1. write a synthetic set as mp4 files (each class a sound paired with a picture, see `cavmae_hf.synthetic`);
2. build a `datasets.Dataset` from the video folder, decode each clip once, split train / test;
3. measure audio -> visual retrieval of the untrained model (chance level);
4. pretrain a small CAV-MAE (masked reconstruction + contrastive) with the `Trainer`;
5. measure retrieval again;
6. fine-tune a classifier from the pretrained weights and measure its accuracy (10-frame evaluation);
7. save it with `save_pretrained`, classify one mp4 through `pipeline("audio-visual-classification")`, and draw
   `demo.png`: loss curves and a masked reconstruction of a test clip. Numbers go to `results.json`.
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
    pretraining_transforms,
)
from .feature_extraction_cav_mae import CavMaeFeatureExtractor
from .metrics import classification_metrics
from .modeling_cav_mae import CavMaeForAudioVisualClassification, CavMaeForPreTraining
from .synthetic import write_synthetic_videos
from .training import CavMaeTrainer, CavMaeTrainingArguments, evaluate_retrieval

# The demo's two sizes, one row per setting: (full, quick). "full", the default, learns clearly in a few minutes on
# 2 CPU cores; "quick", for tests, takes seconds and is still above chance.
_SIZE_NAMES = ("full", "quick")
_SIZE_TABLE = {
    "num_classes": (10, 4),
    "clips_per_class": (64, 30),
    "duration": (2.56, 1.28),
    "fps": (4, 8),
    "audio_length": (256, 128),
    "num_mel_bins": (64, 32),
    "image_size": (96, 32),
    "patch_size": (16, 8),
    "hidden_size": (192, 64),
    "num_attention_heads": (3, 2),
    "num_modality_specific_layers": (4, 2),
    "decoder_hidden_size": (128, 32),
    "decoder_num_hidden_layers": (2, 1),
    "batch_size": (32, 16),
    "pretrain_epochs": (25, 15),
    "finetune_epochs": (8, 6),
    "learning_rate": (5e-4, 1e-3),
    "finetune_learning_rate": (2e-4, 1e-3),
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
    contrastive_loss_weight: float = 1.0
    test_share: float = 0.2
    seed: int = 0
    progress: bool = True
    quick: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (used by `cavmae demo` and `python -m cavmae_hf.demo`)."""
    parser.add_argument("--output-dir", default="cavmae-demo", help="where videos, models and demo.png go")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in well under a minute")
    parser.add_argument("--num-classes", type=int, help="synthetic classes (default 10; quick: 4)")
    parser.add_argument("--clips-per-class", type=int, help="clips per class (default 64; quick: 30)")
    parser.add_argument("--pretrain-epochs", type=int, help="pretraining epochs (default 25; quick: 15)")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs (default 8; quick: 6)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 32; quick: 16)")
    parser.add_argument("--contrastive-loss-weight", type=float, default=1.0,
                        help="weight of the contrastive loss (the paper uses 0.01 with far longer training; 1.0 "
                        "makes retrieval appear within minutes)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data and the training")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: timed at start-up, one thread or all cores, whichever is "
                        "faster; busy cores make multi-threaded steps many times slower)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def settings_from_args(args) -> DemoSettings:
    sizes = dict(SIZES["quick" if args.quick else "full"])
    for name in ("num_classes", "clips_per_class", "pretrain_epochs", "finetune_epochs", "batch_size"):
        if getattr(args, name, None) is not None:
            sizes[name] = getattr(args, name)
    return DemoSettings(
        output_dir=args.output_dir,
        contrastive_loss_weight=args.contrastive_loss_weight,
        seed=args.seed,
        progress=not args.no_progress,
        quick=args.quick,
        **sizes,
    )


class _Clock:
    """Prints numbered steps with the time each took."""

    def __init__(self, total_steps: int):
        self.start = time.time()
        self.total = total_steps
        self.step = 0
        self.step_start = self.start

    def begin(self, text: str):
        self.step += 1
        self.step_start = time.time()
        print(f"\n[{self.step}/{self.total}] {text}", flush=True)

    def done(self, text: str = ""):
        print(f"      {text}{' ' if text else ''}({time.time() - self.step_start:.1f} s)", flush=True)

    @property
    def elapsed(self) -> float:
        return time.time() - self.start


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------
def make_datasets(settings: DemoSettings, video_dir: Path):

    dataset = dataset_from_folder(video_dir)
    decoded = decode_clips(dataset, desc="Decoding mp4 files") if settings.progress else _quietly(decode_clips, dataset)
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
        norm_pix_loss=False,  # so that the reconstruction in demo.png is a faithful picture
        **overrides,
    )


def training_arguments(settings: DemoSettings, output_dir: Path, epochs: int, learning_rate: float, **overrides):
    return CavMaeTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=2 * settings.batch_size,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        warmup_steps=10,
        lr_decay_start=max(1, int(epochs * 0.75)),
        lr_decay_every=max(1, epochs // 8),
        lr_decay=0.5,
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
        epoch, last = int(round(state.epoch or 0)), int(args.num_train_epochs)
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


def pretrain(settings, train_set, test_set, feature_extractor, output_dir: Path):
    train_transform, eval_transform = pretraining_transforms(feature_extractor)
    model = CavMaeForPreTraining(model_config(settings))
    args = training_arguments(settings, output_dir, settings.pretrain_epochs, settings.learning_rate)
    trainer = CavMaeTrainer(
        model=model,
        args=args,
        train_dataset=train_set.with_transform(train_transform),
        eval_dataset=test_set.with_transform(eval_transform),
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
        eval_strategy="epoch",
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
    metrics = trainer.evaluate(test_set.with_transform(all_frames), metric_key_prefix="test")
    return model, trainer, trainer.state.log_history, metrics


def classify_video(model_dir: Path, video: Path):
    """Top-3 predictions for one mp4, through the registered pipeline (or the model directly if it is absent)."""
    try:
        from transformers import pipeline  # the task is registered by `import cavmae_hf`

        classifier = pipeline("audio-visual-classification", model=str(model_dir))
        return classifier(str(video), top_k=3), "pipeline('audio-visual-classification')"
    except (ImportError, KeyError) as error:  # pragma: no cover - only without the pipelines module
        return _classify_directly(model_dir, video), f"the model directly ({error})"


def _classify_directly(model_dir: Path, video: Path):  # pragma: no cover - fallback
    import torch

    from .feature_extraction_cav_mae import CavMaeFeatureExtractor
    from .media import load_video
    from .modeling_cav_mae import CavMaeForAudioVisualClassification

    model = CavMaeForAudioVisualClassification.from_pretrained(str(model_dir)).eval()
    extractor = CavMaeFeatureExtractor.from_pretrained(str(model_dir))
    clip = load_video(video, num_frames=10)
    inputs = extractor(audio=clip.audio, images=[clip.frames], sampling_rate=clip.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)[0]
    scores, ids = probabilities.topk(3)
    return [{"label": model.config.id2label[int(i)], "score": float(s)} for s, i in zip(scores, ids)]


def reconstruction_of(model, test_set, feature_extractor):
    """A masked reconstruction (75 % of both modalities) of the first test clip, or None without the module."""
    try:
        from .reconstruction import reconstruct
    except ImportError:  # pragma: no cover
        return None
    batch = AudioVisualDataCollator()(test_set.with_transform(AudioVisualTransform(feature_extractor))[:1])
    model.eval()
    return reconstruct(
        model,
        batch["input_features"],
        batch["pixel_values"],
        seed=0,
        audio_mean=feature_extractor.audio_mean,
        audio_std=feature_extractor.audio_std,
        image_mean=feature_extractor.image_mean,
        image_std=feature_extractor.image_std,
    )[0]


# ----------------------------------------------------------------------------------------------------------------
# The picture
# ----------------------------------------------------------------------------------------------------------------
def _series(history, key):
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    return [p[0] for p in points], [p[1] for p in points]


def render_figure(path: Path, pretrain_history, finetune_history, results: dict, reconstruction=None):
    """Loss curves (pretraining components, contrastive accuracy, fine-tuning) and, when given, the original /
    masked / reconstructed frame and spectrogram of a test clip."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 3 if reconstruction is not None else 1
    figure = Figure(figsize=(15, 4.2 * rows), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 3, squeeze=False)

    losses = axes[0][0]
    for key, label in (
        ("audio_mae_loss", "audio reconstruction (MSE)"),
        ("visual_mae_loss", "visual reconstruction (MSE)"),
        ("contrastive_loss", "contrastive (InfoNCE)"),
    ):
        losses.plot(*_series(pretrain_history, key), label=label)
    losses.set_yscale("log")
    losses.set_title("pretraining losses")
    losses.set_xlabel("step")
    losses.legend(fontsize=8)

    accuracy = axes[0][1]
    accuracy.plot(*_series(pretrain_history, "contrastive_accuracy"), label="in-batch contrastive accuracy")
    accuracy.axhline(results["retrieval_before"]["a2v_R@1"], color="gray", linestyle=":", label="test R@1 before")
    accuracy.axhline(results["retrieval_after"]["a2v_R@1"], color="green", linestyle="--", label="test R@1 after")
    accuracy.axhline(results["retrieval_after"]["chance_R@1"], color="red", linewidth=0.8, label="chance R@1")
    accuracy.set_ylim(0, 1)
    accuracy.set_title("audio -> visual retrieval")
    accuracy.set_xlabel("pretraining step")
    accuracy.legend(fontsize=8)

    finetuning = axes[0][2]
    finetuning.plot(*_series(finetune_history, "loss"), label="training loss")
    finetuning.plot(*_series(finetune_history, "eval_loss"), "o-", label="test loss")
    twin = finetuning.twinx()
    twin.plot(*_series(finetune_history, "eval_accuracy"), "s-", color="green", label="test accuracy (1 frame)")
    twin.set_ylim(0, 1.02)
    twin.legend(loc="center right", fontsize=8)
    finetuning.set_title(f"fine-tuning: test accuracy {results['accuracy']:.1%} (10 frames)")
    finetuning.set_xlabel("step")
    finetuning.legend(loc="upper center", fontsize=8)

    if reconstruction is not None:
        for axis, image, name in zip(
            axes[1],
            (reconstruction.image, reconstruction.masked_image, reconstruction.reconstructed_image),
            ("original", "75% of patches removed", "reconstruction"),
        ):
            axis.imshow(image, interpolation="nearest")
            axis.set_title(f"frame: {name}")
            axis.axis("off")
        spectrograms = (
            reconstruction.spectrogram,
            reconstruction.masked_spectrogram,
            reconstruction.reconstructed_spectrogram,
        )
        low, high = float(reconstruction.spectrogram.min()), float(reconstruction.spectrogram.max())
        for axis, spectrogram, name in zip(axes[2], spectrograms, ("original", "masked", "reconstruction")):
            axis.imshow(spectrogram, origin="lower", aspect="auto", vmin=low, vmax=high, interpolation="nearest")
            axis.set_title(f"log-mel spectrogram: {name}")
            axis.set_xlabel("frame (10 ms)")
            axis.set_ylabel("mel bin")
    figure.suptitle(
        "CAV-MAE demo on synthetic audio-visual clips: "
        f"retrieval R@1 {results['retrieval_before']['a2v_R@1']:.1%} -> {results['retrieval_after']['a2v_R@1']:.1%} "
        f"(chance {results['retrieval_after']['chance_R@1']:.1%}), classification accuracy {results['accuracy']:.1%} "
        f"(chance {1 / results['num_classes']:.1%})"
    )
    figure.tight_layout()
    figure.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def choose_threads(settings: DemoSettings) -> int:
    """One thread or all of them, whichever runs a pretraining step of the demo model faster. On idle cores all
    threads win; when other programs keep the cores busy, multi-threaded steps wait on descheduled threads and one
    thread is several times faster."""
    most = torch.get_num_threads()
    if most == 1 or settings.quick:
        return 1
    torch.manual_seed(settings.seed)
    model = CavMaeForPreTraining(model_config(settings))
    inputs = {
        "input_features": torch.randn(settings.batch_size, settings.audio_length, settings.num_mel_bins),
        "pixel_values": torch.randn(settings.batch_size, 3, settings.image_size, settings.image_size),
    }

    def seconds_per_step(threads: int) -> float:
        torch.set_num_threads(threads)
        model(**inputs).loss.backward()  # warm-up
        start = time.perf_counter()
        for _ in range(2):
            model(**inputs).loss.backward()
        return (time.perf_counter() - start) / 2

    timings = {threads: seconds_per_step(threads) for threads in (most, 1)}
    return min(timings, key=timings.get)


# ----------------------------------------------------------------------------------------------------------------
# Steps of the run
# ----------------------------------------------------------------------------------------------------------------
def _retrieval_line(metrics: dict) -> str:
    return (
        f"audio->visual R@1 {metrics['a2v_R@1']:.1%}  R@5 {metrics['a2v_R@5']:.1%}  R@10 {metrics['a2v_R@10']:.1%}  "
        f"median rank {metrics['a2v_median_rank']:g} | visual->audio R@1 {metrics['v2a_R@1']:.1%}  "
        f"R@10 {metrics['v2a_R@10']:.1%} | chance R@1 {metrics['chance_R@1']:.1%}"
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
    clock = _Clock(total_steps=7)
    torch.set_num_threads(threads or choose_threads(settings))
    print(f"CAV-MAE demo: {torch.get_num_threads()} CPU thread(s), output in {settings.output_dir}", flush=True)
    transformers.set_seed(settings.seed)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    num_clips = settings.num_classes * settings.clips_per_class

    clock.begin(f"Writing {num_clips} synthetic clips ({settings.num_classes} classes: a sound paired with a picture) "
                f"as mp4 files in {output / 'videos'}")
    video_dir = write_synthetic_videos(
        output / "videos",
        **_passed_on(settings, "num_classes", "clips_per_class", "duration", "image_size", "fps", "seed", "progress"),
    )
    clock.done()

    clock.begin("Building a datasets.Dataset from the video folder and decoding every clip once")
    train_set, test_set = make_datasets(settings, video_dir)
    label_names = label_set_of(train_set).names
    extractor = CavMaeFeatureExtractor(
        max_length=settings.audio_length, num_mel_bins=settings.num_mel_bins, image_size=settings.image_size
    )
    clock.done(f"{len(train_set)} training and {len(test_set)} test clips;")

    clock.begin("Retrieval with the untrained model (test clips, audio -> visual and visual -> audio)")
    retrieval_set = test_set.with_transform(AudioVisualTransform(extractor))
    torch.manual_seed(settings.seed)
    before = evaluate_retrieval(CavMaeForPreTraining(model_config(settings)), retrieval_set)
    print("      " + _retrieval_line(before))
    clock.done()

    clock.begin(f"Pretraining CAV-MAE ({settings.pretrain_epochs} epochs: masked reconstruction + contrastive)")
    pretrained_dir = output / "pretrained"
    pretrained, pretrain_history, pretrain_metrics = pretrain(settings, train_set, test_set, extractor, pretrained_dir)
    print(
        f"      test losses: audio MAE {pretrain_metrics.get('eval_audio_mae_loss', math.nan):.3f}, visual MAE "
        f"{pretrain_metrics.get('eval_visual_mae_loss', math.nan):.3f}, contrastive "
        f"{pretrain_metrics.get('eval_contrastive_loss', math.nan):.3f}"
    )
    clock.done()

    clock.begin("Retrieval with the pretrained model")
    after = evaluate_retrieval(pretrained, retrieval_set)
    print("      " + _retrieval_line(after))
    clock.done()

    clock.begin(f"Fine-tuning a classifier from the pretrained weights ({settings.finetune_epochs} epochs)")
    classifier_dir = output / "classifier"
    classifier, trainer, finetune_history, finetune_metrics = finetune(
        settings, train_set, test_set, extractor, pretrained_dir, output / "finetuning", label_names
    )
    accuracy = finetune_metrics["test_accuracy"]
    print(f"      test accuracy (10 frames per clip): {accuracy:.1%} (chance {1 / settings.num_classes:.1%})")
    clock.done()

    clock.begin(f"Saving the classifier to {classifier_dir}, classifying an mp4 and drawing the figure")
    trainer.save_model(str(classifier_dir))
    extractor.save_pretrained(str(classifier_dir))
    video = Path(test_set[0]["clip_id"])
    video = next(video_dir.glob(f"*/{video}.mp4"))
    predictions, how = classify_video(classifier_dir, video)
    true_label = video.parent.name
    print(f"      {video.name} (true class: {true_label}) via {how}:")
    for prediction in predictions:
        print(f"        {prediction['label']:<28} {prediction['score']:.3f}")
    results = {
        "num_classes": settings.num_classes,
        "train_clips": len(train_set),
        "test_clips": len(test_set),
        "retrieval_before": before,
        "retrieval_after": after,
        "pretraining_eval": pretrain_metrics,
        "accuracy": accuracy,
        "finetuning_eval": finetune_metrics,
        "example_video": str(video),
        "example_true_label": true_label,
        "example_predictions": predictions,
        "settings": asdict(settings),
    }
    reconstruction = reconstruction_of(pretrained, test_set, extractor)
    figure_path = render_figure(output / "demo.png", pretrain_history, finetune_history, results, reconstruction)
    clock.done(f"figure: {figure_path};")
    results["seconds"] = clock.elapsed
    (output / "results.json").write_text(json.dumps(results, indent=2, default=float))

    print(
        f"\nDone in {clock.elapsed / 60:.1f} min. Retrieval R@1 (audio -> visual) {before['a2v_R@1']:.1%} -> "
        f"{after['a2v_R@1']:.1%} (chance {after['chance_R@1']:.1%}); classification accuracy {accuracy:.1%} "
        f"(chance {1 / settings.num_classes:.1%}).\nModel: {classifier_dir}  Figure: {figure_path}  "
        f"Numbers: {output / 'results.json'}"
    )
    return results


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
