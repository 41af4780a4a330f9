"""
Media faults end to end (issue 7): each hostile or unusual file goes through `cavmae_hf.media`, the feature
extractor, the classification / feature-extraction pipelines and the `cavmae` command line, and gives either a clear
error naming the problem or the correct output.

Files are written by the tests (PyAV, soundfile, Pillow, a hand-written PNG encoder); tiny models run on one thread.
"""

import json
import re
import struct
import time
import tracemalloc
import warnings
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile
import torch
from inference_helpers import clip_frames, save_tiny_classifier, tiny_feature_extractor, write_clip
from PIL import Image
from transformers.testing_utils import CaptureLogger

from cavmae_hf import cli, media, pipelines
from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractionError
from cavmae_hf.media import MediaError
from cavmae_hf.pipelines import CLASSIFICATION_TASK, FEATURE_EXTRACTION_TASK, cav_mae_pipeline, load_clip

RATE = 16000
LOG_FLOOR = float(np.log(np.finfo(np.float32).eps))



# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------
def tone(frequency: float, seconds: float = 1.0, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def rich(frequency: float, seconds: float = 1.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A tone over broadband noise: every mel bin has energy far above 8-bit quantisation noise, so features of the
    same signal stored at different bit depths agree (a pure tone leaves bins at the log floor, where any
    quantisation noise changes the log energy by orders of magnitude)."""
    noise = np.random.default_rng(seed).standard_normal(int(round(seconds * rate))).astype(np.float32)
    return (tone(frequency, seconds, rate, amplitude=0.4) + 0.08 * noise).astype(np.float32)


def dominant_frequency(waveform: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1.0 / rate)[np.argmax(spectrum)])


def png_bytes(array: np.ndarray | None, width: int | None = None, height: int | None = None) -> bytes:
    """A PNG written by hand: 16-bit RGB from a uint16 `[H, W, 3]` array (Pillow cannot write those), or only a
    header declaring `width` x `height` when `array` is None."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    if array is None:
        raw = b"\x00" * 64
    else:
        height, width = array.shape[:2]
        raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def stripes() -> np.ndarray:
    """uint8 `[40, 60, 3]`: red, green and blue vertical stripes."""
    array = np.zeros((40, 60, 3), np.uint8)
    array[:, :20], array[:, 20:40], array[:, 40:] = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    return array


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media_faults")
    paths = {}

    def add(name, path):
        paths[name] = path
        return path

    good = add("good", write_clip(folder / "good.mp4", seed=1, seconds=2.0))
    data = good.read_bytes()
    add("truncated", folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    index = data.index(b"moov") - 4  # the index follows the data in files written without faststart
    index_size = struct.unpack(">I", data[index : index + 4])[0]
    add("moov_cut", folder / "moov_cut.mp4").write_bytes(data[: index + int(0.7 * index_size)])
    add("moov_cut_early", folder / "moov_cut_early.mp4").write_bytes(data[: index + int(0.1 * index_size)])
    add("moov_cut_audio", folder / "moov_cut_audio.mp4").write_bytes(data[: index + index_size // 2])
    corrupt = bytearray(data)
    payload = data.index(b"mdat") + 8
    corrupt[payload + 2000 : payload + 6000] = bytes(4000)
    add("corrupt", folder / "corrupt.mp4").write_bytes(bytes(corrupt))
    add("empty_mp4", folder / "empty.mp4").write_bytes(b"")
    add("empty_wav", folder / "empty.wav").write_bytes(b"")
    add("text_mp4", folder / "text.mp4").write_text("this is not a video\n" * 20)
    add("audio_only", media.write_video(folder / "audio_only.mp4", audio=tone(440), sampling_rate=RATE))
    add("video_only", write_clip(folder / "video_only.mp4", seed=2, with_audio=False))
    add(
        "tenth",
        media.write_video(folder / "tenth.mp4", clip_frames(3, count=1), tone(600, 0.1), fps=10, sampling_rate=RATE),
    )
    add("too_short_wav", media.write_audio(folder / "too_short.wav", tone(600, 0.02), RATE))
    silent = np.zeros(RATE, np.float32)
    add("silent_wav", media.write_audio(folder / "silent.wav", silent, RATE))
    add("silent_mp4", media.write_video(folder / "silent.mp4", clip_frames(4), silent, fps=10, sampling_rate=RATE))
    soundfile.write(add("loud_wav", folder / "loud.wav"), tone(440) * 2e6, RATE, subtype="FLOAT")
    soundfile.write(add("overflow_wav", folder / "overflow.wav"), tone(440) * 2e30, RATE, subtype="FLOAT")
    nan = tone(440)
    nan[5000] = np.nan
    soundfile.write(add("nan_wav", folder / "nan.wav"), nan, RATE, subtype="FLOAT")
    square = np.sign(tone(440) + 1e-9).astype(np.float32)  # hard-clipped: every sample at full scale
    soundfile.write(add("clipped_wav", folder / "clipped.wav"), square, RATE, subtype="PCM_16")
    for subtype in ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"):
        soundfile.write(add(subtype, folder / f"{subtype.lower()}.wav"), rich(440), RATE, subtype=subtype)
    for rate in (8000, 22050, 44100, 48000):
        soundfile.write(add(f"rate_{rate}", folder / f"rate_{rate}.wav"), tone(440, 1.0, rate), rate)
    channels = np.stack([rich(300 + 400 * c, seed=c) for c in range(6)], axis=1)  # channel c: (300 + 400 c) Hz
    soundfile.write(add("mono", folder / "mono.wav"), channels[:, 0], RATE, subtype="FLOAT")
    soundfile.write(add("stereo", folder / "stereo.wav"), channels[:, :2], RATE, subtype="FLOAT")
    soundfile.write(add("surround", folder / "surround.wav"), channels, RATE, subtype="FLOAT")
    surround = media.write_video(folder / "surround.mp4", clip_frames(5), channels.T, fps=10, sampling_rate=RATE)
    add("surround_mp4", surround)

    rgb = stripes()
    Image.fromarray(rgb[..., 1]).save(add("grey_png", folder / "grey.png"))
    ramp = np.tile(np.linspace(0, 65535, 60).astype(np.uint16), (40, 1))
    Image.fromarray(ramp).save(add("grey16_png", folder / "grey16.png"))
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(add("grey8_png", folder / "grey8.png"))
    add("rgb16_png", folder / "rgb16.png").write_bytes(png_bytes(rgb.astype(np.uint16) * 257))
    Image.fromarray(rgb).save(add("rgb_png", folder / "rgb.png"))
    Image.fromarray(rgb).convert("CMYK").save(add("cmyk_jpg", folder / "cmyk.jpg"), quality=95)
    marked = np.zeros((40, 60, 3), np.uint8)
    marked[:10, :10] = 255  # a white block in the top-left corner of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored image must be turned 90 degrees clockwise to be upright
    Image.fromarray(marked).save(add("exif_jpg", folder / "exif.jpg"), exif=exif.tobytes(), quality=95)
    gif_frames = [Image.fromarray(np.full((40, 60, 3), value, np.uint8)) for value in (10, 200, 90)]
    gif_frames[0].save(add("gif", folder / "anim.gif"), save_all=True, append_images=gif_frames[1:], duration=100)
    rgba = np.dstack([rgb, np.full((40, 60), 128, np.uint8)])
    Image.fromarray(rgba).save(add("rgba_png", folder / "rgba.png"))
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(add("palette_png", folder / "palette.png"))
    add("bomb_png", folder / "bomb.png").write_bytes(png_bytes(None, width=40000, height=40000))
    add("truncated_jpg", folder / "truncated.jpg").write_bytes((folder / "cmyk.jpg").read_bytes()[:300])
    add("fake_png", folder / "fake.png").write_bytes(data)  # an mp4 named .png
    return paths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("media_model") / "classifier")


@pytest.fixture(scope="module")
def classifier(model_dir):
    return cav_mae_pipeline(CLASSIFICATION_TASK, model_dir)


@pytest.fixture(scope="module")
def embedder(model_dir):
    return cav_mae_pipeline(FEATURE_EXTRACTION_TASK, model_dir)


@pytest.fixture(scope="module")
def extractor(model_dir):
    return tiny_feature_extractor(pipelines.read_config(model_dir))


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_cli_error(files_or_args, model_dir, capsys, contains):
    code, _, err = run_cli(["classify", *files_or_args, "--model", model_dir, "-q", "--num-frames", 2], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], err
    assert "Traceback" not in err


def assert_scores(result, labels=5):
    assert len(result) == labels and all(np.isfinite(entry["score"]) for entry in result)


# ----------------------------------------------------------------------------------------------------------------
# Damaged, empty and foreign files: clear errors everywhere
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,message",
    [
        # the file ends inside its data, before the index (moov) that follows it
        ("truncated", "is not a readable media file: it is truncated: the file ends inside its 'mdat' box"),
        ("moov_cut", "is truncated: its index ('moov' box) is cut off after"),  # FFmpeg cannot open it
        ("moov_cut_early", "is truncated: its index ('moov' box) is cut off after"),  # FFmpeg sees no stream
        ("empty_mp4", "empty (0 bytes)"),
        ("text_mp4", "not a readable media file"),
    ],
)
def test_damaged_and_foreign_video_files(files, classifier, model_dir, capsys, name, message):
    with pytest.raises(MediaError, match=re.escape(message)):
        media.load_video(files[name])
    with pytest.raises(MediaError, match=re.escape(message)):
        classifier(str(files[name]))
    assert_cli_error([files[name]], model_dir, capsys, message)


def test_an_index_cut_inside_the_audio_track_is_truncation_not_a_silent_video(files, classifier, model_dir, capsys):
    """FFmpeg opens an mp4 whose `moov` box ends inside the audio track and shows its video stream only: that is
    reported as truncation everywhere, not as "no audio stream" (nor classified as a silent video)."""
    path = files["moov_cut_audio"]
    with av.open(str(path)) as container:  # the premise: FFmpeg itself sees a video-only file
        assert container.streams.video and not container.streams.audio
    message = "is truncated: its index ('moov' box) is cut off after"
    with pytest.raises(MediaError, match=re.escape(message) + ".*its audio stream could not be read"):
        media.load_video(path)
    with pytest.raises(MediaError, match=re.escape(message) + ".*its audio stream could not be read"):
        media.load_audio(path)
    with pytest.raises(MediaError, match=re.escape(message) + ".*only its video stream could be read"):
        classifier(str(path))
    assert_cli_error([path], model_dir, capsys, message)
    assert media.index_damage(files["good"]) is None and media.index_damage(files["rate_8000"]) is None


def test_empty_wav_and_directory(files, classifier, model_dir, capsys):
    with pytest.raises(MediaError, match=re.escape("empty (0 bytes)")):
        media.load_audio(files["empty_wav"])
    with pytest.raises(MediaError, match=re.escape("empty (0 bytes)")):
        classifier(str(files["empty_wav"]))
    assert_cli_error([files["empty_wav"]], model_dir, capsys, "empty (0 bytes)")
    folder = files["good"].parent
    with pytest.raises(MediaError, match="is a directory"):
        classifier(str(folder))
    assert_cli_error([folder], model_dir, capsys, "is a directory")


def test_corrupt_payload_warns_once_per_stream_and_still_classifies(files, classifier):
    """Zeroed bytes inside the data: the undecodable packets are skipped, with one warning per stream giving their
    count; the pipeline still gives finite scores. Counted in decode order (the default), the lost frames leave the
    stream short of the last frames sampled, which repeat the last one found (a third warning says so); sampled by
    time, nothing else is missing."""
    for selection, expected_warnings in (("decode_order", 3), ("timestamp", 2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clip = media.load_video(files["corrupt"], num_frames=10, frame_selection=selection)
        messages = [str(warning.message) for warning in caught]
        video = [m for m in messages if "undecodable video packet(s) skipped" in m]
        audio = [m for m in messages if "undecodable audio packet(s) skipped" in m]
        ended = [m for m in messages if "the last frame found is repeated" in m]
        assert len(video) == 1 and len(audio) == 1 and len(messages) == expected_warnings, messages
        assert len(ended) == expected_warnings - 2, messages
        assert re.search(r": [1-9]\d* undecodable video", video[0])
        assert re.search(r": [1-9]\d* undecodable audio", audio[0])
        assert len(clip.frames) == 10 and np.isfinite(clip.audio).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_scores(classifier(str(files["corrupt"]), top_k=None, num_frames=4))


def test_corrupt_packets_lose_only_themselves(files):
    """The damaged packets' audio becomes silence of their duration, so what follows stays at its time: after the
    gap (and one AAC frame of overlap) the samples are those of the intact file. Frames sampled after the damage are
    the intact file's."""
    # float audio: with 16-bit samples the quiet start of the tone holds zeros of its own
    good = media.load_video(files["good"], num_frames=10, audio_precision="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = media.load_video(files["corrupt"], num_frames=10, audio_precision="float32")
    assert len(clip.audio) == len(good.audio) >= 1.9 * RATE
    silent = np.flatnonzero(clip.audio[: RATE] == 0.0)
    assert len(silent) >= 1024 and silent[-1] - silent[0] + 1 == len(silent)  # one gap, whole AAC frames of zeros
    resumed = silent[-1] + 1 + 1024
    assert np.abs(clip.audio[resumed:] - good.audio[resumed:]).max() < 1e-3
    assert np.abs(good.audio[silent]).max() > 0.05  # the gap was not silent in the intact file
    # frames before the damage are exact; sampled by time, the later ones are taken at their own times (their pixels
    # differ: they predict from the lost frames, as any decoder shows them)
    assert clip.frames[0].tobytes() == good.frames[0].tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good, clip = (
            media.load_video(path, num_frames=10, load_audio=False, frame_selection="timestamp")
            for path in (files["good"], files["corrupt"])
        )
    assert clip.frames[0].tobytes() == good.frames[0].tobytes() and clip.frame_times[-5:] == good.frame_times[-5:]


def test_a_file_in_which_nothing_decodes_is_an_error(files, tmp_path):
    data = files["good"].read_bytes()
    payload = data.index(b"mdat") + 8
    path = tmp_path / "zeroed.mp4"
    path.write_bytes(data[:payload] + bytes(data.index(b"moov") - 4 - payload) + data[data.index(b"moov") - 4 :])
    with pytest.raises(MediaError, match=r"the video stream could not be decoded: none of its \d+ packet\(s\)"):
        media.load_video(path, load_audio=False)
    with pytest.raises(MediaError, match="the audio stream could not be decoded"):
        media.load_audio(path)


@pytest.mark.parametrize(
    "name,message",
    [
        ("truncated_jpg", "not a readable image"),
        ("fake_png", "not a readable image"),
        ("bomb_png", "not a readable image"),  # 40000 x 40000 declared: Pillow's decompression-bomb guard
    ],
)
def test_damaged_and_hostile_images(files, classifier, model_dir, capsys, name, message):
    with pytest.raises(MediaError, match=message):
        classifier(str(files[name]))
    assert_cli_error([files[name]], model_dir, capsys, message)


# ----------------------------------------------------------------------------------------------------------------
# Missing modalities and very short clips
# ----------------------------------------------------------------------------------------------------------------
def test_audio_only_video_file(files, classifier, model_dir, capsys):
    with pytest.raises(MediaError, match="no video stream"):
        media.load_video(files["audio_only"])
    clip = load_clip(files["audio_only"])
    assert clip.modalities == ("audio",) and abs(dominant_frequency(clip.audio, RATE) - 440) < 3
    assert_scores(classifier(str(files["audio_only"]), top_k=None))
    code, out, _ = run_cli(["classify", files["audio_only"], "--model", model_dir, "-q", "--json"], capsys)
    assert code == 0 and len(json.loads(out)[0]["labels"]) == 5


def test_video_only_file_uses_its_frames_with_a_warning(files, classifier):
    with pytest.raises(MediaError, match="no audio stream"):
        media.load_video(files["video_only"])
    with CaptureLogger(pipelines.logger) as captured:
        clip = load_clip(files["video_only"], num_frames=3)
    assert "no audio stream: only its frames are used" in captured.out
    assert clip.modalities == ("visual",) and len(clip.frames) == 3
    assert_scores(classifier(str(files["video_only"]), top_k=None, num_frames=3))


def test_a_tenth_of_a_second(files, classifier, extractor):
    clip = media.load_video(files["tenth"], num_frames=10)
    assert len(clip.frames) == 10 and all(f.tobytes() == clip.frames[0].tobytes() for f in clip.frames)
    assert len(clip.audio) >= 1600
    out = extractor(clip.audio, sampling_rate=RATE, return_tensors="pt", return_attention_mask=True)
    assert int(out["attention_mask"].sum()) == min(1 + (len(clip.audio) - 400) // 160, extractor.max_length)
    assert torch.isfinite(out["input_features"]).all()
    assert_scores(classifier(str(files["tenth"]), top_k=None))


def test_audio_shorter_than_one_fbank_frame(files, classifier, model_dir, capsys):
    waveform, _ = media.load_audio(files["too_short_wav"])
    assert len(waveform) == 320
    message = f"{files['too_short_wav']}: Audio clip 0 has 320 samples, shorter than one 25 ms frame"
    with pytest.raises(CavMaeFeatureExtractionError, match=re.escape(message)):
        classifier(str(files["too_short_wav"]))
    assert_cli_error([files["too_short_wav"]], model_dir, capsys, message)


# ----------------------------------------------------------------------------------------------------------------
# Long files: only what the model uses is decoded
# ----------------------------------------------------------------------------------------------------------------
def _write_tiny_video(path, seconds: float, fps: int = 2):
    count = int(seconds * fps)
    frames = np.zeros((count, 16, 16, 3), np.uint8) + (np.arange(count) % 200).astype(np.uint8)[:, None, None, None]
    audio = tone(440, seconds, amplitude=0.3)
    # PCM audio in Matroska: a 10-minute file is written in a fraction of a second
    return media.write_video(path, frames, audio, fps=fps, sampling_rate=RATE, audio_codec="pcm_s16le")


def _cost(function, repeats: int = 3) -> tuple[float, int]:
    """(fastest wall time, peak traced allocation in bytes) of `function()`."""
    times, peak = [], 0
    for _ in range(repeats):
        tracemalloc.start()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return min(times), peak


def test_ten_minute_video_costs_what_a_fifteen_second_one_does(tmp_path, classifier):
    short = _write_tiny_video(tmp_path / "short.mkv", 15)
    long = _write_tiny_video(tmp_path / "long.mkv", 600)
    assert long.stat().st_size > 15 * 2**20  # 19 MB of PCM audio: reading it all would show
    short_time, short_peak = _cost(lambda: media.load_video(short, num_frames=10))
    long_time, long_peak = _cost(lambda: media.load_video(long, num_frames=10))
    assert long_time < 3 * short_time + 0.05, (short_time, long_time)
    assert long_peak < 2 * short_peak + 2**20 and long_peak < 8 * 2**20, (short_peak, long_peak)  # all: 38 MB
    clip = media.load_video(long, num_frames=10)
    assert len(clip.audio) == int(np.ceil(media.DEFAULT_AUDIO_SECONDS * RATE)) and max(clip.frame_times) < 10
    pipeline_time, _ = _cost(lambda: classifier(str(long), num_frames=10), repeats=1)
    assert pipeline_time < 10 * short_time + 1.0


def _write_hour_long_video(path, seconds: int, rate: int = 8000):
    """A Matroska file of `seconds` (an hour in 0.05 s, 30 MB): one 16 x 16 MJPEG frame per second (the same packet
    muxed again and again) and 8 kHz 8-bit PCM of a 440 Hz tone, written once and muxed every second."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("mjpeg", rate=1)
        video.width, video.height, video.pix_fmt = 16, 16, "yuvj420p"
        audio = container.add_stream("pcm_u8", rate=rate, layout="mono")
        (image,) = video.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), 90, np.uint8), format="rgb24"))
        wave = (128 + 60 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.uint8)[None]
        frame = av.AudioFrame.from_ndarray(wave, format="u8", layout="mono")
        frame.sample_rate = rate
        second_of_audio = b"".join(bytes(packet) for packet in [*audio.encode(frame), *audio.encode(None)])
        for second in range(seconds):
            for stream, data, base, duration in ((video, bytes(image), 1, 1), (audio, second_of_audio, rate, rate)):
                packet = av.Packet(data)
                packet.stream, packet.time_base = stream, Fraction(1, base)
                packet.pts = packet.dts = second * duration
                packet.duration = duration
                container.mux(packet)
    return path


def test_one_hour_video_costs_what_a_fifteen_second_one_does(tmp_path, classifier):
    short = _write_hour_long_video(tmp_path / "short.mkv", 15)
    hour = _write_hour_long_video(tmp_path / "hour.mkv", 3600)
    assert hour.stat().st_size > 25 * 2**20  # decoding all of it would take 460 MB of float32 audio at 16 kHz
    short_time, short_peak = _cost(lambda: media.load_video(short, num_frames=10))
    hour_time, hour_peak = _cost(lambda: media.load_video(hour, num_frames=10))
    assert hour_time < 3 * short_time + 0.05, (short_time, hour_time)
    assert hour_peak < 2 * short_peak + 2**20 and hour_peak < 8 * 2**20, (short_peak, hour_peak)
    clip = media.load_video(hour, num_frames=10)
    assert clip.frame_numbers == media.opencv_frame_indices(10, 10)  # 1 fps: frames 0, 0, 1, ..., 8
    assert clip.duration == pytest.approx(3600) and clip.frame_times == [float(n) for n in clip.frame_numbers]
    assert len(clip.audio) == int(np.ceil(media.DEFAULT_AUDIO_SECONDS * RATE))
    assert abs(dominant_frequency(clip.audio, RATE) - 440) < 3 and abs(np.asarray(clip.frames[5]).mean() - 90) < 4
    pipeline_time, _ = _cost(lambda: classifier(str(hour), num_frames=10), repeats=1)
    assert pipeline_time < 10 * short_time + 1.0


def test_ten_minute_audio_file_is_read_only_as_far_as_needed(tmp_path, extractor):
    long = media.write_audio(tmp_path / "long.wav", tone(440, 600, amplitude=0.3), RATE)
    short = media.write_audio(tmp_path / "short.wav", tone(440, 15, amplitude=0.3), RATE)
    seconds = pipelines.audio_seconds_for(extractor)
    long_time, long_peak = _cost(lambda: load_clip(long, audio_seconds=seconds))
    short_time, _ = _cost(lambda: load_clip(short, audio_seconds=seconds))
    assert len(load_clip(long, audio_seconds=seconds).audio) == int(np.ceil(seconds * RATE))
    assert long_time < 3 * short_time + 0.05 and long_peak < 8 * 2**20, (short_time, long_time, long_peak)


def test_audio_seconds_follow_the_model_input_length():
    assert pipelines.audio_seconds_for(tiny_feature_extractor_of(64)) == media.DEFAULT_AUDIO_SECONDS
    assert pipelines.audio_seconds_for(tiny_feature_extractor_of(1024)) == media.DEFAULT_AUDIO_SECONDS  # 10.255 s
    assert pipelines.audio_seconds_for(tiny_feature_extractor_of(2048)) == pytest.approx(20.5)  # 20.495 s


def tiny_feature_extractor_of(max_length: int):
    from cavmae_hf import CavMaeFeatureExtractor

    return CavMaeFeatureExtractor(max_length=max_length)


# ----------------------------------------------------------------------------------------------------------------
# Silence and extreme sample values
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["silent_wav", "silent_mp4"])
def test_silence_gives_the_fbank_floor_not_nan(files, classifier, extractor, name):
    clip = load_clip(files[name], num_frames=2)
    assert np.abs(clip.audio).max() == 0.0
    out = extractor(clip.audio, sampling_rate=RATE, return_tensors="pt", return_attention_mask=True)
    computed = out["input_features"][0, : int(out["attention_mask"].sum())]
    assert torch.allclose(computed, torch.tensor((LOG_FLOOR - extractor.audio_mean) / extractor.audio_std))
    assert_scores(classifier(str(files[name]), top_k=None, num_frames=2))


def test_loud_and_clipped_audio_is_used_as_it_is(files, classifier, extractor):
    loud, _ = media.load_audio(files["loud_wav"])
    assert np.abs(loud).max() == pytest.approx(1e6, rel=1e-3)  # float wav: not clipped, not rescaled
    clipped, _ = media.load_audio(files["clipped_wav"])
    assert np.abs(clipped).max() == pytest.approx(1.0, abs=1e-4)
    for waveform in (loud, clipped):
        features = extractor(waveform, sampling_rate=RATE, return_tensors="pt")["input_features"]
        assert torch.isfinite(features).all()
    for name in ("loud_wav", "clipped_wav"):
        assert_scores(classifier(str(files[name]), top_k=None))


def test_samples_that_overflow_the_fbank_are_refused_naming_the_file(files, classifier, model_dir, capsys):
    message = f"{files['overflow_wav']}: Audio clip 0 overflows the filter bank"
    with pytest.raises(CavMaeFeatureExtractionError, match=re.escape(message)):
        classifier(str(files["overflow_wav"]))
    assert_cli_error([files["good"], files["overflow_wav"]], model_dir, capsys, message)


def test_nan_samples_in_a_file(files, classifier, model_dir, capsys):
    with pytest.raises(MediaError, match="NaN or Inf samples"):
        media.load_audio(files["nan_wav"])
    with pytest.raises(MediaError, match="NaN or Inf samples"):
        classifier(str(files["nan_wav"]))
    assert_cli_error([files["nan_wav"]], model_dir, capsys, "NaN or Inf samples")


# ----------------------------------------------------------------------------------------------------------------
# Sample formats, rates and channel layouts
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "subtype,tolerance",
    [("PCM_U8", 1 / 128), ("PCM_16", 1 / 32768), ("PCM_24", 1e-6), ("PCM_32", 1e-7), ("FLOAT", 0), ("DOUBLE", 1e-7)],
)
def test_8_16_24_32_bit_and_float_wav(files, embedder, subtype, tolerance):
    waveform, rate = media.load_audio(files[subtype])
    assert rate == RATE and waveform.dtype == np.float32 and len(waveform) == RATE
    assert np.abs(waveform - rich(440)).max() <= tolerance + 1e-7
    reference = embedder(str(files["FLOAT"]), return_tensors=True)["audio_embeds"]
    embeds = embedder(str(files[subtype]), return_tensors=True)["audio_embeds"]
    assert torch.allclose(embeds, reference, atol=0.05 if subtype == "PCM_U8" else 2e-3)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_sampling_rates_are_resampled_to_16k(files, embedder, rate):
    waveform, got = media.load_audio(files[f"rate_{rate}"])
    assert got == RATE and len(waveform) == RATE and abs(dominant_frequency(waveform, RATE) - 440) < 2
    assert np.isfinite(np.asarray(embedder(str(files[f"rate_{rate}"]))["audio_embeds"])).all()


def test_mono_stereo_and_5_1_keep_the_first_channel(files, embedder):
    for name in ("mono", "stereo", "surround"):
        waveform, _ = media.load_audio(files[name])
        assert abs(dominant_frequency(waveform, RATE) - 300) < 2, name
    mixed, _ = media.load_audio(files["surround"], channel="mean")
    spectrum = np.abs(np.fft.rfft(mixed))  # 1 s at 16 kHz: bin k is k Hz
    assert all(spectrum[300 + 400 * c] > 20 * np.median(spectrum) for c in range(6))  # the mix holds every channel
    reference = embedder(str(files["mono"]), return_tensors=True)["audio_embeds"]
    for name in ("stereo", "surround"):
        assert torch.equal(embedder(str(files[name]), return_tensors=True)["audio_embeds"], reference), name
    track = media.load_video(files["surround_mp4"], num_frames=1).audio
    assert abs(dominant_frequency(track[2048:], RATE) - 300) < 3  # 6-channel AAC in an mp4


def test_multichannel_dict_audio_in_either_layout_at_another_rate(classifier, embedder):
    channels = np.stack([rich(300 + 400 * c, 1.0, 48000, seed=c) for c in range(6)]) * 0.8  # [6, N] at 48 kHz
    first = embedder({"audio": channels[0], "sampling_rate": 48000}, return_tensors=True)["audio_embeds"]
    for audio in (channels, channels.T, (channels * 32767).astype(np.int16).T):
        embeds = embedder({"audio": audio, "sampling_rate": 48000}, return_tensors=True)["audio_embeds"]
        assert torch.allclose(embeds, first, atol=2e-3)
    frames = list(clip_frames(0, count=2))
    assert_scores(classifier({"audio": channels[:2], "sampling_rate": 48000, "frames": frames}, top_k=None))


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def _frame(files, name) -> np.ndarray:
    clip = load_clip(files[name])
    assert clip.modalities == ("visual",) and clip.frames[0].mode == "RGB"
    return np.asarray(clip.frames[0]).astype(int)


def test_greyscale_and_16_bit_png(files, extractor):
    grey = _frame(files, "grey_png")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == stripes()[..., 1]).all()
    sixteen, eight = _frame(files, "grey16_png"), _frame(files, "grey8_png")
    assert np.abs(sixteen - eight).max() <= 1 and sixteen.max() == 255 and sixteen.min() == 0  # scaled, not clipped
    rgb16, rgb8 = _frame(files, "rgb16_png"), _frame(files, "rgb_png")
    assert np.abs(rgb16 - rgb8).max() <= 1
    with Image.open(files["grey16_png"]) as image:  # the feature extractor given the 16-bit image itself
        direct = extractor(images=image, return_tensors="pt")["pixel_values"]
    via_pipeline = extractor(images=load_clip(files["grey16_png"]).frames[0], return_tensors="pt")["pixel_values"]
    assert torch.allclose(direct, via_pipeline, atol=0.02)


def test_cmyk_jpeg_palette_and_alpha(files):
    for name in ("cmyk_jpg", "palette_png", "rgba_png"):
        assert np.abs(_frame(files, name) - stripes()).mean() < 8, name


def test_exif_orientation_is_applied(files, extractor):
    upright = _frame(files, "exif_jpg")
    assert upright.shape == (60, 40, 3)  # stored 60 wide x 40 high, displayed turned: 40 wide x 60 high
    assert upright[:8, -8:].mean() > 200 and upright[:8, :8].mean() < 60  # the corner block is now top right
    with Image.open(files["exif_jpg"]) as image:
        direct = extractor(images=image, return_tensors="pt")["pixel_values"]
    via_pipeline = extractor(images=load_clip(files["exif_jpg"]).frames[0], return_tensors="pt")["pixel_values"]
    assert torch.allclose(direct, via_pipeline)


def test_animated_gif_gives_its_first_frame(files, extractor):
    assert np.abs(_frame(files, "gif") - 10).max() <= 1
    with Image.open(files["gif"]) as image:
        pixels = extractor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


def test_every_image_kind_through_the_cli(files, model_dir, capsys):
    names = ["grey_png", "grey16_png", "rgb16_png", "cmyk_jpg", "exif_jpg", "gif", "rgba_png", "palette_png"]
    code, out, err = run_cli(["classify", *[files[n] for n in names], "--model", model_dir, "-q", "--json"], capsys)
    assert code == 0, err
    results = json.loads(out)
    assert [r["input"] for r in results] == [str(files[n]) for n in names]
    assert all(len(r["labels"]) == 5 for r in results)
