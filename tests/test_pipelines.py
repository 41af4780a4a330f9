"""The `audio-visual-classification` and `audio-visual-feature-extraction` pipelines, end to end on tiny models."""

import numpy as np
import pytest
import torch
from inference_helpers import (
    NUM_FRAMES,
    SAMPLING_RATE,
    clip_audio,
    clip_frames,
    save_tiny_classifier,
    save_tiny_encoder,
    save_tiny_model,
    write_clip,
    write_png,
    write_wav,
)
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import cavmae_hf  # noqa: F401  (registers the tasks)
from cavmae_hf import CavMaeFeatureExtractor, CavMaeForAudioVisualClassification, CavMaeForPreTraining
from cavmae_hf.media import MediaError, load_video, resample
from cavmae_hf.modeling_cav_mae import CavMaeInputError
from cavmae_hf.pipelines import (
    CLASSIFICATION_TASK,
    FEATURE_EXTRACTION_TASK,
    AudioVisualClassificationPipeline,
    AudioVisualFeatureExtractionPipeline,
    load_clip,
)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    write_clip(folder / "a.mp4", seed=1)
    write_clip(folder / "b.mp4", seed=2)
    write_clip(folder / "silent.mp4", seed=3, with_audio=False)
    write_wav(folder / "tone.wav", seed=4)
    write_png(folder / "frame.png", seed=5)
    return folder


@pytest.fixture(scope="module")
def multi_label_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("multi_label"), "multi_label_classification")


@pytest.fixture(scope="module")
def single_label_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("single_label"), "single_label_classification")


@pytest.fixture(scope="module")
def classifier(multi_label_dir):
    return pipeline(CLASSIFICATION_TASK, model=str(multi_label_dir))


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    return pipeline(FEATURE_EXTRACTION_TASK, model=str(save_tiny_encoder(tmp_path_factory.mktemp("encoder"))))


def expected_probabilities(pipe, video_path, function):
    """What the pipeline should give: media decoding, feature extractor and the model, by hand."""
    clip = load_video(video_path, num_frames=NUM_FRAMES)
    features = pipe.feature_extractor(
        audio=clip.audio, images=[clip.frames], sampling_rate=clip.sampling_rate, return_tensors="pt"
    )
    with torch.no_grad():
        logits = pipe.model(**features).logits[0]
    return logits.sigmoid() if function == "sigmoid" else logits.softmax(-1)


def as_vector(result, id2label) -> np.ndarray:
    index = {label: i for i, label in id2label.items()}
    vector = np.full(len(index), np.nan)
    for entry in result:
        vector[index[entry["label"]]] = entry["score"]
    return vector


def test_tasks_are_registered():
    tasks = PIPELINE_REGISTRY.get_supported_tasks()
    assert CLASSIFICATION_TASK in tasks and FEATURE_EXTRACTION_TASK in tasks


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------
def test_classifies_a_video_with_sigmoid_scores(classifier, media_dir):
    assert isinstance(classifier, AudioVisualClassificationPipeline)
    result = classifier(str(media_dir / "a.mp4"), top_k=3)
    assert len(result) == 3 and set(result[0]) == {"label", "score"}
    scores = [entry["score"] for entry in result]
    assert scores == sorted(scores, reverse=True)
    expected = expected_probabilities(classifier, media_dir / "a.mp4", "sigmoid")
    full = classifier(media_dir / "a.mp4", top_k=None)
    np.testing.assert_allclose(as_vector(full, classifier.model.config.id2label), expected.numpy(), atol=1e-5)


def test_single_label_scores_are_softmax(single_label_dir, media_dir):
    classifier = pipeline(CLASSIFICATION_TASK, model=str(single_label_dir))
    result = classifier(str(media_dir / "a.mp4"), top_k=None)
    assert len(result) == 5
    assert sum(entry["score"] for entry in result) == pytest.approx(1.0, abs=1e-5)
    expected = expected_probabilities(classifier, media_dir / "a.mp4", "softmax")
    np.testing.assert_allclose(as_vector(result, classifier.model.config.id2label), expected.numpy(), atol=1e-5)


def test_default_top_k_and_function_override(classifier, media_dir):
    assert len(classifier(str(media_dir / "a.mp4"))) == 5  # all 5 labels: top_k defaults to 5
    raw = classifier(str(media_dir / "a.mp4"), top_k=1, function_to_apply="none")[0]["score"]
    assert classifier(str(media_dir / "a.mp4"), top_k=1)[0]["score"] == pytest.approx(1 / (1 + np.exp(-raw)), abs=1e-6)


