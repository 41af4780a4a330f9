"""The demo, shortened (`--quick`): it runs end to end and shows learning: the removed patches are filled in far
better than by the mean training clip, retrieval and accuracy are above chance, and the figure, the model and the
timings are written."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from cavmae_hf import demo
from cavmae_hf.synthetic import class_specs, generate_clips, synthesize_audio, write_synthetic_videos

# The bar: the model's error on removed patches at least 40 % below that of predicting the mean training clip, for
# both modalities. Measured over seeds 0-4 of `--quick`: audio 53-65 % below, frames 47-57 % below.
REQUIRED_REDUCTION = 0.40


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    parser = demo.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--output-dir", str(output), "--no-progress", "--threads", "1"])
    assert demo.run(args) == 0
    return output, json.loads((output / "results.json").read_text())


def test_quick_demo_fills_in_removed_patches_better_than_the_mean_clip(quick_run):
    _, results = quick_run
    quality = results["reconstruction"]
    for modality in ("audio", "visual"):
        assert quality[f"{modality}_baseline_mse"] > 0
        reduction = 1 - quality[f"{modality}_mse"] / quality[f"{modality}_baseline_mse"]
        assert reduction == pytest.approx(quality[f"{modality}_reduction"])
        assert reduction >= REQUIRED_REDUCTION, (modality, quality)


def test_quick_demo_learns_to_retrieve_and_classify(quick_run):
    _, results = quick_run
    chance_accuracy = 1 / results["num_classes"]
    assert results["accuracy"] >= 2 * chance_accuracy
    after, before = results["retrieval_after"], results["retrieval_before"]
    chance_r5 = min(1.0, 5 / results["test_clips"])
    recall_at_5 = (after["a2v_R@5"] + after["v2a_R@5"]) / 2
    assert recall_at_5 > 1.5 * chance_r5, after
    assert recall_at_5 > (before["a2v_R@5"] + before["v2a_R@5"]) / 2


def test_quick_demo_writes_a_model_a_figure_and_predictions(quick_run):
    output, results = quick_run
    classifier = output / "classifier"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (classifier / name).is_file(), name
    config = json.loads((classifier / "config.json").read_text())
    assert config["architectures"] == ["CavMaeForAudioVisualClassification"] and len(config["id2label"]) == 4
    with Image.open(output / "demo.png") as figure:
        assert figure.width >= 1500 and figure.height >= 1200  # curves, reconstructions, retrieval, classification
    predictions = results["example_predictions"]
    assert len(predictions) == 3 and set(predictions[0]) == {"label", "score"}
    assert results["example_true_label"] in config["id2label"].values()
    for search in results["retrieval_examples"]:
        positions = [position for position, _ in search["hits"]]
        scores = [score for _, score in search["hits"]]
        assert scores == sorted(scores, reverse=True) and len(set(positions)) == len(positions)
        assert (search["query"] in positions) == (search["true_rank"] <= len(positions))
    for example in results["classification_examples"]:
        probabilities = [score for _, score in example["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
        assert example["true_label"] in config["id2label"].values()


def test_quick_demo_reports_wall_and_cpu_time_of_every_step(quick_run):
    _, results = quick_run
    timings = results["timings"]
    steps = timings["steps"]
    assert list(steps) == ["write", "decode", "retrieval", "pretrain", "evaluate", "finetune", "figure"]
    for timing in steps.values():
        assert timing["wall_seconds"] >= 0 and timing["cpu_seconds"] >= 0
    assert steps["pretrain"]["cpu_seconds"] > 0
    assert timings["total_wall_seconds"] >= sum(timing["wall_seconds"] for timing in steps.values()) - 1e-6


def test_time_left_follows_the_pace_of_the_finished_steps(monkeypatch, capsys):
    clock = iter([0.0, 0.0, 6.0, 6.0, 26.0])  # start; "a" takes 6 s where 5 were expected, "b" 20 s where 10 were
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    progress = demo._Progress({"a": 5.0, "b": 10.0, "c": 20.0})
    assert progress.seconds_left() == 35.0
    progress.begin("a", "first")
    progress.done()
    assert progress.seconds_left() == pytest.approx(1.2 * 30.0)  # 20 % slower than expected so far
    progress.begin("b", "second")
    progress.done()
    assert progress.seconds_left() == pytest.approx(demo.MAX_PACE_CORRECTION * 20.0)  # 26 / 15 s, capped
    assert "[1/3] first  (about 35 s left)" in capsys.readouterr().out


def test_clips_written_by_several_processes_are_the_clips_of_one(tmp_path):
    options = dict(num_classes=2, clips_per_class=3, duration=0.5, image_size=32, fps=8, seed=3)
    one = write_synthetic_videos(tmp_path / "one", **options)
    two = write_synthetic_videos(tmp_path / "two", num_proc=2, **options)
    assert (one / "metadata.csv").read_text() == (two / "metadata.csv").read_text()
    assert sorted(p.relative_to(one) for p in one.rglob("*.mp4")) == sorted(p.relative_to(two) for p in two.rglob("*.mp4"))


def test_synthetic_pictures_are_smooth_away_from_the_shape_edge():
    clip = next(generate_clips(num_classes=1, clips_per_class=1, duration=1.0, image_size=64, seed=0))
    steps = np.abs(np.diff(clip.frames[0].astype(float), axis=1)).max(axis=2)
    assert (steps <= 2).mean() > 0.9  # no per-pixel noise: neighbouring pixels differ along the shape's edge only


def test_synthetic_sound_between_pulses_is_the_stack_20_db_down():
    spec = class_specs(1)[0]
    audio = synthesize_audio(spec, 0.5, 0.0, 1.0, 2.0, 16000, np.random.default_rng(0))
    windows = audio[: len(audio) // 160 * 160].reshape(-1, 160)  # 10 ms
    rms = np.sqrt((windows.astype(float) ** 2).mean(axis=1))
    assert 0.05 < np.percentile(rms, 5) / np.percentile(rms, 95) < 0.2


def test_module_entry_point_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
