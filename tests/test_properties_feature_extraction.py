"""
Property-based tests (hypothesis) of `CavMaeFeatureExtractor`'s audio path: for random lengths, sample types
(int16, int32, float32, float64), 1 to 6 channels in either layout and random sampling rates,

- audio at the configured rate gives `input_features` `[1, max_length, num_mel_bins]`, all finite;
- the attention mask marks exactly Kaldi's frame count `1 + (n - 400) // 160`, capped at `max_length`, as a prefix,
  and the frames past it hold the normalised zero fbank;
- a multi-channel clip gives the features of its first channel, whatever the layout;
- integer PCM gives the features of the same samples scaled to [-1, 1];
- extraction is deterministic, and a batch of clips of different lengths gives each clip's own features;
- any other sampling rate is refused with a message that names both rates.

Lengths stay short (at most 0.25 s) and examples few, so the module runs in seconds.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cavmae_hf import CavMaeFeatureExtractor
from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractionError

RATE = 16000
MAX_LENGTH = 12  # frames: clips of 400..4000 samples give 1..23 frames, so the cap is crossed both ways
NUM_MEL_BINS = 32
EXTRACTOR = CavMaeFeatureExtractor(num_mel_bins=NUM_MEL_BINS, max_length=MAX_LENGTH)
SCALE = {np.int16: 32768.0, np.int32: 2147483648.0}



def kaldi_frames(num_samples: int) -> int:
    return min(1 + (num_samples - 400) // 160, MAX_LENGTH)


def make_clip(length: int, channels: int, dtype, seed: int) -> np.ndarray:
    """`[channels, length]` of the given dtype: noise at a random level, integers over their range."""
    rng = np.random.default_rng(seed)
    level = 10 ** rng.uniform(-3, -0.3)
    samples = np.clip(rng.standard_normal((channels, length)) * level, -1.0, 1.0 - 1e-9)
    if dtype in SCALE:
        return np.round(samples * SCALE[dtype]).astype(dtype)
    return samples.astype(dtype)


def laid_out(clip: np.ndarray, layout: str) -> np.ndarray:
    if layout == "1-D":
        return clip[0]
    return clip if layout == "channels-first" else np.ascontiguousarray(clip.T)


def extract(audio, **kwargs) -> dict:
    return EXTRACTOR([audio], sampling_rate=RATE, return_tensors="pt", return_attention_mask=True, **kwargs)


clip_parameters = dict(
    length=st.integers(400, 4000),
    channels=st.integers(1, 6),
    dtype=st.sampled_from([np.int16, np.int32, np.float32, np.float64]),
    layout=st.sampled_from(["channels-first", "channels-last"]),
    seed=st.integers(0, 2**32 - 1),
)


@settings(max_examples=40, deadline=None)
@given(**clip_parameters)
def test_shape_finiteness_mask_and_determinism(length, channels, dtype, layout, seed):
    clip = make_clip(length, channels, dtype, seed)
    audio = laid_out(clip, "1-D" if channels == 1 and seed % 3 == 0 else layout)
    out = extract(audio)
    features, mask = out["input_features"], out["attention_mask"]
    assert features.shape == (1, MAX_LENGTH, NUM_MEL_BINS) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    frames = kaldi_frames(length)
    assert int(mask.sum()) == frames and mask[0, :frames].all() and not mask[0, frames:].any()
    padding = (0.0 - EXTRACTOR.audio_mean) / EXTRACTOR.audio_std
    assert torch.allclose(features[0, frames:], torch.full_like(features[0, frames:], padding))
    again = extract(audio)
    assert torch.equal(again["input_features"], features) and torch.equal(again["attention_mask"], mask)


@settings(max_examples=30, deadline=None)
@given(**clip_parameters)
def test_first_channel_and_pcm_scaling(length, channels, dtype, layout, seed):
    clip = make_clip(length, channels, dtype, seed)
    features = extract(laid_out(clip, layout))["input_features"]
    first = extract(np.ascontiguousarray(clip[0]))["input_features"]
    assert torch.equal(features, first)
    if dtype in SCALE:
        scaled = (clip[0].astype(np.float64) / SCALE[dtype]).astype(np.float32)
        assert torch.allclose(first, extract(scaled)["input_features"], atol=1e-4, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(400, 4000), min_size=2, max_size=4),
    dtype=st.sampled_from([np.float32, np.float64, np.int16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_batch_gives_each_clip_its_own_features(lengths, dtype, seed):
    clips = [make_clip(length, 1, dtype, seed + index)[0] for index, length in enumerate(lengths)]
    batch = EXTRACTOR(clips, sampling_rate=RATE, return_tensors="pt", return_attention_mask=True)
    assert batch["input_features"].shape == (len(clips), MAX_LENGTH, NUM_MEL_BINS)
    assert batch["attention_mask"].sum(dim=1).tolist() == [kaldi_frames(length) for length in lengths]
    for row, clip in enumerate(clips):
        alone = extract(clip)["input_features"][0]
        assert torch.allclose(batch["input_features"][row], alone, atol=1e-4, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    rate=st.integers(1000, 192000).filter(lambda rate: rate != RATE) | st.sampled_from([8000, 22050, 44100, 48000]),
    length=st.integers(400, 4000),
    dtype=st.sampled_from([np.int16, np.int32, np.float32, np.float64]),
    channels=st.integers(1, 6),
)
def test_other_sampling_rates_are_refused(rate, length, dtype, channels):
    audio = make_clip(length, channels, dtype, seed=rate)
    with pytest.raises(CavMaeFeatureExtractionError, match=f"at {rate} Hz but this feature extractor expects 16000 Hz"):
        EXTRACTOR([audio], sampling_rate=rate)
