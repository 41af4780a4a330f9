"""
Training data loading throughput: clips per CPU-second and per wall second of one DataLoader process (one thread,
as in a DataLoader worker), batch 32, pretraining augmentation (random frame, noise + roll), from

- pre-extracted files (the reference's layout: a 16 kHz 16-bit WAV and 10 JPEG frames of 224 px, quality 75, per
  clip, listed in a data JSON): ours (`dataset_from_reference_json` + `AudioVisualTransform` +
  `AudioVisualDataCollator`) and, when `CAVMAE_REFERENCE_SRC` is set, the reference's `AudiosetDataset` on the
  same files (see benchmarks/README.md for its torchaudio / torchvision set-up);
- `decode_clips` output (the package's own pre-extraction, loaded the same way);
- the mp4 files themselves (320 x 240 H.264 at 25 fps with 44.1 kHz stereo AAC, 10 s).

Each is set beside its floor, measured in the same rounds: for pre-extracted files the WAV read, one JPEG decode,
the batched fbank (per clip) and the frame crop + normalisation; for mp4 the PyAV decode of the video frames up to
the last one sampled and of 10.3 s of audio, resampled. Rounds are interleaved; medians are printed with the load
average.

    python benchmarks/data_loading.py [--clips 128] [--rounds 5] [--workdir /tmp/cavmae-data-bench]
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine  # noqa: E402
from _reference import load_reference_dataloader  # noqa: E402

SAMPLING_RATE = 16000
DURATION = 10.0
WIDTH, HEIGHT, FPS = 320, 240, 25
NUM_FRAMES = 10
BATCH_SIZE = 32


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def moving_frames(seed: int) -> np.ndarray:
    """`[N, H, W, 3]` uint8: a drifting gradient with noise, so that the encoder has real work."""
    rng = np.random.default_rng(seed)
    count = int(DURATION * FPS)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = rng.integers(0, 255, 3)
    frames = np.empty((count, HEIGHT, WIDTH, 3), np.uint8)
    for index in range(count):
        shift = 3 * index
        for channel in range(3):
            plane = (x + shift * (channel + 1)) * 0.8 + y * 0.5 + base[channel]
            frames[index, :, :, channel] = plane.astype(np.int64) % 256
        frames[index] ^= rng.integers(0, 24, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return frames


def write_clips(workdir: Path, count: int) -> Path:
    from cavmae_hf import media

    videos = workdir / "videos" / "clips"
    videos.mkdir(parents=True, exist_ok=True)
    rate = 44100
    for index in range(count):
        path = videos / f"clip{index:04d}.mp4"
        if path.exists():
            continue
        rng = np.random.default_rng(index)
        t = np.arange(int(DURATION * rate)) / rate
        tone = 0.2 * np.sin(2 * np.pi * (200 + 20 * index % 800) * t) + 0.05 * rng.standard_normal(t.size)
        media.write_video(path, moving_frames(index), np.stack([tone, 0.7 * tone]), fps=FPS, sampling_rate=rate)
    return workdir / "videos"


def pre_extract(videos: Path, workdir: Path) -> tuple[Path, Path]:
    """The reference's layout: audio/<id>.wav (16 kHz, 16-bit) and frames/frame_<i>/<id>.jpg (224 px, q75)."""
    from cavmae_hf import media

    root = workdir / "extracted"
    data_json, label_csv = root / "data.json", root / "labels.csv"
    if data_json.exists():
        return data_json, label_csv
    (root / "audio").mkdir(parents=True, exist_ok=True)
    entries = []
    for path in sorted(videos.rglob("*.mp4")):
        clip = media.load_video(path, num_frames=NUM_FRAMES)  # by default: the reference scripts' frames and audio
        (root / "audio" / f"{path.stem}.wav").write_bytes(media.wav_bytes(clip.audio, SAMPLING_RATE))
        for index, jpeg in enumerate(clip.frame_jpegs):
            folder = root / "frames" / f"frame_{index}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{path.stem}.jpg").write_bytes(jpeg)
        entries.append({"video_id": path.stem, "wav": f"audio/{path.stem}.wav", "video_path": "frames", "labels": "/m/x"})
    data_json.write_text(json.dumps({"data": entries}))
    label_csv.write_text("index,mid,display_name\n0,/m/x,Thing\n")
    return data_json, label_csv


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------
def our_loader(dataset, extractor):
    from cavmae_hf.data import AudioVisualDataCollator, pretraining_transforms

    train, _ = pretraining_transforms(extractor, noise=True, seed=0)
    return torch.utils.data.DataLoader(
        dataset.with_transform(train), batch_size=BATCH_SIZE, shuffle=True, collate_fn=AudioVisualDataCollator()
    )


