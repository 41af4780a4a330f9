"""Trainer pretraining and fine-tuning of a tiny CAV-MAE, the schedule, head learning rate, freezing, resuming,
weight averaging, and the metrics against hand-computed values."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from safetensors.torch import load_file
from transformers import EvalPrediction, HfArgumentParser, Trainer, TrainingArguments

from cavmae_hf import CavMaeConfig, CavMaeFeatureExtractor, CavMaeForAudioVisualClassification, CavMaeForPreTraining
from cavmae_hf.data import (
    AudioVisualDataCollator,
    CavMaeDataError,
    dataset_from_folder,
    decode_clips,
    finetuning_transforms,
    pretraining_transforms,
    with_transform,
)
from cavmae_hf.metrics import (
    accuracy,
    classification_metrics,
    d_prime,
    mean_auc,
    mean_average_precision,
    recall_metrics,
    retrieval_metrics,
    true_pair_ranks,
)
from cavmae_hf.training import (
    LOSS_COMPONENTS,
    CavMaeTrainer,
    SkippedClipsCallback,
    CavMaeTrainingArguments,
    DataArguments,
    WeightAveragingCallback,
    average_checkpoints,
    average_epoch_checkpoints,
    checkpoint_epochs,
    evaluate_retrieval,
    parse_config_overrides,
    reference_step_multiplier,
)
from cavmae_hf.synthetic import write_synthetic_videos

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """12 decoded synthetic clips (3 classes) matching the tiny config: 64 fbank frames x 32 mel bins, 32 x 32."""
    root = tmp_path_factory.mktemp("clips")
    write_synthetic_videos(root, num_classes=NUM_CLASSES, clips_per_class=4, duration=0.7, image_size=32, fps=10)
    return decode_clips(dataset_from_folder(root)).shuffle(seed=0)


@pytest.fixture(scope="module")
def extractor():
    return CavMaeFeatureExtractor(max_length=64, num_mel_bins=32, image_size=32)


def tiny_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_train_epochs=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        use_cpu=True,
    )
    values.update(overrides)
    return CavMaeTrainingArguments(**values)


def pretraining_trainer(tmp_path, clips, extractor, **overrides):
    train, evaluation = pretraining_transforms(extractor)
    model = CavMaeForPreTraining(CavMaeConfig(**tiny_config_kwargs(contrastive_loss_weight=0.1)))
    return CavMaeTrainer(
        model=model,
        args=tiny_args(tmp_path, **overrides),
        train_dataset=clips.with_transform(train),
        eval_dataset=clips.select(range(8)).with_transform(evaluation),
    )


def classification_trainer(tmp_path, clips, extractor, problem_type="single_label_classification", **overrides):
    train, evaluation = finetuning_transforms(extractor, num_labels=NUM_CLASSES, freqm=4, timem=8)
    config = CavMaeConfig(**tiny_config_kwargs(num_labels=NUM_CLASSES, problem_type=problem_type))
    return CavMaeTrainer(
        model=CavMaeForAudioVisualClassification(config),
        args=tiny_args(tmp_path, **overrides),
        train_dataset=clips.with_transform(train),
        eval_dataset=clips.with_transform(evaluation),
        compute_metrics=classification_metrics(problem_type),
    )


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------
def test_pretraining_logs_every_loss_component(tmp_path, clips, extractor):
    trainer = pretraining_trainer(tmp_path, clips, extractor)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6  # 12 clips / 4 per batch x 2 epochs, logged every step
    for entry in logs:
        assert set(LOSS_COMPONENTS) <= set(entry)
        assert math.isclose(entry["mae_loss"], entry["audio_mae_loss"] + entry["visual_mae_loss"], rel_tol=1e-5)
        assert 0.0 <= entry["contrastive_accuracy"] <= 1.0
    metrics = trainer.evaluate()
    assert {f"eval_{name}" for name in LOSS_COMPONENTS} | {"eval_loss"} <= set(metrics)
    expected = metrics["eval_mae_loss"] + 0.1 * metrics["eval_contrastive_loss"]
    assert math.isclose(metrics["eval_loss"], expected, rel_tol=1e-4)
    eval_transform = pretraining_transforms(extractor)[1]
    retrieval = evaluate_retrieval(trainer.model, clips.select(range(8)).with_transform(eval_transform))
    assert {"a2v_R@1", "v2a_R@10", "a2v_median_rank", "chance_R@1"} <= set(retrieval)


def test_finetuning_multi_frame_evaluation_and_metrics(tmp_path, clips, extractor):
    trainer = classification_trainer(tmp_path, clips, extractor)
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_loss" in metrics
    predictions = trainer.predict(clips.with_transform(finetuning_transforms(extractor, NUM_CLASSES)[1]))
    assert predictions.predictions.shape == (12, NUM_CLASSES)  # 10 frames per clip aggregated by the classifier

    multi_label = classification_trainer(tmp_path / "ml", clips, extractor, problem_type="multi_label_classification")
    assert {"eval_mAP", "eval_mAUC", "eval_d_prime", "eval_accuracy"} <= set(multi_label.evaluate())


def test_streaming_training_with_an_iterable_dataset(tmp_path, clips, extractor):
    train, _ = finetuning_transforms(extractor, num_labels=NUM_CLASSES, freqm=4, timem=8)
    config = CavMaeConfig(**tiny_config_kwargs(num_labels=NUM_CLASSES))
    trainer = CavMaeTrainer(
        model=CavMaeForAudioVisualClassification(config),
        args=tiny_args(tmp_path, max_steps=4, steps_per_epoch=2, lr_decay_start=1, lr_decay_every=1, lr_decay=0.5),
        train_dataset=with_transform(clips.to_iterable_dataset(), train, batch_size=4),
    )
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 4 and rates == [1e-3, 1e-3, 5e-4, 5e-4]


def test_head_learning_rate_and_reference_optimizer(tmp_path, clips, extractor):
    trainer = classification_trainer(tmp_path, clips, extractor, head_lr=50.0, learning_rate=1e-4)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
    base, head = optimizer.param_groups
    assert base["lr"] == 1e-4 and head["lr"] == pytest.approx(5e-3)
    head_ids = {id(p) for p in trainer.model.classifier.parameters()}
    assert {id(p) for p in head["params"]} == head_ids
    assert base["weight_decay"] == 5e-7 and base["betas"] == (0.95, 0.999)

    hf = classification_trainer(tmp_path / "hf", clips, extractor, head_lr=10.0, reference_optimizer=False)
    groups = hf.create_optimizer().param_groups
    assert sorted({round(group["lr"], 8) for group in groups}) == [1e-3, 1e-2]
    assert {group["weight_decay"] for group in groups} == {0.0, 5e-7}


def test_freeze_base_trains_only_the_head(tmp_path, clips, extractor):
    trainer = classification_trainer(tmp_path, clips, extractor, freeze_base=True, num_train_epochs=1)
    backbone = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "classifier" not in name}
    head = trainer.model.classifier.dense.weight.detach().clone()
    trainer.train()
    for name, parameter in trainer.model.named_parameters():
        if "classifier" not in name:
            assert torch.equal(parameter, backbone[name]), name
    assert not torch.equal(trainer.model.classifier.dense.weight, head)


def test_reference_step_schedule():
    # MultiStepLR(range(10, 1000, 5), 0.5) stepped per epoch: epochs 1-10 full, 11-15 halved, 16-20 quartered
    factors = [reference_step_multiplier(epoch * 7, 7, 10, 5, 0.5) for epoch in range(22)]
    assert factors[:10] == [1.0] * 10 and factors[10:15] == [0.5] * 5 and factors[15:20] == [0.25] * 5
    # fine-tuning recipe: start 2, every epoch
    assert [reference_step_multiplier(e, 1, 2, 1, 0.5) for e in range(5)] == [1, 1, 0.5, 0.25, 0.125]
    assert reference_step_multiplier(5, 100, 10, 5, 0.5, warmup_steps=20) == 0.25


def test_trainer_follows_the_step_schedule(tmp_path, clips, extractor):
    trainer = pretraining_trainer(
        tmp_path, clips, extractor, num_train_epochs=4, lr_decay_start=2, lr_decay_every=1, lr_decay=0.1
    )
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    # 3 steps per epoch; each log shows the rate its step used: epochs 1-2 full, then a decay per epoch
    expected = [1e-3 * reference_step_multiplier(step, 3, 2, 1, 0.1) for step in range(12)]
    assert expected == [1e-3] * 6 + [1e-4] * 3 + [pytest.approx(1e-5)] * 3
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_resume_from_checkpoint_continues_training_and_weight_average(tmp_path, clips, extractor):
    common = dict(num_train_epochs=3, save_strategy="epoch", weight_averaging=True, wa_start=2, wa_end=3)
    full = pretraining_trainer(tmp_path / "full", clips, extractor, **common)
    full.train()
    resumed = pretraining_trainer(tmp_path / "full", clips, extractor, **common)  # same output_dir
    checkpoint = checkpoint_epochs(tmp_path / "full" / "run")[2]
    assert (checkpoint / "weight_average.safetensors").is_file()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 9
    callback = resumed.weight_averaging_callback
    assert callback.epochs == [2, 3]
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_weight_average_is_in_a_checkpoint_before_its_trainer_state(tmp_path, clips, extractor, monkeypatch):
    # trainer_state.json, written last, is what marks a checkpoint complete for resuming
    from transformers import TrainerState

    seen = []
    original = TrainerState.save_to_json

    def save_to_json(state, path):
        folder = Path(path).parent
        if folder.name.startswith("checkpoint-"):
            seen.append((folder.name, (folder / "weight_average.safetensors").is_file()))
        return original(state, path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    trainer = pretraining_trainer(
        tmp_path, clips, extractor, num_train_epochs=2, save_strategy="epoch", weight_averaging=True, wa_start=1,
        wa_end=2,
    )
    trainer.train()
    assert seen == [("checkpoint-3", True), ("checkpoint-6", True)]
    assert not list((tmp_path / "run").rglob("*.partial"))


def test_weight_averaging_matches_the_average_of_epoch_checkpoints(tmp_path, clips, extractor):
    trainer = pretraining_trainer(
        tmp_path, clips, extractor, num_train_epochs=3, save_strategy="epoch", weight_averaging=True, wa_start=2,
        wa_end=3,
    )
    trainer.train()
    output_dir = tmp_path / "run"
    by_epoch = checkpoint_epochs(output_dir)
    assert sorted(by_epoch) == [1, 2, 3]
    expected = average_epoch_checkpoints(output_dir, 2, 3)
    last = load_file(str(by_epoch[3] / "model.safetensors"))
    averaged_model = trainer.model.state_dict()
    changed = 0
    for name, value in expected.items():
        torch.testing.assert_close(averaged_model[name], value, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, last[name])
    assert changed > 0  # the average is not the last epoch's weights
    by_hand = {name: (load_file(str(by_epoch[2] / "model.safetensors"))[name] + last[name]) / 2 for name in last}
    for name, value in average_checkpoints([by_epoch[2], by_epoch[3]]).items():
        torch.testing.assert_close(value, by_hand[name])
    with pytest.raises(ValueError, match="epochs \\[4\\]"):
        average_epoch_checkpoints(output_dir, 3, 4)


def test_weight_averaging_callback_validates_its_range():
    with pytest.raises(ValueError):
        WeightAveragingCallback(3, 2)


def test_argument_dataclasses_parse_the_reference_recipe():
    parser = HfArgumentParser((DataArguments, CavMaeTrainingArguments))
    data, training = parser.parse_args_into_dataclasses(
        [
            "--train_data", "train.json", "--output_dir", "out", "--head_lr", "100", "--lr_decay_start", "5",
            "--lr_decay_every", "1", "--weight_averaging", "--wa_start", "3", "--wa_end", "15", "--balanced_sampling",
        ]
    )
    assert data.train_data == "train.json" and data.audio_length is None  # the model's, unless given
    assert training.head_lr == 100 and training.wa_end == 15 and training.balanced_sampling
    assert training.remove_unused_columns is False and training.adam_beta1 == 0.95
    assert parse_config_overrides("hidden_size=192, norm_pix_loss=false,contrastive_temperature=0.1") == {
        "hidden_size": 192,
        "norm_pix_loss": False,
        "contrastive_temperature": 0.1,
    }


def test_balanced_sampling_draws_rare_classes_more_often(tmp_path, clips, extractor):
    classes = [labels[0] for labels in clips["labels"]]
    keep = [i for i, label in enumerate(classes) if label != 2] + [classes.index(2)]  # class 2: one clip of 9
    unbalanced = clips.select(keep)
    trainer = classification_trainer(tmp_path, unbalanced, extractor, balanced_sampling=True)
    sampler = trainer._get_train_sampler()
    unbalanced_labels = [labels[0] for labels in unbalanced["labels"]]
    labels = [unbalanced_labels[i] for _ in range(300) for i in sampler]
    shares = np.bincount(labels, minlength=3) / len(labels)
    assert np.all(np.abs(shares - 1 / 3) < 0.08)


# ----------------------------------------------------------------------------------------------------------------
# The plain Trainer
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_with_a_broken_clip(tmp_path_factory):
    """9 videos in 3 class folders and one file among them that is not a video."""
    root = tmp_path_factory.mktemp("folder_with_a_broken_clip")
    write_synthetic_videos(root, num_classes=NUM_CLASSES, clips_per_class=3, duration=0.7, image_size=32, fps=10)
    broken = sorted(path for path in root.iterdir() if path.is_dir())[0] / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    return root


def train_on_the_folder(trainer_class, tmp_path, root, extractor, **arguments):
    clips = dataset_from_folder(root)
    train, _ = finetuning_transforms(
        extractor, NUM_CLASSES, freqm=0, timem=0, mixup=0.0, noise=False, label_smoothing=0.0
    )
    values = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=5, num_train_epochs=8, learning_rate=2e-3,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False,
        use_cpu=True, seed=0, remove_unused_columns=False,
    )  # fmt: skip
    values.update(arguments)
    trainer = trainer_class(
        model=CavMaeForAudioVisualClassification(CavMaeConfig(**tiny_config_kwargs(num_labels=NUM_CLASSES))),
        args=TrainingArguments(**values),
        train_dataset=clips.with_transform(train),
        data_collator=AudioVisualDataCollator(),
        callbacks=[SkippedClipsCallback()],
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("trainer_class", [Trainer, CavMaeTrainer], ids=["Trainer", "CavMaeTrainer"])
def test_training_on_a_folder_with_a_broken_clip(tmp_path, folder_with_a_broken_clip, extractor, trainer_class):
    trainer = train_on_the_folder(trainer_class, tmp_path, folder_with_a_broken_clip, extractor)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 16  # 10 files, 5 per batch, 8 epochs: the run finished
    losses = [entry["loss"] for entry in logs]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    skipped = [entry["skipped_clips"] for entry in logs]
    assert skipped == sorted(skipped) and skipped[-1] == 8  # the broken file, once per epoch


def test_plain_trainer_without_remove_unused_columns_false_is_told_so(tmp_path, folder_with_a_broken_clip, extractor):
    with pytest.raises(CavMaeDataError, match="remove_unused_columns=False"):
        train_on_the_folder(Trainer, tmp_path, folder_with_a_broken_clip, extractor, remove_unused_columns=True)


# ----------------------------------------------------------------------------------------------------------------
# Metrics, by hand
# ----------------------------------------------------------------------------------------------------------------
def test_classification_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.7], [0.6, 0.4, 0.9], [0.1, 0.3, 0.95]])
    targets = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 1, 0]])
    # argmax of the scores: 0, 1, 2, 2; of the targets: 0, 1, 2, 1
    assert accuracy(scores, targets) == 0.75
    assert accuracy(scores, np.array([0, 1, 2, 1])) == 0.75
    # class 0: its positive ranks first -> AP 1
    # class 1: positives .8 and .3, ranking .8+ .4- .3+ .1- -> AP (1/1 + 2/3) / 2
    # class 2: positives .9 and .7, ranking .95- .9+ .7+ .3- -> AP (1/2 + 2/3) / 2
    expected_map = (1 + (1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 3
    assert mean_average_precision(scores, targets) == pytest.approx(expected_map)
    # AUC: class 0 1; class 1: (.8>.1, .8>.4, .3>.1, .3<.4) 3/4; class 2: (.7>.3, .7<.95, .9>.3, .9<.95) 2/4
    assert mean_auc(scores, targets) == pytest.approx((1 + 0.75 + 0.5) / 3)
    assert d_prime(0.5) == 0.0 and math.isnan(d_prime(1.0))
    assert d_prime(0.8413447460685429) == pytest.approx(math.sqrt(2), rel=1e-6)  # Phi(1) = 0.8413...
    # a class without positives is left out
    no_positives = np.concatenate([targets[:, :1], np.zeros((4, 1))], axis=1)
    assert mean_average_precision(scores[:, :2], no_positives) == 1.0

    compute_metrics = classification_metrics("multi_label_classification")
    results = compute_metrics(EvalPrediction(predictions=scores, label_ids=targets))
    assert results["mAP"] == pytest.approx(expected_map) and results["mAUC"] == pytest.approx(0.75)
    assert results["accuracy"] == 0.75
    single = classification_metrics("single_label_classification")(
        EvalPrediction(predictions=(scores, np.zeros((4, 2, 3))), label_ids=targets)  # a tuple: logits first
    )
    assert single == {"accuracy": 0.75}


def test_retrieval_metrics_by_hand():
    # 4 clips; audio i is closest to visual perm[i]
    visual = torch.eye(4)
    audio = torch.tensor([[1.0, 0.2, 0, 0], [0.9, 1.0, 0, 0], [0, 0, 0.1, 1.0], [0, 0, 0, 1.0]])
    ranks = true_pair_ranks(audio, visual)
    # clip 0: visual 0 best -> 1; clip 1: 1.0 > 0.9 -> 1; clip 2: visual 3 (1.0) beats visual 2 (0.1) -> 2;
    # clip 3: 1
    assert ranks.tolist() == [1, 1, 2, 1]
    metrics = retrieval_metrics(audio, visual)
    assert metrics["a2v_R@1"] == 0.75 and metrics["a2v_R@5"] == 1.0 and metrics["a2v_median_rank"] == 1.0
    assert metrics["chance_R@1"] == 0.25
    # visual -> audio: visual 3 scores audio 2 and 3 equally (1.0): a tie counts for the true pair
    assert true_pair_ranks(visual, audio).tolist() == [1, 1, 1, 1]
    # median of an even count is the mean of the middle ranks, as numpy's (the reference's)
    assert recall_metrics(torch.tensor([1, 2, 3, 40]))["median_rank"] == 2.5
    big_a, big_v = torch.randn(300, 16), torch.randn(300, 16)
    torch.testing.assert_close(true_pair_ranks(big_a, big_v, chunk_size=7), true_pair_ranks(big_a, big_v))


def test_results_are_json_serialisable(tmp_path, clips, extractor):
    trainer = pretraining_trainer(tmp_path, clips, extractor, num_train_epochs=1)
    trainer.train()
    json.dumps(trainer.state.log_history)


# ----------------------------------------------------------------------------------------------------------------
# The example scripts
# ----------------------------------------------------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
INPUT_SIZES = ("image_size", "num_mel_bins", "audio_length")
TINY_OVERRIDES = ",".join(f"{name}={value}" for name, value in tiny_config_kwargs().items() if name not in INPUT_SIZES)
TINY_DATA = ["--audio_length", "64", "--num_mel_bins", "32", "--image_size", "32"]
TINY_TRAINING = [
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--report_to", "none",
    "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--use_cpu", "true", "--save_strategy", "no",
]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("example_videos")
    return write_synthetic_videos(root, num_classes=NUM_CLASSES, clips_per_class=3, duration=0.7, image_size=32, fps=10)


def test_examples_pretrain_finetune_and_retrieve(tmp_path, video_folder, capsys):
    pretrained = tmp_path / "pretrained"
    load_example("pretrain").main(
        ["--train_data", str(video_folder), "--eval_data", str(video_folder), "--output_dir", str(pretrained),
         "--config_overrides", TINY_OVERRIDES, "--decode_once", "--num_train_epochs", "1", "--mask_mode", "time",
         "--contrastive_loss_weight", "0.1", *TINY_DATA, *TINY_TRAINING]
    )
    assert (pretrained / "model.safetensors").is_file() and (pretrained / "preprocessor_config.json").is_file()
    eval_results = json.loads((pretrained / "eval_results.json").read_text())
    assert "eval_contrastive_accuracy" in eval_results
    assert CavMaeForPreTraining.from_pretrained(pretrained).config.audio_mask_mode == "time"

    finetuned = tmp_path / "finetuned"
    load_example("finetune").main(
        ["--model_name_or_path", str(pretrained), "--train_data", str(video_folder), "--eval_data", str(video_folder),
         "--output_dir", str(finetuned), "--num_train_epochs", "2", "--head_lr", "10", "--freqm", "4", "--timem", "8",
         "--weight_averaging", "--wa_start", "1", "--wa_end", "2", "--lr_decay_start", "1", "--lr_decay_every", "1",
         *TINY_DATA, *TINY_TRAINING]
    )
    model = CavMaeForAudioVisualClassification.from_pretrained(finetuned)
    assert model.config.num_labels == NUM_CLASSES and model.config.problem_type == "single_label_classification"
    assert "eval_accuracy" in json.loads((finetuned / "eval_results.json").read_text())

    capsys.readouterr()
    load_example("retrieval").main(
        ["--model_name_or_path", str(finetuned), "--data", str(video_folder), "--frames", "all"]
    )
    assert "audio -> visual: R@1" in capsys.readouterr().out


def test_examples_stream_with_epochs_of_full_batches(tmp_path, video_folder):
    """--streaming: no --max_steps needed; an epoch is the full global batches of the set (9 clips, 4 per step: 2)."""
    clips = len(list(Path(video_folder).rglob("*.mp4")))
    steps_per_epoch = clips // 4
    for name, extra in (("pretrain", ["--config_overrides", TINY_OVERRIDES]), ("finetune", ["--freqm", "4"])):
        output = tmp_path / name
        load_example(name).main(
            ["--train_data", str(video_folder), "--output_dir", str(output), "--streaming", "--num_train_epochs", "2",
             "--shuffle_buffer_size", "4", *extra, *TINY_DATA, *TINY_TRAINING]
        )
        state = json.loads((output / "trainer_state.json").read_text())
        assert state["global_step"] == state["max_steps"] == 2 * steps_per_epoch, name
        assert state["epoch"] == pytest.approx(2.0), name
