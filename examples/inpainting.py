#!/usr/bin/env python
"""
Masked reconstruction ("inpainting") with a CAV-MAE pretraining model, as the reference's `inpaint.py`: each clip's
middle frame and spectrogram are masked, the model fills the removed patches in, and the mean squared error on the
removed patches is reported, for one or several masking ratios. The first clips are drawn as PNGs (original /
masked / reconstruction of the frame and the spectrogram).

    python examples/inpainting.py --model_name_or_path cav-mae-base-nonorm --data vggsound_test.json \
        --label_csv class_labels_indices_vgg.csv --mask_ratios 0.25 0.5 0.75 0.9 --max_samples 200

Use a model pretrained with `norm_pix_loss=False` for pictures that show what the model predicts (the reference's
inpainting used such a model). The masks are reproducible with `--seed`; `--audio_mask_mode time|freq|tf` masks
whole time or frequency bands of the spectrogram instead of single patches.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from cavmae_hf import CavMaeForPreTraining
from cavmae_hf.data import AudioVisualDataCollator, AudioVisualTransform, decode_clips
from cavmae_hf.pipelines import load_feature_extractor
from cavmae_hf.reconstruction import reconstruct, render_reconstruction
from cavmae_hf.training import load_clip_dataset


@dataclass
class InpaintingArguments:
    model_name_or_path: str = field(metadata={"help": "A CAV-MAE pretraining directory (with its decoder)."})
    data: str = field(metadata={"help": "Clips: a folder of videos, a CSV or a reference data JSON."})
    label_csv: str | None = field(default=None, metadata={"help": "Label CSV of a reference data JSON."})
    output_dir: str = field(default="inpainting", metadata={"help": "Where the PNGs and results.json go."})
    mask_ratios: list[float] = field(
        default_factory=lambda: [0.75], metadata={"help": "Masking ratios to evaluate (both modalities)."}
    )
    audio_mask_mode: str | None = field(
        default=None, metadata={"help": "'unstructured', 'time', 'freq' or 'tf' (default: the model's)."}
    )
    num_figures: int = field(default=4, metadata={"help": "Clips drawn as PNGs, per masking ratio."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N clips."})
    num_frames: int = field(default=10, metadata={"help": "Frames per clip; the middle one is reconstructed."})
    batch_size: int = field(default=16, metadata={"help": "Clips per forward pass."})
    seed: int = field(default=2, metadata={"help": "Seed of the masks (the same masks for every ratio's batch)."})
    decode_once: bool = field(default=False, metadata={"help": "Decode the videos once before reconstructing."})


def main(argv=None) -> int:
    (args,) = HfArgumentParser(InpaintingArguments).parse_args_into_dataclasses(argv)
    model = CavMaeForPreTraining.from_pretrained(args.model_name_or_path).eval()
    extractor = load_feature_extractor(args.model_name_or_path, model.config)
    clips = load_clip_dataset(args.data, args.label_csv, args.num_frames, max_samples=args.max_samples)
    if args.decode_once:
        clips = decode_clips(clips, args.num_frames)
    # a clip that does not load stops the run with its name: skipping it would shift the clip names of the figures
    transform = AudioVisualTransform(extractor, num_frames=args.num_frames, frame_index="middle", on_error="raise")
    loader = torch.utils.data.DataLoader(
        clips.with_transform(transform), batch_size=args.batch_size, collate_fn=AudioVisualDataCollator()
    )
    display = {
        "audio_mean": extractor.audio_mean if extractor.do_normalize else 0.0,
        "audio_std": extractor.audio_std if extractor.do_normalize else 1.0,
        "image_mean": extractor.image_mean,
        "image_std": extractor.image_std,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clip_ids = clips["clip_id"]

    results = []
    for ratio in args.mask_ratios:
        totals, start = {"audio": 0.0, "visual": 0.0}, 0
        for batch in loader:
            with torch.no_grad():
                reconstructions = reconstruct(
                    model,
                    batch["input_features"],
                    batch["pixel_values"],
                    audio_mask_ratio=ratio,
                    visual_mask_ratio=ratio,
                    audio_mask_mode=args.audio_mask_mode,
                    seed=args.seed,
                    **display,
                )
            size = len(reconstructions)
            totals["audio"] += reconstructions[0].audio_mae_loss * size  # the losses are batch means
            totals["visual"] += reconstructions[0].visual_mae_loss * size
            for index, reconstruction in enumerate(reconstructions[: max(0, args.num_figures - start)], start):
                reconstruction.source = clip_ids[index]
                render_reconstruction(reconstruction, output_dir / f"{clip_ids[index]}_{ratio:.2f}.png")
            start += size
        results.append(
            {"mask_ratio": ratio, "audio_mse": totals["audio"] / start, "visual_mse": totals["visual"] / start}
        )

    print(f"{len(clips)} clips, {model.config.audio_mask_mode if args.audio_mask_mode is None else args.audio_mask_mode}"
          " audio masking; MSE on the removed patches (in the model's target space):")
    print(f"{'mask ratio':>10}  {'audio':>8}  {'visual':>8}")
    for row in results:
        print(f"{row['mask_ratio']:>10.2f}  {row['audio_mse']:>8.4f}  {row['visual_mse']:>8.4f}")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"figures and results.json in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
