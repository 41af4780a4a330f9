"""
`media.load_video` + `CavMaeFeatureExtractor` against the reference's own preprocessing scripts (issue 14):

- on the fixture clips (../shared/fixtures/video: mp4s written by the ffmpeg CLI, the WAVs and JPEGs the reference's
  scripts wrote for them, its data loader's inputs): the JPEGs byte for byte, `pixel_values` exactly, the 16-bit
  audio up to the rounding ties that another FFmpeg version's AAC decoder breaks the other way;
- on files the tests write (rotated, BT.709, variable frame rate, short, webm / mkv): the frames OpenCV's seek
  returns and the script's JPEGs, redone with OpenCV and Pillow (tests/reference_scripts.py);
- training: a dataset of the mp4s gives the inputs a dataset of the reference's WAVs and JPEGs gives.
"""

import io
import json
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile
import torch

from reference_scripts import opencv_decode_all, opencv_frame_count_and_rate, opencv_frames, script_jpeg

from cavmae_hf import media
from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractor
from cavmae_hf.media import MediaError

CLIPS = ("cfr30_stereo44k_10s", "cfr25_mono48k_11s", "short6s_15fps_16k")
# fbank: mean / max abs difference allowed per clip (measured: 9.2e-6 / 2.0e-3, 5.8e-7 / 4.1e-4, 2.6e-4 / 0.12).
# The short clip's 34 one-LSB differences fall in near-silent high bins of its 16 kHz source; see
# test_audio_differs_only_at_rounding_ties for why they cannot be removed.
FBANK_BOUNDS = {"cfr30_stereo44k_10s": (1e-4, 0.2), "cfr25_mono48k_11s": (1e-4, 0.2), "short6s_15fps_16k": (4e-4, 0.2)}


@pytest.fixture(scope="module")
def video_fixtures():
    from conftest import FIXTURES

    folder = FIXTURES / "video"
    if not folder.is_dir():
        pytest.fail(f"Video fixtures not found at {folder}: the shared/ folder must sit beside the repo.")
    return folder


@pytest.fixture(scope="module")
def reference_inputs(video_fixtures):
    return dict(np.load(video_fixtures / "reference_inputs.npz"))


@pytest.fixture(scope="module")
def extractor():
    return CavMaeFeatureExtractor()


def reference_wav(video_fixtures, name) -> np.ndarray:
    samples, rate = soundfile.read(str(video_fixtures / "audio" / f"{name}.wav"), dtype="int16")
    assert rate == 16000
    return samples


# ----------------------------------------------------------------------------------------------------------------
# The fixture clips: our default against the reference's files and data loader
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLIPS)
def test_from_the_mp4_the_reference_data_loaders_inputs(video_fixtures, reference_inputs, extractor, name):
    clip = media.load_video(video_fixtures / f"{name}.mp4")
    inputs = extractor(audio=clip.audio, images=[clip.frames], sampling_rate=clip.sampling_rate, return_tensors="np")
    pixels = inputs["pixel_values"][0]
    assert pixels.shape == (10, 3, 224, 224)
    assert np.abs(pixels - reference_inputs[f"pixel_values_{name}"]).max() == 0.0
    for index, jpeg in enumerate(clip.frame_jpegs):  # the script's files, byte for byte
        assert jpeg == (video_fixtures / "frames" / f"frame_{index}" / f"{name}.jpg").read_bytes(), index
    difference = np.abs(inputs["input_features"][0] - reference_inputs[f"input_features_{name}"])
    mean_bound, max_bound = FBANK_BOUNDS[name]
    assert difference.mean() < mean_bound and difference.max() < max_bound, (difference.mean(), difference.max())


