"""
Reading and writing media with PyAV (FFmpeg, bundled in its wheel) and soundfile: no subprocess, no torchaudio,
no torchcodec.

- `load_video(path)`: the audio track, resampled to 16 kHz mono, and frames sampled uniformly over the first
  10 s, as the CAV-MAE reference prepared its data (audio: `ffmpeg -ar 16000` then the first channel; frames:
  frame `int(i * total / 10)` of `total = min(frame count, 10 s of frames)`, found by timestamp so that variable
  frame rates work; display-matrix rotation applied).
- `load_audio(path)`: wav/flac/ogg/mp3 (soundfile, with PyAV as fallback) or the audio track of a video.
- `resample(waveform, orig_rate, target_rate)`: FFmpeg's resampler (libswresample) through PyAV.
- `write_video`, `write_audio`: small files for tests, demos and synthetic data.
- `probe_streams(path)`, `index_damage(path)`: which streams a file has; where an mp4 / mov is cut off.

Decoding stops as soon as what is needed has been read, so memory and time stay bounded for long files. Streams are
read packet by packet: a packet FFmpeg cannot decode (damaged data) is skipped, its audio replaced by silence of its
duration so that the timeline stays right, and one warning per stream gives the count. A stream in which nothing
decodes, and an mp4 / mov whose cut-off index (`moov` box) hides a stream or the whole file, raise `MediaError`.
"""

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

DEFAULT_SAMPLING_RATE = 16000
FRAME_WINDOW_SECONDS = 10.0
# 1024 fbank frames of 25 ms every 10 ms need 10.255 s: a little more is decoded, nothing beyond.
DEFAULT_AUDIO_SECONDS = 10.3


class MediaError(CavMaeError):
    """A media file is missing, unreadable, or lacks the stream that was asked for; the message says which."""


@dataclass
class VideoClip:
    """What `load_video` read: mono float32 audio `[N]` at `sampling_rate` (None if not asked for) and RGB frames
    (PIL images) with their presentation times in seconds."""

    audio: np.ndarray | None
    sampling_rate: int
    frames: list = field(default_factory=list)
    frame_times: list = field(default_factory=list)
    duration: float | None = None


# ----------------------------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------------------------
def _open(path) -> "av.container.InputContainer":
    path = Path(path)
    if not path.exists():
        raise MediaError(f"File not found: {path}")
    if path.is_dir():
        raise MediaError(f"{path} is a directory, not a media file.")
    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty (0 bytes).")
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
    """Resampled audio chunks `[channels, n]` as they are decoded, with silence standing in for skipped packets."""

    def __init__(self, layout, sampling_rate: int):
        self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=sampling_rate)
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


def _decode_audio_stream(container, path, sampling_rate: int, max_seconds, channel) -> np.ndarray:
    """Mono float32 at `sampling_rate` from the first audio stream, at most `max_seconds` long. Undecodable packets
    are skipped and replaced by silence of their duration (one warning gives their count)."""
    if not container.streams.audio:
        raise _missing_stream(path, "audio")
    stream = container.streams.audio[0]
    track = _AudioTrack(stream.layout.name if stream.layout else None, sampling_rate)
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
    return np.ascontiguousarray(mono, dtype=np.float32)


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
    """Uniform sampling as the reference intends it: frame `int(i * total / num_frames)` for i in
    0..num_frames-1. (Its OpenCV code seeks to that index minus one before reading, so it reads one frame earlier
    for i > 0, 40 ms at 25 fps; this port takes the intended frame.)"""
    return [int(i * total_frames / num_frames) for i in range(num_frames)]


def _video_frame_rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise MediaError("The video stream declares no frame rate.")
    return Fraction(rate)


def _frames_in_window(stream, rate: Fraction, container, window_seconds: float) -> int:
    """`min(frame count, window of frames)`, the count taken from the stream, else from the duration."""
    window = int(float(rate) * window_seconds)
    count = stream.frames
    if not count:
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        count = int(duration * float(rate)) if duration else window
    return max(1, min(count, window))


