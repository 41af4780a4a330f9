"""
Reading and writing media with PyAV (FFmpeg, bundled in its wheel) and soundfile: no subprocess, no torchaudio,
no torchcodec.

- `load_video(path)`: the audio track at 16 kHz and ten frames from the first 10 s, by default exactly as the
  CAV-MAE reference's preprocessing scripts wrote them before every released checkpoint was trained and evaluated
  (`src/preprocess/extract_audio.py`: `ffmpeg -ar 16000` to a 16-bit WAV, `sox remix 1`, the first channel;
  `src/preprocess/extract_video_frame.py`: OpenCV's frame `max(int(i * total / 10) - 1, 0)` in decode order, shorter
  side to 224 (bilinear), centre crop, a quality-75 JPEG). Options give cleaner alternatives: frames by timestamp,
  full-size frames without the JPEG, float audio (see `load_video`).
- `reference_frame_jpeg(frame)`, `reference_frame(frame)`, `read_frame_jpeg(data)`, `wav_bytes(waveform)`: one frame
  or waveform as the reference's scripts stored it (the 224 x 224 JPEG byte for byte; the 16-bit WAV).
- `load_audio(path)`: wav/flac/ogg/mp3 (soundfile, with PyAV as fallback) or the audio track of a video.
- `resample(waveform, orig_rate, target_rate)`: FFmpeg's resampler (libswresample) through PyAV.
- `write_video`, `write_audio`: small files for tests, demos and synthetic data.
- `probe_streams(path)`, `index_damage(path)`: which streams a file has; where an mp4 / mov is cut off.

Decoding stops as soon as what is needed has been read, so memory and time stay bounded for long files. Streams are
read packet by packet: a packet FFmpeg cannot decode (damaged data) is skipped, its audio replaced by silence of its
duration so that the timeline stays right, and one warning per stream gives the count. A stream in which nothing
decodes, and an mp4 / mov whose cut-off index (`moov` box) hides a stream or the whole file, raise `MediaError`.
"""

import io
import math
import numbers
import struct
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .configuration_cav_mae import CavMaeError
from .feature_extraction_cav_mae import _center_crop_box, _resized_size

DEFAULT_SAMPLING_RATE = 16000
FRAME_WINDOW_SECONDS = 10.0
# 1024 fbank frames of 25 ms every 10 ms need 10.255 s: a little more is decoded, nothing beyond.
DEFAULT_AUDIO_SECONDS = 10.3

# What the reference's extraction scripts wrote: frames at 224 px (the `T.Resize(224)` / `T.CenterCrop(224)` of
# extract_video_frame.py, whatever the model's image size) as Pillow JPEGs at its default quality.
REFERENCE_FRAME_SIZE = 224
REFERENCE_JPEG_QUALITY = 75

# load_video's options; the first of each is the default, the reference's preprocessing.
FRAME_SELECTIONS = ("decode_order", "timestamp")
FRAME_TRANSFORMS = ("reference_jpeg", "none")
AUDIO_PRECISIONS = ("int16", "float32")


class MediaError(CavMaeError):
    """A media file is missing, unreadable, or lacks the stream that was asked for; the message says which."""


@dataclass
class Clip:
    """
    One clip, the package's one clip type: mono float32 `audio` `[N]` at `sampling_rate` (None when absent) and RGB
    `frames` (PIL images), and where it came from (`source`). From `load_video` also the frames' presentation times
    in seconds and their numbers in decode order (0: the first frame decoded), the file's duration, and with
    `frame_transform="reference_jpeg"` the JPEG file of each frame (`bytes`) that the reference's script would have
    written, of which `frames` are the decoded images.
    """

    audio: np.ndarray | None = None
    sampling_rate: int | None = None
    frames: list = field(default_factory=list)
    source: str | None = None
    frame_times: list = field(default_factory=list)
    duration: float | None = None
    frame_numbers: list = field(default_factory=list)
    frame_jpegs: list = field(default_factory=list)

    @property
    def modalities(self) -> tuple[str, ...]:
        """`"audio"` and / or `"visual"`: what the clip has."""
        return tuple(name for name, present in (("audio", self.audio is not None), ("visual", bool(self.frames))) if present)


