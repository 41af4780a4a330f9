"""The original-checkpoint converter: key mapping, shape inference and its refusals."""

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification, CavMaeForPreTraining
from cavmae_hf.convert_original_checkpoint import (
    CheckpointConversionError,
    convert_checkpoint,
    infer_config,
    load_original_state_dict,
    main,
    map_key,
    model_class_for,
)

PRETRAIN = FIXTURES / "original" / "tiny_pretrain.pth"
FINETUNED = FIXTURES / "original" / "tiny_finetuned.pth"


@pytest.mark.parametrize(
    "original,ours",
    [
        ("blocks_a.3.attn.qkv.weight", "cav_mae.audio_layers.3.attention.qkv.weight"),
        ("blocks_v.0.norm2.bias", "cav_mae.visual_layers.0.layernorm_after.visual.bias"),
        ("blocks_a.0.norm1_v.weight", ""),
        ("blocks_u.0.norm1.weight", "cav_mae.shared_layers.0.layernorm_before.joint.weight"),
        ("blocks_u.0.norm2_a.bias", "cav_mae.shared_layers.0.layernorm_after.audio.bias"),
        ("blocks_u.0.norm1_v.weight", "cav_mae.shared_layers.0.layernorm_before.visual.weight"),
        ("decoder_blocks.1.mlp.fc2.weight", "decoder.layers.1.mlp.fc2.weight"),
        ("decoder_blocks.1.norm2_a.weight", ""),
        ("norm.weight", "cav_mae.final_layernorm.joint.weight"),
        ("pos_embed_a", "cav_mae.embeddings.audio_position_embeddings"),
        ("mlp_head.1.bias", "classifier.dense.bias"),
        ("blocks_a.0.attn.q_norm.weight", None),
        ("cls_token", None),
    ],
)
def test_key_mapping(original, ours):
    assert map_key(original) == ours


def test_prefix_is_optional(tmp_path):
    state = torch.load(PRETRAIN, weights_only=True)
    plain = {key.removeprefix("module."): value for key, value in state.items()}
    torch.save(plain, tmp_path / "plain.pth")
    assert load_original_state_dict(tmp_path / "plain.pth").keys() == load_original_state_dict(PRETRAIN).keys()


def test_detects_checkpoint_kind_and_sizes():
    pretrain, finetuned = load_original_state_dict(PRETRAIN), load_original_state_dict(FINETUNED)
    assert model_class_for(finetuned) is CavMaeForAudioVisualClassification
    config = infer_config(pretrain, num_attention_heads=4, decoder_num_attention_heads=4)
    assert config.num_attention_heads == 4 and config.decoder_num_attention_heads == 4
    assert config.audio_length == 256 and config.num_modality_specific_layers == 11
    assert config.image_size == 64 and config.num_mel_bins == 128


def test_a_width_without_a_released_head_count_needs_the_flag(tmp_path, capsys):
    # 64 wide: no released model has that width, and a guessed head count converts into a different model
    with pytest.raises(CheckpointConversionError, match="--num-attention-heads"):
        infer_config(load_original_state_dict(PRETRAIN))
    with pytest.raises(CheckpointConversionError, match="--decoder-num-attention-heads"):
        infer_config(load_original_state_dict(PRETRAIN), num_attention_heads=4)
    assert main(["--checkpoint", str(PRETRAIN), "--output", str(tmp_path / "out")]) == 2
    assert "--num-attention-heads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_converted_directory_has_a_feature_extractor_that_fits(tmp_path):
    from transformers import AutoFeatureExtractor, pipeline

    convert_checkpoint(FINETUNED, tmp_path / "out", num_attention_heads=4)
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path / "out")
    config = CavMaeConfig.from_pretrained(tmp_path / "out")
    assert (extractor.image_size, extractor.max_length, extractor.num_mel_bins) == (64, 256, 128)
    assert (config.image_size, config.audio_length, config.num_mel_bins) == (64, 256, 128)
    classifier = pipeline("audio-visual-classification", model=str(tmp_path / "out"))
    clip = {"audio": np.zeros(16000, dtype=np.float32) + 0.01, "sampling_rate": 16000}
    assert len(classifier(clip, top_k=3)) == 3


def test_label_csv_sets_id2label(tmp_path):
    labels = tmp_path / "labels.csv"
    rows = ["index,mid,display_name"] + [f'{i},/m/{i},"Label {i}"' for i in range(7)]
    labels.write_text("\n".join(rows) + "\n")
    model, _ = convert_checkpoint(
        FINETUNED, tmp_path / "out", label_csv=labels, num_attention_heads=4, decoder_num_attention_heads=4
    )
    assert model.config.id2label[3] == "Label 3" and model.config.label2id["Label 6"] == 6
    assert model.config.problem_type == "single_label_classification"
    reloaded = CavMaeForAudioVisualClassification.from_pretrained(tmp_path / "out")
    assert reloaded.config.id2label[3] == "Label 3"


