"""Helpers shared by the model benchmarks: timing, matmul peak, FLOP counts, machine description."""

import os
import platform
import statistics
import time

import torch


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.2f %.2f %.2f" % os.getloadavg()
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu}), "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}{load}"
    )


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_timings(functions: dict, repeats: int, warmup: int, device: torch.device, on_round=None) -> dict:
    """
    Time every function `repeats` times, interleaved round by round (A B C, A B C, ...) so that a change of load on
    a shared machine hits all of them alike; `warmup` untimed rounds first. Returns {name: [seconds, ...]}.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    timings = {name: [] for name in functions}
    for round_index in range(repeats):
        if on_round is not None:
            on_round(round_index)
        for name, function in functions.items():
            timings[name].append(timed(function, device))
    return timings


def median(values) -> float:
    return statistics.median(values)


def matmul_gflops(device: torch.device, size: int = 4096, dtype=torch.float32) -> float:
    """Throughput of one large square `torch.mm` (GFLOP/s), the reference point for achieved throughput."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up (and first-touch of `out`)
    seconds = timed(lambda: torch.mm(a, b, out=out), device)
    return 2 * size**3 / seconds / 1e9


def onednn_matmul_gflops(size: int = 4096) -> float | None:
    """
    Throughput of the same float32 product through oneDNN (`torch.ops.mkldnn._linear_pointwise`), on CPU. On x86
    CPUs where MKL's sgemm (behind `torch.mm`) runs its AVX2 kernels although AVX-512 is available (non-Intel CPUs),
    this is the higher of the two, the real float32 matmul peak of the cores. None without oneDNN.
    """
    try:
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    a, b = torch.randn(size, size), torch.randn(size, size)
    linear(a, b, None, "none", [], "")
    seconds = timed(lambda: linear(a, b, None, "none", [], ""), torch.device("cpu"))
    return 2 * size**3 / seconds / 1e9


# FLOP counting -----------------------------------------------------------------------------------------------------
def layer_flops(tokens: int, width: int, intermediate: int) -> tuple[float, float]:
    """Forward matmul FLOPs of one pre-norm transformer layer on one sequence of `tokens`: (linear, attention)."""
    linear = 2 * tokens * (3 * width * width + width * width + 2 * width * intermediate)
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and weights @ v
    return linear, attention


def pretraining_flop_terms(config, audio_mask_ratio=None, visual_mask_ratio=None) -> list[tuple[str, float]]:
    """
    Forward matmul FLOPs per sample of a CAV-MAE pretraining step, term by term (elementwise work, LayerNorms,
    softmax and the optimizer are not counted). Sizes follow the config: D = hidden size, Na / Nv patches, of which
    na / nv are kept.
    """
    audio_ratio = config.audio_mask_ratio if audio_mask_ratio is None else audio_mask_ratio
    visual_ratio = config.visual_mask_ratio if visual_mask_ratio is None else visual_mask_ratio
    d, inner = config.hidden_size, config.intermediate_size
    dd, dinner = config.decoder_hidden_size, config.decoder_intermediate_size
    na_all, nv_all = config.num_audio_patches, config.num_visual_patches
    na, nv = int(na_all * (1 - audio_ratio)), int(nv_all * (1 - visual_ratio))
    specific, shared = config.num_modality_specific_layers, config.num_shared_layers
    p2, channels = config.patch_size**2, config.num_channels
    terms = [("patch embedding (all patches)", 2 * d * p2 * (na_all + channels * nv_all))]
    for label, count, tokens in (
        (f"audio layers x{specific} (na={na})", specific, na),
        (f"visual layers x{specific} (nv={nv})", specific, nv),
    ):
        linear, attention = layer_flops(tokens, d, inner)
        terms += [(f"{label}: linear", count * linear), (f"{label}: attention", count * attention)]
    shared_linear = shared_attention = 0.0
    for tokens in (na + nv, na, nv):  # joint, audio, visual streams
        linear, attention = layer_flops(tokens, d, inner)
        shared_linear += shared * linear
        shared_attention += shared * attention
    terms += [
        (f"shared layers x{shared}, 3 streams: linear", shared_linear),
        (f"shared layers x{shared}, 3 streams: attention", shared_attention),
        ("decoder embedding (kept tokens)", 2 * (na + nv) * d * dd),
    ]
    linear, attention = layer_flops(na_all + nv_all, dd, dinner)
    layers = config.decoder_num_hidden_layers
    terms += [
        (f"decoder layers x{layers} (Na+Nv={na_all + nv_all}): linear", layers * linear),
        (f"decoder layers x{layers}: attention", layers * attention),
        ("prediction heads (all patches)", 2 * dd * p2 * (na_all + channels * nv_all)),
    ]
    return terms


def training_flops(terms) -> float:
    """Forward + backward: backward = 2x forward, except the patch embedding, whose input needs no gradient (1x)."""
    total = 0.0
    for name, flops in terms:
        total += flops * (2 if name.startswith("patch embedding") else 3)
    return total


def encoder_inference_flops(config, audio_tokens: int, visual_tokens: int, streams=("audio", "visual", "joint")):
    """Forward matmul FLOPs per sample of the unmasked encoder with the given shared-layer streams."""
    d, inner, p2 = config.hidden_size, config.intermediate_size, config.patch_size**2
    total = 2 * d * p2 * (audio_tokens + config.num_channels * visual_tokens)
    for tokens in (audio_tokens, visual_tokens):
        total += config.num_modality_specific_layers * sum(layer_flops(tokens, d, inner))
    sizes = {"audio": audio_tokens, "visual": visual_tokens, "joint": audio_tokens + visual_tokens}
    for stream in streams:
        total += config.num_shared_layers * sum(layer_flops(sizes[stream], d, inner))
    return total