def test_batched_list_equals_single_calls(classifier, media_dir):
    inputs = [str(media_dir / name) for name in ("a.mp4", "silent.mp4", "tone.wav", "b.mp4", "frame.png")]
    singles = [classifier(path, top_k=None) for path in inputs]
    for batch_size in (1, 2, 5):
        batched = classifier(inputs, batch_size=batch_size, top_k=None)
        assert len(batched) == len(inputs)
        for got, want in zip(batched, singles):
            id2label = classifier.model.config.id2label
            np.testing.assert_allclose(as_vector(got, id2label), as_vector(want, id2label), atol=1e-5)


def test_dict_inputs_with_missing_modalities(classifier):
    audio, frames = clip_audio(7), list(clip_frames(7, count=3))
    for clip in (
        {"audio": audio, "sampling_rate": SAMPLING_RATE, "frames": frames},
        {"audio": audio, "sampling_rate": SAMPLING_RATE},
        {"frames": frames},
    ):
        result = classifier(clip, top_k=2)
        assert len(result) == 2 and all(0.0 <= entry["score"] <= 1.0 for entry in result)


def test_dict_audio_is_resampled(classifier):
    audio_8k = resample(clip_audio(8), SAMPLING_RATE, 8000)
    at_8k = classifier({"audio": audio_8k, "sampling_rate": 8000}, top_k=None)
    at_16k = classifier({"audio": resample(audio_8k, 8000, SAMPLING_RATE), "sampling_rate": SAMPLING_RATE}, top_k=None)
    id2label = classifier.model.config.id2label
    np.testing.assert_allclose(as_vector(at_8k, id2label), as_vector(at_16k, id2label), atol=1e-6)


def test_num_frames_is_passed_to_decoding(classifier, media_dir):
    seen = []
    original = classifier.model.forward

    def spy(**inputs):
        seen.append(tuple(inputs["pixel_values"].shape))
        return original(**inputs)

    classifier.model.forward = spy
    try:
        classifier(str(media_dir / "a.mp4"), num_frames=3)
    finally:
        del classifier.model.forward
    assert seen == [(1, 3, 3, 32, 32)]


def test_feature_extractor_is_built_from_config_when_absent(tmp_path, media_dir):
    model_dir = save_tiny_classifier(tmp_path / "bare", with_feature_extractor=False)
    classifier = pipeline(CLASSIFICATION_TASK, model=str(model_dir))
    extractor = classifier.feature_extractor
    assert isinstance(extractor, CavMaeFeatureExtractor)
    assert (extractor.max_length, extractor.num_mel_bins, extractor.image_size) == (64, 32, 32)
    assert len(classifier(str(media_dir / "a.mp4"), top_k=2)) == 2


def test_mismatched_feature_extractor_is_refused(multi_label_dir):
    with pytest.raises(ValueError, match="max_length"):
        pipeline(CLASSIFICATION_TASK, model=str(multi_label_dir), feature_extractor=CavMaeFeatureExtractor())


def test_device_and_dtype(multi_label_dir, media_dir, classifier):
    double = pipeline(CLASSIFICATION_TASK, model=str(multi_label_dir), device="cpu", dtype=torch.float64)
    assert double.model.dtype == torch.float64 and double.device.type == "cpu"
    id2label = classifier.model.config.id2label
    np.testing.assert_allclose(
        as_vector(double(str(media_dir / "a.mp4"), top_k=None), id2label),
        as_vector(classifier(str(media_dir / "a.mp4"), top_k=None), id2label),
        atol=1e-5,
    )
    half = pipeline(CLASSIFICATION_TASK, model=str(multi_label_dir), device="cpu", dtype=torch.bfloat16)
    assert len(half(str(media_dir / "a.mp4"), top_k=2)) == 2


def test_loaded_model_instance(multi_label_dir, media_dir):
    model = CavMaeForAudioVisualClassification.from_pretrained(multi_label_dir)
    classifier = pipeline(CLASSIFICATION_TASK, model=model)
    assert len(classifier(str(media_dir / "a.mp4"), top_k=1)) == 1


