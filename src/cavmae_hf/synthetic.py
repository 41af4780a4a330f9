"""
Synthetic audio-visual clips that carry real signal, made on the spot (nothing is downloaded).

Each class pairs a distinct sound with a distinct picture, both built from structure that spans many patches, so
that a masked autoencoder can infer a hidden patch from the visible ones:

- sound: a steady stack of partials (a class timbre: all, odd, octave-spaced, weak or strong upper harmonics, or a
  pitch with its fifth) at a class pitch (log-spaced between 150 and 600 Hz, so that the partials reach up the
  whole spectrogram), pulsed at a class rate (1.5 to 4.5 per second) from the start of the clip, 20 dB quieter
  between pulses. The partials continue across the clip and the pulses start together in every band, so a hidden
  stretch of one band follows from the bands above and below it and from the rest of the band;
- picture: a large shape (disc, square, triangle, diamond, cross, ring, bars, ...) with sharp edges, in a class
  colour (hues around the colour wheel), on a smooth grey gradient.

Three latent values per clip tie the modalities together inside a class, so that audio-visual retrieval has an
answer clip by clip and not only class by class:

- `pitch` in [0, 1] raises the sound by up to half an octave and moves the shape up the frame (high sound, high
  shape);
- `brightness` in [0, 1] strengthens the upper partials (a brighter sound) and moves the shape to the right;
- `loudness` in [0, 1] makes the sound louder (18 dB of range) and the background brighter.

Nuisances vary independently: the phases of the partials, a faint background hiss, the shape's size, colour
jitter, the gradient's direction and strength, a small drift of the shape from frame to frame. Clips are written as
real mp4 files (H.264 + AAC, through `cavmae_hf.media.write_video`) in the folder layout `root/<class name>/<clip
id>.mp4` that [`cavmae_hf.data.dataset_from_folder`] reads, or generated as arrays.
"""

import colorsys
import csv
import inspect
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .configuration_cav_mae import CavMaeConfigError

TIMBRES = ("harmonics", "odd_harmonics", "octaves", "dark_harmonics", "bright_harmonics", "fifths")
SHAPES = ("disc", "square", "triangle", "diamond", "cross", "ring", "hbar", "vbar", "x", "half_disc", "frame", "dots")
LOWEST_PITCH_HZ = 150.0
HIGHEST_PITCH_HZ = 600.0
HIGHEST_PARTIAL_HZ = 7000.0  # below the 8 kHz Nyquist frequency of 16 kHz audio
SUSTAIN_LEVEL = 0.1  # the sound between pulses, relative to the pulses (-20 dB)
SLOWEST_PULSE_HZ = 1.5
FASTEST_PULSE_HZ = 4.5


@dataclass
class SyntheticClassSpec:
    """What makes one synthetic class: its name, timbre, base pitch (Hz), pulses per second, shape and colour (RGB
    in [0, 1])."""

    name: str
    timbre: str
    pitch_hz: float
    pulse_rate_hz: float
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
    brightness: float
    loudness: float


def class_specs(num_classes: int) -> list[SyntheticClassSpec]:
    """`num_classes` distinct (timbre, pitch, pulse rate, shape, colour) combinations; up to 12 shapes, colours
    spread evenly."""
    if not 1 <= num_classes <= len(SHAPES) * len(TIMBRES):
        raise CavMaeConfigError(f"num_classes must be between 1 and {len(SHAPES) * len(TIMBRES)}, got {num_classes}.")
    specs = []
    for index in range(num_classes):
        fraction = index / max(num_classes - 1, 1)
        pitch = LOWEST_PITCH_HZ * (HIGHEST_PITCH_HZ / LOWEST_PITCH_HZ) ** fraction
        # rates interleaved with the pitches, so that neighbouring classes differ in both
        rate = SLOWEST_PULSE_HZ * (FASTEST_PULSE_HZ / SLOWEST_PULSE_HZ) ** ((index * 0.618034) % 1.0)
        hue = (index * 0.618034) % 1.0  # golden-ratio steps keep neighbouring classes far apart in hue
        color = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        timbre = TIMBRES[index % len(TIMBRES)]
        shape = SHAPES[index % len(SHAPES)]
        specs.append(SyntheticClassSpec(f"{shape}_{timbre}", timbre, pitch, rate, shape, tuple(color)))
    return specs


# ----------------------------------------------------------------------------------------------------------------
# Sound
# ----------------------------------------------------------------------------------------------------------------
def _pulse_envelope(times: np.ndarray, rate_hz: float, floor: float = 0.0) -> np.ndarray:
    """Pulses at `rate_hz` from time 0 (half on, half at `floor`) with 10 ms ramps."""
    position = (times * rate_hz) % 1.0
    on = position < 0.5
    ramp = np.minimum(position, 0.5 - position) / (0.01 * rate_hz)
    return floor + (1.0 - floor) * np.where(on, np.clip(ramp, 0.0, 1.0), 0.0)


