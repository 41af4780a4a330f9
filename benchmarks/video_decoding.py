"""
From a video file to model inputs, per 10 s clip: `media.load_video` + `CavMaeFeatureExtractor` against the path the
CAV-MAE reference took, in one run, interleaved.

    python benchmarks/video_decoding.py [--rounds 5] [--video a.mp4 ...] [--no-reference] [--threads 1]

Configurations:
- `ours (default)`: `load_video(path)` (the reference's frame choice, 224 px q75 JPEG frames, 16-bit audio), then
  the feature extractor on its audio and ten frames.
- `ours (clean options)`: `load_video(path, frame_selection="timestamp", frame_transform="none",
  audio_precision="float32")`, the behaviour before the reference-exact default, then the extractor.
- `reference scripts`: what the reference's preprocessing did, by calling the same tools (needs Debian's `ffmpeg`
  and `sox` on PATH and `opencv-python-headless`; `tests/reference_scripts.py`): `ffmpeg -i clip -vn -ar 16000` to
  a WAV, `sox ... remix 1`; OpenCV to open the video, seek to each of ten frames and read it, Pillow's bilinear
  resize to 224, centre crop and a quality-75 JPEG per frame written to disk; then the data loader's side: the WAV
  and the ten JPEGs read back and turned into model inputs. The reference computed its fbank with torchaudio, which this project does not install; our
  extractor (exact against it) stands in, so the two paths differ only in how the files are decoded.

Inputs: the fixture clips (`../shared/fixtures/video/*.mp4`, 6 to 11 s, written by the ffmpeg CLI) when present,
else a synthetic 10 s 480x360 clip; `--video` adds files. Every time is divided by the clip's duration / 10 s (at
most 10 s: the reference also reads only the first 10 s of frames and the model only 10.24 s of audio), so the
figures are per 10 s clip. Wall time and CPU time (this process's threads and the subprocesses' time: steadier than
wall time on a loaded machine) are both printed. Ends with one `SUMMARY:` line.
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from cavmae_hf import media
from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractor

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures" / "video"
sys.path.insert(0, str(PROJECT_ROOT / "tests"))  # reference_scripts: the reference's scripts redone with their tools
CLEAN_OPTIONS = {"frame_selection": "timestamp", "frame_transform": "none", "audio_precision": "float32"}
NUM_FRAMES = 10


def synthetic_clip(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, 4 * i, axis=1) for i in range(250)])
    t = np.arange(10 * 44100) / 44100
    audio = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.1 * rng.standard_normal(t.shape)]).astype(np.float32)
    return media.write_video(folder / "synthetic_10s.mp4", frames, audio, fps=25, sampling_rate=44100)


def ours(extractor, options):
    def run(path):
        clip = media.load_video(path, num_frames=NUM_FRAMES, **options)
        return extractor(
            audio=clip.audio, images=[clip.frames], sampling_rate=clip.sampling_rate, return_tensors="np"
        )

    return run


def reference_scripts(extractor, workdir: Path):
    """The reference's two extraction scripts, by their tools (tests/reference_scripts.py), then its data loader's
    reading of their files."""
    import soundfile
    from reference_scripts import opencv_frames, script_jpeg, script_wav

    def run(path):
        wav = script_wav(path, workdir)
        jpegs = []
        for index, frame in enumerate(opencv_frames(path)):
            target = workdir / f"frame_{index}" / f"{path.stem}.jpg"
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(script_jpeg(frame))
            jpegs.append(target)
        pcm, rate = soundfile.read(str(wav), dtype="int16")
        images = [Image.open(jpeg) for jpeg in jpegs]
        return extractor(audio=pcm, images=[images], sampling_rate=rate, return_tensors="np")

    return run


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of the subprocesses it waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def clip_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        return min(10.0, container.duration / av.time_base)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--video", type=Path, nargs="*", default=[])
    parser.add_argument("--no-reference", action="store_true", help="skip the reference scripts' path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in a data loader worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="video_decoding_"))
    videos = sorted(FIXTURES.glob("*.mp4")) if FIXTURES.is_dir() else [synthetic_clip(workdir)]
    videos += args.video
    extractor = CavMaeFeatureExtractor()
    configurations = {"ours (default)": ours(extractor, {}), "ours (clean options)": ours(extractor, CLEAN_OPTIONS)}
    tools = shutil.which("ffmpeg") and shutil.which("sox")
    if not args.no_reference:
        try:
            import cv2  # noqa: F401
        except ImportError:
            tools = None
        if tools:
            configurations["reference scripts"] = reference_scripts(extractor, workdir)
        else:
            print("reference scripts skipped: needs ffmpeg and sox on PATH and opencv-python-headless")

    print(
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; {len(videos)} clips; {args.rounds} rounds; "
        f"{torch.get_num_threads()} torch thread(s)"
    )
    wall = {name: [] for name in configurations}
    cpu = {name: [] for name in configurations}
    for round_index in range(args.rounds + 1):  # the first round warms up and is not counted
        for path in videos:
            scale = 10.0 / clip_seconds(path)
            for name, run in configurations.items():
                start, start_cpu = time.perf_counter(), cpu_seconds()
                run(path)
                if round_index:
                    wall[name].append((time.perf_counter() - start) * scale)
                    cpu[name].append((cpu_seconds() - start_cpu) * scale)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print("| path | median wall ms per 10 s clip | median CPU ms per 10 s clip (all threads and subprocesses) |")
    print("| --- | --- | --- |")
    medians = {name: (statistics.median(wall[name]) * 1000, statistics.median(cpu[name]) * 1000) for name in wall}
    for name, (wall_ms, cpu_ms) in medians.items():
        print(f"| {name} | {wall_ms:.0f} | {cpu_ms:.0f} |")
    default_wall, default_cpu = medians["ours (default)"]
    clean_wall, clean_cpu = medians["ours (clean options)"]
    summary = [f"ours default {default_wall:.0f} ms wall / {default_cpu:.0f} ms CPU"]
    summary.append(f"clean options (the earlier default) {clean_wall:.0f} / {clean_cpu:.0f} ms")
    if "reference scripts" in medians:
        reference_wall, reference_cpu = medians["reference scripts"]
        summary.append(
            f"reference scripts {reference_wall:.0f} / {reference_cpu:.0f} ms "
            f"({reference_wall / default_wall:.2f}x / {reference_cpu / default_cpu:.2f}x ours default)"
        )
    print("SUMMARY: per 10 s clip: " + ", ".join(summary))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