# ----------------------------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------------------------
def check_file(path) -> Path:
    """`path` as a `Path` once it is known to be a non-empty file; else a `MediaError` saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"File not found: {path}")
    if path.is_dir():
        raise MediaError(f"{path} is a directory, not a media file.")
    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty (0 bytes).")
    return path


def _open(path) -> "av.container.InputContainer":
    path = check_file(path)
    try:
        return av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        damage = index_damage(path)
        reason = f"it is truncated: {damage}" if damage else "not audio or video, or corrupt or truncated"
        raise MediaError(f"{path} is not a readable media file: {reason} ({_describe(error)}).") from None


def _checked_rate(name: str, value) -> int:
    """`value` as an int number of Hz, or a `MediaError` naming the argument: a rate must be a positive whole
    number (16000 or 16000.0; not 0, -8000, 16000.5, "16000" or True)."""
    whole = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if not whole or not float(value).is_integer() or value <= 0:
        raise MediaError(f"{name} must be a positive whole number of Hz, got {value!r}.")
    return int(value)


def _describe(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def probe_streams(path) -> tuple[bool, bool]:
    """`(has an audio stream, has a video stream)`, reading only the header. Raises `MediaError` for unreadable
    files, and for an mp4 / mov whose cut-off index hides streams (see [`index_damage`])."""
    with av.logging.Capture(), _open(path) as container:  # Capture: no FFmpeg log lines on stderr
        has_audio, has_video = bool(container.streams.audio), bool(container.streams.video)
    if not (has_audio and has_video):
        damage = index_damage(path)
        if damage:
            kept = "audio" if has_audio else "video" if has_video else None
            readable = f"only its {kept} stream could be read" if kept else "none of its streams could be read"
            raise MediaError(f"{path} is not a readable media file: it is truncated: {damage}; {readable}.")
    return has_audio, has_video


def _missing_stream(path, kind: str) -> MediaError:
    """"X has no audio stream", or, when the file's index is cut off, the truncation that hid the stream."""
    damage = index_damage(path)
    if damage:
        return MediaError(
            f"{path} is not a readable media file: it is truncated: {damage}; its {kind} stream could not be read."
        )
    return MediaError(f"{path} has no {kind} stream.")


# ISO base media files (mp4, mov, m4a, 3gp) are a sequence of boxes: 4-byte big-endian size, 4-byte type.
_ISO_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"})
_MAX_TOP_LEVEL_BOXES = 100_000  # a fragmented mp4 has two per fragment; the walk reads 16 bytes per box


def index_damage(path) -> str | None:
    """
    For an mp4 / mov / m4a file cut off before the end of its index (the `moov` box, which describes every stream
    and where its samples are), e.g. an interrupted download of a file whose index follows the data: a sentence
    saying where it is cut. None for complete files, for files whose index is whole (a cut in the data alone is
    decoded as far as it goes) and for other formats. Reads the top-level box headers only.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            return _walk_top_level_boxes(handle, size)
    except OSError:
        return None


def _walk_top_level_boxes(handle, size: int) -> str | None:
    offset, seen_index = 0, False
    for _ in range(_MAX_TOP_LEVEL_BOXES):
        if offset + 8 > size:
            break
        handle.seek(offset)
        header = handle.read(16)
        box_size, kind = struct.unpack(">I", header[:4])[0], header[4:8]
        if (offset == 0 and kind not in _ISO_FIRST_BOXES) or not all(32 <= byte < 127 for byte in kind):
            return None  # not an ISO base media file, or damage FFmpeg reports better
        if box_size == 1 and len(header) == 16:
            box_size = struct.unpack(">Q", header[8:16])[0]  # a 64-bit size follows the type
        elif box_size == 0:
            box_size = size - offset  # the box runs to the end of the file
        if box_size < 8:
            return None
        name = kind.decode("ascii")
        if offset + box_size > size:
            if kind == b"moov":
                return (
                    f"its index ('moov' box) is cut off after {size - offset} of its {box_size} bytes "
                    "(an interrupted download or copy)"
                )
            if not seen_index:
                return (
                    f"the file ends inside its '{name}' box ({size - offset} of {box_size} bytes present) and its "
                    "index ('moov' box), stored after the data, is missing (an interrupted download or copy)"
                )
            return None  # the index is whole: the data is decoded as far as it goes
        seen_index = seen_index or kind == b"moov"
        offset += box_size
    return None


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------
class _AudioTrack:
    """Resampled audio chunks `[channels, n]` as they are decoded, with silence standing in for skipped packets.
    `sample_format`: FFmpeg's name of the planar format to resample to, `"fltp"` (float32) or `"s16p"` (int16)."""

    def __init__(self, layout, sampling_rate: int, sample_format: str = "fltp"):
        self.resampler = av.AudioResampler(format=sample_format, layout=layout, rate=sampling_rate)
        self.sampling_rate = sampling_rate
        self.chunks, self.collected = [], 0
        self.template = None  # the last decoded frame: the format, layout and rate silence is made in
        self.owed_seconds = 0.0  # the duration of skipped packets not yet replaced by silence
        self.skipped = 0

    def add(self, frame):
        frame.pts = None  # the resampler keeps its own clock; gaps in timestamps are not silence to insert
        if self.owed_seconds:
            self._resample(_silence_like(frame, self.owed_seconds))
            self.owed_seconds = 0.0
        self._resample(frame)
        self.template = frame

    def skip(self, packet, stream):
        self.skipped += 1
        self.owed_seconds += _packet_seconds(packet, stream)

    def finish(self):
        if self.owed_seconds and self.template is not None:  # damage at the very end: its silence, then no more
            self._resample(_silence_like(self.template, self.owed_seconds))
            self.owed_seconds = 0.0
        self._resample(None)

    def length(self) -> int:
        """Samples at `sampling_rate`, counting the silence still owed."""
        return self.collected + int(self.owed_seconds * self.sampling_rate)

    def _resample(self, frame):
        for resampled in self.resampler.resample(frame):
            self.chunks.append(resampled.to_ndarray())
            self.collected += self.chunks[-1].shape[1]


