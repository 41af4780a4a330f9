"""
Input validation at the public edges (issue 7): the feature extractor, the model forwards, the pipelines, the
command line, the checkpoint converter and retrieval indices. Every case asserts the specific error (a `ValueError`
subclass naming the problem) or, where the input is legitimate, the correct output. Every error class of the package
derives from `cavmae_hf.CavMaeError`.
"""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_cli, tiny_config_kwargs
from inference_helpers import clip_audio, clip_frames, save_tiny_classifier, write_clip
from safetensors.torch import load_file, save_file

from cavmae_hf import (
    CavMaeConfig,
    CavMaeFeatureExtractor,
    CavMaeForAudioVisualClassification,
    CavMaeForPreTraining,
    CavMaeModel,
    cli,
    media,
)
from cavmae_hf.configuration_cav_mae import CavMaeArgumentError, CavMaeConfigError
from cavmae_hf.convert_original_checkpoint import (
    CheckpointConversionError,
    convert_checkpoint,
)
from cavmae_hf.convert_original_checkpoint import main as convert_main
from cavmae_hf.feature_extraction_cav_mae import CavMaeFeatureExtractionError
from cavmae_hf.labels import LabelFileError, read_label_csv
from cavmae_hf.modeling_cav_mae import CavMaeInputError
from cavmae_hf.pipelines import (
    CLASSIFICATION_TASK,
    FEATURE_EXTRACTION_TASK,
    CheckpointLoadError,
    cav_mae_pipeline,
    load_clip,
    load_model,
)
from cavmae_hf.retrieval import INDEX_FORMAT, RetrievalError, RetrievalIndex

RATE = 16000
PRETRAIN = FIXTURES / "original" / "tiny_pretrain.pth"
FINETUNED = FIXTURES / "original" / "tiny_finetuned.pth"




# ----------------------------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------------------------
def noise(n: int, dtype=np.float32) -> np.ndarray:
    return (0.1 * np.random.default_rng(n).standard_normal(n)).astype(dtype)


@pytest.mark.parametrize(
    "audio,rate,message",
    [
        (np.zeros(16000, np.int8), RATE, "int8 is not PCM: use float, int16 or int32"),
        (np.zeros(16000, np.int64), RATE, "int64 is not PCM"),
        (np.zeros(16000, bool), RATE, "bool is not supported"),
        (np.zeros(16000, np.complex64), RATE, "complex64 is not supported"),
        (np.array(0.5), RATE, r"1-D \(one clip\) or 2-D"),
        ([noise(1000), None], RATE, "Audio must be a numpy array, a torch tensor or a list of numbers, got NoneType"),
        ([np.zeros((20, 16000), np.float32)], RATE, "at most 16 channels"),
        (noise(399), RATE, "has 399 samples, shorter than one 25 ms frame"),
        ([noise(16000), noise(10)], RATE, "Audio clip 1 has 10 samples"),
        (noise(16000), 8000, r"at 8000 Hz but this feature extractor expects 16000 Hz\. Resample it first"),
        (noise(16000), 48000, r"media\.resample\(audio, 48000, 16000\)"),
        (noise(16000), 0, "at 0 Hz"),
        (np.full(16000, np.inf, np.float32), RATE, "NaN or Inf"),
        (torch.full((16000,), float("nan")), RATE, "NaN or Inf"),
    ],
    ids=lambda value: None,
)
def test_feature_extractor_refuses_bad_audio_by_name(audio, rate, message):
    with pytest.raises(CavMaeFeatureExtractionError, match=message):
        CavMaeFeatureExtractor()(audio, sampling_rate=rate)


@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((0, 0, 3), np.uint8), "size 0x0 has no pixels"),
        (torch.zeros(1, 2, 3, 10, 10), "images must be an image, a list of images, or a list of lists of frames"),
        ([[]], "non-empty list of images"),
        ([], "images must be an image"),
        ("cat.jpg", "got str"),
        (np.full((10, 10, 3), np.nan), "NaN or Inf"),
        ([[np.zeros((8, 8, 3), np.uint8)] * 2, [np.zeros((8, 8, 3), np.uint8)]], "same number of frames"),
    ],
)
def test_feature_extractor_refuses_bad_images_by_name(images, message):
    with pytest.raises(CavMaeFeatureExtractionError, match=message):
        CavMaeFeatureExtractor(image_size=32)(images=images)


def test_feature_extractor_argument_errors():
    extractor = CavMaeFeatureExtractor(image_size=32)
    with pytest.raises(CavMaeFeatureExtractionError, match="Give `audio`, `images` or both"):
        extractor()
    with pytest.raises(CavMaeFeatureExtractionError, match="different batch sizes"):
        extractor(audio=noise(16000), images=[np.zeros((8, 8, 3), np.uint8)] * 2, sampling_rate=RATE)
    with pytest.raises(ValueError, match="return_tensors must be 'pt', 'np' or None"):
        extractor(audio=noise(16000), sampling_rate=RATE, return_tensors="tf")
    with pytest.raises(TypeError, match="unexpected arguments"):
        extractor(audio=noise(16000), sampling_rate=RATE, padding=True)