@pytest.mark.parametrize("name", CLIPS)
def test_audio_differs_only_at_rounding_ties(video_fixtures, name):
    """The 16-bit samples equal the reference's WAV but at rounding ties. The reference's WAV is exactly Debian's
    FFmpeg 5.1 float output rounded to 16 bits; PyAV bundles another FFmpeg whose AAC decoder's floats differ from
    5.1's by up to ~2e-7 (0.006 LSB) in most samples, which changes nothing except where a sample lies within that
    distance of a half-LSB: those few samples round the other way. Every differing sample is such a tie, so no
    rounding rule could do better with this decoder."""
    path = video_fixtures / f"{name}.mp4"
    ours = np.rint(media.load_video(path, load_frames=False, audio_seconds=None).audio * 32768).astype(np.int64)
    floats = media.load_video(path, load_frames=False, audio_seconds=None, audio_precision="float32").audio
    reference = reference_wav(video_fixtures, name).astype(np.int64)
    assert len(ours) == len(reference) == len(floats)
    # resampling straight to 16 bits rounds the float result: one libswresample step, as the ffmpeg CLI does
    assert np.array_equal(ours, np.clip(np.rint(floats.astype(np.float64) * 32768), -32768, 32767))
    differing = np.flatnonzero(ours != reference)
    assert np.abs(ours - reference).max() <= 1 and len(differing) < 1e-3 * len(ours)
    distance_to_tie = np.abs(np.abs(floats[differing].astype(np.float64) * 32768 % 1.0) - 0.5)
    assert distance_to_tie.max() < 0.01, distance_to_tie.max()


def test_the_extractors_resize_is_a_no_op_on_the_224_frames(video_fixtures, extractor):
    """Bicubic `Resize(224)` of a 224 x 224 image returns it unchanged (Pillow copies it), so the frames reach the
    normalisation as the JPEG holds them."""
    image = media.read_frame_jpeg(video_fixtures / "frames" / "frame_3" / "cfr30_stereo44k_10s.jpg")
    expected = torch.from_numpy(np.asarray(image, np.float32).copy()).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(extractor.image_mean).view(3, 1, 1), torch.tensor(extractor.image_std).view(3, 1, 1)
    assert torch.equal(extractor.preprocess_image(image), (expected - mean) / std)


def test_save_images_rounding_returns_every_byte_unchanged():
    """`ToTensor` (uint8 / 255 in float32) then `save_image` (`x * 255 + 0.5`, clamped, to uint8), in torch as
    torchvision computes them: every value 0..255 comes back, so `reference_frame_jpeg` saves the crop itself."""
    values = torch.arange(256, dtype=torch.uint8)
    tensor = values.to(torch.float32).div(255)
    assert torch.equal(tensor.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8), values)


def test_reference_frame_functions_on_a_decoded_frame(video_fixtures):
    """The public steps, as `data.decode_clips` can use them: a decoded frame -> the script's JPEG bytes -> the
    image its data loader read."""
    path = video_fixtures / "cfr25_mono48k_11s.mp4"
    full = media.load_video(path, load_audio=False, frame_transform="none")
    assert full.frames[4].size == (352, 288)
    jpeg = media.reference_frame_jpeg(full.frames[4])
    assert jpeg == (video_fixtures / "frames" / "frame_4" / "cfr25_mono48k_11s.jpg").read_bytes()
    crop = media.reference_frame_crop(full.frames[4])
    assert crop.size == (224, 224) and media.reference_frame(full.frames[4]).tobytes() == media.read_frame_jpeg(
        jpeg
    ).tobytes()
    with pytest.raises(MediaError, match="not a readable JPEG"):
        media.read_frame_jpeg(b"not a jpeg")


