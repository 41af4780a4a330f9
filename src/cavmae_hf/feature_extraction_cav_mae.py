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
FRAMES_PER_CHUNK = 4096  # keeps a chunk's spectra (frames x 257 complex) near the CPU caches


class CavMaeFeatureExtractionError(ValueError):
    """An audio or image input cannot be turned into CAV-MAE features; the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Kaldi fbank
# ----------------------------------------------------------------------------------------------------------------
def _mel_scale(frequency):
    return 1127.0 * torch.log(1.0 + frequency / 700.0)


@lru_cache(maxsize=16)
def _mel_filter_bank_cpu(num_mel_bins: int, fft_size: int, sampling_rate: int) -> torch.Tensor:
    """Triangular mel filters `[fft_size // 2 + 1, num_mel_bins]`, built in float32 exactly as Kaldi/torchaudio."""
    num_fft_bins = fft_size // 2
    nyquist = 0.5 * sampling_rate
    mel_low = 1127.0 * math.log(1.0 + LOW_FREQUENCY / 700.0)
    mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
    mel_delta = (mel_high - mel_low) / (num_mel_bins + 1)
    index = torch.arange(num_mel_bins).unsqueeze(1)
    left = mel_low + index * mel_delta
    center = mel_low + (index + 1.0) * mel_delta
    right = mel_low + (index + 2.0) * mel_delta
    mel = _mel_scale(sampling_rate / fft_size * torch.arange(num_fft_bins)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1)).T.contiguous()  # the Nyquist bin gets no weight


def mel_filter_bank(num_mel_bins: int, fft_size: int, sampling_rate: int, dtype, device) -> torch.Tensor:
    return _mel_filter_bank_cpu(num_mel_bins, fft_size, sampling_rate).to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _frame_weights_cpu(frame_length: int, dtype: torch.dtype) -> torch.Tensor:
    # Kaldi's "hanning" window is the symmetric Hann window.
    return torch.hann_window(frame_length, periodic=False, dtype=dtype)


def frame_parameters(sampling_rate: int, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0):
    """(frame length, frame shift, FFT size) in samples, as Kaldi computes them."""
    frame_length = int(sampling_rate * frame_length_ms * 0.001)
    frame_shift = int(sampling_rate * frame_shift_ms * 0.001)
    fft_size = 1 << (frame_length - 1).bit_length()
    return frame_length, frame_shift, fft_size


def num_frames_for(num_samples, frame_length: int, frame_shift: int):
    """Frames Kaldi takes from `num_samples` (snip_edges): 0 when shorter than one frame."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(num_samples >= frame_length, (num_samples - frame_length) // frame_shift + 1, 0)
    return (num_samples - frame_length) // frame_shift + 1 if num_samples >= frame_length else 0