def _packet_seconds(packet, stream) -> float:
    """The duration of `packet`: its own, else one codec frame (e.g. 1024 samples of AAC), else 0."""
    if packet.duration and packet.time_base:
        return float(packet.duration * packet.time_base)
    frame_size, rate = stream.codec_context.frame_size, stream.codec_context.sample_rate
    return frame_size / rate if frame_size and rate else 0.0


def _silence_like(frame, seconds: float):
    """An `av.AudioFrame` of `seconds` of silence in the sample format, layout and rate of `frame`."""
    samples = max(0, int(round(seconds * frame.sample_rate)))
    name = frame.format.name
    dtype = np.dtype(av.audio.frame.format_dtypes.get(name, "f4"))
    channels = len(frame.layout.channels)
    shape = (channels, samples) if frame.format.is_planar else (1, samples * channels)
    silence = np.full(shape, 128 if name.startswith("u8") else 0, dtype)  # unsigned 8-bit PCM is silent at 128
    silent = av.AudioFrame.from_ndarray(silence, format=name, layout=frame.layout.name)
    silent.sample_rate = frame.sample_rate
    return silent


def _decode_audio_stream(
    container, path, sampling_rate: int, max_seconds, channel, precision: str = "float32"
) -> np.ndarray:
    """Mono float32 at `sampling_rate` from the first audio stream, at most `max_seconds` long. Undecodable packets
    are skipped and replaced by silence of their duration (one warning gives their count).

    `precision="int16"` resamples every channel straight to 16-bit samples in one libswresample step, as `ffmpeg -ar
    16000 clip.wav` does (no dither: FFmpeg's default), and returns them as `int16 / 32768`, the floats that reading
    that WAV gives; `"float32"` keeps the resampler's float output."""
    if not container.streams.audio:
        raise _missing_stream(path, "audio")
    stream = container.streams.audio[0]
    sample_format = {"float32": "fltp", "int16": "s16p"}[precision]
    track = _AudioTrack(stream.layout.name if stream.layout else None, sampling_rate, sample_format)
    limit = None if max_seconds is None else int(math.ceil(max_seconds * sampling_rate))
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                track.skip(packet, stream)
                frames = []
            for frame in frames:
                track.add(frame)
            if limit is not None and track.length() >= limit:
                break
        track.finish()
    except av.error.FFmpegError as error:  # the demuxer itself failed: the container is cut or damaged here
        if not track.chunks:
            raise MediaError(f"{path}: the audio stream could not be decoded ({_describe(error)}).") from None
        warnings.warn(
            f"{path}: audio decoding stopped at {track.collected / sampling_rate:.2f} s on damaged data "
            f"({_describe(error)}); the rest of the audio track is missing.",
            stacklevel=3,
        )
    if not track.chunks:
        if track.skipped:
            raise MediaError(
                f"{path}: the audio stream could not be decoded: none of its {track.skipped} packet(s) read decodes "
                "(damaged data)."
            )
        raise MediaError(f"{path}: the audio stream holds no decodable samples.")
    if track.skipped:
        warnings.warn(
            f"{path}: {track.skipped} undecodable audio packet(s) skipped (damaged data); their duration is "
            "replaced by silence.",
            stacklevel=3,
        )
    mono = _mono(np.concatenate(track.chunks, axis=1), channel, path)
    mono = mono[:limit] if limit is not None else mono
    if precision == "int16":
        return pcm16_to_float(mono)
    return np.ascontiguousarray(mono, dtype=np.float32)


def pcm16_to_float(samples) -> np.ndarray:
    """16-bit samples as float32 in [-1, 1): `int16 / 32768`, what soundfile and torchaudio read from a 16-bit WAV.
    (A mean of several channels, as `channel="mean"` gives, is scaled the same way.)"""
    return (np.asarray(samples, dtype=np.float32) / np.float32(32768.0)).astype(np.float32, copy=False)