def test_wav_bytes_store_the_16_bit_audio_exactly(video_fixtures):
    clip = media.load_video(video_fixtures / "short6s_15fps_16k.mp4", load_frames=False, audio_seconds=None)
    data = media.wav_bytes(clip.audio, clip.sampling_rate)
    with soundfile.SoundFile(io.BytesIO(data)) as handle:
        assert handle.subtype == "PCM_16" and handle.samplerate == 16000 and handle.channels == 1
    read, _ = soundfile.read(io.BytesIO(data), dtype="float32")
    assert np.array_equal(read, clip.audio)
    assert np.array_equal(media.float_to_pcm16(clip.audio), np.rint(clip.audio * 32768).astype(np.int16))
    assert np.array_equal(media.float_to_pcm16(np.array([1.5, -1.5, 0.5 / 32768, 1.5 / 32768])), [32767, -32768, 0, 2])
    with pytest.raises(MediaError, match="mono"):
        media.wav_bytes(np.zeros((2, 100), np.float32))


def test_options_are_checked(video_fixtures):
    path = video_fixtures / "short6s_15fps_16k.mp4"
    for name, value in (("frame_selection", "random"), ("frame_transform", "jpeg"), ("audio_precision", "int8")):
        with pytest.raises(MediaError, match=f"^{name} must be one of"):
            media.load_video(path, **{name: value})


@pytest.mark.parametrize("name", CLIPS)
def test_clean_options_measured_against_the_default(video_fixtures, reference_inputs, extractor, name):
    """What each cleaner option changes in the model inputs, on the fixture clips (the figures in README.md)."""
    path = video_fixtures / f"{name}.mp4"
    reference = reference_inputs[f"pixel_values_{name}"]

    std = np.array(extractor.image_std, np.float32).reshape(3, 1, 1)

    def grey_levels(frames):  # the mean difference from the reference's pixels, in 8-bit levels
        pixels = extractor(images=[frames], return_tensors="np")["pixel_values"][0]
        return float((np.abs(pixels - reference) * std * 255).mean())

    full = media.load_video(path, load_audio=False, frame_transform="none").frames
    assert 4.0 < grey_levels(full) < 11.0  # one bicubic resize of the full frame, no JPEG (measured 4.3 to 10.7)
    assert 3.5 < grey_levels([media.reference_frame_crop(frame) for frame in full]) < 7.5  # the JPEG alone: 4.0-7.2
    by_time = media.load_video(path, load_audio=False, frame_selection="timestamp")
    default = media.load_video(path, load_audio=False)
    assert [b - a for a, b in zip(default.frame_numbers, by_time.frame_numbers)] == [0] + [1] * 9
    floats = media.load_video(path, load_frames=False, audio_precision="float32")
    features = extractor(floats.audio, sampling_rate=16000, return_tensors="np")["input_features"][0]
    assert np.abs(features - reference_inputs[f"input_features_{name}"]).mean() > 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Files the tests write, against OpenCV and the script's transform
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def opencv():
    """opencv-python-headless: in the dev extras (a test dependency, never a run-time one)."""
    return pytest.importorskip("cv2")


