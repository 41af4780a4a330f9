"""
Feature extractor for CAV-MAE: Kaldi log-mel filter banks of the audio (in torch, batched, exact against
torchaudio's `compliance.kaldi.fbank` as the reference used it) and resize / center-crop / normalise of frames
(exact against torchvision's PIL transforms).
"""

import math
import warnings
from functools import lru_cache

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin

from .configuration_cav_mae import CavMaeArgumentError, CavMaeError

try:  # PIL is a dependency of the package; the guard keeps audio-only trust_remote_code users working without it
    from PIL import Image, ImageOps
except ImportError:  # pragma: no cover
    Image = ImageOps = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOAT32_EPSILON = torch.finfo(torch.float32).eps  # Kaldi's log floor, float32 even in float64 work
PREEMPHASIS = 0.97
LOW_FREQUENCY = 20.0
MAX_CHANNELS = 16
MEL_FILTERS_PER_BLOCK = 32
CPU_CHUNK_ELEMENTS = 1 << 20  # FFT input samples per chunk on CPU: 2048 frames of 512
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


class CavMaeFeatureExtractionError(CavMaeError):
    """An audio or image input cannot be turned into CAV-MAE features; the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Kaldi fbank
# ----------------------------------------------------------------------------------------------------------------
def frame_parameters(sampling_rate: int, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0):
    """(frame length, frame shift, FFT size) in samples, as Kaldi computes them (FFT size: the next power of two)."""
    frame_length = int(sampling_rate * frame_length_ms * 0.001)
    frame_shift = int(sampling_rate * frame_shift_ms * 0.001)
    fft_size = 1 << (frame_length - 1).bit_length()
    return frame_length, frame_shift, fft_size


def num_frames_for(num_samples, frame_length: int, frame_shift: int):
    """Frames Kaldi takes from `num_samples` (snip_edges): 0 when shorter than one frame. An int or a `[B]` tensor."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(num_samples >= frame_length, (num_samples - frame_length) // frame_shift + 1, 0)
    return (num_samples - frame_length) // frame_shift + 1 if num_samples >= frame_length else 0


def _mel_scale(frequency):
    return 1127.0 * torch.log(1.0 + frequency / 700.0)


@lru_cache(maxsize=16)
def _mel_filter_bank_cpu(num_mel_bins: int, fft_size: int, sampling_rate: int) -> torch.Tensor:
    num_fft_bins = fft_size // 2
    nyquist = 0.5 * sampling_rate
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQUENCY / 700.0)
    mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)
    index = torch.arange(num_mel_bins, dtype=torch.float32).unsqueeze(1)
    left = mel_low + index * mel_delta
    center = mel_low + (index + 1.0) * mel_delta
    right = mel_low + (index + 2.0) * mel_delta
    mel = _mel_scale(sampling_rate / fft_size * torch.arange(num_fft_bins, dtype=torch.float32)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).T.contiguous()  # the Nyquist bin gets no weight


def mel_filter_bank(num_mel_bins: int, fft_size: int, sampling_rate: int, dtype=torch.float32, device=None):
    """Kaldi's triangular mel filters `[fft_size // 2 + 1, num_mel_bins]` from 20 Hz to Nyquist, built in float32
    (as torchaudio builds them, whatever the dtype of the audio) and then cast to `dtype`."""
    return _mel_filter_bank_cpu(num_mel_bins, fft_size, sampling_rate).to(device=device, dtype=dtype)


