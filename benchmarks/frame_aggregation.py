"""
Frame aggregation throughput: 10-frame audio-visual classification at the real ViT-B size (default CavMaeConfig,
random weights), the naive way (one full forward per frame, each with the clip's audio, probabilities averaged)
against `CavMaeForAudioVisualClassification` with `pixel_values` `[B, F, 3, H, W]` (the audio's modality-specific
layers run once per clip), side by side in one run.

    python benchmarks/frame_aggregation.py [--batch-size 2] [--frames 10] [--repeats 3] [--threads N]

Prints clips per second of both (median of the repeats, after one warm-up), the largest difference of the
averaged probabilities between the two, and one summary line with the ratio.
"""

import argparse
import statistics
import time

import torch

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification


def naive_probabilities(model, input_features, pixel_values) -> torch.Tensor:
    """One full forward per frame, each with the clip's audio; the per-frame sigmoid probabilities averaged."""
    per_frame = [
        model(input_features=input_features, pixel_values=pixel_values[:, f]).logits.sigmoid()
        for f in range(pixel_values.shape[1])
    ]
    return torch.stack(per_frame, dim=1).mean(dim=1)


def aggregated_probabilities(model, input_features, pixel_values) -> torch.Tensor:
    """The model's own frame aggregation: one call with the frame axis."""
    return model(input_features=input_features, pixel_values=pixel_values).logits.sigmoid()


def clips_per_second(function, model, inputs, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        result = function(model, *inputs)  # warm-up
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = function(model, *inputs)
            timings.append(time.perf_counter() - start)
    return inputs[0].shape[0] / statistics.median(timings), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = CavMaeConfig(num_labels=527, problem_type="multi_label_classification")
    model = CavMaeForAudioVisualClassification(config).eval()
    inputs = (
        torch.randn(args.batch_size, config.audio_length, config.num_mel_bins),
        torch.randn(args.batch_size, args.frames, config.num_channels, config.image_size, config.image_size),
    )
    print(
        f"ViT-B CAV-MAE ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), batch {args.batch_size}, "
        f"{args.frames} frames, {args.repeats} repeats after a warm-up, {torch.get_num_threads()} threads, "
        f"attention={config._attn_implementation}"
    )
    naive_rate, naive = clips_per_second(naive_probabilities, model, inputs, args.repeats)
    print(f"naive ({args.frames} full passes per clip): {naive_rate:8.3f} clips/s")
    ours_rate, ours = clips_per_second(aggregated_probabilities, model, inputs, args.repeats)
    print(f"ours (audio encoded once per clip):   {ours_rate:8.3f} clips/s")
    print(f"max |difference| of averaged probabilities: {(naive - ours).abs().max().item():.2e}")
    print(
        f"SUMMARY frame aggregation: ours / naive = {ours_rate / naive_rate:.2f}x "
        f"({ours_rate:.3f} vs {naive_rate:.3f} clips/s, ViT-B, batch {args.batch_size}, {args.frames} frames)"
    )


if __name__ == "__main__":
    main()
