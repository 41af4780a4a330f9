"""
CAV-MAE inference at ViT-B size on unmasked inputs: embeddings (`CavMaeModel`, both modalities) and audio-visual
classification over 1 and 10 frames, for our model with eager and sdpa attention and, when `CAVMAE_REFERENCE_SRC` is
set, the original `CAVMAE` / `CAVMAEFT` with the same weights, timed side by side (interleaved rounds, warm-up,
median) in one run.

    python benchmarks/inference.py [--batch-size 4] [--frames 10] [--repeats 3] [--bf16]

Tasks (B clips):
- `embeddings, 3 streams`: our `CavMaeModel(input_features, pixel_values)` (joint, audio and visual streams) vs the
  same three streams from the original's modules (its `forward_feat` streams plus its joint `blocks_u` pass);
- `embeddings, audio+visual streams`: our `CavMaeModel` called per modality vs the original `CAVMAE.forward_feat`;
- `classification, 1 frame`: `CavMaeForAudioVisualClassification` vs `CAVMAEFT(..., "multimodal")`;
- `classification, F frames`: ours takes `[B, F, 3, H, W]` (the clip's audio layers run once) vs the original's
  multi-frame evaluation, one full pass per frame, per-frame softmax probabilities averaged.
Each task's outputs are compared between ours and the original (max abs difference) as a check of same weights.
"""

import argparse
import copy

import torch

from _common import describe_machine, interleaved_timings, median
from _reference import (
    build_reference,
    load_reference_models,
    load_reference_weights_into,
    reference_encoder_streams,
)
from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification, CavMaeModel, CavMaeForPreTraining

NUM_LABELS = 527


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--bf16", action="store_true", help="also time our sdpa models under bf16 autocast")
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    models = None if args.no_reference else load_reference_models()
    config = CavMaeConfig()
    ft_config = CavMaeConfig(num_labels=NUM_LABELS, trainable_position_embeddings=True)
    ref_pretrain = build_reference(models, "pretrain", config).to(device).eval() if models else None
    ref_finetune = build_reference(models, "finetune", ft_config, NUM_LABELS).to(device).eval() if models else None
    encoders, classifiers = {}, {}
    for implementation in args.attn:
        # copies of the configs: the attention implementation is set on the config
        pretraining = CavMaeForPreTraining._from_config(copy.deepcopy(config), attn_implementation=implementation)
        classifier = CavMaeForAudioVisualClassification._from_config(
            copy.deepcopy(ft_config), attn_implementation=implementation
        )
        if models:
            load_reference_weights_into(pretraining, ref_pretrain)
            load_reference_weights_into(classifier, ref_finetune)
        elif encoders:
            pretraining.cav_mae.load_state_dict(next(iter(encoders.values())).state_dict())
            classifier.load_state_dict(next(iter(classifiers.values())).state_dict())
        encoders[implementation] = pretraining.cav_mae.to(device).eval()
        classifiers[implementation] = classifier.to(device).eval()

    b, f = args.batch_size, args.frames
    audio = torch.randn(b, config.audio_length, config.num_mel_bins, device=device)
    frames = torch.randn(b, f, config.num_channels, config.image_size, config.image_size, device=device)
    first = frames[:, 0]

    def autocast(function, enabled):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                return function()

        return run

    tasks = {
        "embeddings, 3 streams": (
            lambda m: (lambda: m(audio, first)),
            lambda: reference_encoder_streams(ref_pretrain, audio, first),
            lambda ours, ref: (ours.last_hidden_state - ref[0]).abs().max(),
            encoders,
        ),
        "embeddings, audio+visual streams": (
            lambda m: (lambda: (m(input_features=audio).audio_last_hidden_state,
                                m(pixel_values=first).visual_last_hidden_state)),
            lambda: ref_pretrain.forward_feat(audio, first),
            lambda ours, ref: max((ours[0] - ref[0]).abs().max(), (ours[1] - ref[1]).abs().max()),
            encoders,
        ),
        "classification, 1 frame": (
            lambda m: (lambda: m(audio, first).logits),
            lambda: ref_finetune(audio, first, "multimodal"),
            lambda ours, ref: (ours - ref).abs().max(),
            classifiers,
        ),
        f"classification, {f} frames": (
            lambda m: (lambda: m(audio, frames).logits.softmax(-1)),
            lambda: torch.stack([ref_finetune(audio, frames[:, i], "multimodal").softmax(-1) for i in range(f)]).mean(0),
            lambda ours, ref: (ours - ref).abs().max(),
            classifiers,
        ),
    }

    print(describe_machine())
    print(f"batch {b} clips, unmasked inputs, no_grad, fp32 unless noted; reference: "
          + ("original CAVMAE / CAVMAEFT (same weights)" if models else "not configured (CAVMAE_REFERENCE_SRC)"))
    print(f"{'task':<36}{'configuration':<28}{'median s':>10}{'min s':>8}{'vs original':>13}{'max |diff|':>12}")
    summary = []
    for task, (ours_of, ref_run, difference, pool) in tasks.items():
        functions = {f"ours ({name})": ours_of(model) for name, model in pool.items()}
        if args.bf16 and "sdpa" in pool:
            functions["ours (sdpa, bf16 autocast)"] = autocast(ours_of(pool["sdpa"]), True)
        if models:
            functions["original"] = ref_run
        differences = {}
        if models:
            ref_out = ref_run()
            for name, function in functions.items():
                if name != "original":
                    differences[name] = float(difference(function(), ref_out))
        timings = interleaved_timings(functions, args.repeats, args.warmup, device)
        ref_time = median(timings["original"]) if models else None
        for name, values in timings.items():
            seconds = median(values)
            ratio = f"{ref_time / seconds:.2f}x" if ref_time else "-"
            diff = f"{differences[name]:.1e}" if name in differences else "-"
            print(f"{task:<36}{name:<28}{seconds:>10.2f}{min(values):>8.2f}{ratio:>13}{diff:>12}")
        if ref_time:
            summary.append(f"{task} " + ", ".join(
                f"{name.removeprefix('ours (').rstrip(')')} {ref_time / median(values):.2f}x"
                for name, values in timings.items() if name != "original"
            ))
    if summary:
        print("SUMMARY: inference original/ours: " + "; ".join(summary))


if __name__ == "__main__":
    main()
