"""Parity with the original CAV-MAE classes: convert the tiny original checkpoints of ../shared/fixtures/original
and reproduce every array of tiny_reference.npz (made with the reference code) to within 1e-5."""

import numpy as np
import pytest
import torch

from cavmae_hf import CavMaeForAudioVisualClassification, CavMaeForPreTraining
from cavmae_hf.convert_original_checkpoint import main as convert_main

TOLERANCE = 1e-5
PRETRAIN_CASES = [("r75_uni", 0.75, False), ("r75_bi", 0.75, True), ("r50_uni", 0.5, False), ("r50_bi", 0.5, True)]
FINETUNE_MODES = [
    ("multimodal", "multimodal", True, True),
    ("audioonly", "audio", True, False),
    ("videoonly", "visual", False, True),
    ("missingaudioonly", "multimodal", True, False),
    ("missingvideoonly", "multimodal", False, True),
]


@pytest.fixture(scope="module")
def reference(request):
    from conftest import FIXTURES

    arrays = np.load(FIXTURES / "original" / "tiny_reference.npz")
    return {key: torch.from_numpy(arrays[key]) for key in arrays.files}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both tiny checkpoints converted with the command-line converter (4 heads: not visible in the weights)."""
    from conftest import FIXTURES

    directories = {}
    for name in ("tiny_pretrain", "tiny_finetuned"):
        output = tmp_path_factory.mktemp(name)
        exit_code = convert_main(
            [
                "--checkpoint",
                str(FIXTURES / "original" / f"{name}.pth"),
                "--output",
                str(output),
                "--num-attention-heads",
                "4",
                "--decoder-num-attention-heads",
                "4",
            ]
        )
        assert exit_code == 0
        directories[name] = output
    return directories


def assert_close(actual, expected, name):
    assert actual is not None, f"{name} was not computed"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= TOLERANCE, f"{name}: max abs difference {difference:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("tag,mask_ratio,bidirectional", PRETRAIN_CASES)
def test_pretraining_matches_original(converted, reference, attn_implementation, tag, mask_ratio, bidirectional):
    model = CavMaeForPreTraining.from_pretrained(converted["tiny_pretrain"], attn_implementation=attn_implementation)
    model.eval()
    model.config.audio_mask_ratio = model.config.visual_mask_ratio = mask_ratio
    model.config.bidirectional_contrastive = bidirectional
    with torch.no_grad():
        out = model(
            reference["audio"],
            reference["images"],
            audio_noise=reference["audio_noise"],
            visual_noise=reference["visual_noise"],
        )
    fields = {
        "mask_a": out.audio_mask,
        "mask_v": out.visual_mask,
        "pred_a": out.audio_logits,
        "pred_v": out.visual_logits,
        "loss_mae_a": out.audio_mae_loss,
        "loss_mae_v": out.visual_mae_loss,
        "loss_c": out.contrastive_loss,
        "c_acc": out.contrastive_accuracy,
        "latent": out.last_hidden_state,
        "loss": out.loss,
    }
    for name, actual in fields.items():
        assert_close(actual, reference[f"pre_{tag}_{name}"], f"pre_{tag}_{name}")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_unmasked_features_match_original(converted, reference, attn_implementation):
    for name, prefix in (("tiny_pretrain", "pre"), ("tiny_finetuned", "ft")):
        model_class = CavMaeForPreTraining if name == "tiny_pretrain" else CavMaeForAudioVisualClassification
        model = model_class.from_pretrained(converted[name], attn_implementation=attn_implementation).eval()
        with torch.no_grad():
            out = model.cav_mae(reference["audio"], reference["images"])
        assert_close(out.audio_last_hidden_state, reference[f"{prefix}_feat_a"], f"{prefix}_feat_a")
        assert_close(out.visual_last_hidden_state, reference[f"{prefix}_feat_v"], f"{prefix}_feat_v")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("reference_mode,classification_mode,with_audio,with_frames", FINETUNE_MODES)
def test_finetuned_logits_match_original(
    converted, reference, attn_implementation, reference_mode, classification_mode, with_audio, with_frames
):
    model = CavMaeForAudioVisualClassification.from_pretrained(
        converted["tiny_finetuned"], attn_implementation=attn_implementation
    ).eval()
    model.config.classification_mode = classification_mode
    with torch.no_grad():
        logits = model(
            input_features=reference["audio"] if with_audio else None,
            pixel_values=reference["images"] if with_frames else None,
        ).logits
    assert_close(logits, reference[f"ft_logits_{reference_mode}"], f"ft_logits_{reference_mode}")


def test_converted_configs_are_read_from_shapes(converted):
    pretrain = CavMaeForPreTraining.from_pretrained(converted["tiny_pretrain"]).config
    assert (pretrain.hidden_size, pretrain.audio_length, pretrain.image_size) == (64, 256, 64)
    assert (pretrain.num_modality_specific_layers, pretrain.num_shared_layers) == (11, 1)
    assert (pretrain.decoder_hidden_size, pretrain.decoder_num_hidden_layers) == (32, 2)
    assert pretrain.trainable_position_embeddings is False
    finetuned = CavMaeForAudioVisualClassification.from_pretrained(converted["tiny_finetuned"]).config
    assert finetuned.num_labels == 7
    assert finetuned.trainable_position_embeddings is True
    assert (converted["tiny_finetuned"] / "model.safetensors").is_file()
    assert (converted["tiny_finetuned"] / "README.md").read_text().startswith("---")
