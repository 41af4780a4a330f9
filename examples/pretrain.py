#!/usr/bin/env python
"""
Pretrain CAV-MAE (masked reconstruction of audio and frames + audio-visual contrastive learning) on your own videos
with the Hugging Face `Trainer`.

Data: a folder of videos (any sub-folders are read as classes and ignored here), a CSV with a `video` column, or
the reference's data JSON (`wav`, `video_id`, `video_path`, `labels`, frames at `video_path/frame_{i}/video_id.jpg`).

The reference's AudioSet recipe (CAV-MAE scale++, run_cavmae_pretrain_scale++.sh), from an ImageNet MAE or a
converted checkpoint; one GPU or many, unchanged:

    torchrun --nproc_per_node 8 examples/pretrain.py \
        --train_data audioset_2m.json --eval_data audioset_eval.json --label_csv class_labels_indices.csv \
        --model_name_or_path cav-mae-init --output_dir runs/cav-mae-pretrain \
        --per_device_train_batch_size 32 --learning_rate 2e-4 --num_train_epochs 25 \
        --lr_decay_start 10 --lr_decay_every 5 --lr_decay 0.5 \
        --masking_ratio 0.75 --mask_mode unstructured --mae_loss_weight 1.0 --contrastive_loss_weight 0.01 \
        --norm_pix_loss true --noise true --bf16 --dataloader_num_workers 16 --save_strategy epoch

(8 x 32 = 256 clips per step, the scale++ batch; scale+: 120 and 1e-4; base: 48 and 5e-5.)

Every reference hyper-parameter is an option (`--help`); the `Trainer`'s own (mixed precision, gradient
accumulation, checkpointing, logging backends) work as usual; `--resume_from_checkpoint last` continues the newest
checkpoint of `--output_dir`. All options may also come from one JSON file: `examples/pretrain.py args.json`.
"""

import logging
import sys
from dataclasses import dataclass, field

from torch.distributed.elastic.multiprocessing.errors import record

from cavmae_hf import CavMaeConfig, CavMaeForPreTraining
from cavmae_hf.data import pretraining_transforms
from cavmae_hf.distributed import end_distributed_run
from cavmae_hf.training import (
    CavMaeTrainer,
    CavMaeTrainingArguments,
    DataArguments,
    feature_extractor_for_model,
    load_train_and_eval_datasets,
    parse_config_overrides,
    parse_script_arguments,
    streaming_training_set,
    train_save_and_evaluate,
    transform_options,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainingModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A CAV-MAE directory to start from (e.g. a converted checkpoint); "
        "None trains from scratch."}
    )
    config_name: str | None = field(default=None, metadata={"help": "A config.json to build a new model from."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields, e.g. 'hidden_size=384,num_attention_heads=6'."}
    )
    masking_ratio: float = field(default=0.75, metadata={"help": "Share of patches removed in both modalities."})
    audio_mask_ratio: float | None = field(default=None, metadata={"help": "Audio ratio, if not masking_ratio."})
    visual_mask_ratio: float | None = field(default=None, metadata={"help": "Visual ratio, if not masking_ratio."})
    mask_mode: str = field(
        default="unstructured",
        metadata={"help": "Audio masking.", "choices": ["unstructured", "time", "freq", "tf"]},
    )
    mae_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the reconstruction losses."})
    contrastive_loss_weight: float = field(default=0.01, metadata={"help": "Weight of the contrastive loss."})
    norm_pix_loss: bool = field(default=True, metadata={"help": "Reconstruct per-patch normalised targets."})
    trainable_position_embeddings: bool = field(
        default=False, metadata={"help": "Train the sin-cos position embeddings (reference tr_pos)."}
    )
    contrastive_negatives: str = field(
        default="global",
        metadata={
            "help": "Under DDP: 'global' takes negatives from the whole global batch (all-gather with gradient); "
            "'local' keeps each process's own batch, as the reference's per-GPU loss did.",
            "choices": ["global", "local"],
        },
    )
    bidirectional_contrastive: bool = field(default=False, metadata={"help": "Symmetric InfoNCE."})

    def pretraining_fields(self) -> dict:
        return {
            "audio_mask_ratio": self.audio_mask_ratio if self.audio_mask_ratio is not None else self.masking_ratio,
            "visual_mask_ratio": self.visual_mask_ratio if self.visual_mask_ratio is not None else self.masking_ratio,
            "audio_mask_mode": self.mask_mode,
            "mae_loss_weight": self.mae_loss_weight,
            "contrastive_loss_weight": self.contrastive_loss_weight,
            "norm_pix_loss": self.norm_pix_loss,
            "trainable_position_embeddings": self.trainable_position_embeddings,
            "contrastive_negatives": self.contrastive_negatives,
            "bidirectional_contrastive": self.bidirectional_contrastive,
        }


def build_model(model_args: PretrainingModelArguments, data_args: DataArguments) -> CavMaeForPreTraining:
    fields = {**model_args.pretraining_fields(), **parse_config_overrides(model_args.config_overrides)}
    if model_args.model_name_or_path:
        return CavMaeForPreTraining.from_pretrained(model_args.model_name_or_path, **fields)
    if model_args.config_name:
        config = CavMaeConfig.from_pretrained(model_args.config_name, **data_args.input_sizes(), **fields)
    else:
        config = CavMaeConfig(**data_args.input_sizes(), **fields)
    return CavMaeForPreTraining(config)


@record  # under torchrun, the failing process's traceback appears in the launcher's summary
def main(argv=None):
    model_args, data_args, training_args = parse_script_arguments(
        (PretrainingModelArguments, DataArguments, CavMaeTrainingArguments), argv
    )
    model = build_model(model_args, data_args)
    # the checkpoint's own feature extractor (else one fitting the config); --audio_length etc. override it
    feature_extractor = feature_extractor_for_model(model_args.model_name_or_path, model.config, data_args)
    train, evaluation = load_train_and_eval_datasets(data_args, training_args)
    train_transform, eval_transform = pretraining_transforms(
        feature_extractor, data_args.noise, data_args.num_frames, **transform_options(data_args)
    )
    if data_args.streaming:
        train = streaming_training_set(train, training_args, train_transform, data_args.shuffle_buffer_size)
    else:
        train = train.with_transform(train_transform)
    trainer = CavMaeTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation.with_transform(eval_transform) if evaluation is not None else None,
    )
    train_save_and_evaluate(trainer, feature_extractor)
    end_distributed_run(trainer)  # before exit: see cavmae_hf.distributed
    return 0


if __name__ == "__main__":
    sys.exit(main())