def test_bad_inputs_raise_clear_errors(classifier, media_dir, tmp_path):
    with pytest.raises(MediaError, match="not found"):
        classifier(str(tmp_path / "missing.mp4"))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(MediaError, match="not a readable media file"):
        classifier(str(tmp_path / "broken.mp4"))
    with pytest.raises(CavMaeInputError, match="neither"):
        classifier({"sampling_rate": SAMPLING_RATE})
    with pytest.raises(CavMaeInputError, match="no 'sampling_rate'"):
        classifier({"audio": clip_audio(0)})
    with pytest.raises(CavMaeInputError, match="Unknown keys"):
        classifier({"audio": clip_audio(0), "sampling_rate": SAMPLING_RATE, "video": "x"})
    with pytest.raises(CavMaeInputError):
        classifier(12)
    with pytest.raises(TypeError, match="Unexpected pipeline arguments"):
        classifier(str(media_dir / "a.mp4"), topk=3)
    with pytest.raises(ValueError, match="num_frames"):
        classifier(str(media_dir / "a.mp4"), num_frames=0)


def test_pretraining_checkpoint_warns_about_random_head(tmp_path, media_dir, caplog):
    from transformers.testing_utils import CaptureLogger

    from cavmae_hf import pipelines

    model_dir = save_tiny_model(tmp_path / "pre", CavMaeForPreTraining)
    with CaptureLogger(pipelines.logger) as captured:
        classifier = pipeline(CLASSIFICATION_TASK, model=str(model_dir))
    assert "newly initialised" in captured.out
    assert len(classifier(str(media_dir / "a.mp4"), top_k=1)) == 1


def test_load_clip_kinds(media_dir):
    video = load_clip(media_dir / "a.mp4", num_frames=4)
    assert video.audio is not None and len(video.frames) == 4 and video.sampling_rate == SAMPLING_RATE
    assert load_clip(media_dir / "silent.mp4").modalities == ("visual",)
    assert load_clip(media_dir / "tone.wav").modalities == ("audio",)
    assert load_clip(media_dir / "frame.png").modalities == ("visual",)


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------
def test_feature_extraction_shapes(extractor, media_dir):
    assert isinstance(extractor, AudioVisualFeatureExtractionPipeline)
    output = extractor(str(media_dir / "a.mp4"), return_tensors=True, return_token_states=True)
    shapes = {name: tuple(value.shape) for name, value in output.items()}
    assert shapes == {
        "audio_embeds": (32,),
        "visual_embeds": (32,),
        "frame_embeds": (NUM_FRAMES, 32),
        "joint_embeds": (32,),
        "audio_last_hidden_state": (32, 32),
        "visual_last_hidden_state": (NUM_FRAMES, 16, 32),
        "last_hidden_state": (NUM_FRAMES, 48, 32),
    }
    as_lists = extractor(str(media_dir / "a.mp4"))
    assert set(as_lists) == {"audio_embeds", "visual_embeds", "frame_embeds", "joint_embeds"}
    assert isinstance(as_lists["audio_embeds"], list) and len(as_lists["frame_embeds"]) == NUM_FRAMES


