"""Frame aggregation: F frames of a clip classified in one call (audio encoded once) equal the naive F full passes."""

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification

NUM_FRAMES = 4
TOLERANCE = 1e-5


def make_model(problem_type: str, num_labels: int = 6, classification_mode: str = "multimodal"):
    config = CavMaeConfig(
        **tiny_config_kwargs(num_labels=num_labels, problem_type=problem_type, classification_mode=classification_mode)
    )
    return CavMaeForAudioVisualClassification(config).eval()


def make_inputs(config, batch_size: int = 3, num_frames: int = NUM_FRAMES):
    audio = torch.randn(batch_size, config.audio_length, config.num_mel_bins)
    frames = torch.randn(batch_size, num_frames, config.num_channels, config.image_size, config.image_size)
    return audio, frames


def probabilities(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    return logits.sigmoid() if problem_type == "multi_label_classification" else logits.softmax(dim=-1)


def naive_frame_average(model, audio, frames, problem_type):
    """One full forward per frame (with the clip's audio, if any), per-frame probabilities averaged."""
    per_frame = [
        probabilities(model(input_features=audio, pixel_values=frames[:, f]).logits, problem_type)
        for f in range(frames.shape[1])
    ]
    return torch.stack(per_frame, dim=1).mean(dim=1)


PROBLEM_TYPES = ["single_label_classification", "multi_label_classification"]


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
@pytest.mark.parametrize("with_audio", [True, False], ids=["audio+frames", "frames-only"])
def test_aggregation_equals_naive_passes(problem_type, with_audio):
    model = make_model(problem_type)
    audio, frames = make_inputs(model.config)
    audio = audio if with_audio else None
    with torch.no_grad():
        expected = naive_frame_average(model, audio, frames, problem_type)
        output = model(input_features=audio, pixel_values=frames)
    torch.testing.assert_close(probabilities(output.logits, problem_type), expected, atol=TOLERANCE, rtol=0)
    assert output.frame_logits.shape == (3, NUM_FRAMES, 6)


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_per_frame_logits_equal_single_frame_passes(problem_type):
    model = make_model(problem_type)
    audio, frames = make_inputs(model.config, batch_size=2)
    with torch.no_grad():
        output = model(input_features=audio, pixel_values=frames)
        for f in range(NUM_FRAMES):
            single = model(input_features=audio, pixel_values=frames[:, f]).logits
            torch.testing.assert_close(output.frame_logits[:, f], single, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_visual_mode_aggregates_frames(problem_type):
    model = make_model(problem_type, classification_mode="visual")
    audio, frames = make_inputs(model.config, batch_size=2)
    with torch.no_grad():
        expected = naive_frame_average(model, audio, frames, problem_type)
        got = probabilities(model(input_features=audio, pixel_values=frames).logits, problem_type)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_audio_mode_ignores_frames():
    model = make_model("multi_label_classification", classification_mode="audio")
    audio, frames = make_inputs(model.config, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_features=audio, pixel_values=frames).logits, model(input_features=audio).logits, atol=0, rtol=0
        )


def test_single_frame_axis_equals_plain_frame():
    model = make_model("single_label_classification")
    audio, frames = make_inputs(model.config, batch_size=2, num_frames=1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_features=audio, pixel_values=frames).logits.softmax(-1),
            model(input_features=audio, pixel_values=frames[:, 0]).logits.softmax(-1),
            atol=TOLERANCE,
            rtol=0,
        )


def count_rows_through(module: torch.nn.Module) -> list[int]:
    """Clips (batch sizes of the packed streams) of every call of a layer, recorded by a forward hook."""
    rows = []
    module.register_forward_hook(lambda _module, args, _output: rows.append(sum(s.batch_size for s in args[1])))
    return rows


def test_audio_layers_run_once_per_clip():
    model = make_model("multi_label_classification")
    audio, frames = make_inputs(model.config, batch_size=2)
    audio_rows = count_rows_through(model.cav_mae.audio_layers[0])
    visual_rows = count_rows_through(model.cav_mae.visual_layers[0])
    with torch.no_grad():
        model(input_features=audio, pixel_values=frames)
    assert audio_rows == [2]  # one call, one row per clip
    assert visual_rows == [2 * NUM_FRAMES]


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_pipeline_uses_frame_aggregation(tmp_path, problem_type):
    from transformers import pipeline

    from cavmae_hf import CavMaeFeatureExtractor

    model = make_model(problem_type)
    model.save_pretrained(tmp_path)
    config = model.config
    extractor = CavMaeFeatureExtractor(
        max_length=config.audio_length, num_mel_bins=config.num_mel_bins, image_size=config.image_size
    )
    classifier = pipeline("audio-visual-classification", model=str(tmp_path), feature_extractor=extractor)
    rng = np.random.default_rng(0)
    clip = {
        "audio": rng.standard_normal(16000).astype(np.float32) * 0.1,
        "sampling_rate": 16000,
        "frames": [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(NUM_FRAMES)],
    }
    audio_rows = count_rows_through(classifier.model.cav_mae.audio_layers[0])
    result = classifier(clip, top_k=None)
    assert audio_rows == [1]

    features = extractor(audio=clip["audio"], images=[clip["frames"]], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        expected = naive_frame_average(
            classifier.model, features["input_features"], features["pixel_values"], problem_type
        )[0]
    got = {entry["label"]: entry["score"] for entry in result}
    for index, label in config.id2label.items():
        assert got[label] == pytest.approx(expected[index].item(), abs=TOLERANCE)
