"""
bfloat16 against float32 at ViT-B size, same weights, in one run (interleaved rounds, warm-up, median):

    python benchmarks/bfloat16.py [--batch-size 4] [--repeats 5] [--no-train]

- Embeddings: `CavMaeModel` on unmasked inputs (audio + one frame, the three streams), loaded with
  `from_pretrained(dir)` (float32), `from_pretrained(dir, dtype=torch.bfloat16)`, the float32 model under
  `torch.autocast(dtype=torch.bfloat16)`, and the bfloat16 model with the package's kernels switched off
  (`kernels_cav_mae.ENABLED = False`: PyTorch's own bfloat16 `linear`), to show what the kernels add.
  Accuracy against float32: the cosine similarity of every token state and of the pooled embeddings (the lowest).
- Classification: `CavMaeForAudioVisualClassification` (527 labels, 10 frames) in float32 and loaded in bfloat16:
  the largest difference of the sigmoid and softmax probabilities, and of the logits.
- Training: one pretraining step (forward, backward, fused AdamW) in float32 and under bfloat16 autocast.

Weights are random (nothing is downloaded). Ends with one `SUMMARY:` line of ratios.
"""

import argparse
import tempfile

import torch
from transformers.utils import logging

from _common import describe_machine, interleaved_timings, median
from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel
from cavmae_hf import kernels_cav_mae

NUM_LABELS = 527


def autocast(function, device_type):
    def run():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return function()

    return run


def kernels_off(function):
    def run():
        saved, kernels_cav_mae.ENABLED = kernels_cav_mae.ENABLED, False
        try:
            return function()
        finally:
            kernels_cav_mae.ENABLED = saved

    return run


def lowest_cosine(reference, other) -> float:
    """The lowest cosine similarity between matching vectors (last dimension) of two outputs."""
    return torch.nn.functional.cosine_similarity(reference.float(), other.float(), dim=-1).min().item()


def embedding_accuracy(reference, other) -> dict:
    names = ("last_hidden_state", "audio_last_hidden_state", "visual_last_hidden_state")
    pooled = ("pooler_output", "audio_embeds", "visual_embeds")
    return {
        "token states": min(lowest_cosine(getattr(reference, n), getattr(other, n)) for n in names),
        "pooled embeddings": min(lowest_cosine(getattr(reference, n), getattr(other, n)) for n in pooled),
    }


