"""
Audio front-end throughput: our batched torch Kaldi fbank against transformers' ASTFeatureExtractor, the same
Kaldi fbank computed by a peer, through both of its paths: torchaudio's `compliance.kaldi.fbank` (its default when
torchaudio is importable, what its users have) and its numpy path, on the same 10 s clips, in one run.

    python benchmarks/feature_extraction.py [--clips 64] [--rounds 3] [--passes 2] [--threads N]

The torchaudio path needs torchaudio importable; the project's environment does not have it (benchmarks/README.md
shows a venv beside it that has its pure-Python `torchaudio.compliance.kaldi`); without it only the numpy path is
timed. Prints clips per second for batch 1 and batch 32, the load average before and after, the difference of the
raw fbank between ours and each path, and one summary line of ratios. The configurations take turns (`rounds`
times; in each turn an untimed pass, then `passes` timed ones; the median counts), so that load from other
processes falls on all of them alike and none is timed cold after another one ran.
"""

import argparse
import contextlib
import os
import statistics
import time
import warnings

import numpy as np
import torch
from transformers import ASTFeatureExtractor
from transformers.models.audio_spectrogram_transformer import feature_extraction_audio_spectrogram_transformer as ast

from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractor

BATCH_SIZES = (1, 32)


def make_clips(count: int, seconds: float = 10.0, rate: int = 16000, seed: int = 0) -> list:
    """`count` 10 s clips: a random tone in noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    clips = []
    for _ in range(count):
        tone = np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        clips.append((0.3 * tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32))
    return clips


def time_one_pass(function, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        function(batch)
    return time.perf_counter() - start


def measure(configurations: dict, clips: list, rounds: int, passes: int) -> dict:
    """Clips per second of each `(name, batch size) -> function`: the median of `rounds x passes` timed passes over
    `clips`, the configurations taking turns, each turn starting with an untimed pass (caches, thread pool)."""
    batches = {key: [clips[i : i + key[1]] for i in range(0, len(clips), key[1])] for key in configurations}
    timings = {key: [] for key in configurations}
    for _ in range(rounds):
        for key, function in configurations.items():
            time_one_pass(function, batches[key])
            timings[key] += [time_one_pass(function, batches[key]) for _ in range(passes)]
    return {key: len(clips) / statistics.median(values) for key, values in timings.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clips = make_clips(args.clips)

    ours = CavMaeFeatureExtractor(do_normalize=False)
    backends = ["torchaudio", "numpy"] if ast.is_speech_available() else ["numpy"]
    peers = {backend: peer_path(backend) for backend in backends}

    def run_ours(batch):
        return ours(batch, sampling_rate=16000, return_tensors="pt")["input_features"]

    names = {"ours": "cavmae-hf (torch, batched)"} | {b: f"ASTFeatureExtractor ({b})" for b in backends}
    runs = {"ours": run_ours} | peers
    configurations = {(names[key], b): runs[key] for key in runs for b in BATCH_SIZES}
    load_before = os.getloadavg()
    rates = measure(configurations, clips, args.rounds, args.passes)
    load_after = os.getloadavg()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; peer paths: {', '.join(backends)}"
        + ("" if "torchaudio" in backends else " (torchaudio not importable)")
        + f"; {len(clips)} clips of 10 s; load average before %.2f %.2f %.2f, after %.2f %.2f %.2f"
        % (load_before + load_after)
    )
    print(f"{'extractor':<34}{'batch':>6}{'clips/s':>10}{'ms/clip':>10}")
    for (name, batch_size), rate in rates.items():
        print(f"{name:<34}{batch_size:>6}{rate:>10.1f}{1000 / rate:>10.2f}")
    compared = min(8, len(clips))
    for backend, run_peer in peers.items():
        difference = (run_ours(clips[:compared])[:, :998] - run_peer(clips[:compared])[:, :998]).abs()
        print(
            f"raw fbank, ours vs {backend} ({compared} clips x 998 frames x 128 bins): max abs difference "
            f"{difference.max().item():.2e}, mean {difference.mean().item():.2e}"
        )
    parts = []
    for backend in backends:
        ratios = {b: rates[(names["ours"], b)] / rates[(names[backend], b)] for b in BATCH_SIZES}
        parts.append(f"ours / {backend}: " + ", ".join(f"batch {b} {ratio:.2f}x" for b, ratio in ratios.items()))
    print(
        "SUMMARY: clips/s, " + "; ".join(parts)
        + f"; ours batch 32 / ours batch 1: {rates[(names['ours'], 32)] / rates[(names['ours'], 1)]:.2f}x"
        + "; load average %.2f -> %.2f" % (load_before[0], load_after[0])
    )


@contextlib.contextmanager
def speech_available(value: bool):
    """ASTFeatureExtractor asks `is_speech_available()` (torchaudio importable) when built and on every call."""
    saved = ast.is_speech_available
    ast.is_speech_available = lambda: value
    try:
        yield
    finally:
        ast.is_speech_available = saved


def peer_path(backend: str):
    """ASTFeatureExtractor computing through `backend` ("torchaudio" or "numpy"), as a function of a batch."""
    with warnings.catch_warnings(), speech_available(backend == "torchaudio"):
        # 128 Kaldi mel filters over 257 bins: the lowest are narrower than a bin
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        peer = ASTFeatureExtractor(num_mel_bins=128, max_length=1024, do_normalize=False)

    def run(batch):
        with speech_available(backend == "torchaudio"):
            return peer(batch, sampling_rate=16000, return_tensors="pt")["input_values"]

    return run


if __name__ == "__main__":
    main()
