"""
Masked reconstruction ("inpainting") with a CAV-MAE pretraining checkpoint, and its picture.

```python
from cavmae_hf import CavMaeForPreTraining
from cavmae_hf.reconstruction import reconstruct_clip, render_reconstruction

model = CavMaeForPreTraining.from_pretrained("path/to/cav-mae-pretrained")
result = reconstruct_clip(model, "clip.mp4", audio_mask_ratio=0.75, visual_mask_ratio=0.75, seed=0)
render_reconstruction(result, "reconstruction.png")
```

The figure shows, for the frame and the spectrogram, the original, the masked input and the reconstruction (the
visible patches with the model's predictions pasted into the removed ones), in display units: the ImageNet
mean/std and the fbank mean/std of the feature extractor are undone.

A model pretrained with `norm_pix_loss=True` (the released CAV-MAE models) predicts each patch normalised to zero
mean and unit variance, so its raw output does not look like the input. Such predictions are shown re-scaled to
each target patch's own mean and standard deviation, which borrows statistics of the hidden patches; the figure
title and a logged warning say so. Use a model pretrained with `norm_pix_loss=False` for honest inpainting.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from .feature_extraction_cav_mae import IMAGENET_MEAN, IMAGENET_STD, CavMaeFeatureExtractor
from .modeling_cav_mae import (
    CavMaeInputError,
    patchify,
    reconstruction_loss,
    spectrogram_to_image,
    structured_audio_noise,
    unpatchify,
)
from .pipelines import DEFAULT_NUM_FRAMES, audio_seconds_for, clip_features, load_clip

logger = logging.get_logger(__name__)

NORM_PIX_EPSILON = 1.0e-6  # the variance floor of the per-patch normalised targets
MASKED_GRAY = 0.5


@dataclass
class Reconstruction:
    """
    One clip's reconstruction, ready to display (F mel bins x T frames, H x W pixels):

    spectrogram / masked_spectrogram / reconstructed_spectrogram: `[F, T]` log-mel (feature normalisation undone;
        removed patches of the masked one are NaN).
    image / masked_image / reconstructed_image: `[H, W, 3]` RGB in [0, 1] (removed patches of the masked one gray).
    audio_mask `[F/p, T/p]`, visual_mask `[H/p, W/p]`: 1 for removed patches.
    audio_mae_loss, visual_mae_loss: the model's losses on the removed patches (in its training target space).
    norm_pix_loss: whether predictions were per-patch normalised (and were re-scaled with the target patches'
        statistics for display).
    """

    spectrogram: np.ndarray
    masked_spectrogram: np.ndarray
    reconstructed_spectrogram: np.ndarray
    image: np.ndarray
    masked_image: np.ndarray
    reconstructed_image: np.ndarray
    audio_mask: np.ndarray
    visual_mask: np.ndarray
    audio_mae_loss: float
    visual_mae_loss: float
    norm_pix_loss: bool
    audio_mask_ratio: float
    visual_mask_ratio: float
    source: str | None = None


@contextmanager
def config_overrides(config, **values):
    """Temporarily set config fields that are not None (the model reads masking fields at call time)."""
    values = {name: value for name, value in values.items() if value is not None}
    previous = {name: getattr(config, name) for name in values}
    try:
        for name, value in values.items():
            setattr(config, name, value)
        config.validate_cav_mae()
        yield config
    finally:
        for name, value in previous.items():
            setattr(config, name, value)


def masking_noise(config, batch_size: int, seed: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio `[B, Na]` and visual `[B, Nv]` masking noise, reproducible with `seed` (the lowest noise is kept)."""
    generator = torch.Generator(device=device or "cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    if config.audio_mask_mode == "unstructured":
        audio = torch.rand(batch_size, config.num_audio_patches, generator=generator, device=device)
    else:
        audio = structured_audio_noise(
            batch_size, config.audio_grid_size, config.audio_mask_ratio, config.audio_mask_mode, device, generator
        )
    visual = torch.rand(batch_size, config.num_visual_patches, generator=generator, device=device)
    return audio, visual


def rescale_normalised_patches(predictions: torch.Tensor, target_images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch normalised predictions `[B, N, p*p*C]` -> each patch scaled to its target patch's mean and standard
    deviation (unbiased, as the `norm_pix_loss` targets)."""
    target = patchify(target_images, patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + NORM_PIX_EPSILON) ** 0.5
    return predictions * std + mean


def _paste(original: torch.Tensor, predictions: torch.Tensor, mask: torch.Tensor, patch_size: int, grid) -> tuple:
    """Images `[B, C, H, W]` of the predictions, of the removed-patch mask, and of the original with predictions
    pasted into the removed patches."""
    channels = original.shape[1]
    predicted = unpatchify(predictions, patch_size, channels, grid)
    mask_image = unpatchify(
        mask.unsqueeze(-1).expand(-1, -1, patch_size * patch_size * channels), patch_size, channels, grid
    )
    return predicted, mask_image, original * (1 - mask_image) + predicted * mask_image


def display_spectrograms(input_features: torch.Tensor, audio_mean: float = -5.081, audio_std: float = 4.4849):
    """Normalised fbank `[B, T, F]` -> log-mel `[B, F, T]` (frequency up the rows) with the feature normalisation
    undone, as a numpy array."""
    return _log_mel_of_images(spectrogram_to_image(input_features.float()), audio_mean, audio_std)


def _log_mel_of_images(images: torch.Tensor, audio_mean: float, audio_std: float):
    """Normalised spectrogram images `[B, 1, F, T]` -> log-mel `[B, F, T]` with the normalisation undone (numpy)."""
    return (images[:, 0] * audio_std + audio_mean).cpu().numpy()


def display_images(pixel_values: torch.Tensor, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
    """Normalised frames `[B, 3, H, W]` -> RGB `[B, H, W, 3]` in [0, 1], as a numpy array."""
    mean = torch.tensor(image_mean, device=pixel_values.device).view(1, 3, 1, 1)
    std = torch.tensor(image_std, device=pixel_values.device).view(1, 3, 1, 1)
    return (pixel_values.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def reconstruct(
    model,
    input_features: torch.Tensor,
    pixel_values: torch.Tensor,
    audio_mask_ratio: float | None = None,
    visual_mask_ratio: float | None = None,
    audio_mask_mode: str | None = None,
    seed: int | None = 0,
    audio_mean: float = -5.081,
    audio_std: float = 4.4849,
    image_mean=IMAGENET_MEAN,
    image_std=IMAGENET_STD,
) -> list[Reconstruction]:
    """
    Mask and reconstruct a batch with a [`CavMaeForPreTraining`] model.

    Args:
        input_features: `[B, T, F]` normalised fbank. pixel_values: `[B, 3, H, W]` normalised frames.
        audio_mask_ratio, visual_mask_ratio, audio_mask_mode: override the config's for this call.
        seed: makes the masks reproducible (None: random).
        audio_mean, audio_std, image_mean, image_std: the feature extractor's normalisation, undone for display.
    Returns:
        One [`Reconstruction`] per clip.
    """
    if not hasattr(model, "decoder"):
        raise CavMaeInputError(
            "Reconstruction needs a pretraining model with its decoder (CavMaeForPreTraining), "
            f"got {type(model).__name__}."
        )
    config = model.config
    device, dtype = model.device, model.dtype
    input_features = input_features.to(device=device, dtype=dtype)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    with config_overrides(
        config,
        audio_mask_ratio=audio_mask_ratio,
        visual_mask_ratio=visual_mask_ratio,
        audio_mask_mode=audio_mask_mode,
        mae_loss_weight=config.mae_loss_weight or 1.0,
        contrastive_loss_weight=0.0,
    ):
        audio_noise, visual_noise = masking_noise(config, input_features.shape[0], seed, device)
        output = model(
            input_features, pixel_values, audio_noise=audio_noise, visual_noise=visual_noise, return_dict=True
        )
        ratios = (config.audio_mask_ratio, config.visual_mask_ratio)
    if config.norm_pix_loss:
        logger.warning(
            "This model was pretrained with norm_pix_loss=True: its predictions are per-patch normalised. They are "
            "shown re-scaled to each target patch's mean/std (statistics of the hidden patches). Use a model "
            "pretrained with norm_pix_loss=False for a faithful reconstruction."
        )
    spectrograms = spectrogram_to_image(input_features).float()
    frames = pixel_values.float()
    audio_predictions, visual_predictions = output.audio_logits.float(), output.visual_logits.float()
    if config.norm_pix_loss:
        audio_predictions = rescale_normalised_patches(audio_predictions, spectrograms, config.patch_size)
        visual_predictions = rescale_normalised_patches(visual_predictions, frames, config.patch_size)
    _, audio_mask_image, audio_pasted = _paste(
        spectrograms, audio_predictions, output.audio_mask.float(), config.patch_size, config.audio_grid_size
    )
    _, visual_mask_image, visual_pasted = _paste(
        frames, visual_predictions, output.visual_mask.float(), config.patch_size, config.visual_grid_size
    )

    def to_log_mel(image):  # [B, 1, F, T] -> [B, F, T]
        return _log_mel_of_images(image, audio_mean, audio_std)

    def to_rgb(image):  # [B, 3, H, W] -> [B, H, W, 3] in [0, 1]
        return display_images(image, image_mean, image_std)

    spectrogram, reconstructed_spectrogram = to_log_mel(spectrograms), to_log_mel(audio_pasted)
    masked_spectrogram = np.where(audio_mask_image[:, 0].cpu().numpy() > 0.5, np.nan, spectrogram)
    image, reconstructed_image = to_rgb(frames), to_rgb(visual_pasted)
    visual_removed = visual_mask_image.permute(0, 2, 3, 1).cpu().numpy() > 0.5
    masked_image = np.where(visual_removed, MASKED_GRAY, image)
    audio_grid, visual_grid = config.audio_grid_size, config.visual_grid_size
    return [
        Reconstruction(
            spectrogram=spectrogram[i],
            masked_spectrogram=masked_spectrogram[i],
            reconstructed_spectrogram=reconstructed_spectrogram[i],
            image=image[i],
            masked_image=masked_image[i],
            reconstructed_image=reconstructed_image[i],
            audio_mask=output.audio_mask[i].reshape(audio_grid).cpu().numpy(),
            visual_mask=output.visual_mask[i].reshape(visual_grid).cpu().numpy(),
            audio_mae_loss=float(output.audio_mae_loss),
            visual_mae_loss=float(output.visual_mae_loss),
            norm_pix_loss=bool(config.norm_pix_loss),
            audio_mask_ratio=float(ratios[0]),
            visual_mask_ratio=float(ratios[1]),
        )
        for i in range(input_features.shape[0])
    ]


@torch.no_grad()
def masked_patch_errors(
    model,
    input_features: torch.Tensor,
    pixel_values: torch.Tensor,
    audio_baseline: torch.Tensor,
    visual_baseline: torch.Tensor,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """
    How well a model pretrained with `norm_pix_loss=False` fills in removed patches, next to a baseline that knows
    nothing of the clip: the mean squared error on the removed patches (the config's masking ratios, masks drawn
    from `seed`) of the model's predictions and of `audio_baseline` `[T, F]` / `visual_baseline` `[3, H, W]`
    predicted for every clip (e.g. the mean of the training clips), in the model's input units.

    Args:
        input_features: `[N, T, F]` normalised fbank. pixel_values: `[N, 3, H, W]` normalised frames.
    Returns:
        `audio_mse`, `audio_baseline_mse`, `visual_mse`, `visual_baseline_mse`.
    """
    config = model.config
    if config.norm_pix_loss:
        raise CavMaeInputError(
            "masked_patch_errors compares predictions with the input, so it needs a model pretrained with "
            "norm_pix_loss=False (this one predicts per-patch normalised patches)."
        )
    device, dtype = model.device, model.dtype
    sums = dict.fromkeys(("audio_mse", "audio_baseline_mse", "visual_mse", "visual_baseline_mse"), 0.0)
    for batch, start in enumerate(range(0, len(input_features), batch_size)):
        audio = input_features[start : start + batch_size].to(device=device, dtype=dtype)
        frames = pixel_values[start : start + batch_size].to(device=device, dtype=dtype)
        audio_noise, visual_noise = masking_noise(config, len(audio), seed + batch, device)
        with config_overrides(config, mae_loss_weight=config.mae_loss_weight or 1.0, contrastive_loss_weight=0.0):
            output = model(audio, frames, audio_noise=audio_noise, visual_noise=visual_noise, return_dict=True)
        spectrograms = spectrogram_to_image(audio)
        audio_guess = spectrogram_to_image(audio_baseline.to(audio)[None]).expand_as(spectrograms)
        audio_guess = patchify(audio_guess, config.patch_size)
        visual_guess = patchify(visual_baseline.to(frames)[None].expand_as(frames), config.patch_size)
        errors = {
            "audio_mse": (spectrograms, output.audio_logits, output.audio_mask),
            "audio_baseline_mse": (spectrograms, audio_guess, output.audio_mask),
            "visual_mse": (frames, output.visual_logits, output.visual_mask),
            "visual_baseline_mse": (frames, visual_guess, output.visual_mask),
        }
        for name, (target, prediction, mask) in errors.items():
            error = reconstruction_loss(target, prediction.float(), mask.float(), config.patch_size, False)
            sums[name] += float(error) * len(audio)  # every clip has the same number of removed patches
    return {name: total / len(input_features) for name, total in sums.items()}


def reconstruct_clip(
    model,
    source,
    feature_extractor=None,
    frame_index: int | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    **kwargs,
) -> Reconstruction:
    """
    Reconstruct one clip: a video path or a dict `{"audio", "sampling_rate", "frames"}`; both modalities are needed.
    The frame shown is `frame_index` of the `num_frames` sampled uniformly (default: the middle one, as the
    reference's inpainting used frame 5 of 10). `kwargs` go to [`reconstruct`].
    """
    feature_extractor = feature_extractor or CavMaeFeatureExtractor.from_model_config(model.config)
    clip = load_clip(
        source,
        num_frames=num_frames,
        sampling_rate=feature_extractor.sampling_rate,
        audio_seconds=audio_seconds_for(feature_extractor),
    )
    if clip.audio is None or not clip.frames:
        raise CavMaeInputError(
            f"Reconstruction needs audio and frames; {clip.source or 'the input'} has only "
            f"{', '.join(clip.modalities)}."
        )
    frame_index = len(clip.frames) // 2 if frame_index is None else frame_index
    if not -len(clip.frames) <= frame_index < len(clip.frames):
        raise CavMaeInputError(f"frame_index {frame_index} is out of range for {len(clip.frames)} frames.")
    clip.frames = [clip.frames[frame_index]]
    features = clip_features(feature_extractor, clip)
    kwargs.setdefault("audio_mean", feature_extractor.audio_mean if feature_extractor.do_normalize else 0.0)
    kwargs.setdefault("audio_std", feature_extractor.audio_std if feature_extractor.do_normalize else 1.0)
    kwargs.setdefault("image_mean", feature_extractor.image_mean)
    kwargs.setdefault("image_std", feature_extractor.image_std)
    result = reconstruct(model, features["input_features"], features["pixel_values"][:, 0], **kwargs)[0]
    result.source = clip.source
    return result


# ----------------------------------------------------------------------------------------------------------------
# Picture
# ----------------------------------------------------------------------------------------------------------------
def figure_title(result: Reconstruction) -> str:
    title = (
        f"CAV-MAE reconstruction{f' of {Path(result.source).name}' if result.source else ''}: "
        f"{result.audio_mask_ratio:.0%} of audio and {result.visual_mask_ratio:.0%} of visual patches removed "
        f"(MSE on removed patches: audio {result.audio_mae_loss:.3f}, visual {result.visual_mae_loss:.3f})"
    )
    if result.norm_pix_loss:
        title += (
            "\nWARNING: norm_pix_loss=True model - predictions are per-patch normalised and shown re-scaled to each "
            "target patch's mean/std (borrowed from the hidden patches)"
        )
    return title


def render_reconstruction(result: Reconstruction, path, figsize=(15.0, 7.5), dpi: int = 100) -> Path:
    """
    Draw original / masked / reconstruction of the frame (top row) and the spectrogram (bottom row) into a PNG of
    exactly `figsize * dpi` pixels. Uses matplotlib's Agg backend (no display needed).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)  # Agg, whatever backend pyplot may use
    axes = figure.subplots(2, 3, gridspec_kw={"height_ratios": [1.6, 1.0]})
    figure.suptitle(figure_title(result), fontsize=10, color="darkred" if result.norm_pix_loss else "black")
    for axis, image, name in zip(
        axes[0],
        (result.image, result.masked_image, result.reconstructed_image),
        ("original", "masked", "reconstruction"),
    ):
        axis.imshow(image, interpolation="nearest")
        axis.set_title(f"frame: {name}", fontsize=9)
        axis.axis("off")
    limits = np.nanmin(result.spectrogram), np.nanmax(result.spectrogram)
    colormap = matplotlib.colormaps["magma"].with_extremes(bad="0.5")
    for axis, spectrogram, name in zip(
        axes[1],
        (result.spectrogram, result.masked_spectrogram, result.reconstructed_spectrogram),
        ("original", "masked", "reconstruction"),
    ):
        axis.imshow(
            spectrogram,
            origin="lower",
            aspect="auto",
            cmap=colormap,
            vmin=limits[0],
            vmax=limits[1],
            interpolation="nearest",
        )
        axis.set_title(f"log-mel spectrogram: {name}", fontsize=9)
        axis.set_xlabel("frame (10 ms)", fontsize=8)
        axis.set_ylabel("mel bin", fontsize=8)
        axis.tick_params(labelsize=7)
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.08, top=0.86, wspace=0.15, hspace=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return path
