"""
CAV-MAE through Transformers' own doors, as a user who knows Transformers takes them: output flags on every class,
`get_*_features` in the v5 form, training without unused parameters, `Trainer` predictions, quiet loading of a
pretraining checkpoint into the encoder, `AutoFeatureExtractor` on saved directories, remote-code pipelines,
raw waveforms and PIL images in the pipelines, `problem_type` and `dummy_inputs`.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image
from transformers import AutoFeatureExtractor, AutoModel, Trainer, TrainingArguments, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging as hf_logging

from cavmae_hf import (
    CavMaeConfig,
    CavMaeFeatureExtractor,
    CavMaeForAudioVisualClassification,
    CavMaeForPreTraining,
    CavMaeModel,
)


def make_inputs(config, batch_size=2, num_frames=None):
    audio = torch.randn(batch_size, config.audio_length, config.num_mel_bins)
    frame_axis = () if num_frames is None else (num_frames,)
    images = torch.randn(batch_size, *frame_axis, config.num_channels, config.image_size, config.image_size)
    return audio, images


def classifier_config(**overrides):
    return CavMaeConfig(**tiny_config_kwargs(num_labels=3, **overrides))


# 1. output_hidden_states / output_attentions on every class -----------------------------------------------------
@pytest.mark.parametrize("model_class", [CavMaeModel, CavMaeForPreTraining, CavMaeForAudioVisualClassification])
def test_every_class_returns_hidden_states_and_attentions(model_class):
    config = classifier_config()
    model = model_class(config).eval()
    audio, images = make_inputs(config)
    with torch.no_grad():
        out = model(input_features=audio, pixel_values=images, output_hidden_states=True, output_attentions=True)
        plain = model(input_features=audio, pixel_values=images)
        as_tuple = model(input_features=audio, pixel_values=images, output_hidden_states=True, return_dict=False)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[-1].shape[:2] == (2, config.num_attention_heads)
    assert plain.hidden_states is None and plain.attentions is None
    assert isinstance(as_tuple, tuple) and any(isinstance(item, tuple) for item in as_tuple)


def test_classifier_hidden_states_carry_the_frame_axis():
    config = classifier_config()
    model = CavMaeForAudioVisualClassification(config).eval()
    audio, frames = make_inputs(config, num_frames=3)
    with torch.no_grad():
        out = model(input_features=audio, pixel_values=frames, output_hidden_states=True)
    tokens = config.num_audio_patches + config.num_visual_patches
    assert out.hidden_states[-1].shape == (2, 3, tokens, config.hidden_size)


# 2. get_*_features in Transformers v5's form ----------------------------------------------------------------------
def test_get_features_return_base_model_output_with_pooling():
    config = classifier_config()
    model = CavMaeModel(config).eval()
    audio, images = make_inputs(config)
    with torch.no_grad():
        audio_out = model.get_audio_features(audio, output_attentions=True)
        image_out = model.get_image_features(images)
        both = model(audio, images)
    assert isinstance(audio_out, BaseModelOutputWithPooling) and isinstance(image_out, BaseModelOutputWithPooling)
    torch.testing.assert_close(audio_out.pooler_output, both.audio_embeds)
    torch.testing.assert_close(image_out.last_hidden_state, both.visual_last_hidden_state)
    assert len(audio_out.attentions) == config.num_hidden_layers


# 3. no unused parameters in training --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["multimodal", "audio", "visual"])
def test_every_trainable_parameter_of_the_classifier_gets_a_gradient(mode):
    model = CavMaeForAudioVisualClassification(classifier_config(classification_mode=mode)).train()
    audio, images = make_inputs(model.config)
    model(input_features=audio, pixel_values=images, labels=torch.tensor([0, 2])).loss.backward()
    without = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == model.frozen_parameter_names()


def test_multimodal_classifier_keeps_missing_modality_weights_and_uses_them():
    model = CavMaeForAudioVisualClassification(classifier_config()).eval()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "cav_mae.final_layernorm.audio.weight" in frozen
    assert "cav_mae.shared_layers.0.layernorm_before.visual.bias" in frozen
    assert "cav_mae.final_layernorm.joint.weight" not in frozen
    assert "cav_mae.audio_layers.0.layernorm_before.audio.weight" not in frozen
    audio, _ = make_inputs(model.config)
    with torch.no_grad():
        before = model(input_features=audio).logits
        model.cav_mae.final_layernorm["audio"].weight.mul_(2)  # the audio stream's norm serves audio-only input
        after = model(input_features=audio).logits
    assert not torch.allclose(before, after)


# 4. Trainer predictions are the logits ------------------------------------------------------------------------
class _Clips(torch.utils.data.Dataset):
    def __init__(self, config, num_frames=None, size=6):
        generator = torch.Generator().manual_seed(0)
        self.audio = torch.randn(size, config.audio_length, config.num_mel_bins, generator=generator)
        frame_axis = () if num_frames is None else (num_frames,)
        shape = (size, *frame_axis, config.num_channels, config.image_size, config.image_size)
        self.images = torch.randn(*shape, generator=generator)
        self.labels = torch.arange(size) % config.num_labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"input_features": self.audio[index], "pixel_values": self.images[index], "labels": self.labels[index]}


@pytest.mark.parametrize("num_frames", [None, 3], ids=["one frame", "three frames"])
def test_trainer_compute_metrics_gets_plain_logits(tmp_path, num_frames):
    model = CavMaeForAudioVisualClassification(classifier_config())
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = np.asarray(prediction.predictions).shape
        return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}

    args = TrainingArguments(tmp_path, per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=_Clips(model.config, num_frames), compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert seen["shape"] == (6, 3) and 0.0 <= metrics["eval_accuracy"] <= 1.0


# 5. a pretraining checkpoint loads quietly into the encoder -----------------------------------------------------
def test_pretraining_checkpoint_loads_into_the_encoder_without_a_report(tmp_path, capsys):
    CavMaeForPreTraining(CavMaeConfig(**tiny_config_kwargs())).save_pretrained(tmp_path)
    capsys.readouterr()
    hf_logging.enable_default_handler()
    for load in (CavMaeModel.from_pretrained, AutoModel.from_pretrained):
        model, info = load(tmp_path, output_loading_info=True)
        assert isinstance(model, CavMaeModel) and not info["missing_keys"] and not info["mismatched_keys"]
    pipeline("audio-visual-feature-extraction", model=str(tmp_path))
    captured = capsys.readouterr()
    assert "UNEXPECTED" not in captured.err + captured.out and "decoder" not in captured.err


# 8. a feature extractor for every saved directory ----------------------------------------------------------------
def test_auto_feature_extractor_opens_a_saved_model_directory(tmp_path):
    config = CavMaeConfig(**tiny_config_kwargs())
    CavMaeModel(config).save_pretrained(tmp_path)
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert isinstance(extractor, CavMaeFeatureExtractor)
    assert (extractor.max_length, extractor.num_mel_bins, extractor.image_size) == (64, 32, 32)
    assert extractor.to_dict() == CavMaeFeatureExtractor.from_model_config(config).to_dict() | {
        "auto_map": extractor.to_dict()["auto_map"]
    }


def test_a_saved_feature_extractor_is_not_overwritten(tmp_path):
    config = CavMaeConfig(**tiny_config_kwargs())
    CavMaeFeatureExtractor.from_model_config(config, audio_mean=-4.0).save_pretrained(tmp_path)
    CavMaeModel(config).save_pretrained(tmp_path)
    assert AutoFeatureExtractor.from_pretrained(tmp_path).audio_mean == -4.0


# 9. pipelines as remote code, where cavmae-hf is not installed -------------------------------------------------
def test_pipelines_with_trust_remote_code_without_the_package(tmp_path):
    config = classifier_config()
    CavMaeForAudioVisualClassification(config).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        sys.modules["cavmae_hf"] = None  # the package must not be importable in this process
        from transformers import pipeline
        wave = {{"audio": np.random.default_rng(0).standard_normal(16000).astype("float32") * 0.1, "sampling_rate": 16000}}
        classifier = pipeline("audio-visual-classification", model={str(tmp_path)!r}, trust_remote_code=True)
        assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
        assert len(classifier(wave, top_k=2)) == 2
        embedder = pipeline("audio-visual-feature-extraction", model={str(tmp_path)!r}, trust_remote_code=True)
        assert len(embedder(wave)["audio_embeds"]) == {config.hidden_size}
        try:
            pipeline("audio-visual-classification", model={str(tmp_path)!r})
        except ValueError as error:
            assert "trust_remote_code" in str(error)
        else:
            raise AssertionError("remote code ran without trust_remote_code")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_installed_package_needs_no_trust_remote_code(tmp_path):
    CavMaeForAudioVisualClassification(classifier_config()).save_pretrained(tmp_path)
    classifier = pipeline("audio-visual-classification", model=str(tmp_path))
    assert type(classifier).__module__ == "cavmae_hf.pipelines"


# 10. raw waveforms and PIL images ----------------------------------------------------------------------------
def test_pipelines_take_raw_waveforms_and_pil_images(tmp_path):
    config = classifier_config()
    CavMaeForAudioVisualClassification(config).save_pretrained(tmp_path)
    classifier = pipeline("audio-visual-classification", model=str(tmp_path))
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    from_array = classifier(wave, top_k=None)
    from_dict = classifier({"audio": wave, "sampling_rate": 16000}, top_k=None)
    assert from_array == from_dict
    assert classifier(torch.from_numpy(wave), top_k=None) == from_dict
    from_image = classifier(image, top_k=None)
    assert from_image == classifier({"frames": [image]}, top_k=None)
    assert len(classifier([wave, image])) == 2


# 11. problem_type and dummy_inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "labels,expected",
    [
        (torch.tensor([0, 2]), "single_label_classification"),
        (torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
    ],
)
def test_problem_type_is_set_from_the_labels(labels, expected):
    model = CavMaeForAudioVisualClassification(classifier_config())
    assert model.config.problem_type is None
    audio, images = make_inputs(model.config)
    model(input_features=audio, pixel_values=images, labels=labels)
    assert model.config.problem_type == expected


@pytest.mark.parametrize("model_class", [CavMaeModel, CavMaeForPreTraining, CavMaeForAudioVisualClassification])
def test_dummy_inputs_run_the_model(model_class):
    model = model_class(classifier_config()).eval()
    assert set(model.dummy_inputs) == {"input_features", "pixel_values"}
    with torch.no_grad():
        model(**model.dummy_inputs)