def test_feature_extractor_accepts_legitimate_edge_inputs():
    extractor = CavMaeFeatureExtractor(num_mel_bins=32, max_length=64, image_size=32)
    exact = extractor(noise(400), sampling_rate=RATE, return_tensors="pt", return_attention_mask=True)
    assert int(exact["attention_mask"].sum()) == 1 and torch.isfinite(exact["input_features"]).all()
    for audio in (
        np.full(16000, 0.7, np.float32),  # pure DC: removed, then the log floor
        np.full(16000, 1e-45, np.float32),  # denormals
        np.array([32767, -32768] * 8000, np.int16),  # full-scale int16
        np.array([2**31 - 1, -(2**31)] * 8000, np.int32),
        torch.randn(2, 32000)[:, ::2],  # a strided batch
        np.random.default_rng(0).standard_normal(16000).astype(np.float16),
    ):
        features = extractor(audio, sampling_rate=RATE, return_tensors="pt")["input_features"]
        assert torch.isfinite(features).all() and features.shape[1:] == (64, 32)
    for image in (np.zeros((1, 1, 3), np.uint8), np.zeros((1, 5000, 3), np.uint8), torch.rand(1, 9, 9)):
        assert extractor(images=image, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_feature_extractor_refuses_samples_that_overflow_the_fbank():
    audio = (np.random.default_rng(0).standard_normal(16000) * 1e30).astype(np.float32)
    with pytest.raises(CavMaeFeatureExtractionError, match=r"Audio clip 0 overflows the filter bank \(peak \d"):
        CavMaeFeatureExtractor()(audio, sampling_rate=RATE)


def test_feature_extractor_names_an_empty_2d_batch():
    with pytest.raises(CavMaeFeatureExtractionError, match="Empty audio batch"):
        CavMaeFeatureExtractor()(np.zeros((0, 16000), np.float32), sampling_rate=RATE)


def test_feature_extractor_names_unsupported_channel_counts():
    with pytest.raises(CavMaeFeatureExtractionError, match=r"shape \(10, 10, 5\) has no layout with 1, 2, 3 or 4"):
        CavMaeFeatureExtractor()(images=np.zeros((10, 10, 5), np.uint8))


def test_feature_extractor_takes_a_tensor_that_requires_grad():
    audio = torch.randn(16000, requires_grad=True)
    features = CavMaeFeatureExtractor()(audio, sampling_rate=RATE, return_tensors="pt")["input_features"]
    assert torch.isfinite(features).all() and not features.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# Model forwards: every class, every kind of misfit
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    config = CavMaeConfig(**tiny_config_kwargs())
    classifier_config = CavMaeConfig(**tiny_config_kwargs(num_labels=3))
    return {
        "model": CavMaeModel(config).eval(),
        "pretraining": CavMaeForPreTraining(config).eval(),
        "classifier": CavMaeForAudioVisualClassification(classifier_config).eval(),
    }


AUDIO, FRAMES = (1, 64, 32), (1, 3, 32, 32)
SHAPE = "must have shape"


def _randn(shape, **kwargs):
    return torch.randn(*shape, **kwargs)


MODEL_CASES = {
    "audio rank 2": (dict(input_features=_randn((64, 32))), SHAPE),
    "audio transposed": (dict(input_features=_randn((1, 32, 64))), SHAPE),
    "wrong number of mel bins": (dict(input_features=_randn((1, 64, 16))), r"num_mel_bins.*got \(1, 64, 16\)"),
    "wrong audio length": (dict(input_features=_randn((1, 128, 32))), r"audio_length.*got \(1, 128, 32\)"),
    "integer audio": (dict(input_features=torch.zeros(AUDIO, dtype=torch.long)), "floating-point tensor"),
    "numpy audio": (dict(input_features=np.zeros(AUDIO, np.float32)), "must be a torch.Tensor, got ndarray"),
    "NaN audio": (dict(input_features=torch.full(AUDIO, float("nan"))), "NaN or Inf"),
    "Inf frames": (dict(pixel_values=torch.full(FRAMES, float("inf"))), "NaN or Inf"),
    "frames rank 3": (dict(pixel_values=_randn((3, 32, 32))), SHAPE),
    "wrong image size": (dict(pixel_values=_randn((1, 3, 64, 64))), r"got \(1, 3, 64, 64\)"),
    "one-channel frames": (dict(pixel_values=_randn((1, 1, 32, 32))), SHAPE),
    "channels-last frames": (dict(pixel_values=_randn((1, 32, 32, 3))), SHAPE),
    "empty batch": (dict(input_features=_randn((0, 64, 32)), pixel_values=_randn((0, 3, 32, 32))), "Empty batch"),
    "batch sizes differ": (
        dict(input_features=_randn((2, 64, 32)), pixel_values=_randn((3, 3, 32, 32))),
        "different batch sizes: input_features 2, pixel_values 3",
    ),
}


def _complete(kwargs: dict, name: str) -> dict:
    """Pretraining needs both modalities: a good tensor for the one the case does not break."""
    if name != "pretraining":
        return kwargs
    filled = {"input_features": torch.randn(AUDIO), "pixel_values": torch.randn(FRAMES)}
    batch = next((v.shape[0] for v in kwargs.values() if hasattr(v, "shape") and len(v.shape) >= 3), 1)
    filled = {k: v.expand(batch, *v.shape[1:]).clone() for k, v in filled.items()}
    return {**filled, **kwargs}


@pytest.mark.parametrize("name", ["model", "pretraining", "classifier"])
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_every_model_class_names_the_misfit(models, name, case):
    kwargs, message = MODEL_CASES[case]
    with pytest.raises(CavMaeInputError, match=message), torch.no_grad():
        models[name](**_complete(kwargs, name))


def test_frame_axis_everywhere_but_pretraining(models):
    with pytest.raises(CavMaeInputError, match="Pretraining takes one frame per clip"):
        models["pretraining"](**_complete(dict(pixel_values=torch.randn(1, 2, 3, 32, 32)), "pretraining"))
    with torch.no_grad():
        encoded = models["model"](input_features=torch.randn(AUDIO), pixel_values=torch.randn(1, 2, 3, 32, 32))
    assert encoded.visual_embeds.shape == encoded.pooler_output.shape == (1, 2, 32)
    with torch.no_grad():
        out = models["classifier"](input_features=torch.randn(AUDIO), pixel_values=torch.randn(1, 2, 3, 32, 32))
    assert out.logits.shape == (1, 3) and torch.isfinite(out.logits).all()
    with pytest.raises(CavMaeInputError, match="different batch sizes"):
        models["classifier"](input_features=torch.randn(2, 64, 32), pixel_values=torch.randn(3, 2, 3, 32, 32))


def test_missing_modalities_and_bad_noise(models):
    with pytest.raises(CavMaeInputError, match="Give at least one of"):
        models["model"]()
    with pytest.raises(CavMaeInputError, match="Give at least one of"):
        models["classifier"]()
    with pytest.raises(CavMaeInputError, match="needs both `input_features` and `pixel_values`"):
        models["pretraining"](torch.randn(AUDIO), None)
    with pytest.raises(CavMaeInputError, match=r"`audio_noise` must have shape \(1, 32\)"):
        models["pretraining"](torch.randn(AUDIO), torch.randn(FRAMES), audio_noise=torch.rand(1, 3))
    with pytest.raises(TypeError, match="unexpected keyword argument 'pixels'"):
        models["model"](pixels=torch.randn(FRAMES))
    audio_only = CavMaeForAudioVisualClassification(
        CavMaeConfig(**tiny_config_kwargs(num_labels=3, classification_mode="audio"))
    )
    with pytest.raises(CavMaeInputError, match="classification_mode='audio' needs `input_features`"):
        audio_only(pixel_values=torch.randn(FRAMES))


def test_get_features_validate_too(models):
    with pytest.raises(CavMaeInputError, match=SHAPE):
        models["model"].get_audio_features(torch.randn(64, 32))
    with pytest.raises(CavMaeInputError, match="pixel_values"):
        models["model"].get_image_features(torch.randn(1, 2, 3, 31, 32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_inputs_of_another_float_dtype_are_cast(models, dtype):
    with torch.no_grad():
        out = models["model"](input_features=torch.randn(AUDIO, dtype=dtype), pixel_values=torch.randn(FRAMES))
    assert out.audio_embeds.dtype == torch.float32 and torch.isfinite(out.pooler_output).all()


def test_zero_frames_are_named(models):
    for kwargs in (
        dict(pixel_values=torch.randn(1, 0, 3, 32, 32)),
        dict(input_features=torch.randn(AUDIO), pixel_values=torch.randn(1, 0, 3, 32, 32)),
    ):
        with pytest.raises(CavMaeInputError, match=r"`pixel_values` has 0 frames \(shape \(1, 0, 3, 32, 32\)\)"):
            models["classifier"](**kwargs)


PATCHES = {"audio_noise": 32, "visual_noise": 16}  # tiny config: (64 / 8) x (32 / 8) audio, (32 / 8)^2 visual


@pytest.mark.parametrize("name", list(PATCHES))
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda n: torch.full((1, n), float("nan")), "contains NaN or Inf values"),
        (lambda n: torch.rand(1, n).index_fill_(1, torch.tensor([3]), float("inf")), "contains NaN or Inf values"),
        (lambda n: torch.rand(1, n).index_fill_(1, torch.tensor([0]), float("-inf")), "contains NaN or Inf values"),
        (lambda n: torch.rand(n), r"must have shape \(1, \d+\) \(batch, patches\), got \(\d+,\)"),
        (lambda n: torch.rand(2, n), r"must have shape \(1, \d+\) \(batch, patches\), got \(2, \d+\)"),
        (lambda n: torch.rand(1, n + 1), r"must have shape \(1, \d+\)"),
        (lambda n: np.random.rand(1, n), "must be a torch.Tensor of shape .* got ndarray"),
        (lambda n: torch.ones(1, n, dtype=torch.bool), "must hold real numbers .* got torch.bool"),
        (lambda n: torch.ones(1, n, dtype=torch.complex64), "must hold real numbers .* got torch.complex64"),
    ],
)
def test_pretraining_noise_is_checked(models, name, make, message):
    with pytest.raises(CavMaeInputError, match=f"`{name}` {message}"):
        models["pretraining"](torch.randn(AUDIO), torch.randn(FRAMES), **{name: make(PATCHES[name])})