@lru_cache(maxsize=32)
def _mel_blocks(num_mel_bins: int, fft_size: int, sampling_rate: int, dtype, device) -> tuple:
    """The filter bank as blocks of neighbouring filters with the FFT bins they cover:
    `((first_filter, end_filter, first_bin, end_bin, weights [end_bin - first_bin, filters]), ...)`.

    Each triangle covers a few bins, so most of the dense `[257, 128]` product multiplies by zero; the blocks skip
    about three quarters of it. The skipped terms are exact zeros: the result is the dense product's.
    """
    banks = _mel_filter_bank_cpu(num_mel_bins, fft_size, sampling_rate)
    blocks = []
    for first_filter in range(0, num_mel_bins, MEL_FILTERS_PER_BLOCK):
        end_filter = min(first_filter + MEL_FILTERS_PER_BLOCK, num_mel_bins)
        covered = (banks[:, first_filter:end_filter] != 0).any(dim=1).nonzero().flatten()
        if len(covered) == 0:  # filters narrower than an FFT bin: their energy stays 0, i.e. the log floor
            continue
        first_bin, end_bin = int(covered[0]), int(covered[-1]) + 1
        weights = banks[first_bin:end_bin, first_filter:end_filter].to(device=device, dtype=dtype).contiguous()
        blocks.append((first_filter, end_filter, first_bin, end_bin, weights))
    return tuple(blocks)


@lru_cache(maxsize=16)
def _hann_window(frame_length: int, dtype, device) -> torch.Tensor:
    # Kaldi's "hanning" window is the symmetric Hann window.
    return torch.hann_window(frame_length, periodic=False, dtype=dtype, device=device)


def kaldi_fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    sampling_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    num_frames: int | None = None,
    remove_clip_dc: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Kaldi log-mel filter banks of a batch of mono clips, as the CAV-MAE reference computes them with
    `torchaudio.compliance.kaldi.fbank(wave - wave.mean(), htk_compat=True, sample_frequency=sampling_rate,
    use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)`: 25 ms frames
    (snip_edges), per-frame DC removal, pre-emphasis 0.97, symmetric Hann window, FFT of the next power of two
    (512 at 16 kHz, 2048 at 44.1 kHz), power spectrum, mel filters from 20 Hz to Nyquist built in float32, natural
    log floored at float32 epsilon.

    The operations follow torchaudio's order, so float32 results match torchaudio's float32 to ~1e-6 and float64
    ones its float64 to ~1e-14 (the same FFT library). Runs on the device of `waveforms`, in their dtype, without
    a Python loop over clips or frames: on CPU the batch goes through in cache-sized chunks of frames.

    Args:
        waveforms (`torch.Tensor` of shape `[B, N]`):
            float32 or float64 clips (float16 / bfloat16 are computed in float32), each padded to N with anything.
        lengths (`torch.Tensor` or list of shape `[B]`, *optional*):
            valid samples of each clip (default: N); the padding never enters a frame or a mean.
        num_frames (`int`, *optional*):
            zero-pad or cut the output to this many frames; frames past it are not computed. Default: the most
            frames of any clip.
        remove_clip_dc (`bool`, defaults to `True`):
            subtract each clip's mean first, the reference's `wave - wave.mean()`. The per-frame DC removal cancels
            it in exact arithmetic; it is done for float32 rounding to follow the reference's. Clips of different
            lengths get their mean from a masked sum, which can round the mean differently from `wave.mean()` by
            an ulp (visible only in near-silent bins); callers that subtract `clip.mean()` themselves pass False.

    Returns:
        `(fbank, frame_counts)`: fbank `[B, T, num_mel_bins]` in the computation dtype, 0 past each clip's own
        frames; frame_counts `[B]`, the frames of each clip (`(length - frame_length) // shift + 1`, not capped
        at `num_frames`).
    """
    waveforms = _validated_fbank_input(waveforms)
    batch_size, num_samples = waveforms.shape
    device, dtype = waveforms.device, waveforms.dtype
    lengths = num_samples if lengths is None else lengths
    lengths = torch.as_tensor(lengths, device=device).long().expand(batch_size).clamp(max=num_samples)
    frame_length, frame_shift, fft_size = frame_parameters(sampling_rate, frame_length_ms, frame_shift_ms)
    frame_counts = num_frames_for(lengths, frame_length, frame_shift)
    most_frames = int(frame_counts.max()) if batch_size else 0
    output_frames = most_frames if num_frames is None else num_frames
    computed_frames = min(most_frames, output_frames)
    output = waveforms.new_zeros(batch_size, output_frames, num_mel_bins)
    if computed_frames == 0:
        return output, frame_counts

    if remove_clip_dc:
        means = _clip_means(waveforms, lengths)
    waveforms = waveforms[:, : (computed_frames - 1) * frame_shift + frame_length]
    if remove_clip_dc:
        waveforms = waveforms - means
    frames = waveforms.unfold(1, frame_length, frame_shift)  # a view: [B, frames, frame_length]
    window = _hann_window(frame_length, dtype, device)
    mel_blocks = _mel_blocks(num_mel_bins, fft_size, sampling_rate, dtype, device)
    chunks = _chunks(batch_size, computed_frames, _frames_per_chunk(fft_size, device))
    largest_chunk = max((c1 - c0) * (f1 - f0) for c0, c1, f0, f1 in chunks)
    fft_buffer = _zero_padded_buffer(largest_chunk, frame_length, fft_size, waveforms)
    for c0, c1, f0, f1 in chunks:
        _log_mel_into(output[c0:c1, f0:f1], frames[c0:c1, f0:f1], mel_blocks, window, fft_buffer)
    frame_index = torch.arange(output_frames, device=device)
    output.masked_fill_((frame_index >= frame_counts.unsqueeze(1)).unsqueeze(-1), 0.0)
    return output, frame_counts


def _validated_fbank_input(waveforms) -> torch.Tensor:
    if not isinstance(waveforms, torch.Tensor) or waveforms.dim() != 2:
        shape = tuple(waveforms.shape) if hasattr(waveforms, "shape") else type(waveforms).__name__
        raise CavMaeFeatureExtractionError(f"kaldi_fbank takes a [batch, samples] torch tensor, got {shape}.")
    if not waveforms.is_floating_point():
        raise CavMaeFeatureExtractionError(f"kaldi_fbank takes float waveforms, got {waveforms.dtype}.")
    return waveforms.float() if waveforms.dtype in (torch.float16, torch.bfloat16) else waveforms


def _clip_means(waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`[B, 1]` mean of each clip's valid samples."""
    if bool((lengths == waveforms.shape[1]).all()):
        return waveforms.mean(dim=1, keepdim=True)
    valid = torch.arange(waveforms.shape[1], device=waveforms.device) < lengths.unsqueeze(1)
    sums = torch.where(valid, waveforms, 0.0).sum(dim=1, keepdim=True)
    return sums / lengths.clamp(min=1).unsqueeze(1)


