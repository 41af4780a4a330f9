"""
Transformers' own common tests (ModelTesterMixin, ConfigTester, FeatureExtractionSavingTestMixin of the installed
transformers version) on CAV-MAE, as an in-tree model's tests/models/<model>/test_modeling_*.py runs them (patterned
on tests/models/vit_mae and tests/models/clap). See `transformers_test_suite.py` for where the files come from.

As ViTMAE's tests, the sequence length the testers declare is what each class's encoder sees: all audio and visual
tokens for `CavMaeModel` and the classifier, the kept 25 % for `CavMaeForPreTraining` (which masks). So the two kinds
have a tester each (as CLAP has one per tower). As Hiera's, the pretraining model gets fixed `audio_noise` /
`visual_noise`, so determinism, batching and output-equivalence tests compare like with like instead of being skipped.
"""

import copy
import unittest

import numpy as np
import torch
from torch import nn
from transformers_test_suite import ensure_on_path

import cavmae_hf  # noqa: F401  (registers the Auto classes)
from cavmae_hf import (
    CavMaeConfig,
    CavMaeFeatureExtractor,
    CavMaeForAudioVisualClassification,
    CavMaeForPreTraining,
    CavMaeModel,
)

ensure_on_path()

from tests.test_configuration_common import ConfigTester  # noqa: E402
from tests.test_feature_extraction_common import FeatureExtractionSavingTestMixin  # noqa: E402
from tests.test_modeling_common import ModelTesterMixin, floats_tensor  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402
from transformers.testing_utils import torch_device  # noqa: E402

# The common tests know a model's role (base model, pretraining head, audio classifier) from these name tables, which
# in-tree models fill; cavmae_hf registers the same classes with the Auto classes at import.
modeling_auto.MODEL_MAPPING_NAMES.setdefault("cav_mae", "CavMaeModel")
modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES.setdefault("cav_mae", "CavMaeForPreTraining")
modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES.setdefault("cav_mae", "CavMaeForAudioVisualClassification")