def test_good_noise_fixes_the_mask_whatever_its_real_dtype(models):
    noise = {name: torch.rand(1, count) for name, count in PATCHES.items()}
    inputs = (torch.randn(AUDIO), torch.randn(FRAMES))
    with torch.no_grad():
        first = models["pretraining"](*inputs, **noise)
        again = models["pretraining"](*inputs, **{k: v.double() for k, v in noise.items()})
        ranks = models["pretraining"](*inputs, **{k: v.argsort().argsort() for k, v in noise.items()})  # int64
    assert torch.equal(first.audio_mask, again.audio_mask) and torch.equal(first.visual_mask, ranks.visual_mask)
    assert torch.allclose(first.loss, again.loss) and int(first.audio_mask.sum()) == 24  # 75 % of 32 masked


# ----------------------------------------------------------------------------------------------------------------
# Classification labels
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled():
    """A classifier (3 labels) and a batch of two clips."""
    torch.manual_seed(1)
    model = CavMaeForAudioVisualClassification(CavMaeConfig(**tiny_config_kwargs(num_labels=3))).eval()
    return model, dict(input_features=torch.randn(2, 64, 32), pixel_values=torch.randn(2, 3, 32, 32))


SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
LABEL_CASES = [
    (SINGLE, torch.tensor([0, 3]), r"class indices in \[0, 2\] \(or -100 to ignore a clip\); got \[3\]"),
    (SINGLE, torch.tensor([-1, 1]), r"got \[-1\]. num_labels is 3"),
    (SINGLE, torch.tensor([0, 1, 2]), r"`labels` has shape \(3,\) but the batch holds 2 clip"),
    (SINGLE, torch.tensor([1]), r"has shape \(1,\) but the batch holds 2"),
    (SINGLE, torch.tensor(1), r"has shape \(\) but the batch holds 2"),
    (SINGLE, torch.tensor([[0, 1, 1], [1, 0, 0]]), r"problem_type = 'multi_label_classification'"),
    (SINGLE, torch.tensor([0.0, float("nan")]), "`labels` contains NaN or Inf"),
    (SINGLE, torch.tensor([0.5, 1.0]), "whole class indices, got fractional values"),
    (SINGLE, torch.tensor([True, False]), "class indices \\(integers\\), got bool"),
    (SINGLE, torch.tensor([[0.2, 0.9, 0.1], [0.1, 0.1, 0.8]]) * 2, r"Soft-target `labels` must lie in \[0, 1\]"),
    (SINGLE, torch.full((2, 4), 0.25), r"Soft-target `labels` must have shape \(2, 3\)"),
    (SINGLE, [0, 1], "`labels` must be a torch.Tensor, got list"),
    (MULTI, torch.ones(2, 4), r"Multi-label `labels` must have shape \(2, 3\) \(batch, num_labels\), got \(2, 4\)"),
    (MULTI, torch.ones(3, 3), r"has shape \(3, 3\) but the batch holds 2"),
    (MULTI, torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 1.0]]), "contains NaN or Inf"),
    (MULTI, torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]), r"must lie in \[0, 1\], got values from 0 to 2"),
    (MULTI, torch.tensor([1, 2]), r"Multi-label `labels` must have shape \(2, 3\)"),
    (REGRESSION, torch.ones(2), r"Regression `labels` must have shape \(2, 3\) \(batch, num_labels\), got \(2,\)"),
    (REGRESSION, torch.tensor([[1.0, float("inf"), 0.0]] * 2), "contains NaN or Inf"),
]