def _partials(timbre: str, pitch_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (multiples of `pitch_hz`) and amplitudes of a timbre's partials, up to `HIGHEST_PARTIAL_HZ`."""
    count = max(1, int(HIGHEST_PARTIAL_HZ // pitch_hz))
    harmonics = np.arange(1, count + 1, dtype=np.float64)
    if timbre == "harmonics":
        return harmonics, 1.0 / harmonics
    if timbre == "odd_harmonics":
        odd = harmonics[harmonics % 2 == 1]
        return odd, 1.0 / odd
    if timbre == "octaves":
        octaves = 2.0 ** np.arange(int(np.log2(count)) + 1)
        return octaves, octaves**-0.5
    if timbre == "dark_harmonics":
        return harmonics, harmonics**-2.0
    if timbre == "bright_harmonics":
        return harmonics, harmonics**-0.5
    if timbre == "fifths":  # the harmonics of the pitch and of a fifth above it
        fifths = 1.5 * harmonics[: max(1, int(count / 1.5))]
        return np.concatenate([harmonics, fifths]), np.concatenate([1.0 / harmonics, 0.7 / fifths])
    raise CavMaeConfigError(f"Unknown timbre {timbre!r}: one of {', '.join(TIMBRES)}.")


def _timbre_wave(timbre: str, pitch_hz: float, brightness: float, times: np.ndarray, rng: np.random.Generator):
    """The timbre's partials at `pitch_hz` (random phases), the upper ones stronger for a larger `brightness` (up to
    +-16 dB at the 40th harmonic), peak-normalised."""
    multiples, amplitudes = _partials(timbre, pitch_hz)
    amplitudes = amplitudes * multiples ** (brightness - 0.5)
    offsets = rng.uniform(0, 2 * np.pi, len(multiples))
    wave = np.zeros_like(times)
    for multiple, amplitude, offset in zip(multiples, amplitudes, offsets):
        wave += amplitude * np.sin(2 * np.pi * multiple * pitch_hz * times + offset)
    return wave / (np.abs(wave).max() + 1e-8)


def synthesize_audio(
    spec: SyntheticClassSpec,
    pitch: float,
    brightness: float,
    loudness: float,
    duration: float,
    sampling_rate: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The clip's sound: the class timbre at its pitch raised by `pitch` (0-0.5 octave), brighter for a larger
    `brightness`, pulsed at the class's rate from the start of the clip, with a peak amplitude from 0.08 to 0.64 by
    `loudness`, over a faint background hiss. float32 in [-1, 1]."""
    times = np.arange(round(duration * sampling_rate)) / sampling_rate
    wave = _timbre_wave(spec.timbre, spec.pitch_hz * 2 ** (0.5 * pitch), brightness, times, rng)
    envelope = _pulse_envelope(times, spec.pulse_rate_hz, floor=SUSTAIN_LEVEL)
    amplitude = 0.08 * 8**loudness
    hiss = rng.uniform(0.001, 0.003) * rng.standard_normal(len(times))
    return np.clip(amplitude * envelope * wave + hiss, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Picture
# ----------------------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of `shape` of size `radius` around the origin of the offsets `dx`, `dy` (pixels)."""
    distance = np.hypot(dx, dy)
    ax, ay = np.abs(dx), np.abs(dy)
    thin = radius * 0.35
    masks = {
        "disc": lambda: distance <= radius,
        "square": lambda: (ax <= radius * 0.85) & (ay <= radius * 0.85),
        "triangle": lambda: (dy <= radius * 0.8) & (dy >= -radius) & (ax <= (dy + radius) * 0.6),
        "diamond": lambda: ax + ay <= radius * 1.1,
        "cross": lambda: ((ax <= thin) & (ay <= radius)) | ((ay <= thin) & (ax <= radius)),
        "ring": lambda: (distance <= radius) & (distance >= radius * 0.55),
        "hbar": lambda: (ax <= radius * 1.2) & (ay <= thin),
        "vbar": lambda: (ay <= radius * 1.2) & (ax <= thin),
        "x": lambda: ((np.abs(dx - dy) <= thin * 1.2) | (np.abs(dx + dy) <= thin * 1.2)) & (distance <= radius * 1.1),
        "half_disc": lambda: (distance <= radius) & (dy >= 0),
        "frame": lambda: (ax <= radius) & (ay <= radius) & ((ax >= radius * 0.6) | (ay >= radius * 0.6)),
        "dots": lambda: np.hypot(ax - radius * 0.5, ay - radius * 0.5) <= radius * 0.38,
    }
    return masks[shape]()


def _gradient_background(size: int, loudness: float, rng: np.random.Generator) -> np.ndarray:
    """`[size, size, 3]` grey that is brighter for a larger `loudness` and changes linearly across the frame in a
    random direction (so the hidden parts of the background follow from the visible ones)."""
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.1, 0.25)
    coordinates = (np.arange(size) + 0.5) / size - 0.5
    ramp = np.cos(angle) * coordinates[None, :] + np.sin(angle) * coordinates[:, None]
    grey = 0.12 + 0.5 * loudness + strength * ramp
    tint = rng.normal(0, 0.02, 3)
    return np.clip(grey[:, :, None] + tint, 0, 1)


def synthesize_frames(
    spec: SyntheticClassSpec,
    pitch: float,
    brightness: float,
    loudness: float,
    num_frames: int,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """uint8 frames `[num_frames, size, size, 3]`: the class shape in its colour, high in the frame for a high
    `pitch`, to the right for a large `brightness`, drifting a little from frame to frame, on a grey gradient that is
    brighter for a larger `loudness`."""
    radius = size * rng.uniform(0.2, 0.25)
    margin = radius + 2
    center_x = margin + brightness * (size - 2 * margin)
    center_y = margin + (1.0 - pitch) * (size - 2 * margin)
    color = np.clip(np.array(spec.color) + rng.normal(0, 0.04, 3), 0, 1)
    background = _gradient_background(size, loudness, rng)
    drift = rng.normal(0, 0.4, size=(num_frames, 2)).cumsum(axis=0)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for index in range(num_frames):
        canvas = background.copy()
        mask = _shape_mask(spec.shape, xs - center_x - drift[index, 0], ys - center_y - drift[index, 1], radius)
        canvas[mask] = color
        frames[index] = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Clips and files
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _ClipPlan:
    """What a clip will be, drawn up front so that clips can be made in any order (and process)."""

    label: int
    index: int
    pitch: float
    brightness: float
    loudness: float
    seed: int


def _clip_plans(num_classes: int, clips_per_class: int, seed: int) -> list[_ClipPlan]:
    rng = np.random.default_rng(seed)
    plans = []
    for label in range(num_classes):
        for index in range(clips_per_class):
            pitch, brightness, loudness = rng.uniform(size=3)
            plans.append(_ClipPlan(label, index, pitch, brightness, loudness, int(rng.integers(2**32))))
    return plans


def _make_clip(plan: _ClipPlan, spec: SyntheticClassSpec, duration, image_size, fps, sampling_rate) -> SyntheticClip:
    rng = np.random.default_rng(plan.seed)
    num_frames = int(np.ceil(duration * fps))
    return SyntheticClip(
        clip_id=f"{spec.name}_{plan.index:04d}",
        label=plan.label,
        audio=synthesize_audio(spec, plan.pitch, plan.brightness, plan.loudness, duration, sampling_rate, rng),
        sampling_rate=sampling_rate,
        frames=synthesize_frames(spec, plan.pitch, plan.brightness, plan.loudness, num_frames, image_size, rng),
        fps=fps,
        pitch=float(plan.pitch),
        brightness=float(plan.brightness),
        loudness=float(plan.loudness),
    )


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
    specs = class_specs(num_classes)
    for plan in _clip_plans(num_classes, clips_per_class, seed):
        yield _make_clip(plan, specs[plan.label], duration, image_size, fps, sampling_rate)


def _write_clips(root: Path, plans: list[_ClipPlan], options: dict) -> list[tuple]:
    """Make and write the clips of `plans`; their metadata rows."""
    from .media import write_video

    specs = class_specs(options["num_classes"])
    rows = []
    for plan in plans:
        spec = specs[plan.label]
        clip = _make_clip(
            plan, spec, options["duration"], options["image_size"], options["fps"], options["sampling_rate"]
        )
        path = root / spec.name / f"{clip.clip_id}.mp4"
        write_video(path, frames=clip.frames, audio=clip.audio, fps=clip.fps, sampling_rate=clip.sampling_rate)
        latents = (f"{clip.pitch:.4f}", f"{clip.brightness:.4f}", f"{clip.loudness:.4f}")
        rows.append((str(path.relative_to(root)), spec.name, *latents))
    return rows


def write_synthetic_videos(root, *args, progress: bool = False, num_proc: int = 1, **kwargs) -> Path:
    """
    Write a synthetic set as mp4 files in the folder layout `root/<class name>/<clip id>.mp4`, plus
    `root/metadata.csv` (`video,label,pitch,brightness,loudness`). Returns `root`.

    The other arguments are those of [`generate_clips`] (`num_classes=10`, `clips_per_class=64`, `duration=2.56`,
    `image_size=64`, `fps=10`, `sampling_rate=16000`, `seed=0`); `progress` shows a progress bar; `num_proc`
    processes make the clips side by side (the files are the same whatever the number).
    """
    options = _clip_options(*args, **kwargs)
    root = Path(root)
    for spec in class_specs(options["num_classes"]):
        (root / spec.name).mkdir(parents=True, exist_ok=True)
    plans = _clip_plans(options["num_classes"], options["clips_per_class"], options["seed"])
    chunks = [plans[start : start + 8] for start in range(0, len(plans), 8)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plans), desc="Writing synthetic mp4 files", unit="clip")
    rows = []
    with ProcessPoolExecutor(num_proc) if num_proc > 1 else _InProcess() as executor:
        for chunk_rows in executor.map(_write_clips, [root] * len(chunks), chunks, [options] * len(chunks)):
            rows += chunk_rows
            if bar is not None:
                bar.update(len(chunk_rows))
    if bar is not None:
        bar.close()
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "label", "pitch", "brightness", "loudness"])
        writer.writerows(rows)
    return root


class _InProcess:
    """The part of an executor that `write_synthetic_videos` uses, running in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    @staticmethod
    def map(function, *iterables):
        return map(function, *iterables)


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
