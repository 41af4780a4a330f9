"""
From a folder of video files to embeddings, end to end, in clips per second: `cavmae embed` (a fresh process, as a
user runs it: start-up, model loading, decoding, features, model, index written) against the CAV-MAE reference's
way on the same files (its two preprocessing scripts, then its data loader and `forward_feat`), in one run.

    python benchmarks/embed_videos.py [--clips 64] [--folder DIR] [--configs ...] [--batch-size 8]

Inputs: `--clips` ten-second mp4 files (h264 + AAC) written once into `--folder` by the ffmpeg CLI and reused: four
kinds in turn, 1280x720 at 30 fps, 854x480 at 29.97, 640x360 at 25 and 480x270 at 15, stereo audio at 44.1 or 48
kHz. Weights are random (the same weights for both sides; nothing is downloaded).

Configurations (`--configs`, default all):
- `embed bf16`: `cavmae embed FILES --model DIR --output index --batch-size 8 --dtype bfloat16` (10 frames a clip);
- `embed bf16, 1 frame`: the same with `--num-frames 1`, the model work of the reference (one frame a clip);
- `embed fp32`: float32, 10 frames;
- `reference`: the reference's `src/preprocess` scripts as their tools run them (tests/reference_scripts.py:
  `ffmpeg` + `sox` to a 16 kHz WAV, OpenCV to ten 224 px JPEGs), in two processes at once; then its
  `dataloader.AudiosetDataset` (eval mode, the middle frame, as its `retrieval.py`) in a DataLoader with two workers,
  batch 8, and `CAVMAE.forward_feat` in float32, mean-pooled (its retrieval embeddings). This needs the reference's
  source (`CAVMAE_REFERENCE_SRC`, timm in `CAVMAE_REFERENCE_DEPS`), torchaudio for its loader (a venv as
  benchmarks/README.md describes) and torchvision in `CAVMAE_REFERENCE_LOADER_DEPS`, Debian's ffmpeg and sox and
  opencv-python-headless. Its `torchaudio.load` (torchcodec in current torchaudio) is served by soundfile, which
  reads the same 16-bit WAV into the same float32 samples.

Both sides use both cores all the time: ours decodes in the pipeline's threads while the model runs; the
reference's scripts run two files at a time and its loader has two workers. As a check of same weights and same
audio, the audio embeddings of both sides are compared (cosine). Ends with one `SUMMARY:` line.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import torch

from _common import describe_machine

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "tests"))  # reference_scripts: the reference's scripts redone with their tools

# (width, height, frame rate, audio sampling rate, ffmpeg video source)
KINDS = (
    (1280, 720, "30", 48000, "testsrc2"),
    (854, 480, "30000/1001", 44100, "mandelbrot"),
    (640, 360, "25", 44100, "testsrc"),
    (480, 270, "15", 48000, "life"),
)
CONFIGS = ("embed bf16", "reference", "embed bf16, 1 frame", "embed fp32")
SECONDS = 10


# Inputs ------------------------------------------------------------------------------------------------------------
def write_clip(path: Path, index: int):
    width, height, rate, sampling_rate, source = KINDS[index % len(KINDS)]
    video = f"{source}=size={width}x{height}:rate={rate}"
    if source == "life":
        video += f":mold=10:ratio=0.2:random_seed={index},format=yuv420p"
    frequency = 220 + 37 * index
    audio = f"sine=frequency={frequency}:sample_rate={sampling_rate}"
    noise = f"anoisesrc=amplitude=0.05:sample_rate={sampling_rate}:seed={index}"
    command = [
        "ffmpeg", "-nostdin", "-y", "-loglevel", "error",
        "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", audio, "-f", "lavfi", "-i", noise,
        "-filter_complex", "[1:a][2:a]amix=inputs=2,pan=stereo|c0=c0|c1=c0[a]", "-map", "0:v", "-map", "[a]",
        "-t", str(SECONDS), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "128k", str(path),
    ]
    subprocess.run(command, check=True)


def make_clips(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"clip_{index:03d}.mp4" for index in range(count)]
    missing = [(path, index) for index, path in enumerate(paths) if not path.exists()]
    if missing:
        print(f"writing {len(missing)} clips into {folder} ...", flush=True)
        with Pool(2) as pool:
            pool.starmap(write_clip, missing)
    return paths


def save_models(folder: Path, reference_models):
    """Our `CavMaeForPreTraining` (random weights, or the reference's when it is configured) saved for the CLI, and the
    reference `CAVMAE` with the same weights (or None)."""
    from _reference import build_reference, load_reference_weights_into
    from cavmae_hf import CavMaeConfig, CavMaeForPreTraining

    torch.manual_seed(0)
    config = CavMaeConfig()
    ours = CavMaeForPreTraining(config)
    reference = None
    if reference_models is not None:
        reference = build_reference(reference_models, "pretrain", config).eval()
        load_reference_weights_into(ours, reference)
    ours.save_pretrained(folder)
    return reference


# Ours: `cavmae embed` ----------------------------------------------------------------------------------------------
def run_embed(paths, model_dir: Path, output: Path, batch_size: int, dtype: str, num_frames: int):
    command = [
        sys.executable, "-m", "cavmae_hf_cli", "embed", *map(str, paths), "--model", str(model_dir),
        "--output", str(output), "--batch-size", str(batch_size), "--dtype", dtype, "--num-frames", str(num_frames),
        "-q",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    from cavmae_hf.retrieval import RetrievalIndex

    index = RetrievalIndex.load(output)
    return index.embeddings["audio"].float()


# The reference -----------------------------------------------------------------------------------------------------
def reference_preprocess(arguments):
    """One file through the reference's two scripts: the WAV, and ten JPEGs at `frame_{i}/{video_id}.jpg`."""
    from reference_scripts import opencv_frames, script_jpeg, script_wav

    path, workdir = arguments
    script_wav(path, workdir / "audio")
    for index, frame in enumerate(opencv_frames(path)):
        target = workdir / "frames" / f"frame_{index}" / f"{path.stem}.jpg"
        target.write_bytes(script_jpeg(frame))


def load_reference_loader():
    """The reference's `dataloader` module (`_reference.load_reference_dataloader`), or a sentence saying what is
    missing."""
    from _reference import LOADER_DEPS_ENV, load_reference_dataloader

    if not os.environ.get(LOADER_DEPS_ENV):
        return f"reference skipped: set CAVMAE_REFERENCE_SRC and {LOADER_DEPS_ENV} (torchaudio, torchvision)"
    try:
        module = load_reference_dataloader()
    except ImportError as error:
        return f"reference skipped: its data loader needs torchaudio and torchvision ({error}); see benchmarks/README.md"
    return module if module is not None else "reference skipped: CAVMAE_REFERENCE_SRC unset"


def run_reference(paths, workdir: Path, reference, loader_module, batch_size: int):
    for sub in ["audio"] + [f"frames/frame_{i}" for i in range(10)]:
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    with Pool(2) as pool:
        pool.map(reference_preprocess, [(path, workdir) for path in paths])
    label_csv = workdir / "labels.csv"
    label_csv.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n')
    data = [
        {"wav": str(workdir / "audio" / f"{p.stem}.wav"), "labels": "/m/09x0r", "video_id": p.stem,
         "video_path": str(workdir / "frames")}
        for p in paths
    ]
    dataset_json = workdir / "data.json"
    dataset_json.write_text(json.dumps({"data": data}))
    audio_conf = {  # its retrieval.py's evaluation settings
        "num_mel_bins": 128, "target_length": 1024, "freqm": 0, "timem": 0, "mixup": 0, "dataset": "audioset",
        "mode": "eval", "mean": -5.081, "std": 4.4849, "noise": False, "im_res": 224, "frame_use": 5,
    }
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints its set-up
        dataset = loader_module.AudiosetDataset(str(dataset_json), audio_conf, label_csv=str(label_csv))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=2)
    audio_embeddings = []
    with torch.no_grad():
        for fbank, image, _ in loader:
            audio_out, video_out = reference.forward_feat(fbank, image)
            audio_embeddings.append(torch.nn.functional.normalize(audio_out.mean(dim=1), dim=-1))
            torch.nn.functional.normalize(video_out.mean(dim=1), dim=-1)
    return torch.cat(audio_embeddings)