@pytest.mark.parametrize("problem_type,labels,message", LABEL_CASES)
def test_bad_labels_are_named(labelled, problem_type, labels, message):
    model, inputs = labelled
    model.config.problem_type = problem_type
    try:
        with pytest.raises(CavMaeInputError, match=message), torch.no_grad():
            model(**inputs, labels=labels)
    finally:
        model.config.problem_type = None


def test_legitimate_labels_give_the_expected_loss(labelled):
    model, inputs = labelled
    functional = torch.nn.functional
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            model.config.problem_type = SINGLE
            for labels in (torch.tensor([2, 0]), torch.tensor([[2], [0]]), torch.tensor([2.0, 0.0])):
                expected = functional.cross_entropy(logits, torch.tensor([2, 0]))
                assert torch.allclose(model(**inputs, labels=labels).loss, expected)
            ignored = model(**inputs, labels=torch.tensor([-100, 1])).loss  # cross_entropy's ignore_index
            assert torch.allclose(ignored, functional.cross_entropy(logits[1:], torch.tensor([1])))
            soft = torch.tensor([[0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
            assert torch.allclose(model(**inputs, labels=soft).loss, functional.cross_entropy(logits, soft))
            model.config.problem_type = MULTI
            multi_hot = torch.tensor([[1, 0, 1], [0, 0, 0]])
            expected = functional.binary_cross_entropy_with_logits(logits, multi_hot.float())
            assert torch.allclose(model(**inputs, labels=multi_hot).loss, expected)
            model.config.problem_type = REGRESSION
            values = torch.randn(2, 3)
            assert torch.allclose(model(**inputs, labels=values).loss, functional.mse_loss(logits, values))
    finally:
        model.config.problem_type = None


def test_one_output_regression_takes_a_vector_of_targets():
    model = CavMaeForAudioVisualClassification(CavMaeConfig(**tiny_config_kwargs(num_labels=1))).eval()
    inputs = dict(input_features=torch.randn(2, 64, 32))
    with torch.no_grad():
        logits = model(**inputs).logits
        targets = torch.tensor([0.5, -1.0])
        expected = torch.nn.functional.mse_loss(logits[:, 0], targets)
        for labels in (targets, targets[:, None]):
            assert torch.allclose(model(**inputs, labels=labels).loss, expected)
        with pytest.raises(CavMaeInputError, match=r"Regression `labels` must have shape \(2, 1\) .* or \(2,\)"):
            model(**inputs, labels=torch.ones(2, 2))


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    save_tiny_classifier(folder / "classifier")
    write_clip(folder / "clip.mp4", seed=3)
    return folder


@pytest.fixture(scope="module")
def classifier(workspace):
    return cav_mae_pipeline(CLASSIFICATION_TASK, workspace / "classifier")


def variant(workspace, tmp_path, edit) -> str:
    """A copy of the tiny classifier directory changed by `edit(folder)`."""
    folder = tmp_path / "variant"
    shutil.copytree(workspace / "classifier", folder)
    edit(folder)
    return folder


AUDIO_DICT = {"audio": clip_audio(0), "sampling_rate": RATE}


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"sampling_rate": RATE}, "neither 'audio' nor 'frames'"),
        ({"frames": []}, "neither 'audio' nor 'frames'"),
        ({"audio": clip_audio(0)}, "no 'sampling_rate'"),
        ({**AUDIO_DICT, "sampling_rate": "16k"}, "'sampling_rate' must be a positive whole number of Hz, got '16k'"),
        ({**AUDIO_DICT, "sampling_rate": 0}, "positive whole number of Hz, got 0"),
        ({**AUDIO_DICT, "sampling_rate": 16000.5}, "got 16000.5"),
        ({**AUDIO_DICT, "sampling_rate": True}, "got True"),
        ({"audio": "speech.wav", "sampling_rate": RATE}, "'audio' must be a waveform .* got str"),
        ({"audio": ["a", "b"], "sampling_rate": RATE}, "'audio' must be an array of numbers"),
        ({"audio": np.zeros((1, 2, 16000)), "sampling_rate": RATE}, r"\[samples\], \[channels, samples\]"),
        ({"audio": np.zeros(16000, np.int64), "sampling_rate": 48000}, "int64 is not PCM"),
        ({"frames": ["a.png", "b.png"]}, "'frames' must hold images .* got str"),
        ({**AUDIO_DICT, "video": "x.mp4"}, r"Unknown keys \['video'\]"),
        (b"\x00\x00", "Expected a file path, a waveform array, a PIL image, a dict .* got bytes"),
        (None, "got NoneType"),
        (12, "got int"),
    ],
)
def test_pipeline_input_errors(classifier, inputs, message):
    with pytest.raises(CavMaeInputError, match=message):
        classifier(inputs)