def test_feature_extraction_matches_the_model(extractor, media_dir):
    output = extractor(str(media_dir / "a.mp4"), return_tensors=True)
    clip = load_video(media_dir / "a.mp4", num_frames=NUM_FRAMES)
    features = extractor.feature_extractor(
        audio=clip.audio, images=[clip.frames], sampling_rate=SAMPLING_RATE, return_tensors="pt"
    )
    model = extractor.model
    with torch.no_grad():
        audio = model.get_audio_features(features["input_features"]).pooler_output[0]
        frames = model.get_image_features(features["pixel_values"][0]).pooler_output
        joint = torch.stack(
            [
                model(
                    input_features=features["input_features"], pixel_values=features["pixel_values"][:, f]
                ).pooler_output[0]
                for f in range(NUM_FRAMES)
            ]
        ).mean(0)
    torch.testing.assert_close(output["audio_embeds"], audio, atol=1e-5, rtol=0)
    torch.testing.assert_close(output["frame_embeds"], frames, atol=1e-5, rtol=0)
    torch.testing.assert_close(output["visual_embeds"], frames.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(output["joint_embeds"], joint, atol=1e-5, rtol=0)


def test_feature_extraction_batches_mixed_inputs(extractor, media_dir):
    inputs = [str(media_dir / name) for name in ("a.mp4", "tone.wav", "silent.mp4", "b.mp4")]
    batched = extractor(inputs, batch_size=3, return_tensors=True, normalize=True)
    assert [sorted(out) for out in batched] == [
        ["audio_embeds", "frame_embeds", "joint_embeds", "visual_embeds"],
        ["audio_embeds"],
        ["frame_embeds", "visual_embeds"],
        ["audio_embeds", "frame_embeds", "joint_embeds", "visual_embeds"],
    ]
    for path, out in zip(inputs, batched):
        single = extractor(path, return_tensors=True, normalize=True)
        for name, value in single.items():
            torch.testing.assert_close(out[name], value, atol=1e-5, rtol=0)
    assert torch.linalg.vector_norm(batched[0]["audio_embeds"]).item() == pytest.approx(1.0, abs=1e-5)


def test_feature_extraction_uses_the_encoder_of_a_classifier(multi_label_dir, media_dir):
    from cavmae_hf.pipelines import cav_mae_pipeline

    extractor = cav_mae_pipeline(FEATURE_EXTRACTION_TASK, multi_label_dir)
    assert isinstance(extractor.model, CavMaeForAudioVisualClassification)
    assert extractor.encoder is extractor.model.cav_mae
    assert len(extractor(str(media_dir / "a.mp4"))["audio_embeds"]) == 32


@pytest.mark.parametrize(
    "options",
    [{"frame_transform": "none"}, {"frame_selection": "timestamp", "audio_precision": "float32"}],
    ids=["no reference JPEG", "timestamp frames, float audio"],
)
def test_video_options_reach_the_decoder(extractor, media_dir, options):
    video = media_dir / "a.mp4"
    default = extractor(str(video), return_tensors=True)
    chosen = extractor(str(video), return_tensors=True, **options)
    clip = load_video(video, num_frames=NUM_FRAMES, **options)
    features = extractor.feature_extractor(
        audio=clip.audio, images=[clip.frames], sampling_rate=SAMPLING_RATE, return_tensors="pt"
    )
    with torch.no_grad():
        expected = extractor.model.get_image_features(features["pixel_values"][0]).pooler_output
    torch.testing.assert_close(chosen["frame_embeds"], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(chosen["frame_embeds"], default["frame_embeds"], atol=1e-6)
    with pytest.raises(ValueError, match="frame_transform must be one of"):
        extractor(str(video), frame_transform="bicubic")


# Preprocessing ahead of the model --------------------------------------------------------------------------------
def test_preprocessing_threads_keep_the_order_and_the_results(extractor, media_dir):
    inputs = [str(media_dir / name) for name in ("a.mp4", "tone.wav", "silent.mp4", "b.mp4", "frame.png")]
    serial = extractor(inputs, batch_size=2, num_workers=0, return_tensors=True)
    for workers, batch_size in ((1, 1), (3, 2), (2, 4)):
        threaded = extractor((path for path in inputs), batch_size=batch_size, num_workers=workers, return_tensors=True)
        threaded = list(threaded)
        assert len(threaded) == len(serial)
        for expected, actual in zip(serial, threaded):
            assert expected.keys() == actual.keys()
            for name in expected:
                torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)


def test_preprocessing_runs_in_threads_ahead_of_the_consumer():
    import threading

    from cavmae_hf.pipelines import preprocessed

    threads = set()

    def preprocess(item):
        threads.add(threading.current_thread().name)
        return item * 2

    consumed = preprocessed(iter(range(20)), preprocess, {}, num_workers=2, look_ahead=4)
    assert list(consumed) == [2 * i for i in range(20)]
    assert threads and all(name.startswith("cavmae-preprocess") for name in threads)
    assert list(preprocessed(range(3), preprocess, {}, num_workers=0, look_ahead=0)) == [0, 2, 4]


def test_a_failing_input_raises_at_its_turn_with_threads(extractor, media_dir, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    inputs = [str(media_dir / "a.mp4"), str(broken), str(media_dir / "b.mp4")]
    outputs = iter(extractor((path for path in inputs), batch_size=1, num_workers=2, return_tensors=True))
    assert "audio_embeds" in next(outputs)
    with pytest.raises(MediaError, match="broken.mp4"):
        next(outputs)


@pytest.mark.parametrize("workers", [-1, 1.5, True])
def test_num_workers_must_be_a_count(extractor, media_dir, workers):
    with pytest.raises(ValueError, match="num_workers"):
        extractor([str(media_dir / "a.mp4")], num_workers=workers)
