"""
Audio front-end throughput: our batched torch Kaldi fbank against transformers' ASTFeatureExtractor (the same
fbank computed by a peer: torchaudio when importable, else numpy), on the same 10 s clips, in one run.

    python benchmarks/feature_extraction.py [--clips 64] [--repeats 5]

Prints clips per second for batch 1 and batch 32, the max abs difference of the raw fbank between the two, and
one summary line of ratios.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import ASTFeatureExtractor

from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractor


def make_clips(count: int, seconds: float = 10.0, rate: int = 16000, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    clips = []
    for _ in range(count):
        tone = np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        clips.append((0.3 * tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32))
    return clips


def clips_per_second(function, clips, batch_size: int, repeats: int) -> float:
    batches = [clips[i : i + batch_size] for i in range(0, len(clips), batch_size)]
    function(batches[0])  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            function(batch)
        timings.append(time.perf_counter() - start)
    return len(clips) / statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    clips = make_clips(args.clips)
    ours = CavMaeFeatureExtractor(do_normalize=False)
    peer = ASTFeatureExtractor(num_mel_bins=128, max_length=1024, do_normalize=False)
    try:
        import torchaudio  # noqa: F401

        backend = "torchaudio"
    except ImportError:
        backend = "numpy"

    def run_ours(batch):
        return ours(batch, sampling_rate=16000, return_tensors="pt")["input_features"]

    def run_peer(batch):
        return peer(batch, sampling_rate=16000, return_tensors="pt")["input_values"]

    ours_fbank = run_ours(clips[:4])[:, :998]
    peer_fbank = run_peer(clips[:4])[:, :998]
    difference = (ours_fbank - peer_fbank).abs().max().item()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peer backend: {backend}; {args.clips} clips of 10 s")
    print(f"{'extractor':<34}{'batch':>6}{'clips/s':>10}{'ms/clip':>10}")
    results = {}
    for name, function in (("cavmae-hf (torch, batched)", run_ours), (f"ASTFeatureExtractor ({backend})", run_peer)):
        for batch_size in (1, 32):
            rate = clips_per_second(function, clips, batch_size, args.repeats)
            results[(name, batch_size)] = rate
            print(f"{name:<34}{batch_size:>6}{rate:>10.1f}{1000 / rate:>10.2f}")
    print(f"max abs difference of the raw fbank (ours vs peer, 4 clips): {difference:.2e}")
    names = list(dict.fromkeys(name for name, _ in results))
    ratios = {b: results[(names[0], b)] / results[(names[1], b)] for b in (1, 32)}
    print(f"SUMMARY: ours / peer({backend}) clips/s: batch 1 {ratios[1]:.2f}x, batch 32 {ratios[32]:.2f}x")


if __name__ == "__main__":
    main()