def _frames_per_chunk(fft_size: int, device: torch.device) -> int:
    # On CPU a chunk's FFT buffer (4 MB in float32) stays in the caches; a batched FFT over a whole batch does not,
    # and is slower than one clip at a time. Accelerators take the batch in one go.
    elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, elements // fft_size)


def _chunks(batch_size: int, num_frames: int, frames_per_chunk: int) -> list[tuple[int, int, int, int]]:
    """(first clip, end clip, first frame, end frame) tiles of at most `frames_per_chunk` frames (or one clip's
    worth, if more): whole clips when they fit, pieces of one clip when a clip alone is longer."""
    if num_frames <= frames_per_chunk:
        clips_per_chunk = frames_per_chunk // num_frames
        return [
            (start, min(start + clips_per_chunk, batch_size), 0, num_frames)
            for start in range(0, batch_size, clips_per_chunk)
        ]
    return [
        (clip, clip + 1, start, min(start + frames_per_chunk, num_frames))
        for clip in range(batch_size)
        for start in range(0, num_frames, frames_per_chunk)
    ]


def _zero_padded_buffer(rows: int, frame_length: int, fft_size: int, like: torch.Tensor) -> torch.Tensor:
    """`[rows, fft_size]`, zero past column `frame_length`: each chunk views its first rows as
    `[clips, frames, fft_size]` and writes the first `frame_length` columns only, so the FFT input is contiguous
    and already zero-padded (a padding `torch.fft.rfft(x, n=fft_size)` is several times slower)."""
    buffer = like.new_empty(rows, fft_size)
    buffer[:, frame_length:].zero_()
    return buffer