def textured_frames(count: int, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 `[count, H, W, 3]`: noise that moves 3 px per frame, with the frame's number in the top-left block, so
    that every frame differs and resizing and compression are exercised."""
    base = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, 3 * index, axis=1) for index in range(count)])
    frames[:, :8, :8] = (np.arange(count) % 256).astype(np.uint8)[:, None, None, None]
    return frames


def write_timed_video(path, times, keyframe_interval: int, x264_params: str | None = None, full_range=False):
    """h264 at the given presentation times (variable frame rate), a keyframe every `keyframe_interval` frames."""
    options = {"g": str(keyframe_interval), "keyint_min": str(keyframe_interval), "sc_threshold": "0"}
    if x264_params:
        options["x264-params"] = x264_params
    frames = textured_frames(len(times))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if full_range else "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for time, image in zip(times, frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if x264_params:
                frame = frame.reformat(
                    format=stream.pix_fmt, dst_colorspace="ITU709", dst_color_range="JPEG" if full_range else "MPEG"
                )
            frame.pts, frame.time_base = round(time * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def constant_rate_times(count: int, fps: float) -> list[float]:
    return [index / fps for index in range(count)]


# 4 s at 30 fps then 8 s at 10 fps: the frame rate changes at 4 s
VFR_TIMES = [index / 30 for index in range(120)] + [4 + index / 10 for index in range(80)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference_scripts")
    files = {
        "short_3s": media.write_video(folder / "short_3s.mp4", textured_frames(75), fps=25),
        "ntsc_11s": media.write_video(folder / "ntsc_11s.mp4", textured_frames(330), fps=Fraction(30000, 1001)),
        "webm": media.write_video(folder / "clip.webm", textured_frames(60), fps=25),
        "mkv_with_audio": media.write_video(
            folder / "clip.mkv", textured_frames(50), np.full(2 * 44100, 0.1, np.float32), fps=25
        ),
        "bt709": write_timed_video(
            folder / "bt709.mp4", constant_rate_times(60, 25), 250, "colorprim=bt709:transfer=bt709:colormatrix=bt709"
        ),
        "bt709_full_range": write_timed_video(
            folder / "bt709_full.mp4",
            constant_rate_times(60, 25),
            250,
            "colorprim=bt709:transfer=bt709:colormatrix=bt709:fullrange=on",
            full_range=True,
        ),
        "cfr_keyframe_every_7": write_timed_video(folder / "cfr_gop_7.mp4", constant_rate_times(300, 30), 7),
        "vfr_one_gop": write_timed_video(folder / "vfr_one_gop.mp4", VFR_TIMES, 250),
        "vfr_gop_12": write_timed_video(folder / "vfr_gop_12.mp4", VFR_TIMES, 12),
    }
    for degrees in (90, 180, 270):
        files[f"rotated_{degrees}"] = media.write_video(
            folder / f"rotated_{degrees}.mp4", textured_frames(50), fps=25, rotation=degrees
        )
    return files


SAME_AS_THE_SCRIPT = (
    "short_3s", "ntsc_11s", "webm", "mkv_with_audio", "bt709", "bt709_full_range", "cfr_keyframe_every_7", "vfr_one_gop",
    "rotated_90", "rotated_180", "rotated_270",
)  # fmt: skip


@pytest.mark.parametrize("name", SAME_AS_THE_SCRIPT)
def test_the_scripts_jpegs_from_written_files(opencv, written, name):
    """Rotated (OpenCV turns frames upright as we do), BT.709 in limited and full range (OpenCV 5.0 and PyAV convert
    with the same matrix), short files, fractional rates, containers without a frame count (webm, mkv: OpenCV's
    count from the container's duration, where the audio may run longer), a constant rate with a keyframe every 7
    frames (OpenCV's seeks start from many keyframes) and a variable-frame-rate file whose frames are all in one GOP:
    the default gives the script's JPEGs byte for byte."""
    path = written[name]
    clip = media.load_video(path, load_audio=False)
    expected = [script_jpeg(frame) for frame in opencv_frames(path)]
    assert clip.frame_jpegs == expected
    count, fps = opencv_frame_count_and_rate(path)
    assert clip.frame_numbers == media.opencv_frame_indices(min(count, int(fps * 10)), 10)


def test_the_scripts_frame_count_and_rate(opencv, written):
    with av.open(str(written["mkv_with_audio"])) as container:
        assert container.streams.video[0].frames == 0  # Matroska declares no frame count
    assert opencv_frame_count_and_rate(written["mkv_with_audio"]) == (51, 25.0)  # 2.047 s of audio: 51, not 50
    assert media.load_video(written["mkv_with_audio"], load_audio=False).frame_numbers[-1] == 44  # int(9 * 5.1) - 1
    assert opencv_frame_count_and_rate(written["vfr_gop_12"]) == (200, pytest.approx(200 / 11.8, rel=2e-3))


def test_variable_frame_rate_across_keyframes_is_where_the_script_differs(opencv, written):
    """OpenCV's seek lands on the keyframe before `(frame_idx - 17) / fps`, takes that keyframe's number from its
    timestamp and counts on from there, so across a keyframe of a variable-frame-rate file it reads neither the
    decode-order frame nor the frame at the target time. Figures for README.md: the script's frame numbers, ours in
    decode order (the default) and by timestamp, on 4 s at 30 fps then 8 s at 10 fps with a keyframe every 12."""
    path = written["vfr_gop_12"]
    decoded = opencv_decode_all(path)
    lookup = {frame.tobytes(): number for number, frame in reversed(list(enumerate(decoded)))}
    script = [lookup[frame.tobytes()] for frame in opencv_frames(path)]
    ours = media.load_video(path, load_audio=False).frame_numbers
    by_time = media.load_video(path, load_audio=False, frame_selection="timestamp").frame_numbers
    assert script == [0, 15, 42, 70, 103, 130, 152, 161, 170, 178]
    assert ours == [0, 15, 32, 49, 66, 83, 100, 117, 134, 151]
    assert by_time == [0, 28, 58, 88, 118, 130, 140, 150, 160, 170]
    seconds = np.array(VFR_TIMES)
    assert np.abs(seconds[script] - seconds[ours]).max() == pytest.approx(4.2)  # up to 52 frames apart
    assert np.abs(seconds[script] - seconds[by_time]).max() == pytest.approx(1.2)  # up to 18 frames apart
    one_gop = written["vfr_one_gop"]  # within the first GOP OpenCV counts from frame 0: decode order exactly
    assert media.load_video(one_gop, load_audio=False).frame_numbers == ours


# ----------------------------------------------------------------------------------------------------------------
# Training from mp4 files and from the reference's files
# ----------------------------------------------------------------------------------------------------------------
def test_training_from_mp4_gives_the_inputs_of_the_reference_files(video_fixtures, tmp_path, extractor):
    """A dataset of the fixture mp4s and one of the reference's pre-extracted WAVs and JPEGs (its JSON layout), through
    the evaluation transform with every frame, and through `decode_clips` (decoded once): the same pixel values
    exactly, the same fbank but for the AAC rounding ties."""
    from cavmae_hf.data import (
        AudioVisualDataCollator,
        AudioVisualTransform,
        dataset_from_csv,
        dataset_from_reference_json,
        decode_clips,
    )

    names = CLIPS
    (tmp_path / "videos.csv").write_text(
        "video,labels\n" + "".join(f"{video_fixtures / f'{name}.mp4'},m\n" for name in names)
    )
    entries = [
        {"video_id": name, "wav": str(video_fixtures / "audio" / f"{name}.wav"), "video_path": str(video_fixtures / "frames"),
         "labels": "m"}
        for name in names
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps({"data": entries}))
    from_mp4 = dataset_from_csv(tmp_path / "videos.csv")
    from_files = dataset_from_reference_json(tmp_path / "data.json")
    transform, collate = AudioVisualTransform(extractor, training=False, frame_index="all"), AudioVisualDataCollator()
    expected = collate(transform(from_files[: len(names)]))
    for dataset in (from_mp4, decode_clips(from_mp4, 10)):
        got = collate(transform(dataset[: len(names)]))
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        for name, ours, theirs in zip(names, got["input_features"], expected["input_features"]):
            difference = (ours - theirs).abs()
            mean_bound, max_bound = FBANK_BOUNDS[name]
            assert difference.mean() < mean_bound and difference.max() < max_bound, name


def test_pipelines_pass_the_video_options_on(video_fixtures):
    from cavmae_hf.pipelines import load_clip

    path = video_fixtures / "cfr25_mono48k_11s.mp4"
    assert load_clip(path).frames[0].size == (224, 224)
    options = {"frame_transform": "none", "audio_precision": "float32"}
    clip = load_clip(path, video_options=options)
    assert clip.frames[0].size == (352, 288) and not np.array_equal(clip.audio * 32768, np.rint(clip.audio * 32768))
