"""
CAV-MAE pretraining step (forward, backward, AdamW step) at ViT-B size: our model with eager and sdpa attention,
and, when `CAVMAE_REFERENCE_SRC` points at the original repository's `src` folder, the original `CAVMAE` with the
same weights, timed side by side (interleaved rounds, warm-up, median of the repetitions) in one run.

    python benchmarks/train_step.py [--batch-size 4 [8 ...]] [--repeats 5] [--bf16] [--compile] [--profile]

Prints the analytic FLOP count term by term, a table of step times, samples/s and achieved GFLOP/s as a fraction
of the measured throughput of a large fp32 matmul on the same threads (4096^3, measured in every round, median): both
`torch.mm` (MKL's sgemm on x86) and, on CPU, the same product through oneDNN, which on non-Intel x86 CPUs is about
twice as fast (MKL runs AVX2 kernels there) and is the cores' real float32 peak; and one summary line of ratios. Peak memory is measured by benchmarks/train_memory.py (one fresh process per configuration).
"""

import argparse
import copy

import torch

from _common import (
    describe_machine,
    interleaved_timings,
    matmul_gflops,
    median,
    onednn_matmul_gflops,
    pretraining_flop_terms,
    training_flops,
)
from _reference import build_reference, load_reference_models, load_reference_weights_into
from cavmae_hf import CavMaeConfig, CavMaeForPreTraining


def make_optimizer(model, kind: str):
    parameters = [p for p in model.parameters() if p.requires_grad]
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[kind]
    return torch.optim.AdamW(parameters, lr=1e-5, weight_decay=5e-7, **options)


def training_step(model, optimizer, loss_of, autocast_dtype=None, device_type="cpu"):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = loss_of()
        loss.backward()
        optimizer.step()

    return step