def kaldi_fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    sampling_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    remove_clip_dc: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Kaldi log-mel filter banks of a batch of mono clips, as the CAV-MAE reference computes them:
    `torchaudio.compliance.kaldi.fbank(wave - wave.mean(), htk_compat=True, use_energy=False,
    window_type="hanning", dither=0.0, num_mel_bins=128, frame_shift=10)` (25 ms frames, snip_edges, per-frame DC
    removal, pre-emphasis 0.97, symmetric Hann window, power spectrum, mel filters from 20 Hz to Nyquist built in
    float32, natural log floored at float32 epsilon).

    Args:
        waveforms: `[B, N]` float32 or float64, on any device; clips shorter than N are zero-padded.
        lengths: `[B]` valid samples of each clip (default: all N).
        remove_clip_dc: subtract each clip's mean first (the reference's `wave - wave.mean()`).
    Returns:
        fbank `[B, T_max, num_mel_bins]` in the waveforms' dtype (frames past a clip's own count are 0) and
        `[B]` frame counts.
    """
    if waveforms.dim() != 2:
        raise CavMaeFeatureExtractionError(f"kaldi_fbank takes [batch, samples] waveforms, got {tuple(waveforms.shape)}")
    batch_size, num_samples = waveforms.shape
    device, dtype = waveforms.device, waveforms.dtype
    if lengths is None:
        lengths = torch.full((batch_size,), num_samples, device=device, dtype=torch.long)
    lengths = lengths.to(device=device, dtype=torch.long)
    frame_length, frame_shift, fft_size = frame_parameters(sampling_rate, frame_length_ms, frame_shift_ms)
    frame_counts = num_frames_for(lengths, frame_length, frame_shift)
    max_frames = int(frame_counts.max()) if batch_size else 0
    output = waveforms.new_zeros(batch_size, max_frames, num_mel_bins)
    if max_frames == 0:
        return output, frame_counts
    if remove_clip_dc:
        valid = torch.arange(num_samples, device=device).unsqueeze(0) < lengths.unsqueeze(1)
        means = (waveforms * valid).sum(dim=1, keepdim=True) / lengths.clamp_min(1).unsqueeze(1)
        waveforms = (waveforms - means) * valid
    window = _frame_weights_cpu(frame_length, dtype).to(device)
    banks = mel_filter_bank(num_mel_bins, fft_size, sampling_rate, dtype, device)
    clips_per_chunk = max(1, FRAMES_PER_CHUNK // max_frames)
    for start in range(0, batch_size, clips_per_chunk):
        chunk = waveforms[start : start + clips_per_chunk, : (max_frames - 1) * frame_shift + frame_length]
        output[start : start + clips_per_chunk] = _log_mel_of_frames(chunk, frame_length, frame_shift, window, banks, fft_size)
    frame_index = torch.arange(max_frames, device=device).unsqueeze(0)
    output.masked_fill_((frame_index >= frame_counts.unsqueeze(1)).unsqueeze(-1), 0.0)
    return output, frame_counts


def _log_mel_of_frames(chunk, frame_length, frame_shift, window, banks, fft_size):
    """`[b, samples]` -> `[b, frames, mel]`: framing, DC removal, pre-emphasis, window, |rFFT|^2, mel, log."""
    if chunk.shape[1] < frame_length:
        chunk = torch.nn.functional.pad(chunk, (0, frame_length - chunk.shape[1]))
    frames = chunk.unfold(1, frame_length, frame_shift)  # a view: [b, frames, frame_length]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    emphasised = torch.empty_like(frames)
    emphasised[..., 1:] = torch.addcmul(frames[..., 1:], frames[..., :-1], frames.new_tensor(-PREEMPHASIS))
    emphasised[..., 0] = frames[..., 0] * (1.0 - PREEMPHASIS)
    emphasised.mul_(window)
    spectrum = torch.fft.rfft(emphasised, n=fft_size)
    power = torch.view_as_real(spectrum).square_().sum(dim=-1)  # |X|^2 without the square root of abs()
    mel = torch.matmul(power, banks)
    return mel.clamp_min_(FLOAT32_EPSILON).log_()


# ----------------------------------------------------------------------------------------------------------------
# Audio input handling
# ----------------------------------------------------------------------------------------------------------------
def _as_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, (list, tuple)):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise CavMaeFeatureExtractionError(
            f"Audio must be a numpy array, a torch tensor or a list of numbers, got {type(array).__name__}."
        )
    if array.dtype == object:
        raise CavMaeFeatureExtractionError("Audio could not be read as a numeric array (ragged or mixed values).")
    return torch.from_numpy(np.ascontiguousarray(array))


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
        raise CavMaeFeatureExtractionError(f"A clip must be 1-D or 2-D (channels x samples), got {tuple(waveform.shape)}.")
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
        raise CavMaeFeatureExtractionError(f"audio_channel={channel!r} does not exist in a {waveform.shape[0]}-channel clip.")
    return waveform[channel]


def _split_audio_batch(audio) -> list:
    """The clips of `audio`: one clip (1-D), a batch of mono clips (2-D array), or a list of clips."""
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        if audio.ndim == 1:
            return [audio]
        if audio.ndim == 2:
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


# ----------------------------------------------------------------------------------------------------------------
# Image input handling
# ----------------------------------------------------------------------------------------------------------------
def _is_image(value) -> bool:
    if Image is not None and isinstance(value, Image.Image):
        return True
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim in (2, 3)


def _pil_to_rgb(image) -> "Image.Image":
    """Any PIL mode to RGB: EXIF orientation applied; 16/32-bit grey scaled to 8 bits; alpha dropped."""
    image = ImageOps.exif_transpose(image)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF / multi-page TIFF: the first frame
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
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16:
        return Image.fromarray(array, mode="I;16") if array.ndim == 2 else Image.fromarray((array >> 8).astype(np.uint8))
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

    Audio: 16 kHz clips -> Kaldi log-mel fbank (see [`kaldi_fbank`]) -> zero-padded or cut to `max_length`
    frames -> `(fbank - audio_mean) / audio_std` -> `input_features` `[B, max_length, num_mel_bins]`. Clips of any
    length are processed as one batch on the CPU, or on the device of a torch input.

    Images: resize the shorter side to `image_size` (bicubic, PIL), center-crop `image_size`, scale to [0, 1],
    normalise with `image_mean` / `image_std` -> `pixel_values` `[B, 3, image_size, image_size]`, or
    `[B, F, 3, image_size, image_size]` when every sample is a list of F frames. PIL images and uint8 arrays follow
    the reference's torchvision transforms exactly; float arrays and tensors in [0, 1] are quantised to 8 bits
    first, as the reference's jpg frames were.

    Args:
        sampling_rate (`int`, defaults to 16000): the rate audio must have.
        num_mel_bins (`int`, defaults to 128).
        max_length (`int`, defaults to 1024): frames of `input_features` (1024 = 10.24 s).
        audio_mean, audio_std (`float`, defaults to -5.081 and 4.4849): the AudioSet statistics of the reference.
        do_normalize (`bool`, defaults to True): apply the mean/std normalisation to the fbank.
        audio_channel (`int` or `"mean"`, defaults to 0): which channel of a multi-channel clip to use (the
            reference keeps the first), or `"mean"` to mix them down.
        image_size (`int`, defaults to 224), image_mean / image_std (ImageNet's).
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
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.return_attention_mask = return_attention_mask

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
            raise TypeError(f"CavMaeFeatureExtractor got unexpected arguments: {sorted(kwargs)}")
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
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        return BatchFeature(data=data, tensor_type=return_tensors)

    # Audio ------------------------------------------------------------------------------------------------------
    def extract_audio(self, audio, sampling_rate=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_features` `[B, max_length, num_mel_bins]` (float32) and attention mask `[B, max_length]`."""
        self._check_sampling_rate(sampling_rate)
        waveforms, lengths = self.prepare_waveforms(audio, device=device)
        fbank, frame_counts = kaldi_fbank(
            waveforms,
            lengths,
            sampling_rate=self.sampling_rate,
            num_mel_bins=self.num_mel_bins,
            frame_length_ms=self.frame_length_ms,
            frame_shift_ms=self.frame_shift_ms,
        )
        features = self._pad_or_cut(fbank.float())
        if self.do_normalize:
            features = (features - self.audio_mean) / self.audio_std
        frame_index = torch.arange(self.max_length, device=features.device).unsqueeze(0)
        attention_mask = (frame_index < frame_counts.unsqueeze(1)).long()
        return features, attention_mask

    def prepare_waveforms(self, audio, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated mono float clips, zero-padded into `[B, N_max]`, and their lengths `[B]`."""
        clips = []
        for index, clip in enumerate(_split_audio_batch(audio)):
            waveform = _select_channel(_to_float(_as_tensor(clip)), self.audio_channel)
            self._check_waveform(waveform, index)
            clips.append(waveform)
        device = device or next((c.device for c in clips if c.device.type != "cpu"), torch.device("cpu"))
        dtype = torch.float64 if any(c.dtype == torch.float64 for c in clips) else torch.float32
        lengths = torch.tensor([len(c) for c in clips], device=device)
        waveforms = torch.zeros(len(clips), int(lengths.max()), dtype=dtype, device=device)
        for index, clip in enumerate(clips):
            waveforms[index, : len(clip)] = clip.to(device=device, dtype=dtype)
        return waveforms, lengths

    def _check_waveform(self, waveform: torch.Tensor, index: int):
        frame_length, _, _ = frame_parameters(self.sampling_rate, self.frame_length_ms, self.frame_shift_ms)
        if waveform.numel() == 0:
            raise CavMaeFeatureExtractionError(f"Audio clip {index} is empty.")
        if not bool(torch.isfinite(waveform).all()):
            raise CavMaeFeatureExtractionError(f"Audio clip {index} contains NaN or Inf values.")
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
        elif int(sampling_rate) != self.sampling_rate:
            raise CavMaeFeatureExtractionError(
                f"The audio is at {sampling_rate} Hz but this feature extractor expects {self.sampling_rate} Hz. "
                f"Resample it first, e.g. `cavmae_hf.media.resample(audio, {sampling_rate}, {self.sampling_rate})`, "
                f"or load files with `cavmae_hf.media.load_audio(path, sampling_rate={self.sampling_rate})`."
            )

    def _pad_or_cut(self, fbank: torch.Tensor) -> torch.Tensor:
        frames = fbank.shape[1]
        if frames >= self.max_length:
            return fbank[:, : self.max_length]
        return torch.nn.functional.pad(fbank, (0, 0, 0, self.max_length - frames))

    # Images -----------------------------------------------------------------------------------------------------
    def preprocess_images(self, images) -> torch.Tensor:
        """`[B, 3, S, S]`, or `[B, F, 3, S, S]` when each sample is a list of F frames."""
        if _is_image(images) and not (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4):
            return self.preprocess_image(images).unsqueeze(0)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return torch.stack([self.preprocess_image(image) for image in images])
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise CavMaeFeatureExtractionError(
                f"images must be an image, a list of images, or a list of lists of frames; got {type(images).__name__}."
            )
        if all(_is_image(image) for image in images):
            return torch.stack([self.preprocess_image(image) for image in images])
        samples = [self.preprocess_frames(sample) for sample in images]
        counts = {len(sample) for sample in samples}
        if len(counts) > 1:
            raise CavMaeFeatureExtractionError(f"Every sample must have the same number of frames, got {sorted(counts)}.")
        return torch.stack(samples)

    def preprocess_frames(self, frames) -> torch.Tensor:
        if not isinstance(frames, (list, tuple)) or not frames or not all(_is_image(frame) for frame in frames):
            raise CavMaeFeatureExtractionError("A sample of frames must be a non-empty list of images.")
        return torch.stack([self.preprocess_image(frame) for frame in frames])

    def preprocess_image(self, image) -> torch.Tensor:
        """One image -> `[3, S, S]` float32, exactly torchvision's Resize(S, BICUBIC), CenterCrop(S), ToTensor,
        Normalize on the PIL image."""
        image = self._to_pil(image)
        width, height = image.size
        if width == 0 or height == 0:
            raise CavMaeFeatureExtractionError(f"Image of size {width}x{height} has no pixels.")
        size = self.image_size
        image = image.resize(_resized_size(width, height, size), Image.BICUBIC)
        image = image.crop(_center_crop_box(*image.size, size))
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
