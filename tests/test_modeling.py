"""Behaviour of the CAV-MAE model classes on tiny configurations."""

import copy

import pytest
import torch
from conftest import tiny_config_kwargs

from cavmae_hf import (
    CavMaeConfig,
    CavMaeForAudioVisualClassification,
    CavMaeForPreTraining,
    CavMaeModel,
)
from cavmae_hf.configuration_cav_mae import CavMaeConfigError
from cavmae_hf.modeling_cav_mae import (
    pack,
    CavMaeInputError,
    mask_tokens,
    patchify,
    sincos_2d_position_embeddings,
    structured_audio_noise,
    unpatchify,
)


def make_inputs(config, batch_size=3, frames=None):
    audio = torch.randn(batch_size, config.audio_length, config.num_mel_bins)
    image_shape = (config.num_channels, config.image_size, config.image_size)
    if frames:
        images = torch.randn(batch_size, frames, *image_shape)
    else:
        images = torch.randn(batch_size, *image_shape)
    return audio, images


def fixed_noise(config, batch_size=3):
    return torch.rand(batch_size, config.num_audio_patches), torch.rand(batch_size, config.num_visual_patches)


# Configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "divisible by num_attention_heads"),
        (dict(audio_length=60), "audio_length"),
        (dict(image_size=30), "image_size"),
        (dict(audio_mask_mode="random"), "audio_mask_mode"),
        (dict(audio_mask_ratio=1.0), "audio_mask_ratio"),
        (dict(visual_mask_ratio=-0.1), "visual_mask_ratio"),
        (dict(classification_mode="both"), "classification_mode"),
        (dict(num_modality_specific_layers=0, num_shared_layers=0), "at least one layer"),
        (dict(contrastive_negatives="all"), "contrastive_negatives"),
    ],
)
def test_config_rejects_inconsistent_values(overrides, message):
    with pytest.raises(CavMaeConfigError, match=message):
        CavMaeConfig(**tiny_config_kwargs(**overrides))


def test_default_config_is_the_released_model():
    config = CavMaeConfig()
    assert config.num_audio_patches == 512 and config.audio_grid_size == (8, 64)
    assert config.num_visual_patches == 196
    assert config.num_hidden_layers == 12


def test_changed_mask_ratio_is_validated_at_call_time(tiny_config):
    model = CavMaeForPreTraining(tiny_config)
    model.config.audio_mask_ratio = 1.5
    with pytest.raises(CavMaeConfigError, match="audio_mask_ratio"):
        model(*make_inputs(tiny_config))


# Building blocks -------------------------------------------------------------------------------------------------
def test_position_embedding_layout_is_column_then_row():
    table = sincos_2d_position_embeddings(16, 2, 3)
    # token r * cols + c: the first half encodes the column, the second half the row
    assert torch.allclose(table[4, :8], table[1, :8]) and torch.allclose(table[4, 8:], table[3, 8:])
    assert torch.allclose(table[0, :4], torch.zeros(4)) and torch.allclose(table[0, 4:8], torch.ones(4))


def test_patchify_roundtrip():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    assert torch.equal(unpatchify(patches, 8, 3, (2, 3)), images)


def test_mask_tokens_keeps_lowest_noise():
    tokens = torch.arange(10.0).reshape(1, 10, 1)
    noise = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5, 0.05]])
    kept, mask, ids_restore = mask_tokens(tokens, 0.7, noise)
    assert kept.flatten().tolist() == [9.0, 1.0, 3.0]
    assert mask.flatten().tolist() == [1, 0, 1, 0, 1, 1, 1, 1, 1, 0]
    assert sorted(ids_restore.flatten().tolist()) == list(range(10))


@pytest.mark.parametrize("mode", ["time", "freq", "tf"])
def test_structured_noise_removes_whole_columns_or_rows(mode):
    freq, time = 4, 16
    noise = structured_audio_noise(5, (freq, time), 0.75, mode, "cpu")
    grid = (noise > 1.0).reshape(5, freq, time)
    for sample in grid:
        columns = sample.all(dim=0).sum().item()
        rows = sample.all(dim=1).sum().item()
        if mode == "time":
            assert columns == 12 and sample.sum() == 12 * freq
        elif mode == "freq":
            assert rows == 3 and sample.sum() == 3 * time
        else:
            assert columns == int(time * 0.75 * 0.7) and rows == int(freq * 0.75 * 0.7)


