"""The `cavmae` command line: every subcommand end to end on tiny saved models, exit codes and error lines."""

import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import FIXTURES, run_cli
from inference_helpers import save_tiny_classifier, save_tiny_pretraining, write_clip, write_wav
from PIL import Image

from cavmae_hf import cli
from cavmae_hf.convert_original_checkpoint import CheckpointConversionError

SUBCOMMANDS = ["classify", "embed", "retrieve", "reconstruct"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    save_tiny_classifier(folder / "classifier")
    save_tiny_pretraining(folder / "pretrained", norm_pix_loss=False)
    for i in range(3):
        write_clip(folder / f"clip_{i}.mp4", seed=30 + i)
    write_clip(folder / "silent.mp4", seed=40, with_audio=False)
    write_wav(folder / "tone.wav", seed=41)
    (folder / "broken.mp4").write_bytes(b"\x00" * 100)
    return folder


def assert_one_line_error(code, err, expected_code=2, contains=""):
    assert code == expected_code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains in lines[0], err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# Help and usage
# ----------------------------------------------------------------------------------------------------------------
def test_help(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in SUBCOMMANDS + ["convert", "demo"]:
        assert command in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and f"usage: cavmae {command}" in out and "--model" in out


def test_usage_errors_exit_2(capsys):
    assert run_cli([], capsys)[0] == 2
    assert run_cli(["classify"], capsys)[0] == 2  # no video, no --model
    assert run_cli(["frobnicate"], capsys)[0] == 2
    code, _, err = run_cli(["classify", "x.mp4", "--model", "m", "--bogus"], capsys)
    assert code == 2 and "unrecognized arguments: --bogus" in err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("cavmae")
    completed = subprocess.run([str(script), "classify", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "usage: cavmae classify" in completed.stdout


# ----------------------------------------------------------------------------------------------------------------
# classify
# ----------------------------------------------------------------------------------------------------------------
def test_classify_json(workspace, capsys):
    videos = [workspace / "clip_0.mp4", workspace / "silent.mp4", workspace / "tone.wav"]
    code, out, _ = run_cli(
        [
            "classify",
            *videos,
            "--model",
            workspace / "classifier",
            "--top-k",
            2,
            "--json",
            "--batch-size",
            2,
            "--num-frames",
            4,
            "-q",
        ],
        capsys,
    )
    assert code == 0
    results = json.loads(out)
    assert [r["input"] for r in results] == [str(v) for v in videos]
    for result in results:
        assert len(result["labels"]) == 2
        assert all(entry["label"].startswith("class_") and 0 <= entry["score"] <= 1 for entry in result["labels"])


def test_classify_text(workspace, capsys):
    code, out, _ = run_cli(
        ["classify", workspace / "clip_1.mp4", "--model", workspace / "classifier", "--top-k", 3], capsys
    )
    lines = out.splitlines()
    assert code == 0 and lines[0] == str(workspace / "clip_1.mp4") and len(lines) == 4
    assert all(line.startswith("  0.") and "class_" in line for line in lines[1:])


def test_classify_input_errors_are_one_line(workspace, capsys):
    model = workspace / "classifier"
    assert_one_line_error(
        *run_cli(["classify", workspace / "missing.mp4", "--model", model], capsys)[::2], contains="File not found"
    )
    assert_one_line_error(
        *run_cli(["classify", workspace / "broken.mp4", "--model", model], capsys)[::2],
        contains="not a readable media file",
    )
    assert_one_line_error(
        *run_cli(["classify", workspace / "clip_0.mp4", "--model", workspace / "nowhere"], capsys)[::2],
        contains="Model directory not found",
    )
    assert_one_line_error(
        *run_cli(["classify", workspace / "clip_0.mp4", "--model", workspace], capsys)[::2], contains="no config.json"
    )
    assert_one_line_error(
        *run_cli(["classify", workspace / "clip_0.mp4", "--model", workspace / "pretrained"], capsys)[::2],
        contains="CavMaeForAudioVisualClassification checkpoint",
    )
    assert_one_line_error(
        *run_cli(["classify", workspace / "clip_0.mp4", "--model", model, "--top-k", 0], capsys)[::2], contains="--top-k"
    )


@pytest.mark.parametrize("error", [RuntimeError("something broke"), ValueError("bad"), OSError(5, "I/O error")])
def test_errors_outside_the_hierarchy_are_internal_errors_exit_1(workspace, capsys, monkeypatch, error):
    """Exit code 2 means a CavMaeError (bad input) and nothing else: a bare ValueError or OSError from inside is a
    bug, not the user's input."""

    def explode(args):
        raise error

    monkeypatch.setattr(cli, "run_classify", explode)
    code, _, err = run_cli(["classify", workspace / "clip_0.mp4", "--model", workspace / "classifier"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"internal error: {type(error).__name__}: ") and "rerun with --debug" in lines[0]
    with pytest.raises(type(error)):
        cli.main(["--debug", "classify", str(workspace / "clip_0.mp4"), "--model", str(workspace / "classifier")])


def test_version(capsys):
    from importlib.metadata import version

    import cavmae_hf

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"cavmae {cavmae_hf.__version__}"
    assert cavmae_hf.__version__ == version("cavmae-hf")  # one version string: the installed one is built from it


@pytest.mark.parametrize(
    "argv,code",
    [(["--help"], 0), (["--version"], 0), (["classify", "--help"], 0), (["convert", "--help"], 0), (["classify"], 2),
     (["frobnicate"], 2), (["convert", "--checkpoint", "x.pth"], 2)],
)  # fmt: skip
def test_help_version_and_usage_errors_answer_before_the_heavy_imports(argv, code):
    """The console script's module parses the arguments with the standard library alone: torch, Transformers and
    the package (whose import registers its classes, seconds) are imported only to run a command."""
    script = (
        "import sys, cavmae_hf_cli\n"
        f"code = cavmae_hf_cli.main({argv!r})\n"
        "print('imported:', sorted(m for m in ('torch', 'transformers', 'cavmae_hf') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == code, completed.stderr
    assert "imported: []" in completed.stdout


# ----------------------------------------------------------------------------------------------------------------
# embed, retrieve
# ----------------------------------------------------------------------------------------------------------------
def test_embed_then_retrieve(workspace, tmp_path, capsys):
    gallery = [workspace / f"clip_{i}.mp4" for i in range(3)] + [workspace / "silent.mp4"]
    index = tmp_path / "index.safetensors"
    code, out, _ = run_cli(
        ["embed", *gallery, "--model", workspace / "classifier", "--output", index, "--json", "--num-frames", 4, "-q"],
        capsys,
    )
    assert code == 0 and index.is_file()
    summary = json.loads(out)
    assert summary["clips"] == 4 and summary["modalities"] == ["audio", "visual"] and summary["dim"] == 32
    assert len(summary["embeddings"][0]["audio_embeds"]) == 32 and "audio_embeds" not in summary["embeddings"][3]

    code, out, _ = run_cli(
        [
            "retrieve",
            gallery[1],
            "--index",
            index,
            "--model",
            workspace / "classifier",
            "--json",
            "--query-modality",
            "visual",
            "--target-modality",
            "visual",
            "--num-frames",
            4,
            "--top-k",
            2,
        ],
        capsys,
    )
    assert code == 0
    (result,) = json.loads(out)
    assert result["query"] == str(gallery[1]) and len(result["hits"]) == 2
    assert result["hits"][0]["key"] == str(gallery[1]) and result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    code, out, _ = run_cli(
        ["retrieve", workspace / "tone.wav", "--index", index, "--model", workspace / "classifier", "--num-frames", 4],
        capsys,
    )
    assert code == 0 and out.splitlines()[0] == str(workspace / "tone.wav") and len(out.splitlines()) == 5


def test_embed_records_the_decoding_options_and_classify_takes_them(workspace, tmp_path, capsys):
    import cavmae_hf_cli
    from cavmae_hf import media
    from cavmae_hf.retrieval import RetrievalIndex

    choices = cavmae_hf_cli.VIDEO_OPTION_CHOICES
    assert choices == {
        "frame_selection": media.FRAME_SELECTIONS,
        "frame_transform": media.FRAME_TRANSFORMS,
        "audio_precision": media.AUDIO_PRECISIONS,
    }
    index = tmp_path / "index.safetensors"
    clip, model = workspace / "clip_0.mp4", workspace / "classifier"
    options = ["--frame-selection", "timestamp", "--audio-precision", "float32"]
    code, _, _ = run_cli(["embed", clip, "--model", model, "--output", index, "--num-frames", 2, "-q", *options], capsys)
    assert code == 0
    metadata = RetrievalIndex.load(index).metadata
    assert (metadata["frame_selection"], metadata["frame_transform"], metadata["audio_precision"]) == (
        "timestamp",
        "reference_jpeg",
        "float32",
    )
    code, out, _ = run_cli(["classify", clip, "--model", model, "--json", "--num-frames", 2, *options], capsys)
    assert code == 0 and json.loads(out)[0]["labels"]
    code, _, err = run_cli(["classify", clip, "--model", model, "--frame-transform", "png"], capsys)
    assert code == 2 and "--frame-transform" in err


def test_embed_and_retrieve_errors(workspace, tmp_path, capsys):
    model = workspace / "classifier"
    assert_one_line_error(*run_cli(["embed", workspace / "clip_0.mp4", "--model", model], capsys)[::2], contains="--output")
    assert_one_line_error(
        *run_cli(
            ["retrieve", workspace / "clip_0.mp4", "--model", model, "--index", tmp_path / "none.safetensors"], capsys
        )[::2],
        contains="Index file not found",
    )
    assert_one_line_error(
        *run_cli(["retrieve", workspace / "clip_0.mp4", "--model", model, "--index", workspace / "broken.mp4"], capsys)[
            ::2
        ],
        contains="not a safetensors file",
    )


# ----------------------------------------------------------------------------------------------------------------
# reconstruct
# ----------------------------------------------------------------------------------------------------------------
def test_reconstruct_writes_the_png(workspace, tmp_path, capsys):
    output = tmp_path / "figure.png"
    code, out, _ = run_cli(
        [
            "reconstruct",
            workspace / "clip_2.mp4",
            "--model",
            workspace / "pretrained",
            "--output",
            output,
            "--json",
            "--dpi",
            40,
            "--audio-mask-ratio",
            0.5,
            "--seed",
            1,
        ],
        capsys,
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["output"] == str(output) and summary["norm_pix_loss"] is False
    with Image.open(output) as image:
        assert image.size == (600, 300)


def test_reconstruct_errors(workspace, capsys):
    assert_one_line_error(
        *run_cli(["reconstruct", workspace / "clip_0.mp4", "--model", workspace / "classifier"], capsys)[::2],
        contains="CavMaeForPreTraining checkpoint",
    )
    assert_one_line_error(
        *run_cli(["reconstruct", workspace / "silent.mp4", "--model", workspace / "pretrained"], capsys)[::2],
        contains="needs audio and frames",
    )
    assert (
        run_cli(
            ["reconstruct", workspace / "clip_0.mp4", "--model", workspace / "pretrained", "--visual-mask-ratio", 1.5],
            capsys,
        )[0]
        == 2
    )


# ----------------------------------------------------------------------------------------------------------------
# convert, demo
# ----------------------------------------------------------------------------------------------------------------
def test_convert(tmp_path, capsys):
    """`convert` is a subcommand like the others: its own usage line, a text summary, `--json`, `--quiet`,
    `--debug`, and one `error:` line with exit code 2 for bad input."""
    original = FIXTURES / "original" / "tiny_pretrain.pth"
    heads = ["--num-attention-heads", "4", "--decoder-num-attention-heads", "4"]  # tiny widths: no released count
    code, out, _ = run_cli(
        ["convert", "--checkpoint", original, "--output", tmp_path / "converted", *heads, "--json"], capsys
    )
    assert code == 0 and json.loads(out)["model_class"] == "CavMaeForPreTraining"
    assert (tmp_path / "converted" / "config.json").is_file()
    assert (tmp_path / "converted" / "README.md").read_text().startswith("---")
    code, out, err = run_cli(["convert", "--checkpoint", original, "--output", tmp_path / "again", *heads, "-q"], capsys)
    assert code == 0 and out.startswith("wrote CavMaeForPreTraining (") and str(tmp_path / "again") in out
    assert len(out.splitlines()) == 1 and err == ""
    code, out, _ = run_cli(["convert", "--help"], capsys)
    assert code == 0 and out.startswith("usage: cavmae convert") and "--checkpoint" in out and "--json" in out
    missing = ["convert", "--checkpoint", tmp_path / "missing.pth", "--output", tmp_path / "x"]
    assert_one_line_error(*run_cli(missing, capsys)[::2], contains="Checkpoint not found")
    with pytest.raises(CheckpointConversionError, match="Checkpoint not found"):
        cli.main(["--debug", *map(str, missing)])


def test_demo_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli(["demo"], capsys)
    assert code == 2 and "demo is not available" in err


def test_demo_missing_dependency_names_it_and_the_install_command(monkeypatch, capsys):
    import_module = cli.importlib.import_module

    def without_datasets(name, *args, **kwargs):
        if name == "cavmae_hf.demo":
            raise ImportError("No module named 'datasets'")
        return import_module(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", without_datasets)
    code, out, err = run_cli(["demo", "--quick"], capsys)
    assert code == 2 and out == ""
    assert_one_line_error(code, err, contains="without the module 'datasets'")
    assert 'pip install "cavmae-hf[demo]"' in err


def test_demo_is_delegated(monkeypatch, capsys):
    calls = []
    demo = types.ModuleType("cavmae_hf.demo")
    demo.__spec__ = importlib.machinery.ModuleSpec("cavmae_hf.demo", None)
    demo.add_arguments = lambda parser: parser.add_argument("--port", type=int, default=7860)
    demo.run = lambda args: calls.append(args.port) or 0
    monkeypatch.setitem(sys.modules, "cavmae_hf.demo", demo)
    assert run_cli(["demo", "--port", 1234], capsys)[0] == 0 and calls == [1234]
    code, out, _ = run_cli(["demo", "--help"], capsys)
    assert code == 0 and "usage: cavmae demo" in out and "--port" in out