def _log_mel_into(output, frames, mel_blocks, window, fft_buffer):
    """Fill `output` `[b, t, mel]` with the log-mel energies of `frames` `[b, t, frame_length]` (a view into the
    clips), in the order and roundings of torchaudio's float32 code, which keeps the two within ~1e-6."""
    clips, num_frames, frame_length = frames.shape
    fft_size = fft_buffer.shape[1]
    padded = fft_buffer[: clips * num_frames].view(clips, num_frames, fft_size)
    samples = padded[..., :frame_length]
    torch.sub(frames, frames.mean(dim=-1, keepdim=True), out=samples)
    # Pre-emphasis y[j] = x[j] - 0.97 x[j-1], with x[-1] = x[0]; the products come first, so no sample is
    # overwritten before it is used.
    previous = samples[..., :-1] * PREEMPHASIS
    samples[..., :1] -= samples[..., :1] * PREEMPHASIS
    samples[..., 1:] -= previous
    samples.mul_(window)
    spectrum = torch.view_as_real(torch.fft.rfft(padded))
    power = spectrum[..., 0].square().add_(spectrum[..., 1].square())
    for first_filter, end_filter, first_bin, end_bin, weights in mel_blocks:
        output[..., first_filter:end_filter] = power[..., first_bin:end_bin] @ weights
    output.clamp_min_(FLOAT32_EPSILON).log_()


# ----------------------------------------------------------------------------------------------------------------
# Audio input handling
# ----------------------------------------------------------------------------------------------------------------
def _as_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach()  # the fbank is not differentiable; a tensor that requires grad is taken as data
    if isinstance(array, (list, tuple)):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise CavMaeFeatureExtractionError(
            f"Audio must be a numpy array, a torch tensor or a list of numbers, got {type(array).__name__}."
        )
    if array.dtype == object:
        raise CavMaeFeatureExtractionError("Audio could not be read as a numeric array (ragged or mixed values).")
    return torch.from_numpy(np.ascontiguousarray(_native_byte_order(array)))


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """`array` in the machine's byte order: big-endian data (`>f4`, `>i2`, as read from some WAV/AIFF/raw files)
    is converted, since torch cannot hold it and numpy compares `>u2` unequal to `uint16`."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _to_float(waveform: torch.Tensor) -> torch.Tensor:
    """Integer PCM scaled to [-1, 1]; floats kept (float16/bfloat16 promoted to float32)."""
    if waveform.dtype == torch.uint8:
        return (waveform.float() - 128.0) / 128.0
    if waveform.dtype == torch.int16:
        return waveform.float() / 32768.0
    if waveform.dtype == torch.int32:
        return (waveform.double() / 2147483648.0).float()
    if waveform.dtype in (torch.int8, torch.int64):
        raise CavMaeFeatureExtractionError(f"Audio of dtype {waveform.dtype} is not PCM: use float, int16 or int32.")
    if waveform.dtype in (torch.float16, torch.bfloat16):
        return waveform.float()
    if waveform.dtype == torch.bool or not waveform.is_floating_point():
        raise CavMaeFeatureExtractionError(f"Audio of dtype {waveform.dtype} is not supported.")
    return waveform


def _select_channel(waveform: torch.Tensor, channel) -> torch.Tensor:
    """A `[samples]` mono clip from `[samples]`, `[channels, samples]` or `[samples, channels]`."""
    if waveform.dim() == 1:
        return waveform
    if waveform.dim() != 2:
        raise CavMaeFeatureExtractionError(
            f"A clip must be 1-D or 2-D (channels x samples), got {tuple(waveform.shape)}."
        )
    if waveform.shape[0] > waveform.shape[1] and waveform.shape[1] <= MAX_CHANNELS:
        waveform = waveform.T  # soundfile's [samples, channels]
    if waveform.shape[0] > MAX_CHANNELS:
        raise CavMaeFeatureExtractionError(
            f"A 2-D clip is read as [channels, samples] with at most {MAX_CHANNELS} channels; got "
            f"{tuple(waveform.shape)}. Pass a batch of mono clips as a list of 1-D arrays."
        )
    if channel == "mean":
        return waveform.mean(dim=0)
    if not isinstance(channel, int) or not -waveform.shape[0] <= channel < waveform.shape[0]:
        raise CavMaeFeatureExtractionError(
            f"audio_channel={channel!r} does not exist in a {waveform.shape[0]}-channel clip."
        )
    return waveform[channel]


def _split_audio_batch(audio) -> list:
    """The clips of `audio`: one clip (1-D), a batch of mono clips (2-D array), or a list of clips."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        if audio.ndim == 1:
            return [audio]
        if audio.ndim == 2:
            if audio.shape[0] == 0:
                raise CavMaeFeatureExtractionError("Empty audio batch.")
            return list(audio)
        raise CavMaeFeatureExtractionError(
            f"Audio arrays must be 1-D (one clip) or 2-D (a batch of mono clips), got shape {tuple(audio.shape)}. "
            "For multi-channel clips pass a list of [channels, samples] arrays."
        )
    if isinstance(audio, (list, tuple)):
        if len(audio) == 0:
            raise CavMaeFeatureExtractionError("Empty audio batch.")
        if all(isinstance(x, (int, float, np.number)) for x in audio):
            return [np.asarray(audio, dtype=np.float32)]
        return list(audio)
    raise CavMaeFeatureExtractionError(f"Unsupported audio input of type {type(audio).__name__}.")