def test_pipeline_feature_extractor_errors_pass_through(classifier):
    with pytest.raises(CavMaeFeatureExtractionError, match="NaN or Inf"):
        classifier({"audio": np.full(16000, np.nan, np.float32), "sampling_rate": RATE})
    with pytest.raises(CavMaeFeatureExtractionError, match="Audio clip 0 is empty"):
        classifier({"audio": np.zeros(0, np.float32), "sampling_rate": 48000})
    with pytest.raises(CavMaeFeatureExtractionError, match="Image contains NaN"):
        classifier({"frames": [np.full((8, 8, 3), np.nan)]})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_frames=0), "num_frames must be a whole number of at least 1, got 0"),
        (dict(num_frames=2.5), "got 2.5"),
        (dict(num_frames="3"), "got '3'"),
        (dict(top_k=0), "top_k must be a whole number of at least 1"),
        (dict(top_k=1.5), "got 1.5"),
        (dict(function_to_apply="relu"), "function_to_apply must be 'softmax', 'sigmoid' or 'none'"),
    ],
)
def test_pipeline_parameter_errors(classifier, workspace, kwargs, message):
    with pytest.raises(CavMaeInputError, match=message):
        classifier(str(workspace / "clip.mp4"), **kwargs)


def test_pipeline_collections(classifier, workspace):
    assert classifier([]) == [] and classifier(()) == []
    with pytest.raises(TypeError, match="Unexpected pipeline arguments") as raised:
        classifier([], topk=3)
    assert isinstance(raised.value, CavMaeArgumentError)
    path = str(workspace / "clip.mp4")
    assert classifier((path, AUDIO_DICT), top_k=2) == classifier([path, AUDIO_DICT], top_k=2)
    frames = list(clip_frames(1, count=3))
    stereo = {"audio": np.stack([clip_audio(0), clip_audio(1)]), "sampling_rate": RATE, "frames": frames}
    assert len(classifier(stereo, top_k=None)) == 5  # [2, N] is one stereo clip, not a batch of two


WEIGHT_DAMAGE = [
    (lambda d: (d / "model.safetensors").unlink(), r"has no weights \(model.safetensors not found\)"),
    (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        "model.safetensors is not a readable safetensors file: it is truncated or corrupt .*; download or save it again",
    ),
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 1000), "truncated or corrupt"),
    (
        lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 64')
        ),
        r"do not fit its config.json: \d+ tensor\(s\) differ, e.g. cav_mae",
    ),
    (
        lambda d: save_file({"conv1.weight": torch.zeros(2, 3)}, str(d / "model.safetensors")),
        "None of the 1 tensors .* belong to a CAV-MAE model",
    ),
]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})),
            "holds a model of type 'bert', not a CAV-MAE checkpoint",
        ),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        *WEIGHT_DAMAGE,
        (
            lambda d: (d / "preprocessor_config.json").write_text("{broken"),
            "preprocessor_config.json could not be read",
        ),
        (
            lambda d: (d / "preprocessor_config.json").write_text(
                json.dumps({"feature_extractor_type": "Wav2Vec2FeatureExtractor"})
            ),
            "describes a Wav2Vec2FeatureExtractor, not a CavMaeFeatureExtractor",
        ),
    ],
)
def test_damaged_model_directories(workspace, tmp_path, capsys, edit, message):
    folder = variant(workspace, tmp_path, edit)
    expected = CheckpointLoadError if "no config.json" not in message else (CheckpointLoadError, cli.UsageError)
    with pytest.raises(expected, match=message):
        cav_mae_pipeline(CLASSIFICATION_TASK, folder)
    code, _, err = run_cli(["classify", workspace / "clip.mp4", "--model", folder, "-q"], capsys)
    assert_one_line(code, err, message)


@pytest.mark.parametrize("task", [CLASSIFICATION_TASK, FEATURE_EXTRACTION_TASK])
@pytest.mark.parametrize("edit,message", WEIGHT_DAMAGE)
def test_transformers_pipeline_names_damaged_weights(workspace, tmp_path, task, edit, message):
    """Plain `transformers.pipeline(task, model=directory)` runs the package's checks too: a truncated
    model.safetensors is named with what to do (it was a bare SafetensorError naming no file). Transformers wraps
    the CheckpointLoadError in its own ValueError ("Could not load model ..."), whose message ends with ours."""
    from transformers import pipeline

    folder = variant(workspace, tmp_path, edit)
    with pytest.raises(ValueError) as raised:
        pipeline(task, model=str(folder))
    last_line = str(raised.value).strip().splitlines()[-1]
    assert last_line.startswith("cavmae_hf.pipelines.CheckpointLoadError: ") and str(folder) in last_line
    assert re.search(message, last_line), last_line


def test_feature_extractor_that_does_not_fit_the_model(workspace, tmp_path, capsys):
    def edit(folder, key, value):
        config = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "preprocessor_config.json").write_text(json.dumps({**config, key: value}))

    mel = variant(workspace, tmp_path / "a", lambda d: edit(d, "num_mel_bins", 64))
    with pytest.raises(CheckpointLoadError, match=r"does not fit the model: num_mel_bins=64 \(model: 32\)"):
        cav_mae_pipeline(CLASSIFICATION_TASK, mel)
    rate = variant(workspace, tmp_path / "b", lambda d: edit(d, "sampling_rate", -5))
    with pytest.raises(CheckpointLoadError, match="sampling_rate must be a positive integer, got -5"):
        cav_mae_pipeline(FEATURE_EXTRACTION_TASK, rate)
    code, _, err = run_cli(["classify", workspace / "clip.mp4", "--model", rate, "-q"], capsys)
    assert_one_line(code, err, "sampling_rate must be a positive integer")


def test_weights_holding_nan_are_caught_at_the_output(workspace, tmp_path):
    def poison(folder):
        weights = load_file(str(folder / "model.safetensors"))
        weights["classifier.dense.weight"][0, 0] = float("nan")
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    classifier = cav_mae_pipeline(CLASSIFICATION_TASK, variant(workspace, tmp_path, poison))
    with pytest.raises(CheckpointLoadError, match=r"produced NaN or Inf \(logits\) from finite inputs"):
        classifier(str(workspace / "clip.mp4"))


