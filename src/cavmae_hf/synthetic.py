"""
Synthetic audio-visual clips that carry real signal, made on the spot (nothing is downloaded).

Each class pairs a distinct sound with a distinct picture:

- sound: a timbre (pure tone, odd or all harmonics, a noise band, a rising chirp, a warbling tone) at a class
  pitch (log-spaced between 300 and 2400 Hz), switched on and off in pulses;
- picture: a shape (disc, square, triangle, diamond, cross, ring, bars, ...) in a class colour (hues around the
  colour wheel) on a noisy grey background.

Three latent values per clip tie the modalities together inside a class, so that audio-visual retrieval has an
answer clip by clip and not only class by class:

- `pitch` in [0, 1] raises the tone by up to half an octave and moves the shape up the frame (high sound, high
  shape);
- `tempo` in [0, 1] speeds the pulses from 1.5 to 5 per second and moves the shape to the right;
- `loudness` in [0, 1] makes the sound louder (18 dB of range) and the background brighter.

Nuisances vary independently: background noise of both, shape size, colour jitter, a small drift of the shape
from frame to frame. Clips are written as real mp4 files (H.264 + AAC, through
`cavmae_hf.media.write_video`) in the folder layout `root/<class name>/<clip id>.mp4` that
[`cavmae_hf.data.dataset_from_folder`] reads, or generated as arrays.
"""

import colorsys
import csv
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .configuration_cav_mae import CavMaeConfigError