def _is_whole_number(value) -> bool:
    """An int or an integral float (16000, 16000.0, numpy scalars); not a bool, a string or 16000.5."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(value) and float(value).is_integer()


# ----------------------------------------------------------------------------------------------------------------
# Image input handling
# ----------------------------------------------------------------------------------------------------------------
def _is_image(value) -> bool:
    if Image is not None and isinstance(value, Image.Image):
        return True
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim in (2, 3)


def _pil_to_rgb(image) -> "Image.Image":
    """Any PIL mode to RGB: the first frame of an animation, EXIF orientation applied, 16/32-bit grey scaled to
    8 bits, alpha dropped."""
    if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
        # animated GIF / WebP, multi-page TIFF left at a later frame: the first frame, before exif_transpose copies
        # whichever frame is current
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `shorter_side`, the longer one is truncated."""
    if width <= height:
        return shorter_side, int(shorter_side * height / width)
    return int(shorter_side * width / height), shorter_side


def _center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def _array_to_pil(array: np.ndarray) -> "Image.Image":
    array = _native_byte_order(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (2, 3, 4))):
        raise CavMaeFeatureExtractionError(
            f"An image array of shape {array.shape} has no layout with 1, 2, 3 or 4 channels: expected H x W, "
            "H x W x {1, 2, 3, 4} (channels last) or {1, 3, 4} x H x W (channels first)."
        )
    if array.dtype == np.uint16:
        if array.ndim == 2:
            return Image.fromarray(array)  # mode I;16, scaled to 8 bits by _pil_to_rgb
        return Image.fromarray((array >> 8).astype(np.uint8))
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise CavMaeFeatureExtractionError("Image contains NaN or Inf values.")
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _tensor_to_pil(tensor: torch.Tensor) -> "Image.Image":
    array = tensor.detach().cpu()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array.permute(1, 2, 0)
    return _array_to_pil(array.numpy())


