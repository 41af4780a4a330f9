#!/usr/bin/env python
"""
Fine-tune a pretrained CAV-MAE for audio-visual classification with the Hugging Face `Trainer`, as the reference's
`run_cavmae_ft.py`: a new LayerNorm + Linear head with a larger learning rate (`--head_lr`), SpecAugment, mixup,
noise, label smoothing, the step schedule, weight averaging of the last epochs, and 10-frame evaluation.

Data: a folder of videos in class sub-folders, a CSV (`video,labels`), or the reference's data JSON with its label
CSV. Single-label data (one class per clip, e.g. VGGSound) is trained with cross-entropy and scored by accuracy;
multi-label data (AudioSet) with binary cross-entropy and scored by mAP and mAUC (`--problem_type` overrides).

The reference's recipes (one GPU or many: prefix `torchrun --nproc_per_node N`, and divide the batch size by N):

    # AudioSet-20K (run_cavmae_ft_bal.sh): mAP 42.2 in the paper
    python examples/finetune.py --model_name_or_path cav-mae-scale++ \
        --train_data audioset_20k.json --eval_data audioset_eval.json --label_csv class_labels_indices.csv \
        --output_dir runs/as20k --problem_type multi_label_classification \
        --per_device_train_batch_size 36 --learning_rate 5e-5 --head_lr 100 --num_train_epochs 15 \
        --lr_decay_start 5 --lr_decay_every 1 --lr_decay 0.5 --weight_averaging --wa_start 3 --wa_end 15 \
        --freqm 48 --timem 192 --mixup 0.5 --label_smoothing 0.1 --noise true \
        --save_strategy epoch --eval_strategy epoch --bf16 --dataloader_num_workers 16

    # AudioSet-2M (run_cavmae_ft_full.sh): as above with --train_data audioset_2m.json --balanced_sampling
    #   --per_device_train_batch_size 48 --learning_rate 1e-5 --head_lr 50 --num_train_epochs 10
    #   --lr_decay_start 2 --wa_start 1 --wa_end 10
    # VGGSound (egs/vggsound/run_cavmae_ft.sh): --problem_type single_label_classification --balanced_sampling
    #   --per_device_train_batch_size 48 --learning_rate 1e-4 --head_lr 10 --num_train_epochs 10
    #   --lr_decay_start 2 --wa_start 3 --wa_end 10
    # audio-only / visual-only: --classification_mode audio | visual (audio-only: --eval_frames middle)
    # linear probing: --freeze_base

`--eval_frames all` (default) evaluates every clip on its 10 frames and averages the per-frame probabilities,
the reference's final multi-frame evaluation; `middle` uses frame 5 of 10.
"""

import logging
import sys
from dataclasses import dataclass, field

from torch.distributed.elastic.multiprocessing.errors import record

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification
from cavmae_hf.data import finetuning_transforms, label_set_of, labels_for_classification
from cavmae_hf.distributed import end_distributed_run
from cavmae_hf.metrics import classification_metrics
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
class FinetuningModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The pretrained CAV-MAE directory; None trains from scratch (not advised)."}
    )
    classification_mode: str = field(
        default="multimodal",
        metadata={"help": "What the head classifies (reference ftmode).", "choices": ["multimodal", "audio", "visual"]},
    )
    problem_type: str | None = field(
        default=None,
        metadata={
            "help": "Loss and metrics; default: multi-label if any training clip has several labels.",
            "choices": ["single_label_classification", "multi_label_classification"],
        },
    )
    trainable_position_embeddings: bool = field(
        default=True, metadata={"help": "Train the position embeddings (the reference's fine-tuning does)."}
    )
    config_overrides: str | None = field(default=None, metadata={"help": "Other config fields, name=value,..."})


@dataclass
class FinetuningDataArguments(DataArguments):
    freqm: int = field(default=48, metadata={"help": "SpecAugment: widest frequency mask (mel bins)."})
    timem: int = field(default=192, metadata={"help": "SpecAugment: widest time mask (frames of 10 ms)."})
    mixup: float = field(default=0.5, metadata={"help": "Share of training clips mixed with another clip."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing."})
    eval_frames: str = field(
        default="all", metadata={"help": "Evaluation frames: 'all' (10-frame evaluation), 'middle' or an index."}
    )


def infer_problem_type(train_dataset) -> str:
    label_lists = train_dataset.with_format(None)["labels"]
    if any(len(labels) > 1 for labels in label_lists):
        return "multi_label_classification"
    return "single_label_classification"


def build_model(model_args, data_args, label_set, problem_type) -> CavMaeForAudioVisualClassification:
    fields = {
        **labels_for_classification(label_set),
        "problem_type": problem_type,
        "classification_mode": model_args.classification_mode,
        "trainable_position_embeddings": model_args.trainable_position_embeddings,
        **parse_config_overrides(model_args.config_overrides),
    }
    if model_args.model_name_or_path:
        return CavMaeForAudioVisualClassification.from_pretrained(model_args.model_name_or_path, **fields)
    logger.warning("No --model_name_or_path: fine-tuning a randomly initialised CAV-MAE.")
    return CavMaeForAudioVisualClassification(CavMaeConfig(**data_args.input_sizes(), **fields))


@record  # under torchrun, the failing process's traceback appears in the launcher's summary
def main(argv=None):
    model_args, data_args, training_args = parse_script_arguments(
        (FinetuningModelArguments, FinetuningDataArguments, CavMaeTrainingArguments), argv
    )
    if data_args.streaming and training_args.balanced_sampling:
        raise ValueError("--balanced_sampling needs random access: it cannot be combined with --streaming.")

    train, evaluation = load_train_and_eval_datasets(data_args, training_args)
    label_set = label_set_of(train)
    if label_set is None:
        raise ValueError(f"{data_args.train_data} has no labels: use class folders, a labels column or --label_csv.")
    problem_type = model_args.problem_type or infer_problem_type(train)
    logger.info(f"{len(label_set)} classes, {problem_type}.")

    model = build_model(model_args, data_args, label_set, problem_type)
    # the checkpoint's own feature extractor (else one fitting the config); --audio_length etc. override it
    feature_extractor = feature_extractor_for_model(model_args.model_name_or_path, model.config, data_args)
    eval_frames = int(data_args.eval_frames) if data_args.eval_frames.isdigit() else data_args.eval_frames
    train_transform, eval_transform = finetuning_transforms(
        feature_extractor,
        num_labels=len(label_set),
        freqm=data_args.freqm,
        timem=data_args.timem,
        mixup=data_args.mixup,
        noise=data_args.noise,
        label_smoothing=data_args.label_smoothing,
        num_frames=data_args.num_frames,
        eval_frames=eval_frames,
        **transform_options(data_args),
    )
    if data_args.streaming:
        train = streaming_training_set(train, training_args, train_transform, data_args.shuffle_buffer_size)
    else:
        train = train.with_transform(train_transform)
    if training_args.weight_averaging and training_args.load_best_model_at_end:
        raise ValueError("Choose --weight_averaging or --load_best_model_at_end: both set the final weights.")

    trainer = CavMaeTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation.with_transform(eval_transform) if evaluation is not None else None,
        compute_metrics=classification_metrics(problem_type),
    )
    train_save_and_evaluate(trainer, feature_extractor)  # the final model is the weight average with --weight_averaging
    end_distributed_run(trainer)  # before exit: see cavmae_hf.distributed
    return 0


if __name__ == "__main__":
    sys.exit(main())