def test_label_count_mismatch_is_refused(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n0,/m/0,a\n")
    with pytest.raises(CheckpointConversionError, match="1 labels but the checkpoint's head has 7"):
        convert_checkpoint(
            FINETUNED, tmp_path / "out", label_csv=labels, num_attention_heads=4, decoder_num_attention_heads=4
        )


def test_unknown_keys_are_listed_not_dropped(tmp_path):
    state = torch.load(PRETRAIN, weights_only=True)
    state["module.extra_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointConversionError, match="extra_head.weight"):
        convert_checkpoint(
            tmp_path / "extra.pth", tmp_path / "out", num_attention_heads=4, decoder_num_attention_heads=4
        )


def test_missing_keys_are_listed(tmp_path):
    state = torch.load(PRETRAIN, weights_only=True)
    del state["module.blocks_u.0.norm1_a.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointConversionError, match="shared_layers.0.layernorm_before.audio.weight"):
        convert_checkpoint(
            tmp_path / "missing.pth", tmp_path / "out", num_attention_heads=4, decoder_num_attention_heads=4
        )


def test_partial_checkpoint_keeps_initialisation_of_missing_weights_and_lists_both_sides(tmp_path, capsys):
    """A starting point that covers part of the model: some weights absent, some keys foreign."""
    state = torch.load(PRETRAIN, weights_only=True)
    del state["module.blocks_u.0.norm1_a.weight"], state["module.decoder_pred_a.bias"]
    state["module.cls_token"] = torch.zeros(1, 1, 64)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointConversionError, match="missing from the checkpoint"):
        convert_checkpoint(
            tmp_path / "partial.pth", tmp_path / "strict", num_attention_heads=4, decoder_num_attention_heads=4
        )

    arguments = ["--checkpoint", str(tmp_path / "partial.pth"), "--output", str(tmp_path / "out")]
    heads = ["--num-attention-heads", "4", "--decoder-num-attention-heads", "4"]
    assert main([*arguments, *heads, "--partial", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["initialized_keys"]) == [
        "cav_mae.shared_layers.0.layernorm_before.audio.weight",
        "decoder.audio_prediction.bias",
    ]
    assert summary["ignored_original_keys"] == ["cls_token"]
    model = CavMaeForPreTraining.from_pretrained(tmp_path / "out")
    weights = model.state_dict()
    assert torch.equal(weights["cav_mae.shared_layers.0.layernorm_before.audio.weight"], torch.ones(64))
    assert torch.equal(
        weights["decoder.audio_prediction.bias"], torch.zeros_like(weights["decoder.audio_prediction.bias"])
    )
    original = state["module.blocks_a.1.mlp.fc1.weight"]
    assert torch.equal(weights["cav_mae.audio_layers.1.mlp.fc1.weight"], original)


def test_partial_checkpoint_still_refuses_shape_mismatches(tmp_path):
    state = torch.load(PRETRAIN, weights_only=True)
    state["module.blocks_a.2.mlp.fc1.weight"] = torch.zeros(128, 64)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointConversionError, match="shape mismatches"):
        convert_checkpoint(
            tmp_path / "shape.pth", tmp_path / "out", num_attention_heads=4, decoder_num_attention_heads=4, partial=True
        )


def test_shape_mismatch_is_listed(tmp_path):
    state = torch.load(PRETRAIN, weights_only=True)
    state["module.blocks_a.2.mlp.fc1.weight"] = torch.zeros(128, 64)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointConversionError, match="shape mismatches"):
        convert_checkpoint(
            tmp_path / "shape.pth", tmp_path / "out", num_attention_heads=4, decoder_num_attention_heads=4
        )


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_files_that_are_not_checkpoints_give_a_clear_error(tmp_path, content, capsys):
    path = tmp_path / "broken.pth"
    if content is None:  # truncated real checkpoint
        path.write_bytes(PRETRAIN.read_bytes()[:100_000])
    else:
        path.write_bytes(content)
    assert main(["--checkpoint", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "could not be read" in capsys.readouterr().err


def test_pickles_needing_code_are_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"weight": Payload()}, path)
    assert main(["--checkpoint", str(path), "--output", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "this must never run" not in captured.out and "weights_only" in captured.err


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, tmp_path / "resnet.pth")
    assert main(["--checkpoint", str(tmp_path / "resnet.pth"), "--output", str(tmp_path / "out")]) == 2
    assert "not an original CAV-MAE checkpoint" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