def build_models(config, attn_implementations, device, with_reference: bool):
    """Our models (one per attention implementation) and the reference, all with the same weights."""
    models = load_reference_models() if with_reference else None
    reference = build_reference(models, "pretrain", config).to(device).train() if models is not None else None
    ours = {}
    for implementation in attn_implementations:
        # a copy of the config each: the attention implementation is set on the config
        model = CavMaeForPreTraining._from_config(copy.deepcopy(config), attn_implementation=implementation)
        if reference is not None:
            load_reference_weights_into(model, reference)
        elif ours:
            model.load_state_dict(next(iter(ours.values())).state_dict())
        ours[implementation] = model.to(device).train()
    return ours, reference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"], help="our attention implementations")
    parser.add_argument("--optimizer", choices=["fused", "foreach", "forloop"], default="fused",
                        help="AdamW implementation, the same for every model (default fused)")
    parser.add_argument("--bf16", action="store_true", help="also time our sdpa model under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(our sdpa model)")
    parser.add_argument("--profile", action="store_true", help="profile one step of our sdpa model, print top ops")
    parser.add_argument("--no-reference", action="store_true", help="skip the original even if configured")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    config = CavMaeConfig()  # ViT-B, 75 % masking of both modalities, norm_pix_loss, contrastive weight 0.01
    ours, reference = build_models(config, args.attn, device, with_reference=not args.no_reference)
    print(describe_machine())
    print(f"optimizer: AdamW ({args.optimizer}) for every model; reference: "
          + ("original CAVMAE (same weights)" if reference is not None else "not configured (CAVMAE_REFERENCE_SRC)"))

    terms = pretraining_flop_terms(config)
    forward = sum(flops for _, flops in terms)
    per_sample = training_flops(terms)
    print("\nAnalytic matmul FLOPs per sample (forward):")
    for name, flops in terms:
        print(f"  {name:<52}{flops / 1e9:>9.2f} GFLOP")
    print(f"  {'forward total':<52}{forward / 1e9:>9.2f} GFLOP")
    print(f"  {'training step (forward + 2x backward; patch embedding 1x)':<52}{per_sample / 1e9:>9.2f} GFLOP")

    summaries = []
    for batch_size in args.batch_size:
        audio = torch.randn(batch_size, config.audio_length, config.num_mel_bins, device=device)
        frames = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, device=device)
        steps = {}
        optimizers = {name: make_optimizer(model, args.optimizer) for name, model in ours.items()}
        for name, model in ours.items():
            steps[f"ours ({name})"] = training_step(
                model, optimizers[name], lambda m=model: m(audio, frames).loss, device_type=device.type
            )
        if args.bf16 and "sdpa" in ours:
            steps["ours (sdpa, bf16 autocast)"] = training_step(
                ours["sdpa"], optimizers["sdpa"], lambda: ours["sdpa"](audio, frames).loss, torch.bfloat16, device.type
            )
        if args.compile and "sdpa" in ours:
            compiled = torch.compile(ours["sdpa"])
            steps["ours (sdpa, torch.compile)"] = training_step(
                ours["sdpa"], optimizers["sdpa"], lambda: compiled(audio, frames).loss, device_type=device.type
            )
        if reference is not None:
            reference_optimizer = make_optimizer(reference, args.optimizer)
            steps["original CAVMAE"] = training_step(
                reference, reference_optimizer, lambda: reference(audio, frames)[0], device_type=device.type
            )

        peaks, onednn_peaks = [], []

        def measure_peaks(_):
            peaks.append(matmul_gflops(device))
            if device.type == "cpu":
                onednn_peaks.append(onednn_matmul_gflops())

        timings = interleaved_timings(steps, args.repeats, args.warmup, device, on_round=measure_peaks)
        peak = median(peaks)
        onednn_peak = median(onednn_peaks) if onednn_peaks and None not in onednn_peaks else None
        flops = per_sample * batch_size
        print(f"\nbatch {batch_size}: large fp32 matmul, torch.mm: {peak:.1f} GFLOP/s (median of "
              + ", ".join(f"{p:.0f}" for p in peaks) + ")"
              + (f"; oneDNN: {onednn_peak:.1f} GFLOP/s (" + ", ".join(f"{p:.0f}" for p in onednn_peaks) + ")"
                 if onednn_peak else ""))
        print(f"{'configuration':<30}{'median s':>10}{'min s':>8}{'samples/s':>11}{'GFLOP/s':>9}{'% mm':>7}"
              + (f"{'% oneDNN':>10}" if onednn_peak else "") + f"{'vs original':>13}")
        ref_time = median(timings["original CAVMAE"]) if "original CAVMAE" in timings else None
        rows = {}
        for name, values in timings.items():
            seconds = median(values)
            rows[name] = seconds
            ratio = f"{ref_time / seconds:.2f}x" if ref_time else "-"
            achieved = flops / seconds / 1e9
            print(f"{name:<30}{seconds:>10.2f}{min(values):>8.2f}{batch_size / seconds:>11.2f}{achieved:>9.1f}"
                  f"{100 * achieved / peak:>6.0f}%" + (f"{100 * achieved / onednn_peak:>9.0f}%" if onednn_peak else "")
                  + f"{ratio:>13}")
        parts = []
        if ref_time:
            parts += [f"original/ours-{name} {ref_time / rows[f'ours ({name})']:.2f}x" for name in ours]
        if "ours (sdpa)" in rows:
            achieved = flops / rows["ours (sdpa)"] / 1e9
            parts.append(f"ours-sdpa at {100 * achieved / peak:.0f}% of the torch.mm peak"
                         + (f" ({100 * achieved / onednn_peak:.0f}% of the oneDNN fp32 peak)" if onednn_peak else ""))
        if "ours (sdpa, bf16 autocast)" in rows:
            base = ref_time or rows["ours (sdpa)"]
            parts.append(f"bf16 autocast {base / rows['ours (sdpa, bf16 autocast)']:.2f}x vs "
                         + ("original fp32" if ref_time else "ours fp32"))
        summaries.append(f"batch {batch_size}: " + ", ".join(parts))

    if args.profile and "sdpa" in ours:
        profile_step(ours["sdpa"], config, args.batch_size[0], device, args.optimizer)
    print("\nSUMMARY: train step " + "; ".join(summaries))


def profile_step(model, config, batch_size, device, optimizer_kind):
    from torch.profiler import ProfilerActivity, profile

    audio = torch.randn(batch_size, config.audio_length, config.num_mel_bins, device=device)
    frames = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, device=device)
    step = training_step(model, make_optimizer(model, optimizer_kind), lambda: model(audio, frames).loss,
                         device_type=device.type)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nProfile of one training step, ours (sdpa), batch {batch_size} (top 15 by self time):")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