# Pretraining -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["unstructured", "time", "freq", "tf"])
@pytest.mark.parametrize("audio_ratio,visual_ratio", [(0.75, 0.75), (0.5, 0.25)])
def test_masks_have_exactly_the_configured_count(mode, audio_ratio, visual_ratio):
    config = CavMaeConfig(
        **tiny_config_kwargs(audio_mask_mode=mode, audio_mask_ratio=audio_ratio, visual_mask_ratio=visual_ratio)
    )
    model = CavMaeForPreTraining(config).eval()
    with torch.no_grad():
        out = model(*make_inputs(config, batch_size=4))
    na, nv = config.num_audio_patches, config.num_visual_patches
    assert out.audio_mask.shape == (4, na) and out.visual_mask.shape == (4, nv)
    assert (out.audio_mask.sum(dim=1) == na - int(na * (1 - audio_ratio))).all()
    assert (out.visual_mask.sum(dim=1) == nv - int(nv * (1 - visual_ratio))).all()
    for ids, mask in ((out.audio_ids_restore, out.audio_mask), (out.visual_ids_restore, out.visual_mask)):
        assert (ids.sort(dim=1).values == torch.arange(ids.shape[1])).all()
        kept = mask.shape[1] - int(mask[0].sum())
        assert torch.equal(mask, (ids >= kept).float())
    assert out.audio_logits.shape == (4, na, config.patch_size**2)
    assert out.visual_logits.shape == (4, nv, config.patch_size**2 * 3)


def test_loss_is_the_weighted_sum_of_its_components(tiny_config):
    tiny_config.mae_loss_weight, tiny_config.contrastive_loss_weight = 0.7, 0.3
    model = CavMaeForPreTraining(tiny_config).eval()
    with torch.no_grad():
        out = model(*make_inputs(tiny_config))
    assert torch.allclose(out.mae_loss, out.audio_mae_loss + out.visual_mae_loss)
    assert torch.allclose(out.loss, 0.7 * out.mae_loss + 0.3 * out.contrastive_loss)
    assert 0 <= out.contrastive_accuracy <= 1


def test_vanilla_av_mae_is_a_joint_encoder_without_contrastive_loss():
    config = CavMaeConfig(
        **tiny_config_kwargs(num_modality_specific_layers=0, num_shared_layers=3, contrastive_loss_weight=0.0)
    )
    model = CavMaeForPreTraining(config).eval()
    assert len(model.cav_mae.audio_layers) == 0 and len(model.cav_mae.shared_layers) == 3
    with torch.no_grad():
        out = model(*make_inputs(config))
    assert out.contrastive_loss is None and out.audio_embeds is None
    assert torch.allclose(out.loss, out.mae_loss)


def test_contrastive_only_model_does_not_run_the_decoder(tiny_config):
    tiny_config.mae_loss_weight = 0.0
    model = CavMaeForPreTraining(tiny_config).eval()
    calls = []
    model.decoder.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model(*make_inputs(tiny_config))
    assert calls == [] and out.audio_logits is None and out.mae_loss is None
    assert torch.allclose(out.loss, tiny_config.contrastive_loss_weight * out.contrastive_loss)


def test_bidirectional_contrastive_loss_averages_both_directions(tiny_config):
    model = CavMaeForPreTraining(tiny_config).eval()
    inputs, noise = make_inputs(tiny_config, 5), fixed_noise(tiny_config, 5)
    with torch.no_grad():
        one_way = model(*inputs, *noise)
        model.config.bidirectional_contrastive = True
        both_ways = model(*inputs, *noise)
    a = torch.nn.functional.normalize(one_way.audio_embeds, dim=-1)
    v = torch.nn.functional.normalize(one_way.visual_embeds, dim=-1)
    similarity = a @ v.T / 0.05
    reverse = -torch.diagonal(torch.log_softmax(similarity.T, dim=0)).mean()
    assert torch.allclose(both_ways.contrastive_loss, (one_way.contrastive_loss + reverse) / 2, atol=1e-6)


def test_several_shared_layers_are_chained_for_every_stream():
    config = CavMaeConfig(**tiny_config_kwargs(num_shared_layers=2))
    model = CavMaeModel(config).eval()
    audio, images = make_inputs(config)
    with torch.no_grad():
        out = model(audio, images)
        tokens = model.embeddings.embed("audio", audio)
        rows, segments = pack([(tokens, "audio")])
        for layer in [*model.audio_layers, *model.shared_layers]:
            rows, _ = layer(rows, segments)
        expected = model.final_layernorm["audio"](rows.view_as(tokens))
    assert torch.allclose(out.audio_last_hidden_state, expected, atol=1e-6)


