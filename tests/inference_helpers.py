"""Helpers of the inference tests (pipelines, CLI, retrieval, reconstruction): tiny saved models and short clips."""

from pathlib import Path

import numpy as np
from conftest import tiny_config_kwargs

from cavmae_hf import (
    CavMaeConfig,
    CavMaeFeatureExtractor,
    CavMaeForAudioVisualClassification,
    CavMaeForPreTraining,
    CavMaeModel,
)
from cavmae_hf.media import write_audio, write_video

SAMPLING_RATE = 16000
NUM_FRAMES = 10


def tiny_feature_extractor(config) -> CavMaeFeatureExtractor:
    return CavMaeFeatureExtractor(
        max_length=config.audio_length, num_mel_bins=config.num_mel_bins, image_size=config.image_size
    )


def save_tiny_model(
    path: Path, model_class=CavMaeForAudioVisualClassification, with_feature_extractor=True, **overrides
):
    """A randomly initialised tiny CAV-MAE of `model_class` saved (with a matching feature extractor) into `path`."""
    if model_class is CavMaeForAudioVisualClassification:
        overrides.setdefault("num_labels", 5)
        overrides.setdefault("id2label", {i: f"class_{i}" for i in range(overrides["num_labels"])})
    model = model_class(CavMaeConfig(**tiny_config_kwargs(**overrides))).eval()
    model.save_pretrained(path)
    if with_feature_extractor:
        tiny_feature_extractor(model.config).save_pretrained(path)
    return path


def save_tiny_classifier(path: Path, problem_type="multi_label_classification", **overrides) -> Path:
    return save_tiny_model(path, CavMaeForAudioVisualClassification, problem_type=problem_type, **overrides)


def save_tiny_pretraining(path: Path, norm_pix_loss=False, **overrides) -> Path:
    return save_tiny_model(path, CavMaeForPreTraining, norm_pix_loss=norm_pix_loss, **overrides)


def save_tiny_encoder(path: Path, **overrides) -> Path:
    return save_tiny_model(path, CavMaeModel, **overrides)


def clip_frames(seed: int, count: int = NUM_FRAMES, height: int = 32, width: int = 48) -> np.ndarray:
    """uint8 `[count, H, W, 3]`: a coloured gradient that drifts, different for each seed."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(1, 1, 3))
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-120, 120, size=(1, 1, 3))
    frames = [np.clip(base + ramp + 8 * t + rng.normal(0, 6, (height, width, 3)), 0, 255) for t in range(count)]
    return np.stack(frames).astype(np.uint8)


def clip_audio(seed: int, seconds: float = 1.0) -> np.ndarray:
    """float32 mono at 16 kHz: a tone at a seed-dependent pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
    return (tone + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def write_clip(path: Path, seed: int = 0, with_audio: bool = True, seconds: float = 1.0) -> Path:
    """A short mp4 (10 fps, 32 x 48) with a 16 kHz audio track unless `with_audio` is False."""
    frames = clip_frames(seed, count=int(10 * seconds))
    audio = clip_audio(seed, seconds) if with_audio else None
    return write_video(path, frames=frames, audio=audio, fps=10, sampling_rate=SAMPLING_RATE)


def write_wav(path: Path, seed: int = 0, seconds: float = 1.0) -> Path:
    return write_audio(path, clip_audio(seed, seconds), sampling_rate=SAMPLING_RATE)


def write_png(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    Image.fromarray(clip_frames(seed, count=1)[0]).save(path)
    return path