class CavMaeModelTester:
    def __init__(self, parent, masked: bool = False, batch_size: int = 3):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = True
        self.hidden_size = 32
        self.num_attention_heads = 4
        self.num_modality_specific_layers = 1
        self.num_shared_layers = 1
        # what CavMaeConfig.num_hidden_layers reports: the depth of each stream's path through the encoder
        self.num_hidden_layers = 2
        self.patch_size = 8
        self.audio_length, self.num_mel_bins, self.image_size, self.num_channels = 32, 16, 16, 3
        self.num_labels = 3
        self.num_audio_patches = (self.num_mel_bins // 8) * (self.audio_length // 8)  # 8
        self.num_visual_patches = (self.image_size // 8) ** 2  # 4
        # the joint stream the outputs describe: audio then visual tokens, the kept ones (int(N * 0.25)) when masked
        if masked:
            self.seq_length = int(self.num_audio_patches * 0.25) + int(self.num_visual_patches * 0.25)
        else:
            self.seq_length = self.num_audio_patches + self.num_visual_patches

    def get_config(self):
        return CavMaeConfig(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            num_modality_specific_layers=self.num_modality_specific_layers,
            num_shared_layers=self.num_shared_layers,
            patch_size=self.patch_size,
            image_size=self.image_size,
            num_channels=self.num_channels,
            num_mel_bins=self.num_mel_bins,
            audio_length=self.audio_length,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=24,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs_for_common(self):
        input_features = floats_tensor([self.batch_size, self.audio_length, self.num_mel_bins])
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"input_features": input_features, "pixel_values": pixel_values}

    def fixed_noise(self, batch_size):
        generator = torch.Generator().manual_seed(42)
        audio_noise = torch.rand(batch_size, self.num_audio_patches, generator=generator)
        visual_noise = torch.rand(batch_size, self.num_visual_patches, generator=generator)
        return audio_noise.to(torch_device), visual_noise.to(torch_device)


class _CavMaeCommonTests(ModelTesterMixin):
    test_resize_embeddings = False  # no token embeddings (as ViTMAE / CLAP audio)
    # the SDPA/eager equivalence test feeds `main_input_name` (input_features) plus these
    additional_model_inputs = ["pixel_values"]
    test_torch_exportable = True
    # the suite dates a model by a "# Copyright YYYY" line atop its configuration file; CAV-MAE's port is new
    test_can_init_all_missing_weights_before_2023 = True
    masked = False

    def setUp(self):
        self.model_tester = CavMaeModelTester(self, masked=self.masked)
        # ViTMAE passes hidden_size=37; CAV-MAE needs hidden_size % num_attention_heads == 0 and % 4 == 0
        self.config_tester = ConfigTester(
            self, config_class=CavMaeConfig, has_text_modality=False, hidden_size=36, num_attention_heads=4
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if model_class is CavMaeForPreTraining:
            batch_size = inputs_dict["input_features"].shape[0]
            inputs_dict["audio_noise"], inputs_dict["visual_noise"] = self.model_tester.fixed_noise(batch_size)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="CAV-MAE does not use inputs_embeds (as ViTMAE / CLAP audio)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="CAV-MAE does not use input_ids / inputs_embeds (as ViTMAE / CLAP audio)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(
        reason="The joint stream's hidden states and attention weights before the shared layers are assembled from "
        "the two modality stacks for reporting (the modality-specific layers never see a joint sequence), so the "
        "first ones are not on the autograd path; test_modality_stream_hidden_states_retain_grad (on CavMaeModel) checks a stream "
        "whose every entry is."
    )
    def test_retain_grad_hidden_states_attentions(self):
        pass

    def test_model_get_set_embeddings(self):
        # as ViTMAE: the input embeddings are a patch projection, not an nn.Embedding
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))

    def test_torch_export_static(self):
        # the core of upstream's ExportTesterMixin.test_torch_export (not in the sdist, and @slow there)
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
                inputs = self._prepare_for_class(inputs_dict, model_class)
                model = model_class(config).eval().to(torch_device)
                with torch.no_grad():
                    eager = model(**copy.deepcopy(inputs))
                    exported = torch.export.export(model, args=(), kwargs=copy.deepcopy(inputs), strict=False)
                    result = exported.module()(**copy.deepcopy(inputs))
                for name, value in eager.items():
                    if isinstance(value, torch.Tensor):
                        torch.testing.assert_close(result[name], value, atol=1e-4, rtol=1e-4)


class CavMaeModelTest(_CavMaeCommonTests, unittest.TestCase):
    """The encoder and the classifier, which see every token."""

    all_model_classes = (CavMaeModel, CavMaeForAudioVisualClassification)

    def test_modality_stream_hidden_states_retain_grad(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = CavMaeModel._from_config(config, attn_implementation="eager").to(torch_device)
        outputs = model.get_audio_features(inputs_dict["input_features"], output_hidden_states=True, output_attentions=True)
        hidden_states, attentions = outputs.hidden_states[0], outputs.attentions[0]
        hidden_states.retain_grad()
        attentions.retain_grad()
        outputs.last_hidden_state.flatten()[0].backward()
        self.assertIsNotNone(hidden_states.grad)
        self.assertIsNotNone(attentions.grad)


class CavMaeForPreTrainingTest(_CavMaeCommonTests, unittest.TestCase):
    """The pretraining model, whose encoder sees the kept 25 % of the tokens (as ViTMAE's tests declare)."""

    all_model_classes = (CavMaeForPreTraining,)
    masked = True


class CavMaeFeatureExtractionTest(FeatureExtractionSavingTestMixin, unittest.TestCase):
    """
    The common feature-extractor tests. CavMaeFeatureExtractor is a FeatureExtractionMixin (audio and frames), not a
    SequenceFeatureExtractor, so SequenceFeatureExtractionTestMixin (padding, truncation) does not apply.
    """

    feature_extraction_class = CavMaeFeatureExtractor

    @property
    def feat_extract_dict(self):
        return {
            "sampling_rate": 16000,
            "num_mel_bins": 16,
            "max_length": 32,
            "audio_mean": -4.0,
            "audio_std": 3.0,
            "do_normalize": True,
            "image_size": 16,
        }

    def test_call_audio_and_images(self):
        extractor = self.feature_extraction_class(**self.feat_extract_dict)
        rng = np.random.default_rng(0)
        audio = [rng.standard_normal(8000).astype(np.float32) for _ in range(3)]
        images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
        out = extractor(audio=audio, images=images, sampling_rate=16000, return_tensors="pt")
        self.assertEqual(tuple(out["input_features"].shape), (3, 32, 16))
        self.assertEqual(tuple(out["pixel_values"].shape), (3, 3, 16, 16))