def reference_loader(reference, data_json: Path, label_csv: Path):
    conf = {
        "num_mel_bins": 128, "target_length": 1024, "freqm": 0, "timem": 0, "mixup": 0.0, "dataset": "audioset",
        "mode": "train", "mean": -5.081, "std": 4.4849, "noise": True, "label_smooth": 0.0, "im_res": 224,
    }  # fmt: skip  (the reference's pretraining settings)
    entries = json.loads(data_json.read_text())["data"]
    for entry in entries:  # it opens the paths as they are written
        entry["wav"], entry["video_path"] = str(data_json.parent / entry["wav"]), str(data_json.parent / "frames")
    absolute = data_json.with_name("data_absolute_paths.json")
    absolute.write_text(json.dumps({"data": entries}))
    with contextlib.redirect_stdout(io.StringIO()):
        dataset = reference.AudiosetDataset(str(absolute), conf, label_csv=str(label_csv))
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)


def timed_pass(loader) -> tuple[float, float, int]:
    """CPU seconds, wall seconds and clips of one pass over `loader`."""
    clips = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in loader:
        clips += len(batch["input_features"] if isinstance(batch, dict) else batch[0])
    return time.process_time() - cpu, time.perf_counter() - wall, clips


# ----------------------------------------------------------------------------------------------------------------
# Floors
# ----------------------------------------------------------------------------------------------------------------
def pre_extracted_floor(data_json: Path, extractor, sample: int = 32) -> tuple[float, dict]:
    """CPU seconds per clip of the work a pre-extracted clip needs: WAV read, one JPEG decode, the batched fbank
    (per clip) and the frame crop + normalisation (per clip, batched)."""
    import soundfile
    from PIL import Image

    from cavmae_hf.data import cropped_frame

    root = data_json.parent
    entries = json.loads(data_json.read_text())["data"][:sample]
    parts = {}
    start = time.process_time()
    waveforms = [soundfile.read(root / entry["wav"], dtype="float32")[0] for entry in entries]
    parts["WAV read"] = (time.process_time() - start) / len(entries)
    start = time.process_time()
    images = []
    for entry in entries:
        with Image.open(root / "frames" / "frame_5" / f"{entry['video_id']}.jpg") as image:
            images.append(image.convert("RGB"))
    parts["JPEG decode"] = (time.process_time() - start) / len(entries)
    start = time.process_time()
    extractor(audio=waveforms, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    parts["fbank (batched)"] = (time.process_time() - start) / len(entries)
    start = time.process_time()
    crops = torch.from_numpy(np.stack([cropped_frame(image, extractor) for image in images]))
    crops.permute(0, 3, 1, 2).contiguous().float().div_(255.0).sub_(0.45).div_(0.225)
    parts["crop + normalise"] = (time.process_time() - start) / len(entries)
    return sum(parts.values()), parts


def mp4_floor(videos: Path, sample: int = 8) -> tuple[float, dict]:
    """CPU seconds per clip of decoding an mp4 with PyAV and nothing else: the video frames up to the last one of
    10 sampled in the first 10 s (converted to RGB only when sampled), and 10.3 s of audio resampled to 16 kHz."""
    import av

    paths = sorted(videos.rglob("*.mp4"))[:sample]
    parts = {"video decode": 0.0, "audio decode + resample": 0.0}
    for path in paths:
        start = time.process_time()
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = int(round(float(stream.duration * stream.time_base) * float(stream.average_rate)))
            wanted = {max(int(i * total / NUM_FRAMES) - 1, 0) for i in range(1, NUM_FRAMES + 1)}
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frame.to_ndarray(format="rgb24")
                if index >= max(wanted):
                    break
        parts["video decode"] += time.process_time() - start
        start = time.process_time()
        with av.open(str(path)) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLING_RATE)
            for frame in container.decode(audio=0):
                resampler.resample(frame)
                if frame.time is not None and frame.time > 10.3:
                    break
        parts["audio decode + resample"] += time.process_time() - start
    parts = {name: value / len(paths) for name, value in parts.items()}
    return sum(parts.values()), parts


