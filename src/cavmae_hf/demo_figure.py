"""
The picture of `cavmae demo` (`demo.png`), top to bottom:

1. the training curves: pretraining losses (with the error of predicting the mean training clip), in-batch
   contrastive accuracy and test retrieval before / after pretraining, fine-tuning losses and accuracy;
2. masked reconstructions of test clips: frame and log-mel spectrogram, original / 75 % of patches removed /
   the visible patches with the model's predictions in the removed ones;
3. audio -> visual retrieval as pictures: a query's spectrogram and the test frames it retrieves, its own marked;
4. the fine-tuned classifier on test clips: each clip's frame and its top scores.

Drawn with matplotlib's Agg backend (no display needed).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MATCH_COLOR = "tab:green"
MISS_COLOR = "tab:red"
AUDIO_COLOR, VISUAL_COLOR, CONTRASTIVE_COLOR = "tab:blue", "tab:orange", "tab:purple"
SPECTROGRAM_COLORMAP = "magma"


@dataclass
class DemoPictures:
    """What the lower part of the figure shows, in display units: log-mel spectrograms `[N, F, T]` and RGB frames
    `[N, H, W, 3]` of the test clips, their [`Reconstruction`]s, and the retrieval and classification examples of
    [`cavmae_hf.demo`]."""

    spectrograms: np.ndarray
    frames: np.ndarray
    reconstructions: list
    retrieval: list[dict]
    classification: list[dict]

    @classmethod
    def from_inputs(cls, inputs: dict, units: dict, reconstructions, retrieval, classification) -> "DemoPictures":
        """From the test clips' model inputs (`input_features`, `pixel_values`) and the feature extractor's
        normalisation `units` (`audio_mean`, `audio_std`, `image_mean`, `image_std`)."""
        from .reconstruction import display_images, display_spectrograms

        return cls(
            spectrograms=display_spectrograms(inputs["input_features"], units["audio_mean"], units["audio_std"]),
            frames=display_images(inputs["pixel_values"], units["image_mean"], units["image_std"]),
            reconstructions=list(reconstructions),
            retrieval=retrieval,
            classification=classification,
        )


def relative_change(reduction: float) -> str:
    """`0.45` -> "45 % below", `-0.1` -> "10 % above"."""
    return f"{abs(reduction):.0%} {'below' if reduction >= 0 else 'above'}"


def _series(history, key):
    points = [(entry["step"], entry[key]) for entry in history if key in entry]
    return [p[0] for p in points], [p[1] for p in points]


def _bare(axis, edge_color=None):
    """No ticks; a thick coloured frame when `edge_color` is given."""
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(edge_color is not None)
        if edge_color is not None:
            spine.set_edgecolor(edge_color)
            spine.set_linewidth(3)


def _show_spectrogram(axis, spectrogram, limits, title=None):
    import matplotlib

    colormap = matplotlib.colormaps[SPECTROGRAM_COLORMAP].with_extremes(bad="0.5")
    axis.imshow(spectrogram, origin="lower", aspect="auto", cmap=colormap, vmin=limits[0], vmax=limits[1],
                interpolation="nearest")
    if title:
        axis.set_title(title, fontsize=8)


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------
def _draw_curves(subfigure, pretrain_history, finetune_history, results):
    losses, retrieval, finetuning = subfigure.subplots(1, 3)
    quality = results.get("reconstruction") or {}
    for key, label, color, baseline in (
        ("audio_mae_loss", "audio reconstruction (MSE)", AUDIO_COLOR, "audio_baseline_mse"),
        ("visual_mae_loss", "frame reconstruction (MSE)", VISUAL_COLOR, "visual_baseline_mse"),
        ("contrastive_loss", "contrastive (InfoNCE)", CONTRASTIVE_COLOR, None),
    ):
        losses.plot(*_series(pretrain_history, key), label=label, color=color)
        if baseline in quality:
            losses.axhline(quality[baseline], color=color, linestyle="--", linewidth=1)
    losses.set_yscale("log")
    losses.set_title("pretraining losses (dashed: predicting the mean clip, test)", fontsize=9)
    losses.set_xlabel("step")
    losses.legend(fontsize=7)

    before, after = results["retrieval_before"], results["retrieval_after"]
    retrieval.plot(*_series(pretrain_history, "contrastive_accuracy"), label="in-batch contrastive accuracy")
    retrieval.axhline(before["a2v_R@1"], color="gray", linestyle=":", label="test R@1 before")
    retrieval.axhline(after["a2v_R@1"], color="green", linestyle="--", label="test R@1 after")
    retrieval.axhline(after["chance_R@1"], color="red", linewidth=0.8, label="chance R@1")
    retrieval.set_ylim(0, 1)
    retrieval.set_title("audio -> visual retrieval", fontsize=9)
    retrieval.set_xlabel("pretraining step")
    retrieval.legend(fontsize=7)

    finetuning.plot(*_series(finetune_history, "loss"), label="training loss")
    finetuning.plot(*_series(finetune_history, "eval_loss"), "o-", label="test loss")
    twin = finetuning.twinx()
    twin.plot(*_series(finetune_history, "eval_accuracy"), "s-", color="green", label="test accuracy (1 frame)")
    twin.set_ylim(0, 1.02)
    twin.legend(loc="center right", fontsize=7)
    finetuning.set_title(f"fine-tuning: test accuracy {results['accuracy']:.1%} (10 frames)", fontsize=9)
    finetuning.set_xlabel("step")
    finetuning.legend(loc="upper center", fontsize=7)


def _draw_reconstructions(subfigure, reconstructions, quality):
    rows = max(1, len(reconstructions))
    grid = subfigure.add_gridspec(rows, 15)
    for row, result in enumerate(reconstructions):
        images = (result.image, result.masked_image, result.reconstructed_image)
        for column, (image, name) in enumerate(zip(images, ("original", "masked", "reconstruction"))):
            axis = subfigure.add_subplot(grid[row, 2 * column : 2 * column + 2])
            axis.imshow(image, interpolation="nearest")
            _bare(axis)
            if row == 0:
                axis.set_title(f"frame: {name}", fontsize=8)
        limits = np.nanmin(result.spectrogram), np.nanmax(result.spectrogram)
        spectrograms = (result.spectrogram, result.masked_spectrogram, result.reconstructed_spectrogram)
        for index, (spectrogram, name) in enumerate(zip(spectrograms, ("original", "masked", "reconstruction"))):
            axis = subfigure.add_subplot(grid[row, 6 + 3 * index : 9 + 3 * index])
            _show_spectrogram(axis, spectrogram, limits, f"log-mel spectrogram: {name}" if row == 0 else None)
            axis.tick_params(labelsize=6)
            if row == rows - 1:
                axis.set_xlabel("frame (10 ms)", fontsize=7)
    title = "Masked reconstruction of test clips: 75 % of the patches of each modality removed, then filled in"
    if quality:
        title += (
            f"\nMSE on removed patches over all test clips: audio {quality['audio_mse']:.3f}, frames "
            f"{quality['visual_mse']:.3f}; predicting the mean training clip: audio "
            f"{quality['audio_baseline_mse']:.3f}, frames {quality['visual_baseline_mse']:.3f} (the model's error is "
            f"{relative_change(quality['audio_reduction'])} and {relative_change(quality['visual_reduction'])})"
        )
    subfigure.suptitle(title, fontsize=10)


def _draw_retrieval(subfigure, pictures: DemoPictures, per_row: int = 2):
    searches = pictures.retrieval
    top_k = max((len(search["hits"]) for search in searches), default=1)
    rows = max(1, -(-len(searches) // per_row))
    columns_per_query = 2 + top_k
    grid = subfigure.add_gridspec(rows, per_row * columns_per_query, wspace=0.08)
    limits = float(pictures.spectrograms.min()), float(pictures.spectrograms.max())
    for number, search in enumerate(searches):
        row, first = divmod(number, per_row)
        first *= columns_per_query
        axis = subfigure.add_subplot(grid[row, first : first + 2])
        _show_spectrogram(axis, pictures.spectrograms[search["query"]], limits)
        _bare(axis)
        found = search["true_rank"] <= top_k
        axis.set_title(f"query: sound of test clip {search['query']}", fontsize=8)
        if not found:
            axis.set_xlabel(f"its own frame: rank {search['true_rank']}", fontsize=8, color=MISS_COLOR)
        for rank, (position, score) in enumerate(search["hits"], start=1):
            axis = subfigure.add_subplot(grid[row, first + 1 + rank])
            axis.imshow(pictures.frames[position], interpolation="nearest")
            own = position == search["query"]
            _bare(axis, MATCH_COLOR if own else "0.8")
            axis.set_title(f"#{rank}  {score:.2f}", fontsize=7, color=MATCH_COLOR if own else "black")
    subfigure.suptitle(
        f"Audio -> visual retrieval among the {len(pictures.frames)} test frames: a query's spectrogram and the "
        f"{top_k} frames closest to it (cosine similarity); green: the query's own frame",
        fontsize=10,
    )


def _draw_classification(subfigure, pictures: DemoPictures):
    examples = pictures.classification
    grid = subfigure.add_gridspec(1, 3 * max(1, len(examples)), wspace=0.15)
    for number, example in enumerate(examples):
        frame = subfigure.add_subplot(grid[0, 3 * number])
        frame.imshow(pictures.frames[example["position"]], interpolation="nearest")
        right = example["top"][0][0] == example["true_label"]
        _bare(frame, MATCH_COLOR if right else MISS_COLOR)
        frame.set_title(f"test clip {example['position']}", fontsize=8)
        bars = subfigure.add_subplot(grid[0, 3 * number + 1 : 3 * number + 3])
        for row, (label, score) in enumerate(example["top"]):
            own = label == example["true_label"]
            bars.barh(-row, score, color=MATCH_COLOR if own else "0.75")
            bars.text(0.02, -row, f"{label}  {score:.2f}", va="center", fontsize=7)
        bars.set_xlim(0, 1)
        bars.set_yticks([])
        bars.tick_params(axis="x", labelsize=6)
        bars.set_title(f"true class: {example['true_label']}", fontsize=8)
    subfigure.suptitle(
        "The fine-tuned classifier on test clips (10 frames each): its top scores, the true class in green", fontsize=10
    )


# ----------------------------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------------------------
def render_figure(path, pretrain_history, finetune_history, results: dict, pictures: DemoPictures | None = None):
    """Draw `demo.png` (the curves, and with `pictures` the reconstruction, retrieval and classification rows)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = [3.4] + ([2.2 * max(1, len(pictures.reconstructions)) + 0.6, 3.2, 2.2] if pictures else [])
    figure = Figure(figsize=(16, sum(heights) + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    sections = figure.subfigures(len(heights), 1, height_ratios=heights)
    sections = list(np.atleast_1d(sections))
    _draw_curves(sections[0], pretrain_history, finetune_history, results)
    if pictures is not None:
        _draw_reconstructions(sections[1], pictures.reconstructions, results.get("reconstruction"))
        _draw_retrieval(sections[2], pictures)
        _draw_classification(sections[3], pictures)
    before, after = results["retrieval_before"], results["retrieval_after"]
    figure.suptitle(
        "CAV-MAE demo on synthetic audio-visual clips: "
        f"retrieval R@1 {before['a2v_R@1']:.1%} -> {after['a2v_R@1']:.1%} (chance {after['chance_R@1']:.1%}), "
        f"classification accuracy {results['accuracy']:.1%} (chance {1 / results['num_classes']:.1%})",
        fontsize=12,
    )
    path = Path(path)
    figure.savefig(path)
    return path