# Main --------------------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "cavmae-embed-videos")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    paths = make_clips(args.folder / "clips", args.clips)
    loader_module = None
    reference_models = None
    if "reference" in args.configs:
        from _reference import load_reference_models

        loader_module = load_reference_loader()
        reference_models = load_reference_models() if not isinstance(loader_module, str) else None
        if isinstance(loader_module, str) or reference_models is None:
            print(loader_module if isinstance(loader_module, str) else "reference skipped: CAVMAE_REFERENCE_SRC unset")
            args.configs = [c for c in args.configs if c != "reference"]
    print(describe_machine())
    kinds = ", ".join(f"{w}x{h} at {r} fps" for w, h, r, _, _ in KINDS)
    print(f"{len(paths)} clips of {SECONDS} s ({kinds}, in turn); batch {args.batch_size}")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        reference = save_models(scratch / "model", reference_models)
        options = {
            "embed bf16": ("bfloat16", 10),
            "embed bf16, 1 frame": ("bfloat16", 1),
            "embed fp32": ("float32", 10),
        }
        seconds, loads, audio = {}, {}, {}
        for name in args.configs:
            before = os.getloadavg()[0]
            start = time.perf_counter()
            if name == "reference":
                audio[name] = run_reference(paths, scratch / "reference", reference, loader_module, args.batch_size)
            else:
                dtype, frames = options[name]
                audio[name] = run_embed(paths, scratch / "model", scratch / "index.safetensors", args.batch_size,
                                        dtype, frames)
            seconds[name] = time.perf_counter() - start
            loads[name] = (before, os.getloadavg()[0])
            print(f"  {name}: {seconds[name]:.1f} s, load average {before:.2f} -> {loads[name][1]:.2f}", flush=True)

    print(f"\n| configuration | seconds | clips/s | vs reference | load average (1 min) before -> after |")
    print("| --- | --- | --- | --- | --- |")
    base = seconds.get("reference")
    for name, value in seconds.items():
        ratio = f"{base / value:.2f}x" if base else "-"
        print(f"| {name} | {value:.1f} | {len(paths) / value:.2f} | {ratio} | {loads[name][0]:.2f} -> {loads[name][1]:.2f} |")
    cosine = torch.nn.functional.cosine_similarity
    if "reference" in audio:
        for name in audio:
            if name != "reference":
                lowest = cosine(audio[name], audio["reference"], dim=-1).min().item()
                print(f"audio embeddings, {name} vs reference (same weights): lowest cosine {lowest:.5f}")
    parts = [f"{name} {len(paths) / value:.2f} clips/s" + (f" ({base / value:.2f}x reference)" if base and name != "reference" else "")
             for name, value in seconds.items()]
    print("SUMMARY: video files to embeddings, " + f"{len(paths)} clips: " + ", ".join(parts))


if __name__ == "__main__":
    main()