def float_to_pcm16(waveform) -> np.ndarray:
    """float audio to int16 as FFmpeg rounds it (`lrintf(x * 32768)`, clipped to [-32768, 32767]): the inverse of
    `pcm16_to_float` on the 16-bit grid."""
    scaled = np.rint(np.asarray(waveform, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def load_audio(
    path, sampling_rate: int = DEFAULT_SAMPLING_RATE, max_seconds=None, channel=0
) -> tuple[np.ndarray, int]:
    """
    Read an audio file (wav, flac, ogg, mp3, ...) or the audio track of a video as mono float32 in [-1, 1] at
    `sampling_rate`. `channel` picks the channel of multi-channel audio (the reference keeps the first, 0) or
    `"mean"` mixes them. `max_seconds` stops reading early (None: the whole file). Returns `(waveform, rate)`.
    """
    sampling_rate = _checked_rate("sampling_rate", sampling_rate)
    path = Path(path)
    waveform = _read_with_soundfile(path, max_seconds, channel)
    if waveform is not None:
        data, rate = waveform
        if not np.isfinite(data).all():
            raise MediaError(f"{path} contains NaN or Inf samples.")
        return resample(data, rate, sampling_rate), sampling_rate
    with _open(path) as container:
        return _decode_audio_stream(container, path, sampling_rate, max_seconds, channel), sampling_rate


def _read_with_soundfile(path: Path, max_seconds, channel):
    """(float32 mono, rate) through soundfile, or None when soundfile cannot read the file (PyAV then tries)."""
    try:
        import soundfile
    except ImportError:  # pragma: no cover
        return None
    if not path.exists():
        raise MediaError(f"File not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise MediaError(f"{path} is empty (0 bytes).")
    try:
        with soundfile.SoundFile(str(path)) as handle:
            frames = -1 if max_seconds is None else int(math.ceil(max_seconds * handle.samplerate))
            data = handle.read(frames=frames, dtype="float32", always_2d=True)
            rate = handle.samplerate
    except Exception:  # soundfile raises several types for formats it does not know; PyAV gets a turn
        return None
    if data.shape[0] == 0:
        raise MediaError(f"{path} holds no audio samples.")
    return np.ascontiguousarray(_mono(data.T, channel, path), dtype=np.float32), rate


def _mono(samples: np.ndarray, channel, path) -> np.ndarray:
    """`[N]` from `[channels, N]`: one channel (0, the first, is the reference's choice) or `"mean"`, their mix."""
    if channel == "mean":
        return samples.mean(axis=0)
    if not isinstance(channel, (int, np.integer)) or not -len(samples) <= channel < len(samples):
        raise MediaError(f"{path}: channel={channel!r} does not exist in its {len(samples)}-channel audio.")
    return samples[channel]


def resample(waveform, orig_rate: int, target_rate: int) -> np.ndarray:
    """
    Resample mono audio `[N]` (or `[channels, N]`) from `orig_rate` to `target_rate` with FFmpeg's libswresample
    (through PyAV), the resampler the reference's `ffmpeg -ar 16000` used. Returns float32.
    """
    orig_rate, target_rate = _checked_rate("orig_rate", orig_rate), _checked_rate("target_rate", target_rate)
    waveform = np.asarray(waveform, dtype=np.float32)
    if orig_rate == target_rate or waveform.shape[-1] == 0:
        return waveform
    planar = waveform[None] if waveform.ndim == 1 else waveform
    if planar.ndim != 2 or planar.shape[0] > 8:
        raise MediaError(f"resample takes [samples] or [channels, samples] audio, got shape {waveform.shape}.")
    layout = {1: "mono", 2: "stereo"}.get(planar.shape[0], f"{planar.shape[0]}c")
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=target_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar), format="fltp", layout=layout)
    frame.sample_rate = orig_rate
    chunks = [f.to_ndarray() for f in resampler.resample(frame)]
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
    result = np.concatenate(chunks, axis=1) if chunks else np.zeros((planar.shape[0], 0), np.float32)
    expected = int(round(planar.shape[1] * target_rate / orig_rate))
    result = result[:, :expected]
    return result[0] if waveform.ndim == 1 else result


# ----------------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------------
def frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """The reference's uniform positions over `total_frames`: `frame_idx = int(i * (total / num_frames))` for i in
    0..num_frames-1, computed as its extract_video_frame.py computes it."""
    return [int(i * (total_frames / num_frames)) for i in range(num_frames)]


def opencv_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """The frames the reference's script read, numbered in decode order from 0: for each `frame_idx` it set
    OpenCV's `CAP_PROP_POS_FRAMES` to `frame_idx - 1` and read one frame, which is frame `frame_idx - 1` (frame 0
    for i = 0, where the position -1 is the start). So every frame but the first is one before its uniform
    position."""
    return [max(index - 1, 0) for index in frame_indices(total_frames, num_frames)]


def _video_frame_rate(stream) -> Fraction:
    """The stream's average frame rate, OpenCV's `CAP_PROP_FPS` (FFmpeg's `avg_frame_rate`); for a stream that
    declares none, FFmpeg's guessed or base rate (where OpenCV would report 1 / time base)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise MediaError("The video stream declares no frame rate.")
    return Fraction(rate)


def _frames_in_window(stream, rate: Fraction, container, window_seconds: float) -> int:
    """The reference's `total = min(CAP_PROP_FRAME_COUNT, int(fps * window_seconds))`, with OpenCV's frame count: the
    count the container declares (mp4 / mov: the samples in its index), else (webm, mkv, ...) `floor(duration * fps
    + 0.5)` with the container's duration (the stream's if the container gives none). Frames are not counted by
    decoding: the reference never did, and its `min` with 10 s of frames guards against wrong declared counts."""
    window = int(float(rate) * window_seconds)
    count = stream.frames
    if not count:
        duration = container.duration / av.time_base if container.duration else None
        if not duration and stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        count = math.floor(duration * float(rate) + 0.5) if duration else window
    return max(1, min(count, window))


def _to_rgb_image(frame) -> Image.Image:
    image = frame.to_image()
    rotation = getattr(frame, "rotation", 0) or 0
    if rotation % 360:
        # the display matrix turns counter-clockwise by `rotation` degrees; PIL's rotate is counter-clockwise too
        # (OpenCV turns frames upright the same way before the reference's script saw them)
        image = image.rotate(rotation, expand=True)
    return image


# Packets are read until this many seconds past the last frame wanted by timestamp (decoders may hold frames back),
# no further when damaged data keeps that frame from decoding.
_DECODER_DELAY_SECONDS = 2.0


def _check_option(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise MediaError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def _decode_frames(container, path, num_frames: int, window_seconds: float, selection: str):
    """`num_frames` upright RGB frames, their times and their decode-order numbers.

    `selection="decode_order"`: frames `opencv_frame_indices(total, num_frames)`, counted as decoded (as the
    reference's OpenCV seek counts them in a constant-frame-rate file); `"timestamp"`: for each uniform position
    `frame_idx`, the first frame shown at or after `frame_idx / fps` (less half a frame), so that variable frame
    rates are sampled uniformly in time. Decoding stops after the last frame wanted. Undecodable packets are skipped
    (one warning gives their count) and their frames are not counted; frames past the end of a stream shorter than
    declared repeat the last frame found, as the reference's data loader used the previous frame file when one was
    missing."""
    if not container.streams.video:
        raise _missing_stream(path, "video")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(_video_frame_rate(stream))
    total = _frames_in_window(stream, Fraction(rate), container, window_seconds)
    by_time = selection == "timestamp"
    if by_time:
        positions = frame_indices(total, num_frames)
        targets = [index / rate - 0.5 / rate for index in positions]
        stop_seconds = positions[-1] / rate + _DECODER_DELAY_SECONDS
    else:
        targets = opencv_frame_indices(total, num_frames)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    frames, times, numbers, decoded_count, last, skipped = [], [], [], 0, None, 0
    try:
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError:
                skipped, decoded = skipped + 1, []
            for frame in decoded:
                time = (frame.time if frame.time is not None else 0.0) - start
                key = time if by_time else decoded_count
                while len(frames) < len(targets) and key >= targets[len(frames)]:
                    frames.append(_to_rgb_image(frame))
                    times.append(time)
                    numbers.append(decoded_count)
                decoded_count += 1
                last = frame
            if len(frames) == len(targets) or (by_time and _past(packet, start, stop_seconds)):
                break
    except av.error.FFmpegError as error:  # the demuxer itself failed: the container is cut or damaged here
        if last is None:
            raise MediaError(f"{path}: the video stream could not be decoded ({_describe(error)}).") from None
    if last is None:
        if skipped:
            raise MediaError(
                f"{path}: the video stream could not be decoded: none of its {skipped} packet(s) read decodes "
                "(damaged data)."
            )
        raise MediaError(f"{path}: the video stream holds no decodable frames.")
    if skipped:
        warnings.warn(
            f"{path}: {skipped} undecodable video packet(s) skipped (damaged data); their frames are left out "
            "(a frame sampled there is replaced by the next decodable one).",
            stacklevel=3,
        )
    if len(frames) < len(targets):
        wanted = f"the frame at {targets[len(frames)] + 0.5 / rate:.2f} s" if by_time else f"frame {targets[len(frames)]}"
        warnings.warn(
            f"{path}: the video stream ended at {(last.time or 0.0) - start:.2f} s after {decoded_count} frames, "
            f"before {wanted} (truncated file or wrong header); the last frame found is repeated.",
            stacklevel=3,
        )
    while len(frames) < len(targets):
        frames.append(frames[-1])
        times.append(times[-1])
        numbers.append(numbers[-1])
    return frames, times, numbers


def _past(packet, start: float, seconds: float) -> bool:
    """Whether `packet` is timed after `seconds` (from the stream's start)."""
    if packet.pts is None or packet.time_base is None:
        return False
    return float(packet.pts * packet.time_base) - start > seconds


def load_video(
    path,
    num_frames: int = 10,
    sampling_rate: int = DEFAULT_SAMPLING_RATE,
    load_audio: bool = True,
    load_frames: bool = True,
    audio_seconds=DEFAULT_AUDIO_SECONDS,
    frame_window_seconds: float = FRAME_WINDOW_SECONDS,
    channel=0,
    frame_selection: str = "decode_order",
    frame_transform: str = "reference_jpeg",
    audio_precision: str = "int16",
) -> Clip:
    """
    Read a video (mp4, webm, mkv, avi, ...). By default the result is what the CAV-MAE reference's preprocessing
    scripts wrote for the file, the data every released checkpoint was trained and evaluated on: the feature
    extractor then gives the same `input_features` and `pixel_values` as the reference's data loader on those files
    (pixels bit for bit; the fbank up to the 1-LSB differences left by another FFmpeg version's AAC decoder).

    Args:
        num_frames: frames sampled uniformly over the first `frame_window_seconds` (or the whole video if shorter).
        sampling_rate: rate of the returned audio.
        load_audio / load_frames: skip a modality (its absence is then no error).
        audio_seconds: how much audio to decode (default: what the model's 1024 fbank frames use; None: all).
        channel: audio channel to keep (0, the reference's choice) or `"mean"`.
        frame_selection: `"decode_order"` (default): frame `max(int(i * total / num_frames) - 1, 0)` counted in
            decode order (`opencv_frame_indices`), `total = min(frame count, int(fps * 10))` with OpenCV's frame
            count and fps, not FFmpeg's: the count the container declares, else `floor(duration * fps + 0.5)` with
            the container's duration (which may be the audio's), and the average frame rate. These are the frames
            the reference's OpenCV seek read in a constant-frame-rate file; in a variable-frame-rate file OpenCV
            counts on from the timestamp of the keyframe it seeks to, which differs once a keyframe is passed.
            `"timestamp"`: the frame shown at `int(i * total / num_frames) / fps`, uniform in time also when the
            frame rate varies (phone videos, screen recordings), and not one frame early.
        frame_transform: `"reference_jpeg"` (default): each frame as `reference_frame` makes it, 224 x 224 after a
            bilinear resize, a centre crop and a quality-75 JPEG round trip (`Clip.frame_jpegs` holds the
            JPEGs). `"none"`: the full decoded frame, upright, for the feature extractor to resize once (bicubic).
        audio_precision: `"int16"` (default): resampled straight to 16-bit samples, as the reference's WAV; then
            `int16 / 32768`. `"float32"`: the resampler's float output, without the 16-bit rounding.
    Raises:
        MediaError: missing / empty / unreadable file, no audio (video) stream when audio (frames) are asked for, or
            an option that does not exist.
    """
    if num_frames < 1 and load_frames:
        raise MediaError(f"num_frames must be at least 1, got {num_frames}.")
    sampling_rate = _checked_rate("sampling_rate", sampling_rate)
    _check_option("frame_selection", frame_selection, FRAME_SELECTIONS)
    _check_option("frame_transform", frame_transform, FRAME_TRANSFORMS)
    _check_option("audio_precision", audio_precision, AUDIO_PRECISIONS)
    path = Path(path)
    clip = Clip(sampling_rate=sampling_rate, source=str(path))
    with _open(path) as container:
        if container.duration is not None:
            clip.duration = container.duration / av.time_base
        if load_frames:
            clip.frames, clip.frame_times, clip.frame_numbers = _decode_frames(
                container, path, num_frames, frame_window_seconds, frame_selection
            )
    if load_frames and frame_transform == "reference_jpeg":
        clip.frame_jpegs = [reference_frame_jpeg(frame) for frame in clip.frames]
        clip.frames = [read_frame_jpeg(data) for data in clip.frame_jpegs]
    if load_audio:
        with _open(path) as container:  # a fresh demuxer: the audio is read from the start, whatever was decoded
            clip.audio = _decode_audio_stream(
                container, path, sampling_rate, audio_seconds, channel, precision=audio_precision
            )
    return clip


# ----------------------------------------------------------------------------------------------------------------
# Frames and audio as the reference stored them
# ----------------------------------------------------------------------------------------------------------------
def reference_frame_crop(frame: Image.Image, size: int = REFERENCE_FRAME_SIZE) -> Image.Image:
    """A decoded RGB frame as extract_video_frame.py transformed it before saving: torchvision's `Resize(size)` on
    a PIL image (the shorter side to `size`, the longer one truncated as torchvision computes it, Pillow's bilinear
    resize, which antialiases when shrinking), then `CenterCrop(size)` with its rounding of the offsets."""
    if frame.mode != "RGB":
        frame = frame.convert("RGB")
    resized = frame.resize(_resized_size(*frame.size, size), Image.BILINEAR)
    return resized.crop(_center_crop_box(*resized.size, size))


def reference_frame_jpeg(frame: Image.Image, size: int = REFERENCE_FRAME_SIZE) -> bytes:
    """The JPEG file extract_video_frame.py wrote for a decoded RGB frame, byte for byte: `reference_frame_crop`,
    then `torchvision.utils.save_image` of its `ToTensor` (`x / 255`): that function's `x * 255 + 0.5` rounding to
    uint8 returns every 8-bit value unchanged, so the crop itself is saved, by Pillow at its default quality 75
    (4:2:0 chroma)."""
    buffer = io.BytesIO()
    reference_frame_crop(frame, size).save(buffer, format="JPEG", quality=REFERENCE_JPEG_QUALITY)
    return buffer.getvalue()


def read_frame_jpeg(source) -> Image.Image:
    """A frame JPEG (`bytes`, a path or a binary file) decoded to an RGB PIL image, as the reference's data loader
    opened its frame files."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(handle) as image:
            return image.convert("RGB")
    except OSError as error:
        raise MediaError(f"{_source_name(source)} is not a readable JPEG ({_describe(error)}).") from None


def _source_name(source) -> str:
    return f"a {len(source)}-byte frame" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def reference_frame(frame: Image.Image, size: int = REFERENCE_FRAME_SIZE) -> Image.Image:
    """A decoded RGB frame as the reference's models saw it: the image its data loader read back from the JPEG
    that extract_video_frame.py wrote (`read_frame_jpeg(reference_frame_jpeg(frame))`), 224 x 224."""
    return read_frame_jpeg(reference_frame_jpeg(frame, size))


def wav_bytes(waveform, sampling_rate: int = DEFAULT_SAMPLING_RATE) -> bytes:
    """A mono 16-bit PCM WAV file in memory, as extract_audio.py wrote it: samples rounded with `float_to_pcm16`
    (a waveform `load_video` returned with `audio_precision="int16"` is already on that grid and is stored
    exactly; reading the file back gives it unchanged)."""
    import soundfile

    sampling_rate = _checked_rate("sampling_rate", sampling_rate)
    samples = np.asarray(waveform)
    if samples.ndim != 1:
        raise MediaError(f"wav_bytes takes mono [samples] audio, got shape {samples.shape}.")
    buffer = io.BytesIO()
    soundfile.write(buffer, float_to_pcm16(samples), sampling_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def load_frames_folder(folder, video_id: str, num_frames: int = 10, extension: str = "jpg") -> list[Image.Image]:
    """The reference's pre-extracted frames: `folder/frame_{i}/{video_id}.jpg` for i in 0..num_frames-1."""
    frames = []
    for index in range(num_frames):
        path = Path(folder) / f"frame_{index}" / f"{video_id}.{extension}"
        if not path.is_file():
            raise MediaError(f"Frame {index} of {video_id} not found at {path}.")
        try:
            with Image.open(path) as image:
                frames.append(image.convert("RGB"))
        except OSError as error:
            raise MediaError(f"{path} is not a readable image ({_describe(error)}).") from None
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
_CODECS = {
    ".mp4": ("libx264", "aac"),
    ".mkv": ("libx264", "aac"),
    ".mov": ("libx264", "aac"),
    ".webm": ("libvpx", "libopus"),
    ".avi": ("mpeg4", "mp3"),
}


def _frame_rate(fps) -> Fraction:
    """An exact frame rate: Fractions and ints as given; floats near an NTSC rate (23.976, 29.97, 59.94, ...) as
    N * 1000 / 1001, others rounded to a denominator of at most 1001."""
    if isinstance(fps, (Fraction, int)):
        rate = Fraction(fps)
    else:
        rate = Fraction(float(fps)).limit_denominator(1001)
        ntsc = Fraction(round(float(fps) * 1.001) * 1000, 1001)
        if abs(float(fps) - float(ntsc)) < 0.01 and ntsc.denominator == 1001:
            rate = ntsc
    if rate <= 0:
        raise MediaError(f"fps must be positive, got {fps!r}.")
    return rate


def _encoder_rate(codec: str, sampling_rate: int) -> int:
    # Opus encodes at 48 kHz (and a few lower rates) only.
    if codec in ("libopus", "opus") and sampling_rate not in (8000, 12000, 16000, 24000, 48000):
        return 48000
    return sampling_rate


def _add_audio_stream(container, codec: str, sampling_rate: int, layout: str):
    # FFmpeg's own Vorbis encoder (libvorbis is not in PyAV's wheels) is flagged experimental.
    options = {"strict": "experimental"} if codec == "vorbis" else {}
    return container.add_stream(codec, rate=_encoder_rate(codec, sampling_rate), layout=layout, options=options)


def _planar_audio(audio) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    planar = audio[None] if audio.ndim == 1 else audio
    if planar.ndim != 2 or planar.shape[0] > 8:
        raise MediaError(f"Audio to write must be [samples] or [channels, samples], got {audio.shape}.")
    return np.ascontiguousarray(np.clip(planar, -1.0, 1.0))


def _write_audio_stream(container, stream, planar: np.ndarray, sampling_rate: int):
    """Feed `[channels, N]` float audio at `sampling_rate` to `stream` (resampled to its rate) in encoder-sized
    frames."""
    layout = stream.layout.name
    resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=stream.rate)
    step = stream.codec_context.frame_size or 1024
    for start in range(0, planar.shape[1], step):
        chunk = np.ascontiguousarray(planar[:, start : start + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sampling_rate
        for converted in resampler.resample(frame):
            container.mux(stream.encode(converted))
    for converted in resampler.resample(None):
        container.mux(stream.encode(converted))
    container.mux(stream.encode(None))


def write_video(
    path,
    frames=None,
    audio=None,
    fps=25,
    sampling_rate: int = 44100,
    video_codec: str | None = None,
    audio_codec: str | None = None,
    rotation: int = 0,
):
    """
    Write a small video file with PyAV. `frames`: uint8 `[N, H, W, 3]` (even H and W for h264), or None for an
    audio-only file; `audio`: float in [-1, 1], `[samples]` or `[channels, samples]`, or None for a silent
    video. `fps` may be fractional (`Fraction(30000, 1001)` or 29.97). Codecs default by extension
    (mp4/mkv/mov: h264 + aac, webm: vp8 + opus, avi: mpeg4 + mp3). `rotation` sets a display-matrix rotation.
    """
    path = Path(path)
    if frames is None and audio is None:
        raise MediaError("write_video needs frames, audio or both.")
    sampling_rate = _checked_rate("sampling_rate", sampling_rate)
    default_video, default_audio = _CODECS.get(path.suffix.lower(), ("libx264", "aac"))
    rate = _frame_rate(fps)
    with av.open(str(path), mode="w") as container:
        video_stream = audio_stream = None
        if frames is not None:
            frames = np.asarray(frames, dtype=np.uint8)
            video_stream = container.add_stream(video_codec or default_video, rate=rate)
            video_stream.width, video_stream.height = frames.shape[2], frames.shape[1]
            video_stream.pix_fmt = "yuv420p"
            if rotation:
                video_stream.set_display_rotation(rotation)
        if audio is not None:
            planar = _planar_audio(audio)
            layout = {1: "mono", 2: "stereo"}.get(planar.shape[0], f"{planar.shape[0]}c")
            codec = audio_codec or default_audio
            audio_stream = _add_audio_stream(container, codec, sampling_rate, layout)
        if video_stream is not None:
            for image in frames:
                for packet in video_stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            container.mux(video_stream.encode(None))
        if audio_stream is not None:
            _write_audio_stream(container, audio_stream, planar, sampling_rate)
    return path


def write_audio(path, audio, sampling_rate: int = DEFAULT_SAMPLING_RATE, subtype: str | None = None):
    """Write `[samples]` or `[channels, samples]` float audio with soundfile (wav, flac, ogg), or with PyAV for
    formats soundfile cannot write (e.g. mp3, m4a)."""
    import soundfile

    path = Path(path)
    sampling_rate = _checked_rate("sampling_rate", sampling_rate)
    planar = _planar_audio(audio)
    if path.suffix.lower() in (".wav", ".flac", ".ogg"):
        soundfile.write(str(path), planar.T, sampling_rate, subtype=subtype)
        return path
    codec = {".mp3": "libmp3lame", ".m4a": "aac", ".opus": "libopus"}.get(path.suffix.lower())
    if codec is None:
        raise MediaError(f"Cannot write audio with extension {path.suffix!r}.")
    layout = {1: "mono", 2: "stereo"}.get(planar.shape[0], f"{planar.shape[0]}c")
    with av.open(str(path), mode="w") as container:
        stream = _add_audio_stream(container, codec, sampling_rate, layout)
        _write_audio_stream(container, stream, planar, sampling_rate)
    return path


def is_media_file(path) -> bool:
    """Whether FFmpeg can open `path` (cheap: reads the header only)."""
    try:
        with _open(path):
            return True
    except MediaError:
        return False


__all__ = [
    "MediaError",
    "Clip",
    "AUDIO_PRECISIONS",
    "check_file",
    "FRAME_SELECTIONS",
    "FRAME_TRANSFORMS",
    "REFERENCE_FRAME_SIZE",
    "REFERENCE_JPEG_QUALITY",
    "float_to_pcm16",
    "frame_indices",
    "index_damage",
    "is_media_file",
    "load_audio",
    "load_frames_folder",
    "load_video",
    "opencv_frame_indices",
    "pcm16_to_float",
    "probe_streams",
    "read_frame_jpeg",
    "reference_frame",
    "reference_frame_crop",
    "reference_frame_jpeg",
    "resample",
    "wav_bytes",
    "write_audio",
    "write_video",
]