def test_batch_size_invariance(tiny_config):
    model = CavMaeForPreTraining(tiny_config).eval()
    audio, images = make_inputs(tiny_config, 4)
    audio_noise, visual_noise = fixed_noise(tiny_config, 4)
    with torch.no_grad():
        batched = model(audio, images, audio_noise, visual_noise)
        single = model(audio[2:3], images[2:3], audio_noise[2:3], visual_noise[2:3])
        encoder_batched = model.cav_mae(audio, images)
        encoder_single = model.cav_mae(audio[2:3], images[2:3])
    assert torch.allclose(batched.audio_logits[2:3], single.audio_logits, atol=1e-5)
    assert torch.allclose(batched.visual_logits[2:3], single.visual_logits, atol=1e-5)
    assert torch.allclose(encoder_batched.last_hidden_state[2:3], encoder_single.last_hidden_state, atol=1e-5)
    assert torch.allclose(encoder_batched.audio_embeds[2:3], encoder_single.audio_embeds, atol=1e-5)


def test_optimizer_steps_lower_the_loss(tiny_config):
    torch.manual_seed(0)
    model = CavMaeForPreTraining(tiny_config).train()
    audio, images = make_inputs(tiny_config, 6)
    noise = fixed_noise(tiny_config, 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = model(audio, images, *noise).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_gradient_checkpointing_gives_equal_gradients(tiny_config):
    model = CavMaeForPreTraining(tiny_config).train()
    audio, images = make_inputs(tiny_config)
    noise = fixed_noise(tiny_config)

    def gradients(checkpointing):
        clone = copy.deepcopy(model)
        if checkpointing:
            clone.gradient_checkpointing_enable()
            assert clone.cav_mae.shared_layers[0].gradient_checkpointing
        clone.zero_grad()
        clone(audio, images, *noise).loss.backward()
        return {name: p.grad.clone() for name, p in clone.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_position_embeddings_are_frozen_unless_configured(tiny_config):
    model = CavMaeForPreTraining(tiny_config)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted(
        [
            "cav_mae.embeddings.audio_position_embeddings",
            "cav_mae.embeddings.visual_position_embeddings",
            "decoder.audio_position_embeddings",
            "decoder.visual_position_embeddings",
        ]
    )
    tiny_config.trainable_position_embeddings = True
    assert all(p.requires_grad for p in CavMaeForPreTraining(tiny_config).parameters())


def test_initialisation_follows_the_reference(tiny_config):
    model = CavMaeForPreTraining(tiny_config)
    embeddings = model.cav_mae.embeddings
    expected = sincos_2d_position_embeddings(tiny_config.hidden_size, *tiny_config.audio_grid_size)
    assert torch.equal(embeddings.audio_position_embeddings[0], expected)
    qkv = model.cav_mae.audio_layers[0].attention.qkv
    bound = (6 / (qkv.in_features + qkv.out_features)) ** 0.5
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.8 * bound
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    assert 0.005 < model.decoder.mask_token.std() < 0.05


# Base model --------------------------------------------------------------------------------------------------------
def test_model_outputs_and_hidden_states(tiny_config):
    model = CavMaeModel(tiny_config).eval()
    audio, images = make_inputs(tiny_config, 2)
    with torch.no_grad():
        out = model(audio, images, output_hidden_states=True, output_attentions=True)
    na, nv, d = tiny_config.num_audio_patches, tiny_config.num_visual_patches, tiny_config.hidden_size
    assert out.last_hidden_state.shape == (2, na + nv, d)
    assert out.audio_last_hidden_state.shape == (2, na, d) and out.visual_last_hidden_state.shape == (2, nv, d)
    assert torch.allclose(out.audio_embeds, out.audio_last_hidden_state.mean(1))
    assert torch.allclose(out.pooler_output, out.last_hidden_state.mean(1))
    audio_alone = model.get_audio_features(audio, output_hidden_states=True, output_attentions=True)
    visual_alone = model.get_image_features(images, output_hidden_states=True, output_attentions=True)
    for hidden in (out.hidden_states, audio_alone.hidden_states, visual_alone.hidden_states):
        assert len(hidden) == 1 + tiny_config.num_hidden_layers
    assert len(out.attentions) == len(audio_alone.attentions) == tiny_config.num_hidden_layers
    assert out.attentions[0].shape == (2, tiny_config.num_attention_heads, na + nv, na + nv)
    assert torch.allclose(audio_alone.attentions[0].sum(-1), torch.ones(1))
    # the joint stream before the shared layers: the modality streams side by side, attention block-diagonal
    assert torch.equal(out.hidden_states[1], torch.cat([audio_alone.hidden_states[1], visual_alone.hidden_states[1]], 1))
    assert torch.equal(out.attentions[0][:, :, :na, :na], audio_alone.attentions[0])
    assert torch.equal(out.attentions[0][:, :, na:, na:], visual_alone.attentions[0])
    assert not out.attentions[0][:, :, :na, na:].any()
    with torch.no_grad():
        audio_features = model.get_audio_features(audio, output_hidden_states=True)
        assert torch.allclose(audio_features.pooler_output, out.audio_embeds, atol=1e-6)
        assert torch.allclose(audio_features.last_hidden_state, out.audio_last_hidden_state, atol=1e-6)
        assert len(audio_features.hidden_states) == 1 + tiny_config.num_hidden_layers
        assert torch.allclose(model.get_image_features(images).pooler_output, out.visual_embeds, atol=1e-6)
        tokens, pooled = model.get_image_features(images, return_dict=False)
        assert torch.allclose(pooled, out.visual_embeds, atol=1e-6) and tokens.shape == (2, nv, d)
        audio_only = model(input_features=audio)
    assert audio_only.last_hidden_state is None and audio_only.visual_embeds is None
    assert torch.allclose(audio_only.audio_embeds, out.audio_embeds, atol=1e-6)
    as_tuple = model(audio, images, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], out.last_hidden_state, atol=1e-6)


@pytest.mark.parametrize(
    "audio_shape,image_shape,message",
    [
        ((2, 63, 32), (2, 3, 32, 32), "input_features"),
        ((2, 64, 32), (2, 3, 16, 16), "pixel_values"),
        ((2, 64, 32), (3, 3, 32, 32), "different batch sizes"),
        ((0, 64, 32), (0, 3, 32, 32), "Empty batch"),
    ],
)
def test_model_rejects_inputs_that_do_not_fit(tiny_config, audio_shape, image_shape, message):
    model = CavMaeModel(tiny_config)
    with pytest.raises(CavMaeInputError, match=message):
        model(torch.zeros(audio_shape), torch.zeros(image_shape))


def test_model_rejects_nan_and_missing_inputs(tiny_config):
    model = CavMaeModel(tiny_config)
    audio, images = make_inputs(tiny_config, 1)
    audio[0, 3, 4] = float("nan")
    with pytest.raises(CavMaeInputError, match="NaN"):
        model(audio, images)
    with pytest.raises(CavMaeInputError, match="at least one"):
        model()
    with pytest.raises(CavMaeInputError, match="one frame per clip"):
        model(pixel_values=torch.zeros(1, 2, 3, 32, 32), apply_masking=True)
    with pytest.raises(CavMaeInputError, match="one frame per clip"):
        CavMaeForPreTraining(tiny_config)(audio.nan_to_num(), torch.zeros(1, 2, 3, 32, 32))
    with pytest.raises(CavMaeInputError, match="streams"):
        model(audio.nan_to_num(), streams=("audio", "sideways"))
    with pytest.raises(CavMaeInputError, match="pixel_values"):
        model(audio.nan_to_num(), streams=("visual",))


def test_only_the_streams_asked_for_are_computed(tiny_config):
    model = CavMaeModel(tiny_config).eval()
    audio, images = make_inputs(tiny_config, 2)
    visual_calls = []
    model.visual_layers[0].register_forward_hook(lambda *args: visual_calls.append(1))
    with torch.no_grad():
        audio_only = model(audio, images, streams=("audio",))
        assert not visual_calls and audio_only.visual_embeds is None and audio_only.last_hidden_state is None
        both = model(audio, images)
    torch.testing.assert_close(audio_only.audio_embeds, both.audio_embeds)


# Classification ---------------------------------------------------------------------------------------------------
def test_classifier_loss_follows_problem_type():
    config = CavMaeConfig(**tiny_config_kwargs(num_labels=5, problem_type="multi_label_classification"))
    model = CavMaeForAudioVisualClassification(config).eval()
    audio, images = make_inputs(config, 2)
    labels = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    out = model(audio, images, labels=labels)
    assert out.logits.shape == (2, 5)
    assert torch.allclose(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels))
    model.config.problem_type = "single_label_classification"
    out = model(audio, images, labels=torch.tensor([1, 3]))
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 3])))


@pytest.mark.parametrize("problem_type", ["single_label_classification", "multi_label_classification"])
def test_frame_axis_averages_per_frame_probabilities(problem_type):
    config = CavMaeConfig(**tiny_config_kwargs(num_labels=4, problem_type=problem_type))
    model = CavMaeForAudioVisualClassification(config).eval()
    audio, frames = make_inputs(config, 2, frames=3)
    with torch.no_grad():
        out = model(audio, frames)
        per_frame = torch.stack([model(audio, frames[:, f]).logits for f in range(3)], dim=1)
    assert torch.allclose(out.frame_logits, per_frame, atol=1e-5)
    activation = torch.sigmoid if problem_type.startswith("multi") else lambda x: torch.softmax(x, -1)
    assert torch.allclose(activation(out.logits), activation(per_frame).mean(1), atol=1e-5)


def test_classification_mode_requires_its_modality(tiny_config):
    tiny_config.classification_mode = "visual"
    model = CavMaeForAudioVisualClassification(tiny_config)
    with pytest.raises(CavMaeInputError, match="visual"):
        model(input_features=torch.zeros(1, 64, 32))