def test_load_model_checks_before_from_pretrained(workspace):
    model = load_model(workspace / "classifier")
    assert isinstance(model, CavMaeForAudioVisualClassification)
    encoder = load_model(workspace / "classifier", CavMaeModel)  # the encoder of a classifier checkpoint
    assert torch.equal(
        encoder.embeddings.audio_patch_embeddings.weight, model.cav_mae.embeddings.audio_patch_embeddings.weight
    )
    with pytest.raises(CheckpointLoadError, match="Model directory not found"):
        load_model(workspace / "nowhere")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def assert_one_line(code, err, message, expected_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "options,message",
    [
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--num-frames", "-2"], "--num-frames must be at least 1, got -2"),
        (["--top-k", "0"], "--top-k must be at least 1"),
    ],
)
def test_cli_option_errors(workspace, capsys, options, message):
    code, _, err = run_cli(["classify", workspace / "clip.mp4", "--model", workspace / "classifier", *options], capsys)
    assert_one_line(code, err, re.escape(message))


def test_cli_path_errors(workspace, tmp_path, capsys):
    model = workspace / "classifier"
    assert_one_line(*run_cli(["classify", workspace, "--model", model], capsys)[::2], "is a directory, not a media file")
    assert_one_line(
        *run_cli(["classify", workspace / "clip.mp4", "--model", workspace / "clip.mp4"], capsys)[::2],
        "is not a saved model directory",
    )
    for output, message in [
        (tmp_path, "is a directory; give the index a file name ending in .safetensors"),
        (tmp_path / "index.bin", r"An index is a safetensors file: name it \*.safetensors, not 'index.bin'"),
        (tmp_path / "missing" / "index.safetensors", "the directory .* does not exist"),
    ]:
        code, _, err = run_cli(["embed", workspace / "clip.mp4", "--model", model, "--output", output], capsys)
        assert_one_line(code, err, message)
    assert not list(tmp_path.iterdir())  # nothing written
    code, _, err = run_cli(
        ["reconstruct", workspace / "clip.mp4", "--model", model, "--dpi", 0, "--output", tmp_path / "x.png"], capsys
    )
    assert_one_line(code, err, "--dpi must be at least 1")


def test_cli_hub_model_that_cannot_be_loaded(workspace, capsys, monkeypatch):
    """Transformers' OSError for a Hub id (not found, offline, gated) is the user's input: one line, exit 2."""
    import transformers

    def unreachable(name, *args, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on the Hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    code, _, err = run_cli(["classify", workspace / "clip.mp4", "--model", "nobody/no-such-model"], capsys)
    assert_one_line(code, err, "'nobody/no-such-model' could not be loaded from the Hugging Face Hub: nobody/no-such")


def test_cli_output_in_a_missing_folder_is_refused_before_any_work(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_check_architecture", lambda *args: pytest.fail("the model was looked at"))
    for output, message in [
        (tmp_path / "missing" / "x.png", "the directory .*missing does not exist"),
        (tmp_path, "is a directory; give a file name"),
    ]:
        argv = ["reconstruct", workspace / "clip.mp4", "--model", workspace / "classifier", "--output", output]
        assert_one_line(*run_cli(argv, capsys)[::2], message)


def test_cli_debug_shows_the_traceback(workspace):
    with pytest.raises(media.MediaError, match="is a directory"):
        cli.main(["--debug", "classify", str(workspace), "--model", str(workspace / "classifier")])


# ----------------------------------------------------------------------------------------------------------------
# Converter
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original():
    return torch.load(PRETRAIN, weights_only=True)


def converted(tmp_path, state) -> tuple[int, str]:
    torch.save(state, tmp_path / "edited.pth")
    return convert_cli(tmp_path, tmp_path / "edited.pth")


def convert_cli(tmp_path, checkpoint, *extra):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        # the tiny checkpoints are 64 wide (32 in the decoder): no released width, so the head counts are given
        heads = ["--num-attention-heads", "4", "--decoder-num-attention-heads", "4"]
        arguments = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), *heads, *map(str, extra)]
        code = convert_main(arguments)
    return code, err.getvalue()


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("module.patch_embed_v.proj.weight", torch.zeros(8, 8), r"has shape \(8, 8\); .* a 4-D tensor there"),
        ("module.pos_embed_a", torch.zeros(500), r"`pos_embed_a` has shape \(500,\)"),
        ("module.pos_embed_v", torch.zeros(1, 150, 64), "150 visual patches, which is not a square grid"),
        ("module.blocks_a.0.attn.qkv.weight", torch.full((192, 64), float("nan")), "tensors holding NaN or Inf"),
        ("module.blocks_a.0.attn.qkv.weight", torch.zeros(192, 64, dtype=torch.long), "not floating point"),
        ("module.epoch", 3, "does not hold a flat state dict of tensors"),
    ],
)
def test_converter_refuses_damaged_state_dicts(tmp_path, original, key, value, message):
    code, err = converted(tmp_path, {**original, key: value})
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_converter_file_and_option_errors(tmp_path):
    code, err = convert_cli(tmp_path, tmp_path)
    assert code == 2 and "is a directory; --checkpoint takes the original .pth file" in err
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    assert "does not hold a flat state dict of tensors" in convert_cli(tmp_path, tmp_path / "list.pth")[1]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        options = ["--checkpoint", str(PRETRAIN), "--output", str(tmp_path / "o"), "--num-attention-heads", "0"]
        code = convert_main(options)
    assert code == 2 and "must be at least 1, got 0" in err.getvalue()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointConversionError, match="is a file; give a directory"):
        convert_checkpoint(PRETRAIN, tmp_path / "file", num_attention_heads=4, decoder_num_attention_heads=4)


