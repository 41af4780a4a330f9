"""The demo, shortened (`--quick`): it runs end to end and shows learning (above-chance retrieval and accuracy)."""

import argparse
import json

import pytest

from cavmae_hf import demo


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    parser = demo.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--output-dir", str(output), "--no-progress", "--threads", "1"])
    assert demo.run(args) == 0
    return output, json.loads((output / "results.json").read_text())


def test_quick_demo_learns(quick_run):
    _, results = quick_run
    chance_accuracy = 1 / results["num_classes"]
    assert results["accuracy"] >= 2 * chance_accuracy
    after, before = results["retrieval_after"], results["retrieval_before"]
    chance_r5 = min(1.0, 5 / results["test_clips"])
    recall_at_5 = (after["a2v_R@5"] + after["v2a_R@5"]) / 2
    assert recall_at_5 > 1.5 * chance_r5, after
    assert recall_at_5 > (before["a2v_R@5"] + before["v2a_R@5"]) / 2
    assert results["pretraining_eval"]["eval_mae_loss"] < 3.0


def test_quick_demo_writes_a_model_a_figure_and_a_prediction(quick_run):
    output, results = quick_run
    classifier = output / "classifier"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (classifier / name).is_file(), name
    config = json.loads((classifier / "config.json").read_text())
    assert config["architectures"] == ["CavMaeForAudioVisualClassification"] and len(config["id2label"]) == 4
    assert (output / "demo.png").stat().st_size > 10_000
    predictions = results["example_predictions"]
    assert len(predictions) == 3 and set(predictions[0]) == {"label", "score"}
    assert results["example_true_label"] in config["id2label"].values()


def test_module_entry_point_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