def loaded_pair(model_class, config, folder, device):
    """The same random weights loaded by `from_pretrained` in float32 and in bfloat16."""
    model_class._from_config(config).save_pretrained(folder)
    float32 = model_class.from_pretrained(folder).to(device).eval()
    bfloat16 = model_class.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    assert bfloat16.dtype == torch.bfloat16
    return float32, bfloat16


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frames", type=int, default=10, help="frames of the classification check")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable_progress_bar()  # of saving and loading the weights
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = CavMaeConfig()
    b = args.batch_size
    audio = torch.randn(b, config.audio_length, config.num_mel_bins, device=device)
    frame = torch.randn(b, config.num_channels, config.image_size, config.image_size, device=device)
    print(describe_machine())
    print(f"oneDNN dtypes of the package's kernels: {[str(d) for d in kernels_cav_mae._ONEDNN_DTYPES]}")

    summary = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        float32, bfloat16 = loaded_pair(CavMaeModel, config, f"{folder}/encoder", device)
        functions = {
            "float32": lambda: float32(audio, frame),
            "bfloat16 (dtype=)": lambda: bfloat16(audio, frame),
            "bfloat16 autocast": autocast(lambda: float32(audio, frame), device.type),
            "bfloat16 (dtype=), kernels off": kernels_off(lambda: bfloat16(audio, frame)),
        }
        reference = float32(audio, frame)
        accuracy = {name: embedding_accuracy(reference, run()) for name, run in functions.items() if name != "float32"}
        timings = interleaved_timings(functions, args.repeats, args.warmup, device)
        base = median(timings["float32"])
        print(f"\nembeddings, CavMaeModel, batch {b}, unmasked (audio + 1 frame, 3 streams), no_grad")
        print(f"{'configuration':<34}{'median s':>10}{'min s':>8}{'vs float32':>12}{'cos tokens':>12}{'cos pooled':>12}")
        for name, values in timings.items():
            cos = accuracy.get(name, {"token states": 1.0, "pooled embeddings": 1.0})
            print(f"{name:<34}{median(values):>10.2f}{min(values):>8.2f}{base / median(values):>11.2f}x"
                  f"{cos['token states']:>12.6f}{cos['pooled embeddings']:>12.6f}")
        ratio = {name: base / median(values) for name, values in timings.items()}
        summary.append(
            f"embeddings batch {b}: bfloat16 (dtype=) {ratio['bfloat16 (dtype=)']:.2f}x float32 "
            f"(lowest cosine {accuracy['bfloat16 (dtype=)']['token states']:.5f} tokens, "
            f"{accuracy['bfloat16 (dtype=)']['pooled embeddings']:.5f} pooled), "
            f"autocast {ratio['bfloat16 autocast']:.2f}x, kernels off {ratio['bfloat16 (dtype=), kernels off']:.2f}x"
        )
        del float32, bfloat16

        ft_config = CavMaeConfig(num_labels=NUM_LABELS, trainable_position_embeddings=True)
        classifier32, classifier16 = loaded_pair(CavMaeForAudioVisualClassification, ft_config, f"{folder}/clf", device)
        frames = torch.randn(b, args.frames, config.num_channels, config.image_size, config.image_size, device=device)
        logits32, logits16 = classifier32(audio, frames).logits, classifier16(audio, frames).logits.float()
        differences = {
            "sigmoid": (logits32.sigmoid() - logits16.sigmoid()).abs().max().item(),
            "softmax": (logits32.softmax(-1) - logits16.softmax(-1)).abs().max().item(),
            "logits": (logits32 - logits16).abs().max().item(),
        }
        print(f"\nclassification, {NUM_LABELS} labels, {args.frames} frames, batch {b}: bfloat16 (dtype=) vs float32, "
              f"max abs difference of probabilities: sigmoid {differences['sigmoid']:.2e}, softmax "
              f"{differences['softmax']:.2e}; logits {differences['logits']:.2e} (float32 logits span "
              f"{logits32.min().item():.2f} .. {logits32.max().item():.2f}; a sigmoid's slope is at most 1/4, so "
              f"at any logit the probabilities would differ by at most {differences['logits'] / 4:.1e})")
        summary.append(f"classification probabilities max diff {max(differences['sigmoid'], differences['softmax']):.1e}")
        del classifier32, classifier16

    if not args.no_train:
        summary.append(training_comparison(config, audio, frame, args, device))
    print("\nSUMMARY: bfloat16 vs float32: " + "; ".join(summary))


def training_comparison(config, audio, frame, args, device) -> str:
    model = CavMaeForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(autocast_enabled):
        def run():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_enabled):
                loss = model(audio, frame).loss
            loss.backward()
            optimizer.step()

        return run

    timings = interleaved_timings(
        {"float32": step(False), "bfloat16 autocast": step(True)}, args.train_repeats, args.warmup, device
    )
    base = median(timings["float32"])
    print(f"\npretraining step (forward, backward, fused AdamW), batch {audio.shape[0]}")
    print(f"{'configuration':<34}{'median s':>10}{'min s':>8}{'vs float32':>12}")
    for name, values in timings.items():
        print(f"{name:<34}{median(values):>10.2f}{min(values):>8.2f}{base / median(values):>11.2f}x")
    return f"training step bfloat16 autocast {base / median(timings['bfloat16 autocast']):.2f}x float32"


if __name__ == "__main__":
    main()
