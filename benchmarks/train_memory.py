"""
Peak memory of a CAV-MAE pretraining step (forward, backward, AdamW step) at ViT-B size, with and without gradient
checkpointing, against the original `CAVMAE` when `CAVMAE_REFERENCE_SRC` is set. Every configuration runs in a fresh
subprocess, so that peaks don't mix.

    python benchmarks/train_memory.py [--batch-size 4] [--steps 3] [--configs ...]

On CPU two numbers are reported per configuration:
- peak RSS (`ru_maxrss` of the process): what the operating system sees, including what the C allocator keeps
  after tensors are freed (glibc malloc keeps much of it; this depends on the allocator and its settings, e.g.
  `MALLOC_MMAP_THRESHOLD_`, and applies to every configuration alike);
- peak of live tensor bytes (parameters + optimizer state at the start of the last step, plus the highest running
  sum of the allocations and frees the profiler records during that step): allocator-independent, the CPU
  counterpart of `torch.cuda.max_memory_allocated`, which is reported on GPU.
Both include the fixed part every configuration shares: weights, gradients and the two AdamW moments (4 x 4 bytes per
trainable parameter, about 3 GB at ViT-B size), which no activation saving can go below.

The "AdamW in backward" configuration (not in the defaults) shows what lies below that floor: each parameter's
AdamW step runs as soon as its gradient is complete (`register_post_accumulate_grad_hook`), and the gradient is
freed at once, so the step never holds all gradients. The arithmetic is that of AdamW on every parameter, but it
leaves no room for gradient clipping, gradient accumulation or DDP's all-reduce, so it is a measurement here, not
an option of `CavMaeTrainer`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

CONFIGS = {
    "original CAVMAE": dict(reference=True),
    "ours (eager)": dict(attn="eager"),
    "ours (sdpa)": dict(attn="sdpa"),
    "ours (sdpa, checkpointing)": dict(attn="sdpa", checkpointing=True),
    "ours (sdpa, no recomputation)": dict(attn="sdpa", recompute=False),
    "ours (eager, checkpointing)": dict(attn="eager", checkpointing=True),
    "ours (sdpa, checkpointing, AdamW in backward)": dict(attn="sdpa", checkpointing=True, step_in_backward=True),
}
DEFAULT_CONFIGS = list(CONFIGS)[:5]


def rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class _AdamWInBackward:
    """One fused AdamW per parameter, stepped from the parameter's post-accumulate-grad hook, which then frees the
    gradient. Exposes `zero_grad`, `step` (a no-op: the steps happened in backward) and `state`, as the loop needs."""

    def __init__(self, parameters, **options):
        self.optimizers = {p: torch.optim.AdamW([p], fused=True, **options) for p in parameters}
        for parameter in parameters:
            parameter.register_post_accumulate_grad_hook(self._step_parameter)

    def _step_parameter(self, parameter):
        self.optimizers[parameter].step()
        parameter.grad = None

    @property
    def state(self):
        return {p: o.state[p] for p, o in self.optimizers.items() if p in o.state}

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def child(name: str, batch_size: int, steps: int, device: torch.device, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    from cavmae_hf import CavMaeConfig, CavMaeForPreTraining
    from cavmae_hf.modeling_cav_mae import CavMaeMLP

    settings = CONFIGS[name]
    config = CavMaeConfig()
    rss_before_model = rss_gib()
    if settings.get("reference"):
        from _reference import build_reference, load_reference_models

        model = build_reference(load_reference_models(), "pretrain", config)
        loss_of = lambda: model(audio, frames)[0]  # noqa: E731
    else:
        CavMaeMLP.recompute_activation = settings.get("recompute", True)
        model = CavMaeForPreTraining._from_config(config, attn_implementation=settings["attn"])
        if settings.get("checkpointing"):
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        loss_of = lambda: model(audio, frames).loss  # noqa: E731
    model = model.to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    if settings.get("step_in_backward"):
        optimizer = _AdamWInBackward(parameters, lr=1e-5, weight_decay=5e-7)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=5e-7, fused=True)
    audio = torch.randn(batch_size, config.audio_length, config.num_mel_bins, device=device)
    frames = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        optimizer.step()

    for _ in range(steps):
        step()
    result = {"rss_before_model_gib": rss_before_model}
    # the RSS peak of the plain steps, before the profiled step below adds the profiler's own memory
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        result["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        from torch.profiler import ProfilerActivity, profile

        optimizer.zero_grad(set_to_none=True)
        static = sum(p.numel() * p.element_size() for p in model.parameters())
        static += sum(
            t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        )
        static += audio.numel() * audio.element_size() + frames.numel() * frames.element_size()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step()
        # every allocation (+) and free (-) of the step, in time order
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        running = peak = 0
        for _, nbytes in events:
            running += nbytes
            peak = max(peak, running)
        result["live_peak_gib"] = (static + peak) / 2**30
        result["static_gib"] = static / 2**30
    result["trainable_parameters"] = sum(p.numel() for p in parameters)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="plain steps per process (RSS peak), then one profiled")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(child(args.child, args.batch_size, args.steps, device, args.threads)))
        return

    from _common import describe_machine
    from _reference import reference_src

    names = [n for n in args.configs if not CONFIGS[n].get("reference") or reference_src() is not None]
    print(describe_machine())
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"pretraining step, ViT-B, batch {args.batch_size}, AdamW (fused); one fresh process per configuration; "
          f"allocator settings: {malloc or 'glibc defaults'}")
    results = {}
    for name in names:
        command = [sys.executable, os.path.abspath(__file__), "--child", name, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--device", args.device]
        if args.threads:
            command += ["--threads", str(args.threads)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"{name} failed:\n{completed.stderr[-3000:]}")
        results[name] = json.loads(completed.stdout.strip().splitlines()[-1])

    key = "cuda_max_allocated_gib" if device.type == "cuda" else "live_peak_gib"
    reference = results.get("original CAVMAE")
    print(f"{'configuration':<48}{'peak RSS GiB':>13}{'vs original':>12}{'live peak GiB':>14}{'vs original':>12}")
    for name, result in results.items():
        rss_ratio = f"{result['peak_rss_gib'] / reference['peak_rss_gib']:.2f}x" if reference else "-"
        live_ratio = f"{result[key] / reference[key]:.2f}x" if reference else "-"
        print(f"{name:<48}{result['peak_rss_gib']:>13.2f}{rss_ratio:>12}{result[key]:>14.2f}{live_ratio:>12}")
    some = next(r for n, r in results.items() if n != "original CAVMAE")
    if device.type == "cpu":
        print(f"fixed part (weights + AdamW moments + inputs, live at the start of a step): {some['static_gib']:.2f} GiB;"
              f" + gradients {some['trainable_parameters'] * 4 / 2**30:.2f} GiB at the end of backward;"
              f" process RSS before building a model {some['rss_before_model_gib']:.2f} GiB")
    if reference:
        parts = []
        for name in ("ours (sdpa)", "ours (sdpa, checkpointing)", "ours (sdpa, checkpointing, AdamW in backward)"):
            if name in results:
                parts.append(f"{name} peak RSS {results[name]['peak_rss_gib'] / reference['peak_rss_gib']:.2f}x, "
                             f"live {results[name][key] / reference[key]:.2f}x")
        print("SUMMARY: train-step memory vs original: " + "; ".join(parts))


if __name__ == "__main__":
    main()