def test_converter_accepts_legitimate_variants(tmp_path, original):
    wrapped = {"model": original, "optimizer": {"lr": 0.1}, "epoch": 3}  # a training checkpoint
    assert converted(tmp_path, wrapped)[0] == 0
    assert converted(tmp_path, {k: v.half() for k, v in original.items()})[0] == 0  # float16 weights
    torch.save(original, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert convert_cli(tmp_path, tmp_path / "legacy.pth")[0] == 0


@pytest.mark.parametrize(
    "content,message",
    [
        ("index,mid,display_name\n" + "".join(f"x{i},/m/{i},L{i}\n" for i in range(7)), "index 'x0' is not a whole"),
        ("index,mid,display_name\n" + "".join(f"{i if i != 2 else 9},/m/{i},L\n" for i in range(7)), r"missing \[2\]"),
        ("index,mid,display_name\n0,/m/0,a\n0,/m/1,b\n", "index 0 appears twice"),
        ("a,b\n1,2\n", "must be a CSV with columns index,mid,display_name"),
        (b"index,mid,display_name\n0,/m/0,caf\xe9\n", "is not UTF-8 text"),
    ],
)
def test_label_csv_errors(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LabelFileError, match=message):
        read_label_csv(path)
    with pytest.raises(LabelFileError, match="Label file not found"):
        read_label_csv(tmp_path / "none.csv")


def test_label_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffindex,mid,display_name\n0,/m/0,Speech\n1,/m/1,Music\n".encode())
    assert read_label_csv(path).id2label == {0: "Speech", 1: "Music"}


# ----------------------------------------------------------------------------------------------------------------
# Retrieval indices and queries
# ----------------------------------------------------------------------------------------------------------------
GOOD_HEADER = {"format": INDEX_FORMAT, "version": "1", "keys": json.dumps(["a", "b", "c"])}


@pytest.mark.parametrize(
    "tensors,header,message",
    [
        ({"audio_embeds": torch.randn(3, 4)}, {**GOOD_HEADER, "version": "9"}, "version '9' index"),
        ({"audio_embeds": torch.randn(3, 4)}, {**GOOD_HEADER, "keys": "[a,"}, "no valid list of clip keys"),
        ({"audio_embeds": torch.randn(3, 4)}, {k: v for k, v in GOOD_HEADER.items() if k != "keys"}, "clip keys"),
        ({"audio_embeds": torch.randn(3, 4)}, {**GOOD_HEADER, "keys": '["a"]'}, r"must be \[1, D\]"),
        ({"other": torch.randn(3, 4)}, GOOD_HEADER, "holds no audio_embeds or visual_embeds"),
        ({"audio_embeds": torch.full((3, 4), float("nan"))}, GOOD_HEADER, "contain NaN or Inf"),
        ({"audio_embeds": torch.ones(3, 4, dtype=torch.long)}, GOOD_HEADER, "must be a float tensor"),
        (
            {"audio_embeds": torch.randn(3, 4), "audio_present": torch.ones(5, dtype=torch.uint8)},
            GOOD_HEADER,
            r"presence flags must be \[3\]",
        ),
        (
            {"audio_embeds": torch.randn(3, 4), "visual_embeds": torch.randn(3, 6)},
            GOOD_HEADER,
            "different sizes",
        ),
    ],
)
def test_damaged_indices_are_named(tmp_path, tensors, header, message):
    path = tmp_path / "index.safetensors"
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(RetrievalError, match=message):
        RetrievalIndex.load(path)


def test_queries_and_index_paths(tmp_path):
    index = RetrievalIndex(["a", "b", "c"], {"audio": torch.randn(3, 4)})
    for queries, message in [
        (torch.full((4,), float("nan")), "Queries contain NaN or Inf"),
        (torch.randn(5), "Queries have dimension 5, the index 4"),
        (torch.randn(2, 2, 4), r"must be a float tensor \[Q, D\]"),
        (torch.ones(4, dtype=torch.long), "float tensor"),
    ]:
        with pytest.raises(RetrievalError, match=message):
            index.search(queries, "audio")
    for top_k in (0, 1.5, "2", True):
        with pytest.raises(RetrievalError, match="top_k must be a whole number"):
            index.search(torch.randn(4), "audio", top_k=top_k)
    with pytest.raises(RetrievalError, match="has no visual embeddings"):
        index.search(torch.randn(4), "visual")
    for path, message in [
        (tmp_path, "is a directory"),
        (tmp_path / "index.pt", "name it"),
        (tmp_path / "no" / "index.safetensors", "does not exist"),
    ]:
        with pytest.raises(RetrievalError, match=message):
            index.save(path)
    assert RetrievalIndex.load(index.save(tmp_path / "index.safetensors")).keys == ["a", "b", "c"]


def test_load_clip_is_the_pipelines_front_door(workspace):
    with pytest.raises(CavMaeInputError, match="got list"):
        load_clip([str(workspace / "clip.mp4")])


# ----------------------------------------------------------------------------------------------------------------
# One base class for every error of the package
# ----------------------------------------------------------------------------------------------------------------
def _error_classes():
    from cavmae_hf.configuration_cav_mae import CavMaeArgumentError, CavMaeConfigError
    from cavmae_hf.media import MediaError
    from cavmae_hf.model_card import ModelCardError

    return [
        CavMaeConfigError,
        CavMaeArgumentError,
        CavMaeInputError,
        CavMaeFeatureExtractionError,
        MediaError,
        CheckpointConversionError,
        LabelFileError,
        CheckpointLoadError,
        ModelCardError,
        RetrievalError,
        cli.UsageError,
    ]


def test_every_error_class_derives_from_cavmae_error():
    import cavmae_hf
    from cavmae_hf.configuration_cav_mae import CavMaeError

    assert cavmae_hf.CavMaeError is CavMaeError and "CavMaeError" in cavmae_hf.__all__
    assert issubclass(CavMaeError, ValueError) and CavMaeError is not ValueError
    for error_class in _error_classes():
        assert issubclass(error_class, CavMaeError) and issubclass(error_class, ValueError), error_class
        assert error_class is not CavMaeError


def test_except_cavmae_error_catches_every_area(tmp_path):
    from cavmae_hf import CavMaeError, media
    from cavmae_hf.model_card import card_metadata

    index = RetrievalIndex(["a"], {"audio": torch.randn(1, 4)})
    audio_file = tmp_path / "tone.wav"
    media.write_audio(audio_file, np.zeros(1600, np.float32))
    failures = {
        "CavMaeConfigError": lambda: CavMaeConfig(**tiny_config_kwargs(hidden_size=30)),
        "CavMaeArgumentError": lambda: CavMaeFeatureExtractor()(np.zeros(16000, np.float32), sampling_rate=RATE, pad=1),
        "CavMaeInputError": lambda: CavMaeModel(CavMaeConfig(**tiny_config_kwargs()))(torch.randn(64, 32)),
        "CavMaeFeatureExtractionError": lambda: CavMaeFeatureExtractor()(np.zeros(10, np.float32), sampling_rate=RATE),
        "MediaError": lambda: media.load_video(tmp_path / "missing.mp4"),
        "LabelFileError": lambda: read_label_csv(tmp_path / "missing.csv"),
        "CheckpointConversionError": lambda: convert_checkpoint(tmp_path / "missing.pth", tmp_path / "out"),
        "CheckpointLoadError": lambda: load_model(tmp_path / "nowhere"),
        "ModelCardError": lambda: card_metadata("no front matter"),
        "RetrievalError": lambda: index.search(torch.randn(5), "audio"),
        "UsageError": lambda: cli.main(["--debug", "classify", str(audio_file), "--model", str(tmp_path / "none")]),
    }
    assert set(failures) == {error_class.__name__ for error_class in _error_classes()}
    for name, fail in failures.items():
        try:
            fail()
        except CavMaeError as error:
            assert type(error).__name__ == name, (name, error)
        else:
            pytest.fail(f"{name}: nothing raised")


BUILTIN_ERRORS = {"ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "OSError", "AssertionError",
                  "FileNotFoundError", "IsADirectoryError", "PermissionError", "LookupError", "Exception"}  # fmt: skip


def test_the_package_raises_no_builtin_error_on_purpose():
    """Every deliberate `raise` names a CavMaeError subclass (25 bare ValueError / TypeError raises were left)."""
    import ast

    import cavmae_hf

    bare = []
    for path in sorted(Path(cavmae_hf.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", None)
                if name in BUILTIN_ERRORS:
                    bare.append(f"{path.name}:{node.lineno}: raise {name}")
    assert not bare, "\n".join(bare)


def _formerly_bare_errors(tmp_path):
    """The calls that raised a bare ValueError / TypeError, and the CavMaeError subclass each raises now."""
    from cavmae_hf import metrics, synthetic, training

    rate = {"sampling_rate": RATE}
    extractor = CavMaeFeatureExtractor(image_size=32)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a" / "model.safetensors"))
    save_file({"y": torch.zeros(1)}, str(tmp_path / "b" / "model.safetensors"))
    arguments = dict(output_dir=str(tmp_path / "run"), report_to="none")
    config = CavMaeConfig(**tiny_config_kwargs())
    return [
        (CavMaeArgumentError, "unexpected arguments", lambda: extractor(np.zeros(16000, np.float32), **rate, pad=1)),
        (CavMaeFeatureExtractionError, "return_tensors", lambda: extractor(np.zeros(16000), **rate, return_tensors="tf")),
        (CavMaeConfigError, "problem_type='regression'", lambda: metrics.classification_metrics("regression")),
        (RetrievalError, "one target per query", lambda: metrics.true_pair_ranks(torch.ones(3, 4), torch.ones(2, 4))),
        (CavMaeConfigError, "num_classes must be between 1 and", lambda: synthetic.class_specs(0)),
        (CavMaeConfigError, "Unknown timbre 'kazoo'", lambda: synthetic._timbre_wave("kazoo", 440.0, 0.5, np.zeros(4), np.random.default_rng(0))),
        (CavMaeConfigError, "lr_schedule", lambda: training.CavMaeTrainingArguments(**arguments, lr_schedule="cosine")),
        (CavMaeConfigError, "lr_decay_every", lambda: training.CavMaeTrainingArguments(**arguments, lr_decay_every=0)),
        (
            CavMaeConfigError,
            "wa_start <= wa_end",
            lambda: training.CavMaeTrainingArguments(**arguments, weight_averaging=True, wa_start=3, wa_end=2),
        ),
        (CavMaeConfigError, "no classification head", lambda: training.freeze_backbone(CavMaeModel(config))),
        (CavMaeConfigError, "start_epoch <= end_epoch", lambda: training.WeightAveragingCallback(3, 2)),
        (CavMaeConfigError, "at least one checkpoint", lambda: training.average_checkpoints([])),
        (CheckpointLoadError, "holds other weights", lambda: training.average_checkpoints([tmp_path / "a", tmp_path / "b"])),
        (CheckpointLoadError, r"epochs \[1, 2\]", lambda: training.average_epoch_checkpoints(tmp_path, 1, 2)),
        (CavMaeConfigError, "is not name=value", lambda: training.parse_config_overrides("hidden_size")),
        (CavMaeConfigError, "Data arguments do not fit", lambda: training.data_config_consistent(config, 1, 2, 3)),
    ]


def test_formerly_bare_errors_are_in_the_hierarchy(tmp_path):
    for error_class, message, fail in _formerly_bare_errors(tmp_path):
        with pytest.raises(error_class, match=message):
            fail()
    assert issubclass(CavMaeArgumentError, TypeError)  # code catching the TypeError of old keeps working


def test_pipelines_given_the_wrong_model_say_so(workspace):
    from transformers import ViTConfig, ViTModel, pipeline

    encoder = CavMaeModel(CavMaeConfig(**tiny_config_kwargs()))
    extractor = CavMaeFeatureExtractor(max_length=64, num_mel_bins=32, image_size=32)
    with pytest.raises(CavMaeInputError, match="needs CavMaeForAudioVisualClassification, got CavMaeModel"):
        pipeline(CLASSIFICATION_TASK, model=encoder, feature_extractor=extractor)
    vit = ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8))
    with pytest.raises(CavMaeInputError, match="needs a CAV-MAE model, got ViTModel"):
        pipeline(FEATURE_EXTRACTION_TASK, model=vit, feature_extractor=extractor)