# ----------------------------------------------------------------------------------------------------------------
# The feature extractor
# ----------------------------------------------------------------------------------------------------------------
class CavMaeFeatureExtractor(FeatureExtractionMixin):
    r"""
    Turns audio and frames into CAV-MAE inputs.

    Audio: 16 kHz clips (float, or int16 / int32 PCM scaled to [-1, 1]; one channel of multi-channel audio, see
    `audio_channel`) -> each clip's mean removed -> Kaldi log-mel fbank (see [`kaldi_fbank`]) -> zero-padded or cut
    to `max_length` frames -> `(fbank - audio_mean) / audio_std` -> `input_features`
    `[B, max_length, num_mel_bins]` (float32). Clips of any length are processed as one batch, on the CPU or on
    the device of a torch input; float64 clips are computed in float64. Audio at another rate is refused with a
    hint to `cavmae_hf.media.resample`; audio without a stated `sampling_rate` is assumed at the configured rate,
    with a warning. Empty, too short, NaN / Inf and wrongly shaped audio raise `CavMaeFeatureExtractionError`.

    Images: convert to RGB (any PIL mode: RGBA, LA, L, P, CMYK, I;16, ...), resize the shorter side to
    `resize_size` (default `image_size`; bicubic, with PIL), center-crop `image_size`, scale to [0, 1], normalise
    with `image_mean` / `image_std` -> `pixel_values` `[B, 3, image_size, image_size]`, or
    `[B, F, 3, image_size, image_size]` when every sample is a list of F frames. Every input goes through PIL, so
    PIL images and uint8 arrays (HWC) follow the reference's torchvision transforms exactly; torch tensors (CHW)
    are moved to the CPU, and float arrays / tensors (in [0, 1], or in [0, 255] when their maximum exceeds 1) are
    quantised to 8 bits first, as the reference's jpg frames were.

    Args:
        sampling_rate (`int`, defaults to 16000): the rate audio must have.
        num_mel_bins (`int`, defaults to 128).
        max_length (`int`, defaults to 1024): frames of `input_features` (1024 = 10.24 s).
        audio_mean, audio_std (`float`, defaults to -5.081 and 4.4849): the AudioSet statistics of the reference.
        do_normalize (`bool`, defaults to True): apply the mean/std normalisation to the fbank.
        audio_channel (`int` or `"mean"`, defaults to 0): which channel of a multi-channel clip to use (the
            reference keeps the first), or `"mean"` to mix them down.
        image_size (`int`, defaults to 224): side of the square crop.
        resize_size (`int`, *optional*): the shorter side before the crop (default: `image_size`, as the reference).
        image_mean / image_std (`list[float]`, default to ImageNet's).
        return_attention_mask (`bool`, defaults to False): also return `attention_mask` `[B, max_length]`
            (1 for frames computed from the audio, 0 for padding).
    """

    model_input_names = ["input_features", "pixel_values"]

    def __init__(
        self,
        sampling_rate: int = 16000,
        num_mel_bins: int = 128,
        max_length: int = 1024,
        audio_mean: float = -5.081,
        audio_std: float = 4.4849,
        do_normalize: bool = True,
        audio_channel=0,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = 10.0,
        image_size: int = 224,
        resize_size: int | None = None,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        return_attention_mask: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sampling_rate = sampling_rate
        self.num_mel_bins = num_mel_bins
        self.max_length = max_length
        self.audio_mean = audio_mean
        self.audio_std = audio_std
        self.do_normalize = do_normalize
        self.audio_channel = audio_channel
        self.frame_length_ms = frame_length_ms
        self.frame_shift_ms = frame_shift_ms
        self.image_size = image_size
        self.resize_size = resize_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.return_attention_mask = return_attention_mask

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "CavMaeFeatureExtractor":
        """The extractor whose outputs fit a CAV-MAE model of `config` (`audio_length` frames of `num_mel_bins`
        bins, `image_size` frames); the reference's other settings unless given in `kwargs`."""
        sizes = dict(max_length=config.audio_length, num_mel_bins=config.num_mel_bins, image_size=config.image_size)
        return cls(**{**sizes, **kwargs})

    def __call__(
        self,
        audio=None,
        images=None,
        sampling_rate: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        device=None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            audio: one clip (1-D array/tensor/list), a batch of mono clips (2-D array), or a list of clips, each
                1-D or multi-channel 2-D (`[channels, samples]` or `[samples, channels]`). float, int16 or int32.
            images: one image (PIL, HWC array, CHW tensor), a list of images, or a list of lists of frames.
            sampling_rate: the rate of `audio`; must equal `self.sampling_rate`.
            return_tensors: `"pt"`, `"np"` or None (lists of numpy arrays).
            device: where to compute the fbank (default: the device of a torch input, else CPU).
        """
        if kwargs:
            raise CavMaeArgumentError(f"CavMaeFeatureExtractor got unexpected arguments: {sorted(kwargs)}")
        if audio is None and images is None:
            raise CavMaeFeatureExtractionError("Give `audio`, `images` or both.")
        data = {}
        if audio is not None:
            features, attention_mask = self.extract_audio(audio, sampling_rate, device=device)
            data["input_features"] = features
            if self.return_attention_mask if return_attention_mask is None else return_attention_mask:
                data["attention_mask"] = attention_mask
        if images is not None:
            data["pixel_values"] = self.preprocess_images(images)
        batch_sizes = {name: len(value) for name, value in data.items()}
        if len(set(batch_sizes.values())) > 1:
            raise CavMaeFeatureExtractionError(f"Audio and images have different batch sizes: {batch_sizes}.")
        if return_tensors in (None, "np"):
            data = {k: v.cpu().numpy() for k, v in data.items()}
            if return_tensors is None:
                data = {k: list(v) for k, v in data.items()}
        elif return_tensors != "pt":
            raise CavMaeFeatureExtractionError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        return BatchFeature(data=data, tensor_type=return_tensors)

    # Audio ------------------------------------------------------------------------------------------------------
    def extract_audio(self, audio, sampling_rate=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_features` `[B, max_length, num_mel_bins]` (float32) and the attention mask `[B, max_length]`."""
        self._check_sampling_rate(sampling_rate)
        waveforms, lengths = self.prepare_waveforms(audio, device=device)
        fbank, frame_counts = kaldi_fbank(
            waveforms,
            lengths,
            sampling_rate=self.sampling_rate,
            num_mel_bins=self.num_mel_bins,
            frame_length_ms=self.frame_length_ms,
            frame_shift_ms=self.frame_shift_ms,
            num_frames=self.max_length,
            remove_clip_dc=False,  # prepare_waveforms did it, clip by clip, as the reference does
        )
        self._check_finite(fbank, waveforms)
        features = fbank.float()
        if self.do_normalize:
            features.sub_(self.audio_mean).div_(self.audio_std)  # padding frames too, as in the reference
        frame_index = torch.arange(self.max_length, device=features.device).unsqueeze(0)
        attention_mask = (frame_index < frame_counts.unsqueeze(1)).long()
        return features, attention_mask

    def prepare_waveforms(self, audio, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated mono float clips with their own mean removed (the reference's `wave - wave.mean()`),
        zero-padded into `[B, N_max]`, and their lengths `[B]`. float64 if any clip is float64, else float32."""
        clips = []
        for index, clip in enumerate(_split_audio_batch(audio)):
            waveform = _select_channel(_to_float(_as_tensor(clip)), self.audio_channel)
            self._check_waveform(waveform, index)
            clips.append(waveform)
        device = device or next((c.device for c in clips if c.device.type != "cpu"), torch.device("cpu"))
        dtype = torch.float64 if any(c.dtype == torch.float64 for c in clips) else torch.float32
        lengths = [len(clip) for clip in clips]
        waveforms = torch.zeros(len(clips), max(lengths), dtype=dtype, device=device)
        for index, (row, clip) in enumerate(zip(waveforms, clips)):
            clip = clip.to(device=device, dtype=dtype).contiguous()  # a strided channel would sum in another order
            mean = clip.mean()
            # A NaN or Inf sample makes the mean NaN or Inf, so the mean saves a pass over finite clips.
            if not bool(torch.isfinite(mean)) and not bool(torch.isfinite(clip).all()):
                raise CavMaeFeatureExtractionError(f"Audio clip {index} contains NaN or Inf values.")
            torch.sub(clip, mean, out=row[: len(clip)])
        return waveforms, torch.tensor(lengths, device=device)

    @staticmethod
    def _check_finite(fbank: torch.Tensor, waveforms: torch.Tensor):
        """Samples far outside [-1, 1] (around 1e16 and more in float32) overflow the power spectrum."""
        # One pass: a clip's sum is finite exactly when all its log energies are (each is at most log(FLT_MAX) ~ 89,
        # so the sum of a clip's 131072 cannot overflow), where isfinite().all() reads the batch three times.
        finite = torch.isfinite(fbank.flatten(1).sum(dim=1))
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0])
            peak = float(waveforms[index].abs().max())
            raise CavMaeFeatureExtractionError(
                f"Audio clip {index} overflows the filter bank (peak {peak:.3g}): float audio is expected in [-1, 1]."
            )

    def _check_waveform(self, waveform: torch.Tensor, index: int):
        frame_length, _, _ = frame_parameters(self.sampling_rate, self.frame_length_ms, self.frame_shift_ms)
        if waveform.numel() == 0:
            raise CavMaeFeatureExtractionError(f"Audio clip {index} is empty.")
        if waveform.numel() < frame_length:
            raise CavMaeFeatureExtractionError(
                f"Audio clip {index} has {waveform.numel()} samples, shorter than one {self.frame_length_ms:g} ms "
                f"frame ({frame_length} samples at {self.sampling_rate} Hz)."
            )

    def _check_sampling_rate(self, sampling_rate):
        if sampling_rate is None:
            warnings.warn(
                f"No sampling_rate was passed to CavMaeFeatureExtractor: the audio is assumed to be at "
                f"{self.sampling_rate} Hz. Pass sampling_rate= to have a wrong rate caught.",
                stacklevel=3,
            )
            return
        if not _is_whole_number(sampling_rate):
            raise CavMaeFeatureExtractionError(
                f"sampling_rate must be a whole number of Hz (e.g. {self.sampling_rate}), got {sampling_rate!r}."
            )
        if int(sampling_rate) != self.sampling_rate:
            sampling_rate = int(sampling_rate)
            raise CavMaeFeatureExtractionError(
                f"The audio is at {sampling_rate} Hz but this feature extractor expects {self.sampling_rate} Hz. "
                f"Resample it first, e.g. `cavmae_hf.media.resample(audio, {sampling_rate}, {self.sampling_rate})`, "
                f"or load files with `cavmae_hf.media.load_audio(path, sampling_rate={self.sampling_rate})`."
            )

    # Images -----------------------------------------------------------------------------------------------------
    def preprocess_images(self, images) -> torch.Tensor:
        """`[B, 3, S, S]`, or `[B, F, 3, S, S]` when each sample is a list of F frames."""
        if _is_image(images) and not (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
            return self.preprocess_image(images).unsqueeze(0)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return torch.stack([self.preprocess_image(image) for image in images])
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise CavMaeFeatureExtractionError(
                "images must be an image, a list of images, or a list of lists of frames; "
                f"got {type(images).__name__}."
            )
        if all(_is_image(image) for image in images):
            return torch.stack([self.preprocess_image(image) for image in images])
        samples = [self.preprocess_frames(sample) for sample in images]
        counts = {len(sample) for sample in samples}
        if len(counts) > 1:
            raise CavMaeFeatureExtractionError(
                f"Every sample must have the same number of frames, got {sorted(counts)}."
            )
        return torch.stack(samples)

    def preprocess_frames(self, frames) -> torch.Tensor:
        if not isinstance(frames, (list, tuple)) or not frames or not all(_is_image(frame) for frame in frames):
            raise CavMaeFeatureExtractionError("A sample of frames must be a non-empty list of images.")
        return torch.stack([self.preprocess_image(frame) for frame in frames])

    def preprocess_image(self, image) -> torch.Tensor:
        """One image -> `[3, S, S]` float32: exactly torchvision's `Resize(resize_size or S, BICUBIC)`,
        `CenterCrop(S)`, `ToTensor`, `Normalize(image_mean, image_std)` on the PIL image (S = `image_size`)."""
        image = self._to_pil(image)
        width, height = image.size
        if width == 0 or height == 0:
            raise CavMaeFeatureExtractionError(f"Image of size {width}x{height} has no pixels.")
        image = image.resize(_resized_size(width, height, self.resize_size or self.image_size), Image.BICUBIC)
        image = image.crop(_center_crop_box(*image.size, self.image_size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        return pixels.sub_(mean).div_(std)

    @staticmethod
    def _to_pil(image) -> "Image.Image":
        if Image is None:
            raise CavMaeFeatureExtractionError("Image preprocessing needs Pillow: pip install pillow.")
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, np.ndarray):
            pil = _array_to_pil(image)
        elif isinstance(image, torch.Tensor):
            pil = _tensor_to_pil(image)
        else:
            raise CavMaeFeatureExtractionError(f"Unsupported image type {type(image).__name__}.")
        return _pil_to_rgb(pil)