# ----------------------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/cavmae-data-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting

    from cavmae_hf import CavMaeFeatureExtractor
    from cavmae_hf.data import dataset_from_folder, dataset_from_reference_json, decode_clips

    workdir = Path(args.workdir)
    videos = write_clips(workdir, args.clips)
    data_json, label_csv = pre_extract(videos, workdir)
    extractor = CavMaeFeatureExtractor()
    with contextlib.redirect_stderr(io.StringIO()):
        decoded = decode_clips(dataset_from_folder(videos)).select(range(args.clips))
    loaders = {
        "ours, pre-extracted": our_loader(dataset_from_reference_json(data_json, label_csv), extractor),
        "ours, decode_clips": our_loader(decoded, extractor),
        "ours, mp4": our_loader(dataset_from_folder(videos).select(range(args.clips)), extractor),
    }
    reference = load_reference_dataloader()
    if reference is not None:
        loaders["reference AudiosetDataset, pre-extracted"] = reference_loader(reference, data_json, label_csv)
    floors = {"pre-extracted": [], "mp4": []}
    results = {name: [] for name in loaders}
    parts = {}
    for round_index in range(args.rounds):
        for name, loader in loaders.items():
            cpu, wall, clips = timed_pass(loader)
            results[name].append((cpu / clips, wall / clips))
        floor, parts["pre-extracted"] = pre_extracted_floor(data_json, extractor)
        floors["pre-extracted"].append(floor)
        floor, parts["mp4"] = mp4_floor(videos)
        floors["mp4"].append(floor)
        print(f"round {round_index + 1}/{args.rounds}, load average {os.getloadavg()[0]:.2f}", flush=True)

    def median(values):
        return statistics.median(values)

    print(f"\n{describe_machine()}")
    print(f"{args.clips} clips of {DURATION:g} s, batch {BATCH_SIZE}, {args.rounds} interleaved rounds (medians)\n")
    print("| loader | ms CPU / clip | clips / CPU-s | ms wall / clip | clips / wall-s | vs its floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    cpu_ms = {name: 1000 * median([cpu for cpu, _ in values]) for name, values in results.items()}
    for name, values in results.items():
        wall = 1000 * median([wall for _, wall in values])
        source = "mp4" if name.endswith("mp4") else "pre-extracted"
        vs_floor = cpu_ms[name] / (1000 * median(floors[source]))
        print(f"| {name} | {cpu_ms[name]:.2f} | {1000 / cpu_ms[name]:.0f} | {wall:.2f} | {1000 / wall:.0f} | "
              f"{vs_floor:.2f}x |")
    for source, values in floors.items():
        detail = ", ".join(f"{part} {1000 * value:.2f}" for part, value in parts[source].items())
        print(f"| floor, {source} ({detail}) | {1000 * median(values):.2f} | {1 / median(values):.0f} | | | 1.00x |")
    summary = [
        f"pre-extracted {cpu_ms['ours, pre-extracted'] / (1000 * median(floors['pre-extracted'])):.2f}x its floor",
        f"mp4 {cpu_ms['ours, mp4'] / (1000 * median(floors['mp4'])):.2f}x its floor",
    ]
    reference_name = "reference AudiosetDataset, pre-extracted"
    if reference_name in cpu_ms:
        summary.insert(0, f"reference/ours per CPU-second {cpu_ms[reference_name] / cpu_ms['ours, pre-extracted']:.2f}x")
    print(f"\nSUMMARY: data loading: {', '.join(summary)}, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