TIMBRES = ("tone", "odd_harmonics", "all_harmonics", "noise_band", "chirp", "warble")
SHAPES = ("disc", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar", "x", "half_disc", "frame", "dots")
LOWEST_PITCH_HZ = 300.0
HIGHEST_PITCH_HZ = 2400.0


@dataclass
class SyntheticClassSpec:
    """What makes one synthetic class: its name, timbre, base pitch (Hz), shape and colour (RGB in [0, 1])."""

    name: str
    timbre: str
    pitch_hz: float
    shape: str
    color: tuple[float, float, float]


@dataclass
class SyntheticClip:
    """One generated clip: mono float32 audio at `sampling_rate`, uint8 frames `[F, H, W, 3]`, its class and latents."""

    clip_id: str
    label: int
    audio: np.ndarray
    sampling_rate: int
    frames: np.ndarray
    fps: int
    pitch: float
    tempo: float
    loudness: float


def class_specs(num_classes: int) -> list[SyntheticClassSpec]:
    """`num_classes` distinct (timbre, pitch, shape, colour) combinations; up to 12 shapes, colours spread evenly."""
    if not 1 <= num_classes <= len(SHAPES) * len(TIMBRES):
        raise CavMaeConfigError(f"num_classes must be between 1 and {len(SHAPES) * len(TIMBRES)}, got {num_classes}.")
    specs = []
    for index in range(num_classes):
        fraction = index / max(num_classes - 1, 1)
        pitch = LOWEST_PITCH_HZ * (HIGHEST_PITCH_HZ / LOWEST_PITCH_HZ) ** fraction
        hue = (index * 0.618034) % 1.0  # golden-ratio steps keep neighbouring classes far apart in hue
        color = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        timbre = TIMBRES[index % len(TIMBRES)]
        shape = SHAPES[index % len(SHAPES)]
        specs.append(SyntheticClassSpec(f"{shape}_{timbre}", timbre, pitch, shape, tuple(color)))
    return specs


# ----------------------------------------------------------------------------------------------------------------
# Sound
# ----------------------------------------------------------------------------------------------------------------
def _pulse_envelope(times: np.ndarray, rate_hz: float, phase: float) -> np.ndarray:
    """Smooth on/off pulses at `rate_hz` (half on, half off) with 10 ms ramps."""
    position = (times * rate_hz + phase) % 1.0
    on = position < 0.5
    ramp = np.minimum(position, 0.5 - position) / (0.01 * rate_hz)
    return np.where(on, np.clip(ramp, 0.0, 1.0), 0.0)


def _timbre_wave(timbre: str, pitch_hz: float, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    phase = 2 * np.pi * pitch_hz * times
    if timbre == "tone":
        return np.sin(phase)
    if timbre == "odd_harmonics":
        return sum(np.sin(k * phase) / k for k in (1, 3, 5, 7))
    if timbre == "all_harmonics":
        return sum(np.sin(k * phase) / k for k in range(1, 7))
    if timbre == "noise_band":
        noise = rng.standard_normal(len(times))
        spectrum = np.fft.rfft(noise)
        frequencies = np.fft.rfftfreq(len(times), times[1] - times[0])
        spectrum[np.abs(frequencies - pitch_hz) > 0.15 * pitch_hz] = 0
        band = np.fft.irfft(spectrum, n=len(times))
        return band / (np.abs(band).max() + 1e-8)
    if timbre == "chirp":
        # each pulse sweeps up an octave: the instantaneous frequency rises within a 0.25 s period
        sweep = (times % 0.25) / 0.25
        return np.sin(2 * np.pi * np.cumsum(pitch_hz * 2**sweep) * (times[1] - times[0]))
    if timbre == "warble":
        return np.sin(phase + 3.0 * np.sin(2 * np.pi * 12.0 * times))
    raise CavMaeConfigError(f"Unknown timbre {timbre!r}: one of {', '.join(TIMBRES)}.")


def synthesize_audio(
    spec: SyntheticClassSpec,
    pitch: float,
    tempo: float,
    loudness: float,
    duration: float,
    sampling_rate: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The clip's sound: the class timbre at its pitch raised by `pitch` (0-0.5 octave), pulsed at 1.5-5 Hz by
    `tempo`, with a peak amplitude from 0.08 to 0.64 by `loudness`, over a little background noise. float32 in
    [-1, 1]."""
    times = np.arange(int(round(duration * sampling_rate))) / sampling_rate
    wave = _timbre_wave(spec.timbre, spec.pitch_hz * 2 ** (0.5 * pitch), times, rng)
    wave = wave / (np.abs(wave).max() + 1e-8)
    envelope = _pulse_envelope(times, 1.5 + 3.5 * tempo, rng.uniform())
    amplitude = 0.08 * 8**loudness
    background = rng.uniform(0.003, 0.02) * rng.standard_normal(len(times))
    return np.clip(amplitude * envelope * wave + background, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Picture
# ----------------------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of `shape` of size `radius` around the origin of the offsets `dx`, `dy` (pixels)."""
    distance = np.hypot(dx, dy)
    ax, ay = np.abs(dx), np.abs(dy)
    thin = radius * 0.35
    masks = {
        "disc": distance <= radius,
        "square": (ax <= radius * 0.85) & (ay <= radius * 0.85),
        "triangle": (dy <= radius * 0.8) & (dy >= -radius) & (ax <= (dy + radius) * 0.6),
        "diamond": ax + ay <= radius * 1.1,
        "cross": ((ax <= thin) & (ay <= radius)) | ((ay <= thin) & (ax <= radius)),
        "ring": (distance <= radius) & (distance >= radius * 0.55),
        "hbar": (ax <= radius * 1.2) & (ay <= thin),
        "vbar": (ay <= radius * 1.2) & (ax <= thin),
        "x": (np.abs(dx - dy) <= thin * 1.2) & (distance <= radius * 1.1)
        | (np.abs(dx + dy) <= thin * 1.2) & (distance <= radius * 1.1),
        "half_disc": (distance <= radius) & (dy >= 0),
        "frame": (ax <= radius) & (ay <= radius) & ((ax >= radius * 0.6) | (ay >= radius * 0.6)),
        "dots": np.hypot(ax - radius * 0.5, ay - radius * 0.5) <= radius * 0.38,
    }
    return masks[shape]


def synthesize_frames(
    spec: SyntheticClassSpec,
    pitch: float,
    tempo: float,
    loudness: float,
    num_frames: int,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """uint8 frames `[num_frames, size, size, 3]`: the class shape in its colour, high in the frame for a high
    `pitch`, to the right for a fast `tempo`, drifting a little from frame to frame, on a noisy grey background that
    is brighter for a larger `loudness`."""
    radius = size * rng.uniform(0.14, 0.19)
    margin = radius + 2
    center_x = margin + tempo * (size - 2 * margin)
    center_y = margin + (1.0 - pitch) * (size - 2 * margin)
    color = np.clip(np.array(spec.color) + rng.normal(0, 0.04, 3), 0, 1)
    background = 0.08 + 0.5 * loudness
    drift = rng.normal(0, 0.6, size=(num_frames, 2)).cumsum(axis=0)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for index in range(num_frames):
        canvas = background + rng.normal(0, 0.05, (size, size, 1)) + np.zeros((1, 1, 3))
        mask = _shape_mask(spec.shape, xs - center_x - drift[index, 0], ys - center_y - drift[index, 1], radius)
        canvas[mask] = color
        frames[index] = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Clips and files
# ----------------------------------------------------------------------------------------------------------------
def generate_clips(
    num_classes: int = 10,
    clips_per_class: int = 64,
    duration: float = 2.56,
    image_size: int = 64,
    fps: int = 10,
    sampling_rate: int = 16000,
    seed: int = 0,
):
    """Yield [`SyntheticClip`]s, class by class; the same seed gives the same clips."""
    rng = np.random.default_rng(seed)
    num_frames = int(np.ceil(duration * fps))
    for label, spec in enumerate(class_specs(num_classes)):
        for index in range(clips_per_class):
            pitch, tempo, loudness = rng.uniform(size=3)
            clip_rng = np.random.default_rng(rng.integers(2**32))
            yield SyntheticClip(
                clip_id=f"{spec.name}_{index:04d}",
                label=label,
                audio=synthesize_audio(spec, pitch, tempo, loudness, duration, sampling_rate, clip_rng),
                sampling_rate=sampling_rate,
                frames=synthesize_frames(spec, pitch, tempo, loudness, num_frames, image_size, clip_rng),
                fps=fps,
                pitch=float(pitch),
                tempo=float(tempo),
                loudness=float(loudness),
            )


def write_synthetic_videos(root, *args, progress: bool = False, **kwargs) -> Path:
    """
    Write a synthetic set as mp4 files in the folder layout `root/<class name>/<clip id>.mp4`, plus
    `root/metadata.csv` (`video,label,pitch,tempo,loudness`). Returns `root`.

    The other arguments are those of [`generate_clips`] (`num_classes=10`, `clips_per_class=64`, `duration=2.56`,
    `image_size=64`, `fps=10`, `sampling_rate=16000`, `seed=0`); `progress` shows a progress bar.
    """
    from .media import write_video

    options = _clip_options(*args, **kwargs)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clips = generate_clips(**options)
    if progress:
        from tqdm.auto import tqdm

        total = options["num_classes"] * options["clips_per_class"]
        clips = tqdm(clips, total=total, desc="Writing synthetic mp4 files", unit="clip")
    names = [spec.name for spec in class_specs(options["num_classes"])]
    rows = []
    for clip in clips:
        path = root / names[clip.label] / f"{clip.clip_id}.mp4"
        path.parent.mkdir(exist_ok=True)
        write_video(path, frames=clip.frames, audio=clip.audio, fps=clip.fps, sampling_rate=clip.sampling_rate)
        latents = (f"{clip.pitch:.4f}", f"{clip.tempo:.4f}", f"{clip.loudness:.4f}")
        rows.append((str(path.relative_to(root)), names[clip.label], *latents))
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "label", "pitch", "tempo", "loudness"])
        writer.writerows(rows)
    return root


def _clip_options(*args, **kwargs) -> dict:
    """The arguments of [`generate_clips`] by name, defaults included (a `TypeError` for any it does not take)."""
    options = inspect.signature(generate_clips).bind(*args, **kwargs)
    options.apply_defaults()
    return options.arguments


__all__ = [
    "SyntheticClassSpec",
    "SyntheticClip",
    "class_specs",
    "generate_clips",
    "synthesize_audio",
    "synthesize_frames",
    "write_synthetic_videos",
]
