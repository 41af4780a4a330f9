"""save_pretrained / from_pretrained, Auto classes, trust_remote_code loading, and the real-size model."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel


def test_save_and_reload_round_trip(tmp_path, tiny_config):
    model = CavMaeForPreTraining(tiny_config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = CavMaeForPreTraining.from_pretrained(tmp_path).eval()
    for (name, original), (_, loaded) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(original, loaded), name
    assert not reloaded.cav_mae.embeddings.audio_position_embeddings.requires_grad
    audio = torch.randn(2, tiny_config.audio_length, tiny_config.num_mel_bins)
    images = torch.randn(2, 3, tiny_config.image_size, tiny_config.image_size)
    noise = (torch.rand(2, tiny_config.num_audio_patches), torch.rand(2, tiny_config.num_visual_patches))
    with torch.no_grad():
        assert torch.equal(model(audio, images, *noise).loss, reloaded(audio, images, *noise).loss)


def test_encoder_loads_from_a_pretraining_checkpoint(tmp_path, tiny_config):
    pretraining = CavMaeForPreTraining(tiny_config)
    pretraining.save_pretrained(tmp_path)
    encoder = CavMaeModel.from_pretrained(tmp_path)
    assert torch.equal(encoder.shared_layers[0].attention.qkv.weight, pretraining.cav_mae.shared_layers[0].attention.qkv.weight)
    classifier = CavMaeForAudioVisualClassification.from_pretrained(tmp_path, num_labels=3)
    assert torch.equal(classifier.cav_mae.audio_layers[1].mlp.fc1.weight, pretraining.cav_mae.audio_layers[1].mlp.fc1.weight)
    assert classifier.classifier.dense.out_features == 3


def test_auto_classes_resolve_after_import(tmp_path, tiny_config):
    CavMaeForPreTraining(tiny_config).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CavMaeConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), CavMaeModel)
    assert isinstance(AutoModelForPreTraining.from_pretrained(tmp_path), CavMaeForPreTraining)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "cav_mae"
    assert saved["auto_map"]["AutoModel"].endswith("CavMaeModel")


def test_trust_remote_code_loading_without_the_package(tmp_path, tiny_config):
    model = CavMaeModel(tiny_config).eval()
    model.save_pretrained(tmp_path)
    audio = torch.randn(1, tiny_config.audio_length, tiny_config.num_mel_bins)
    torch.save(audio, tmp_path / "audio.pt")
    with torch.no_grad():
        expected = model.get_audio_features(audio).pooler_output
    script = f"""
import sys, torch
sys.modules["cavmae_hf"] = None  # the package must not be importable in this process
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    features = model.get_audio_features(torch.load({str(tmp_path / 'audio.pt')!r})).pooler_output
torch.save(features, {str(tmp_path / 'features.pt')!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "features.pt"), expected, atol=1e-6)


def test_classifier_round_trip_keeps_labels(tmp_path):
    config = CavMaeConfig(**tiny_config_kwargs(num_labels=3, id2label={0: "dog", 1: "cat", 2: "car"}))
    CavMaeForAudioVisualClassification(config).save_pretrained(tmp_path)
    reloaded = CavMaeForAudioVisualClassification.from_pretrained(tmp_path)
    assert reloaded.config.id2label == {0: "dog", 1: "cat", 2: "car"}
    assert reloaded.cav_mae.embeddings.audio_position_embeddings.requires_grad is False


@pytest.mark.slow
def test_full_size_model_builds_saves_and_reloads(tmp_path):
    model = CavMaeForPreTraining(CavMaeConfig()).eval()
    parameters = sum(p.numel() for p in model.parameters())
    assert 185e6 < parameters < 195e6, parameters
    encoder_parameters = sum(p.numel() for p in model.cav_mae.parameters())
    model.save_pretrained(tmp_path)
    reloaded = CavMaeForPreTraining.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.cav_mae.parameters()) == encoder_parameters
    audio, images = torch.randn(1, 1024, 128), torch.randn(1, 3, 224, 224)
    noise = (torch.rand(1, 512), torch.rand(1, 196))
    with torch.no_grad():
        expected, actual = model(audio, images, *noise), reloaded(audio, images, *noise)
    assert actual.audio_logits.shape == (1, 512, 256) and actual.visual_logits.shape == (1, 196, 768)
    assert torch.equal(expected.loss, actual.loss)
