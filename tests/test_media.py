"""Decoding real files written with PyAV: audio track, frame sampling, codecs, frame rates, and errors."""

import re
from fractions import Fraction

import av
import numpy as np
import pytest

from cavmae_hf import media
from cavmae_hf.media import MediaError

AUDIO_RATE = 44100


def tone(frequency: float, seconds: float = 3.0, rate: int = AUDIO_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def colour_ramp(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i has red = round(255 * i / (count - 1)) everywhere and blue 128: its index is readable."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    frames[..., 0] = np.round(np.linspace(0, 255, count)).astype(np.uint8)[:, None, None]
    frames[..., 2] = 128
    return frames


def dominant_frequency(waveform: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return np.argmax(spectrum) * rate / len(waveform)


def band_energy(waveform: np.ndarray, frequency: float, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(waveform))
    centre = int(frequency * len(waveform) / rate)
    return float(spectrum[centre - 20 : centre + 20].sum())


@pytest.mark.parametrize(
    "suffix,fps,codecs",
    [
        (".mp4", 25, {}),
        (".mp4", Fraction(30000, 1001), {}),
        (".webm", 25, {}),
        (".webm", 29.97, {"video_codec": "libvpx-vp9", "audio_codec": "vorbis"}),
        (".mkv", 25, {}),
        (".avi", 25, {}),
    ],
)
def test_stereo_44k_video_gives_16k_mono_first_channel_and_uniform_frames(tmp_path, suffix, fps, codecs):
    count = int(round(3 * float(fps)))
    path = media.write_video(
        tmp_path / f"clip{suffix}",
        colour_ramp(count),
        np.stack([tone(440), tone(1500)]),
        fps=fps,
        sampling_rate=AUDIO_RATE,
        **codecs,
    )
    clip = media.load_video(path)
    assert clip.sampling_rate == 16000 and clip.audio.dtype == np.float32
    assert abs(len(clip.audio) - 48000) < 1200  # 3 s, give or take the codec's priming samples
    assert abs(dominant_frequency(clip.audio, 16000) - 440) < 5  # the first channel, not a mix
    assert np.array_equal(clip.audio * 32768, np.round(clip.audio * 32768))  # 16-bit samples, as the reference's WAV
    assert len(clip.frames) == 10 and clip.frames[0].size == (224, 224) and clip.frames[0].mode == "RGB"
    # mkv declares no frame count: OpenCV's floor(duration * fps + 0.5) with the container's 3.047 s (where the
    # audio track ends) counts 76
    assert clip.frame_numbers == media.opencv_frame_indices(count + (suffix == ".mkv"), 10)
    full = media.load_video(path, load_audio=False, frame_transform="none")
    assert full.frames[0].size == (64, 48) and full.frame_numbers == clip.frame_numbers
    expected = [round(255 * i / (count - 1)) for i in clip.frame_numbers]
    for frames, (row, column) in ((clip.frames, (112, 112)), (full.frames, (24, 32))):
        red = [np.asarray(frame)[row, column, 0] for frame in frames]
        assert np.abs(np.array(red, float) - expected).max() < 12, (red, expected)


def test_frames_are_taken_from_the_first_ten_seconds(tmp_path):
    path = media.write_video(tmp_path / "long.mp4", colour_ramp(300, 32, 32), fps=25)  # 12 s
    clip = media.load_video(path, load_audio=False)
    assert clip.audio is None
    assert clip.frame_numbers == [0, 24, 49, 74, 99, 124, 149, 174, 199, 224]  # of 250 in 10 s: one frame early
    assert clip.frame_times == pytest.approx([number / 25 for number in clip.frame_numbers])
    by_time = media.load_video(path, load_audio=False, frame_selection="timestamp")
    assert [round(t, 2) for t in by_time.frame_times] == [float(i) for i in range(10)]
    assert by_time.frame_numbers == [25 * i for i in range(10)]


def test_reference_frame_indices():
    assert media.frame_indices(250, 10) == [0, 25, 50, 75, 100, 125, 150, 175, 200, 225]
    assert media.frame_indices(75, 10) == [0, 7, 15, 22, 30, 37, 45, 52, 60, 67]
    assert media.opencv_frame_indices(250, 10) == [0, 24, 49, 74, 99, 124, 149, 174, 199, 224]
    assert media.opencv_frame_indices(75, 10) == [0, 6, 14, 21, 29, 36, 44, 51, 59, 66]
    assert media.opencv_frame_indices(3, 10) == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_fractional_frame_rates_are_exact(tmp_path):
    for fps in (29.97, 30000 / 1001, Fraction(30000, 1001)):
        path = media.write_video(tmp_path / "ntsc.mp4", colour_ramp(30, 16, 16), fps=fps)
        with av.open(str(path)) as container:
            assert container.streams.video[0].average_rate == Fraction(30000, 1001)


def test_variable_frame_rate_is_sampled_by_time(tmp_path):
    # 25 frames at 25 fps, then 25 frames at 12.5 fps: uniform in time is not uniform in frame index.
    times = [i * 0.04 for i in range(25)] + [1.0 + i * 0.08 for i in range(25)]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for index, time in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), index * 5, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(time * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    clip = media.load_video(path, load_audio=False, frame_selection="timestamp", frame_transform="none")
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate  # 50 frames over 2.88 s
    targets = [index / rate for index in media.frame_indices(50, 10)]
    for time, target, frame in zip(clip.frame_times, targets, clip.frames):
        assert target - 0.5 / rate <= time < target + 0.08  # the first frame at (or within half a frame of) the target
        index = int(np.argmin(np.abs(np.array(times) - time)))
        assert abs(int(np.asarray(frame)[16, 16, 0]) - 5 * index) < 6  # and it is that frame's picture


def test_rotated_phone_video_is_turned_upright(tmp_path):
    frames = np.zeros((4, 48, 64, 3), np.uint8)
    frames[:, :16, :16, 0] = 255  # a red mark at the top left of the stored picture
    path = media.write_video(tmp_path / "rotated.mp4", frames, fps=25, rotation=90)
    clip = media.load_video(path, load_audio=False, num_frames=2, frame_transform="none")
    upright = np.asarray(clip.frames[0])
    assert upright.shape == (64, 48, 3)
    assert upright[-5, 4, 0] > 200 and upright[4, 4, 0] < 50  # turned 90 degrees counter-clockwise: bottom left
    default = media.load_video(path, load_audio=False, num_frames=2)  # the upright frame, then the 224 crop
    assert default.frames[0].tobytes() == media.reference_frame(clip.frames[0]).tobytes()


def test_audio_only_and_video_only_files(tmp_path):
    audio_only = media.write_video(tmp_path / "audio.mp4", None, tone(1000), sampling_rate=AUDIO_RATE)
    silent = media.write_video(tmp_path / "silent.mp4", colour_ramp(25), fps=25)
    with pytest.raises(MediaError, match="no video stream"):
        media.load_video(audio_only)
    with pytest.raises(MediaError, match="no audio stream"):
        media.load_video(silent)
    assert len(media.load_video(audio_only, load_frames=False).audio) > 40000
    assert len(media.load_video(silent, load_audio=False).frames) == 10


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_load_audio_files(tmp_path, suffix):
    path = media.write_audio(tmp_path / f"tone{suffix}", np.stack([tone(700), tone(2000)]), AUDIO_RATE)
    waveform, rate = media.load_audio(path)
    assert rate == 16000 and abs(len(waveform) - 48000) < 2500
    assert abs(dominant_frequency(waveform, 16000) - 700) < 5
    mixed, _ = media.load_audio(path, channel="mean")
    assert band_energy(mixed, 2000) > 0.2 * band_energy(mixed, 700)  # the mix holds the second channel's tone
    assert band_energy(waveform, 2000) < 0.01 * band_energy(waveform, 700)


def test_load_audio_of_a_video_track(tmp_path):
    path = media.write_video(tmp_path / "clip.mp4", colour_ramp(10), tone(300), fps=25, sampling_rate=AUDIO_RATE)
    waveform, rate = media.load_audio(path, sampling_rate=8000)
    assert rate == 8000 and abs(dominant_frequency(waveform, 8000) - 300) < 5


def test_resample_keeps_frequency_and_length():
    resampled = media.resample(tone(1000, 1.0, 48000), 48000, 16000)
    assert len(resampled) == 16000 and abs(dominant_frequency(resampled, 16000) - 1000) < 2


def test_audio_decoding_stops_at_the_requested_length(tmp_path):
    path = media.write_video(tmp_path / "clip.mp4", colour_ramp(25), tone(500, 3.0), fps=25, sampling_rate=AUDIO_RATE)
    clip = media.load_video(path, audio_seconds=1.0, num_frames=1)
    assert len(clip.audio) == 16000


def test_error_cases(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        media.load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        media.load_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("this is not a video")
    with pytest.raises(MediaError, match="not a readable media file"):
        media.load_video(tmp_path / "text.mp4")
    good = media.write_video(tmp_path / "good.mp4", colour_ramp(50), tone(440), fps=25, sampling_rate=AUDIO_RATE)
    (tmp_path / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(MediaError):
        media.load_video(tmp_path / "truncated.mp4")
    with pytest.raises(MediaError, match="directory"):
        media.load_video(tmp_path)
    (tmp_path / "noise.wav").write_bytes(b"RIFF" + bytes(100))
    with pytest.raises(MediaError):
        media.load_audio(tmp_path / "noise.wav")
    with pytest.raises(MediaError, match="not found"):
        media.load_audio(tmp_path / "missing.wav")


def test_damaged_video_data(tmp_path):
    """A file whose header is intact (faststart: the index before the data) but whose data is cut or garbage."""
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for image in np.random.default_rng(0).integers(0, 256, (50, 48, 64, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="ended at .* the last frame found is repeated"):
        clip = media.load_video(tmp_path / "cut.mp4", load_audio=False)
    assert len(clip.frames) == 10
    payload = data.index(b"mdat") + 4
    (tmp_path / "garbage.mp4").write_bytes(data[:payload] + bytes(len(data) - payload))
    with pytest.raises(MediaError, match="could not be decoded"):
        media.load_video(tmp_path / "garbage.mp4", load_audio=False)


def test_frames_folder_of_the_reference_layout(tmp_path):
    from PIL import Image

    for index in range(3):
        (tmp_path / f"frame_{index}").mkdir()
        Image.fromarray(colour_ramp(3)[index]).save(tmp_path / f"frame_{index}" / "vid.jpg")
    frames = media.load_frames_folder(tmp_path, "vid", num_frames=3)
    assert len(frames) == 3 and frames[0].mode == "RGB"
    with pytest.raises(MediaError, match="Frame 3 of vid not found"):
        media.load_frames_folder(tmp_path, "vid", num_frames=4)


@pytest.mark.parametrize("bad", [0, -16000, 16000.5, "16000", True, float("nan")])
def test_sampling_rates_must_be_positive_whole_numbers(tmp_path, bad):
    """Every media function taking a rate refuses a rate that is no positive whole number, naming the argument,
    before anything is read or written."""
    wav = media.write_audio(tmp_path / "tone.wav", tone(440, 0.5), AUDIO_RATE)
    clip = media.write_video(tmp_path / "clip.mp4", colour_ramp(5), tone(440, 0.5), fps=25, sampling_rate=AUDIO_RATE)
    message = r"must be a positive whole number of Hz, got " + re.escape(repr(bad))
    calls = {
        "target_rate": lambda: media.resample(tone(440, 0.1), AUDIO_RATE, bad),
        "orig_rate": lambda: media.resample(tone(440, 0.1), bad, 16000),
        "sampling_rate": lambda: media.load_audio(wav, sampling_rate=bad),
    }
    calls_sampling = [
        lambda: media.load_video(clip, sampling_rate=bad),
        lambda: media.write_audio(tmp_path / "out.wav", tone(440, 0.1), bad),
        lambda: media.write_audio(tmp_path / "out.mp3", tone(440, 0.1), bad),
        lambda: media.write_video(tmp_path / "out.mp4", colour_ramp(2), tone(440, 0.1), sampling_rate=bad),
    ]
    for name, call in [*calls.items(), *(("sampling_rate", call) for call in calls_sampling)]:
        with pytest.raises(MediaError, match=f"^{name} {message}"):
            call()
    assert not list(tmp_path.glob("out.*"))  # nothing half-written


def test_whole_float_sampling_rates_are_taken_as_ints(tmp_path):
    assert len(media.resample(tone(1000, 1.0, 48000), 48000.0, 16000.0)) == 16000
    wav = media.write_audio(tmp_path / "tone.wav", tone(440, 0.5), float(AUDIO_RATE))
    waveform, rate = media.load_audio(wav, sampling_rate=8000.0)
    assert rate == 8000 and type(rate) is int and len(waveform) == 4000