def _to_rgb_image(frame) -> Image.Image:
    image = frame.to_image()
    rotation = getattr(frame, "rotation", 0) or 0
    if rotation % 360:
        # the display matrix turns counter-clockwise by `rotation` degrees; PIL's rotate is counter-clockwise too
        image = image.rotate(rotation, expand=True)
    return image


# Packets are read until this many seconds past the last frame wanted (decoders may hold frames back), no further
# when damaged data keeps that frame from decoding.
_DECODER_DELAY_SECONDS = 2.0


def _decode_frames(container, path, num_frames: int, window_seconds: float):
    """`num_frames` RGB frames by timestamp (robust to variable frame rate); decoding stops after the last one.
    Undecodable packets are skipped (one warning gives their count): a frame they held is replaced by the next
    decodable one."""
    if not container.streams.video:
        raise _missing_stream(path, "video")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = _video_frame_rate(stream)
    total = _frames_in_window(stream, rate, container, window_seconds)
    targets = [index / float(rate) for index in frame_indices(total, num_frames)]
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    frames, times, last, skipped = [], [], None, 0
    try:
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError:
                skipped, decoded = skipped + 1, []
            for frame in decoded:
                time = (frame.time if frame.time is not None else 0.0) - start
                while len(frames) < len(targets) and time >= targets[len(frames)] - 0.5 / float(rate):
                    frames.append(_to_rgb_image(frame))
                    times.append(time)
                last = frame
            if len(frames) == len(targets) or _past(packet, start, targets[-1] + _DECODER_DELAY_SECONDS):
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
            f"{path}: {skipped} undecodable video packet(s) skipped (damaged data); a frame sampled there is "
            "replaced by the next decodable one.",
            stacklevel=3,
        )
    if len(frames) < len(targets):
        warnings.warn(
            f"{path}: the video stream ended at {(last.time or 0.0) - start:.2f} s, before the frame at "
            f"{targets[len(frames)]:.2f} s (truncated file or wrong header); its last frame is repeated.",
            stacklevel=3,
        )
    while len(frames) < len(targets):
        frames.append(_to_rgb_image(last))
        times.append((last.time or 0.0) - start)
    return frames, times


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
) -> VideoClip:
    """
    Read a video (mp4, webm, mkv, avi, ...) the way the CAV-MAE reference prepared its data.

    Args:
        num_frames: frames sampled uniformly over the first `frame_window_seconds` (or the whole video if shorter).
        sampling_rate: rate of the returned audio.
        load_audio / load_frames: skip a modality (its absence is then no error).
        audio_seconds: how much audio to decode (default: what the model's 1024 fbank frames use; None: all).
        channel: audio channel to keep (0, the reference's choice) or `"mean"`.
    Raises:
        MediaError: missing / empty / unreadable file, or no audio (video) stream when audio (frames) are asked for.
    """
    if num_frames < 1 and load_frames:
        raise MediaError(f"num_frames must be at least 1, got {num_frames}.")
    sampling_rate = _checked_rate("sampling_rate", sampling_rate)
    path = Path(path)
    audio, frames, times, duration = None, [], [], None
    with _open(path) as container:
        if container.duration is not None:
            duration = container.duration / av.time_base
        if load_frames:
            frames, times = _decode_frames(container, path, num_frames, frame_window_seconds)
    if load_audio:
        with _open(path) as container:  # a fresh demuxer: the audio is read from the start, whatever was decoded
            audio = _decode_audio_stream(container, path, sampling_rate, audio_seconds, channel)
    return VideoClip(audio=audio, sampling_rate=sampling_rate, frames=frames, frame_times=times, duration=duration)


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
    "VideoClip",
    "frame_indices",
    "index_damage",
    "is_media_file",
    "load_audio",
    "load_frames_folder",
    "load_video",
    "probe_streams",
    "resample",
    "write_audio",
    "write_video",
]
