"""CavMaeFeatureExtractor against the reference front end (../shared/fixtures) and on bad input."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from PIL import Image
from transformers import AutoFeatureExtractor

from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractionError, CavMaeFeatureExtractor, kaldi_fbank

FBANK = np.load(FIXTURES / "fbank_golden.npz")
IMAGES = np.load(FIXTURES / "image_golden.npz")
CLIPS = sorted(key[len("wave_") :] for key in FBANK.files if key.startswith("wave_"))
CLIPS_16K = [name for name in CLIPS if int(FBANK[f"rate_{name}"]) == 16000]


def compare(actual: np.ndarray, expected: np.ndarray, max_tolerance: float, mean_tolerance: float | None = None):
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    assert difference.max() <= max_tolerance, f"max {difference.max():.3g}"
    if mean_tolerance is not None:
        assert difference.mean() <= mean_tolerance, f"mean {difference.mean():.3g}"


@pytest.mark.parametrize("name", CLIPS)
def test_fbank_one_clip_at_its_own_rate(name):
    wave, rate = FBANK[f"wave_{name}"], int(FBANK[f"rate_{name}"])
    fbank, frames = kaldi_fbank(torch.from_numpy(wave)[None], sampling_rate=rate)
    assert int(frames[0]) == FBANK[f"fbank_{name}"].shape[0]
    compare(fbank[0].numpy(), FBANK[f"fbank_{name}"], 2e-2, 2e-4)


# torchaudio builds its mel filters in float32 whatever the audio's dtype. The fixture's float32 filters differ from
# the ones torch 2.13 builds by one float32 ulp in the mel value of a few FFT bins (a weight moves by up to 5.6e-6): the
# torch that made the fixture rounded those float32 operations differently. torchaudio's own kaldi.fbank run beside this torch gives our result to 1.8e-15, not
# the fixture's; where one FFT bin carries a filter's energy such a weight moves the log-energy by up to ~1e-4
# (measured: max 1.04e-4, mean <= 9.1e-7 over the nine clips). Everything after the filters is float64.
FLOAT64_MAX, FLOAT64_MEAN = 3e-4, 2e-6


@pytest.mark.parametrize("name", CLIPS)
def test_fbank_float64_matches_torchaudio_float64(name):
    wave, rate = FBANK[f"wave_{name}"], int(FBANK[f"rate_{name}"])
    fbank, _ = kaldi_fbank(torch.from_numpy(wave.astype(np.float64))[None], sampling_rate=rate)
    assert fbank.dtype == torch.float64
    compare(fbank[0].numpy(), FBANK[f"fbank64_{name}"], FLOAT64_MAX, FLOAT64_MEAN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fbank_of_a_batch_of_clips_of_different_lengths(dtype):
    waves = [torch.from_numpy(FBANK[f"wave_{name}"]).to(dtype) for name in CLIPS_16K]
    lengths = torch.tensor([len(wave) for wave in waves])
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True, padding_value=0.5)  # padding must not matter
    fbank, frames = kaldi_fbank(padded, lengths)
    for index, name in enumerate(CLIPS_16K):
        count = FBANK[f"fbank_{name}"].shape[0]
        assert int(frames[index]) == count and not fbank[index, count:].any()
        if dtype == torch.float64:
            compare(fbank[index, :count].numpy(), FBANK[f"fbank64_{name}"], FLOAT64_MAX, FLOAT64_MEAN)
        else:
            compare(fbank[index, :count].numpy(), FBANK[f"fbank_{name}"], 2e-2, 2e-4)


def test_fbank_in_small_chunks_equals_one_chunk(monkeypatch):
    from cavmae_hf import feature_extraction_cav_mae as module

    noise = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 40000)).astype(np.float32))
    lengths = torch.tensor([40000, 25000, 9000])
    whole, _ = kaldi_fbank(noise, lengths, num_frames=300)
    monkeypatch.setattr(module, "CPU_CHUNK_ELEMENTS", 100 * 512)  # 100 frames a chunk: clips are cut in pieces
    pieces, frames = kaldi_fbank(noise, lengths, num_frames=300)
    assert frames.tolist() == [248, 154, 54] and pieces.shape == (3, 300, 128)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-4)


def test_batched_clips_of_different_lengths_match_one_by_one():
    extractor = CavMaeFeatureExtractor()
    batch = extractor([FBANK[f"wave_{n}"] for n in CLIPS_16K], sampling_rate=16000, return_tensors="pt")
    assert batch["input_features"].shape == (len(CLIPS_16K), 1024, 128)
    for index, name in enumerate(CLIPS_16K):
        compare(batch["input_features"][index].numpy(), FBANK[f"input_{name}"], 5e-3, 5e-5)
        single = extractor(FBANK[f"wave_{name}"], sampling_rate=16000, return_tensors="np")["input_features"][0]
        compare(single, batch["input_features"][index].numpy(), 1e-3)


def test_attention_mask_marks_real_frames():
    extractor = CavMaeFeatureExtractor(return_attention_mask=True)
    clips = [np.zeros(16000, np.float32), np.zeros(4000, np.float32)]
    out = extractor(clips, sampling_rate=16000, return_tensors="pt")
    assert out["attention_mask"].sum(dim=1).tolist() == [98, 23]


def test_integer_pcm_and_channels():
    extractor = CavMaeFeatureExtractor()
    wave = FBANK["wave_chirp_10s"]
    reference = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_features"]
    pcm = (wave * 32767).astype(np.int16)
    as_int16 = extractor(pcm, sampling_rate=16000, return_tensors="pt")["input_features"]
    scaled = extractor(pcm.astype(np.float32) / 32768, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.equal(as_int16, scaled)
    pcm32 = pcm.astype(np.int32) << 16
    as_int32 = extractor(pcm32, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.allclose(as_int32, scaled, atol=1e-5)
    stereo = np.stack([wave, np.zeros_like(wave)])
    first = extractor([stereo], sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.allclose(first, reference, atol=1e-5)
    channels_last = extractor([stereo.T], sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.allclose(channels_last, reference, atol=1e-5)
    mixed = CavMaeFeatureExtractor(audio_channel="mean")([stereo], sampling_rate=16000, return_tensors="pt")
    halved = extractor(wave / 2, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.allclose(mixed["input_features"], halved, atol=1e-4)


def test_torch_and_list_inputs():
    extractor = CavMaeFeatureExtractor(max_length=64, num_mel_bins=32)
    wave = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    from_numpy = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_features"]
    from_torch = extractor(torch.from_numpy(wave), sampling_rate=16000, return_tensors="pt")["input_features"]
    from_list = extractor(wave.tolist(), sampling_rate=16000, return_tensors="pt")["input_features"]
    requiring_grad = torch.from_numpy(wave).requires_grad_()
    from_grad = extractor(requiring_grad, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.equal(from_grad, from_numpy)
    assert from_numpy.shape == (1, 64, 32)
    assert torch.equal(from_numpy, from_torch) and torch.allclose(from_numpy, from_list)
    as_lists = extractor(wave, sampling_rate=16000)
    assert isinstance(as_lists["input_features"], list) and as_lists["input_features"][0].shape == (64, 32)


@pytest.mark.parametrize(
    "audio,rate,message",
    [
        (np.zeros(16000, np.float32), 44100, "expects 16000 Hz"),
        (np.array([0.1, np.nan] * 4000, np.float32), 16000, "NaN"),
        (np.array([0.1, np.inf] * 4000, np.float32), 16000, "NaN or Inf"),
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.zeros(100, np.float32), 16000, "shorter than one 25 ms frame"),
        (np.zeros((2, 3, 16000), np.float32), 16000, "1-D .* or 2-D"),
        ([], 16000, "Empty audio batch"),
        (np.zeros((0, 16000), np.float32), 16000, "Empty audio batch"),
        ((np.sign(np.sin(np.arange(16000))) * 1e30).astype(np.float32), 16000, "overflows the filter bank"),
        ("not audio", 16000, "Unsupported audio"),
    ],
)
def test_bad_audio_is_refused_with_a_clear_message(audio, rate, message):
    with pytest.raises(CavMaeFeatureExtractionError, match=message):
        CavMaeFeatureExtractor()(audio, sampling_rate=rate)


def test_missing_sampling_rate_warns():
    with pytest.warns(UserWarning, match="sampling_rate"):
        CavMaeFeatureExtractor()(np.zeros(16000, np.float32))


def test_silence_gives_the_log_floor_not_nan():
    extractor = CavMaeFeatureExtractor(do_normalize=False)
    out = extractor(np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="pt")
    features = out["input_features"][0, :98]
    assert torch.isfinite(features).all() and torch.allclose(features, torch.tensor(np.log(np.finfo(np.float32).eps)))


@pytest.mark.parametrize("name", [key[len("pixels_") :] for key in IMAGES.files])
def test_images_match_torchvision(name):
    image = Image.open(FIXTURES / "images" / f"{name}.png")
    pixels = CavMaeFeatureExtractor()(images=image, return_tensors="np")["pixel_values"][0]
    compare(pixels, IMAGES[f"pixels_{name}"], 0.0)  # the same PIL resize and crop: identical


def test_resize_then_crop_sizes():
    array = np.random.default_rng(0).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    pixels = CavMaeFeatureExtractor(image_size=32, resize_size=40, image_mean=[0, 0, 0], image_std=[1, 1, 1])(
        images=array, return_tensors="np"
    )["pixel_values"][0]
    expected = np.asarray(Image.fromarray(array).resize((40, 50), Image.BICUBIC))[9:41, 4:36] / 255.0
    compare(pixels, expected.transpose(2, 0, 1).astype(np.float32), 1e-7)


def test_image_input_kinds_and_frames():
    extractor = CavMaeFeatureExtractor(image_size=32)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    from_pil = extractor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    from_array = extractor(images=array, return_tensors="pt")["pixel_values"]
    from_tensor = extractor(images=torch.from_numpy(array).permute(2, 0, 1), return_tensors="pt")["pixel_values"]
    from_float = extractor(images=array / 255.0, return_tensors="pt")["pixel_values"]
    assert from_pil.shape == (1, 3, 32, 32)
    for other in (from_array, from_tensor, from_float):
        assert torch.equal(from_pil, other)
    frames = extractor(images=[[array, array, array], [array, array, array]], return_tensors="pt")["pixel_values"]
    assert frames.shape == (2, 3, 3, 32, 32)
    batch = extractor(images=[array, array], return_tensors="pt")["pixel_values"]
    assert batch.shape == (2, 3, 32, 32)
    cmyk = Image.fromarray(array).convert("CMYK")
    assert extractor(images=cmyk, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    sixteen = Image.fromarray(array[..., 0].astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    grey = extractor(images=Image.fromarray(array[..., 0]), return_tensors="pt")["pixel_values"]
    assert torch.allclose(extractor(images=sixteen, return_tensors="pt")["pixel_values"], grey, atol=1e-5)


def test_image_errors():
    extractor = CavMaeFeatureExtractor(image_size=32)
    array = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(CavMaeFeatureExtractionError, match="same number of frames"):
        extractor(images=[[array, array], [array]])
    with pytest.raises(CavMaeFeatureExtractionError, match="NaN"):
        extractor(images=np.full((40, 50, 3), np.nan))
    with pytest.raises(CavMaeFeatureExtractionError, match="1, 2, 3 or 4 channels"):
        extractor(images=np.zeros((40, 50, 5), np.uint8))
    with pytest.raises(CavMaeFeatureExtractionError, match="different batch sizes"):
        extractor(audio=np.zeros(16000, np.float32), images=[array, array], sampling_rate=16000)


def test_audio_and_images_together():
    extractor = CavMaeFeatureExtractor()
    image = np.zeros((240, 320, 3), np.uint8)
    out = extractor(audio=FBANK["wave_chirp_10s"], images=image, sampling_rate=16000, return_tensors="pt")
    assert out["input_features"].shape == (1, 1024, 128) and out["pixel_values"].shape == (1, 3, 224, 224)


def test_save_and_reload(tmp_path):
    extractor = CavMaeFeatureExtractor(max_length=512, audio_mean=-4.0, audio_channel="mean", image_size=96)
    extractor.save_pretrained(tmp_path)
    for loaded in (CavMaeFeatureExtractor.from_pretrained(tmp_path), AutoFeatureExtractor.from_pretrained(tmp_path)):
        assert isinstance(loaded, CavMaeFeatureExtractor)
        assert loaded.to_dict() == extractor.to_dict()


# Byte order, sampling-rate types, multi-frame images, 16-bit arrays ------------------------------------------------
@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">i4"])
def test_big_endian_audio_gives_the_native_result(dtype):
    """Big-endian arrays (read from AIFF / raw big-endian PCM) give exactly what the same values in native order
    give, alone, in a list and as a 2-D batch."""
    extractor = CavMaeFeatureExtractor(max_length=64, num_mel_bins=32)
    wave = np.random.default_rng(1).standard_normal(8000) * 0.1
    native = (wave * 32767 if "i2" in dtype else wave * 2**30 if "i4" in dtype else wave).astype(dtype[1:])
    swapped = native.astype(dtype)
    assert not swapped.dtype.isnative and np.array_equal(swapped, native)
    expected = extractor(native, sampling_rate=16000, return_tensors="pt")["input_features"]
    for audio in (swapped, [swapped, swapped], np.stack([swapped, swapped])):
        got = extractor(audio, sampling_rate=16000, return_tensors="pt")["input_features"]
        assert torch.equal(got, expected.expand(len(got), -1, -1))


def test_big_endian_and_16_bit_grey_image_arrays():
    """A 2-D uint16 array is a 16-bit grey image (scaled to 8 bits, as a 16-bit PNG is); in big-endian order it
    gives the same pixels, as do big-endian RGB uint16 arrays."""
    extractor = CavMaeFeatureExtractor(image_size=32)
    grey = np.random.default_rng(2).integers(0, 256, (40, 50)).astype(np.uint16) * 257
    from_pil = extractor(images=Image.fromarray(grey), return_tensors="pt")["pixel_values"]
    eight_bit = extractor(images=(grey // 257).astype(np.uint8), return_tensors="pt")["pixel_values"]
    assert torch.equal(from_pil, eight_bit)
    for array in (grey, grey.astype(">u2")):
        assert torch.equal(extractor(images=array, return_tensors="pt")["pixel_values"], from_pil)
    rgb = np.stack([grey, grey, grey], axis=-1)
    assert torch.equal(
        extractor(images=rgb.astype(">u2"), return_tensors="pt")["pixel_values"],
        extractor(images=rgb, return_tensors="pt")["pixel_values"],
    )


@pytest.mark.parametrize("rate", [16000.0, np.float32(16000), np.int64(16000), np.uint16(16000)])
def test_a_whole_number_sampling_rate_of_any_numeric_type_is_accepted(rate, recwarn):
    extractor = CavMaeFeatureExtractor(max_length=64, num_mel_bins=32)
    wave = np.random.default_rng(3).standard_normal(8000).astype(np.float32) * 0.1
    expected = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.equal(extractor(wave, sampling_rate=rate, return_tensors="pt")["input_features"], expected)
    assert not recwarn.list


@pytest.mark.parametrize("rate", [16000.5, "16000", True, float("nan"), float("inf"), [16000]])
def test_a_sampling_rate_that_is_no_whole_number_is_refused_by_name(rate):
    with pytest.raises(CavMaeFeatureExtractionError, match=r"sampling_rate must be a whole number of Hz"):
        CavMaeFeatureExtractor()(np.zeros(16000, np.float32), sampling_rate=rate)


def test_a_whole_float_rate_that_differs_is_named_as_an_int():
    with pytest.raises(CavMaeFeatureExtractionError, match=r"at 8000 Hz .*media\.resample\(audio, 8000, 16000\)"):
        CavMaeFeatureExtractor()(np.zeros(16000, np.float32), sampling_rate=8000.0)


def test_an_animation_left_at_a_later_frame_gives_its_first_frame(tmp_path):
    extractor = CavMaeFeatureExtractor(image_size=32)
    frames = [Image.fromarray(np.full((40, 60, 3), value, np.uint8)) for value in (10, 200, 90)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    first = extractor(images=np.full((40, 60, 3), 10, np.uint8), return_tensors="pt")["pixel_values"]
    with Image.open(tmp_path / "anim.gif") as animation:
        animation.seek(2)  # e.g. after a caller looked at the last frame
        assert torch.equal(extractor(images=animation, return_tensors="pt")["pixel_values"], first)
        assert torch.equal(extractor(images=[animation, animation], return_tensors="pt")["pixel_values"][1], first[0])
