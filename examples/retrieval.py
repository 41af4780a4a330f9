#!/usr/bin/env python
"""
Audio -> visual and visual -> audio retrieval of a CAV-MAE model, as the reference's `retrieval.py`: every clip's
audio and frames are embedded (the unmasked modality streams, mean-pooled, L2-normalised), and each audio is
ranked against all frames (and each frame against all audio) by cosine similarity, one matrix product. Reported:
recall at 1, 5 and 10 and the median rank of the true pair.

    python examples/retrieval.py --model_name_or_path cav-mae-scale++ \
        --data audioset_eval_5_per_class_for_retrieval.json --label_csv class_labels_indices.csv

The reference evaluates on frame 5 of 10 (`--frames middle`, the default); `--frames all` averages the
embeddings of the 10 frames.
"""

import json
import sys
from dataclasses import dataclass, field

from transformers import AutoConfig, HfArgumentParser

from cavmae_hf import CavMaeModel
from cavmae_hf.data import AudioVisualTransform, decode_clips
from cavmae_hf.pipelines import load_feature_extractor, load_model_as_saved
from cavmae_hf.training import load_clip_dataset


@dataclass
class RetrievalArguments:
    model_name_or_path: str = field(metadata={"help": "Any CAV-MAE directory (pretrained or fine-tuned)."})
    data: str = field(metadata={"help": "Clips: a folder of videos, a CSV or a reference data JSON."})
    label_csv: str | None = field(default=None, metadata={"help": "Label CSV of a reference data JSON."})
    frames: str = field(default="middle", metadata={"help": "'middle' (frame 5 of 10) or 'all' (averaged)."})
    num_frames: int = field(default=10, metadata={"help": "Frames per clip to choose from."})
    batch_size: int = field(default=32, metadata={"help": "Clips per forward pass."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N clips."})
    decode_once: bool = field(default=False, metadata={"help": "Decode the videos once before embedding."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})


def main(argv=None) -> int:
    (args,) = HfArgumentParser(RetrievalArguments).parse_args_into_dataclasses(argv)
    from cavmae_hf.training import evaluate_retrieval

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    model = load_model_as_saved(args.model_name_or_path) if config.architectures else CavMaeModel(config)
    extractor = load_feature_extractor(args.model_name_or_path, config)
    dataset = load_clip_dataset(args.data, args.label_csv, args.num_frames, max_samples=args.max_samples)
    if args.decode_once:
        dataset = decode_clips(dataset, args.num_frames)
    transform = AudioVisualTransform(extractor, num_frames=args.num_frames, frame_index=args.frames)
    metrics = evaluate_retrieval(model, dataset.with_transform(transform), batch_size=args.batch_size, progress=True)

    print(f"{len(dataset)} clips (chance R@1 {metrics['chance_R@1']:.4f})")
    for direction, name in (("a2v", "audio -> visual"), ("v2a", "visual -> audio")):
        print(
            f"{name}: R@1 {metrics[f'{direction}_R@1']:.4f}  R@5 {metrics[f'{direction}_R@5']:.4f}  "
            f"R@10 {metrics[f'{direction}_R@10']:.4f}  median rank {metrics[f'{direction}_median_rank']:g}"
        )
    if args.output_file:
        with open(args.output_file, "w") as handle:
            json.dump(metrics, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
