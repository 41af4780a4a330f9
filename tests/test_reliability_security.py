"""
Untrusted checkpoints and files (issue 7):

- third-party `.pth` / `pytorch_model.bin` files are read only with `torch.load(weights_only=True)`: a pickle that asks
  for code is refused, nothing in it runs (converter API, `cavmae convert`, pipelines, `cavmae classify`);
- everything the package writes is safetensors / JSON / text / PNG, never a pickle (models, feature extractors,
  converted checkpoints, retrieval indices);
- with the package installed no `trust_remote_code` is needed and the code copied into a saved directory never runs;
- decoding and classifying media spawns no process (no ffmpeg binary): `subprocess`, `os.system`, `fork` and
  `exec*` are made to fail while a video is loaded, classified by the pipeline and by the CLI in-process.
"""

import contextlib
import io
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_cli, tiny_config_kwargs
from inference_helpers import save_tiny_classifier, save_tiny_pretraining, write_clip, write_png, write_wav
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForPreTraining,
    pipeline,
)

import cavmae_hf
from cavmae_hf import (
    CavMaeConfig,
    CavMaeFeatureExtractor,
    CavMaeForAudioVisualClassification,
    CavMaeForPreTraining,
    CavMaeModel,
    cli,
    media,
)
from cavmae_hf.convert_original_checkpoint import (
    CheckpointConversionError,
    convert_checkpoint,
    load_original_state_dict,
)
from cavmae_hf.pipelines import CLASSIFICATION_TASK, FEATURE_EXTRACTION_TASK, CheckpointLoadError, cav_mae_pipeline
from cavmae_hf.retrieval import RetrievalIndex

PRETRAIN = FIXTURES / "original" / "tiny_pretrain.pth"
FINETUNED = FIXTURES / "original" / "tiny_finetuned.pth"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}




# ----------------------------------------------------------------------------------------------------------------
# Malicious pickles
# ----------------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls `os.mkdir(marker)`: the marker directory appearing means code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_malicious(path: Path, marker: Path, kind: str) -> Path:
    state = {"module.patch_embed_v.proj.weight": torch.zeros(4, 3, 16, 16), "module.norm.weight": Payload(marker)}
    if kind == "zip":
        torch.save(state, path)
    elif kind == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle, as a hand-made "checkpoint" would be
        with open(path, "wb") as handle:
            pickle.dump(state, handle, protocol=2)
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
def test_converter_refuses_pickles_that_need_code(tmp_path, kind):
    marker = tmp_path / "code_ran"
    path = write_malicious(tmp_path / "evil.pth", marker, kind)
    with pytest.raises(CheckpointConversionError, match="weights_only=True") as raised:
        load_original_state_dict(path)
    assert not marker.exists()
    assert "posix.mkdir" in str(raised.value) or "could not be read" in str(raised.value)
    assert "weights_only` set to `False` will likely succeed" not in str(raised.value)  # no advice to disable it


def test_cli_convert_refuses_a_malicious_checkpoint(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = write_malicious(tmp_path / "evil.pth", marker, "zip")
    code, out, err = run_cli(["convert", "--checkpoint", path, "--output", tmp_path / "out"], capsys)
    assert code == 2 and "asks for `posix.mkdir`" in err and "refused" in err and out == ""
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture()
def evil_model_dir(tmp_path):
    """A saved classifier whose weights were replaced by a pytorch_model.bin that runs code when unpickled."""
    folder = save_tiny_classifier(tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({"classifier.dense.bias": Payload(marker)}, folder / "pytorch_model.bin")
    return folder, marker


def test_pipelines_and_cli_refuse_a_malicious_pytorch_model_bin(evil_model_dir, tmp_path, capsys):
    folder, marker = evil_model_dir
    clip = write_clip(tmp_path / "clip.mp4")
    for task in (CLASSIFICATION_TASK, FEATURE_EXTRACTION_TASK):
        with pytest.raises(CheckpointLoadError, match="asks for `posix.mkdir`, which could run code .* refused"):
            cav_mae_pipeline(task, folder)
    code, _, err = run_cli(["classify", clip, "--model", folder, "-q"], capsys)
    assert code == 2 and err.startswith("error: ") and "refused" in err and "Traceback" not in err
    with pytest.raises(pickle.UnpicklingError):  # transformers' own loader: weights_only=True as well
        CavMaeForAudioVisualClassification.from_pretrained(folder)
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers.pipeline raises, nothing may run
        pipeline(CLASSIFICATION_TASK, model=str(folder))
    assert not marker.exists()


def test_every_torch_load_is_weights_only(tmp_path, monkeypatch):
    """Converter, directory checks and from_pretrained of a legitimate pytorch_model.bin: torch.load is only ever
    called with weights_only=True."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    convert_checkpoint(PRETRAIN, tmp_path / "converted", num_attention_heads=4, decoder_num_attention_heads=4)
    folder = save_tiny_classifier(tmp_path / "bin")
    model = CavMaeForAudioVisualClassification.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    classifier = cav_mae_pipeline(CLASSIFICATION_TASK, folder)  # a legitimate pickle of tensors still loads
    assert torch.equal(classifier.model.classifier.dense.weight, model.classifier.dense.weight)
    assert len(calls) >= 3 and all(flag is True for flag in calls), calls


# ----------------------------------------------------------------------------------------------------------------
# Everything written is safetensors / JSON / text / PNG
# ----------------------------------------------------------------------------------------------------------------
def assert_no_pickles(folder: Path):
    files = [path for path in Path(folder).rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert path.suffix.lower() not in PICKLE_SUFFIXES, path
        head = path.read_bytes()[:4]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"pickle: {path}"
        assert head != b"PK\x03\x04", f"zip (torch.save format): {path}"
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                assert list(handle.keys())
        else:
            assert path.suffix in {".json", ".md", ".py", ".png", ".txt"}, path


def test_everything_the_package_writes_is_safe_to_open(tmp_path, capsys):
    config = CavMaeConfig(**tiny_config_kwargs(num_labels=3))
    for model_class in (CavMaeModel, CavMaeForPreTraining, CavMaeForAudioVisualClassification):
        model_class(config).save_pretrained(tmp_path / "saved" / model_class.__name__)
    CavMaeFeatureExtractor().save_pretrained(tmp_path / "saved" / "feature_extractor")
    convert_checkpoint(PRETRAIN, tmp_path / "converted" / "pretrain", num_attention_heads=4, decoder_num_attention_heads=4)
    convert_checkpoint(FINETUNED, tmp_path / "converted" / "finetuned", num_attention_heads=4)
    models = tmp_path / "models"
    save_tiny_classifier(models / "classifier")
    save_tiny_pretraining(models / "pretrained")
    clip = write_clip(models / "clip.mp4")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    code, _, err = run_cli(
        ["embed", clip, "--model", models / "classifier", "--output", outputs / "index.safetensors", "-q"], capsys
    )
    assert code == 0, err
    code, _, err = run_cli(
        ["reconstruct", clip, "--model", models / "pretrained", "--output", outputs / "r.png", "--dpi", 20], capsys
    )
    assert code == 0, err
    index = RetrievalIndex.load(outputs / "index.safetensors")
    index.save(outputs / "copy.safetensors")
    for folder in (tmp_path / "saved", tmp_path / "converted", outputs):
        assert_no_pickles(folder)


# ----------------------------------------------------------------------------------------------------------------
# No remote code
# ----------------------------------------------------------------------------------------------------------------
def test_saved_directories_load_without_running_their_code(tmp_path, capsys):
    folder = save_tiny_classifier(tmp_path / "classifier")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].startswith("modeling_cav_mae.")  # the remote-code route exists
    marker = tmp_path / "remote_code_ran"
    copies = sorted(folder.glob("*.py"))
    assert {path.name for path in copies} >= {"modeling_cav_mae.py", "configuration_cav_mae.py"}
    for path in copies:  # replace the code shipped in the directory by code that leaves a trace
        path.write_text(f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\nraise SystemExit('remote code')\n")

    for loader, expected in (
        (AutoConfig, cavmae_hf.CavMaeConfig),
        (AutoModel, CavMaeModel),
        (AutoModelForPreTraining, CavMaeForPreTraining),
        (AutoModelForAudioClassification, CavMaeForAudioVisualClassification),
        (AutoFeatureExtractor, CavMaeFeatureExtractor),
    ):
        for trust in ({}, {"trust_remote_code": False}):
            loaded = loader.from_pretrained(folder, **trust)
            assert type(loaded) is expected, (loader, type(loaded))
    classifier = pipeline(CLASSIFICATION_TASK, model=str(folder))
    assert type(classifier.model) is CavMaeForAudioVisualClassification
    code, _, err = run_cli(["classify", write_clip(tmp_path / "clip.mp4"), "--model", folder, "-q"], capsys)
    assert code == 0, err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# No subprocess
# ----------------------------------------------------------------------------------------------------------------
class ProcessSpawned(AssertionError):
    pass


@pytest.fixture()
def no_processes(monkeypatch):
    """Make every way of starting a process fail loudly."""

    def refuse(*args, **kwargs):
        raise ProcessSpawned(f"a process was started: {args[:2]}")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)  # what every Popen / run / check_output calls
    for name in (
        "system",
        "popen",
        "fork",
        "forkpty",
        "posix_spawn",
        "posix_spawnp",
        "execv",
        "execve",
        "execvp",
        "execvpe",
        "spawnv",
        "spawnve",
    ):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    import multiprocessing

    monkeypatch.setattr(multiprocessing.Process, "start", refuse)
    with pytest.raises(ProcessSpawned):  # the guard works
        subprocess.run(["true"])


def test_decoding_and_classifying_spawn_no_process(tmp_path, capsys, no_processes):
    folder = save_tiny_classifier(tmp_path / "classifier")
    clip = write_clip(tmp_path / "clip.mp4", seconds=1.5)
    wav, png = write_wav(tmp_path / "tone.wav"), write_png(tmp_path / "frame.png")
    mp3 = media.write_audio(tmp_path / "tone.mp3", np.zeros(16000, np.float32), 44100)
    video = media.load_video(clip, num_frames=4)
    assert video.audio is not None and len(video.frames) == 4
    assert media.load_audio(mp3)[1] == 16000 and len(media.resample(video.audio, 16000, 44100)) > 0
    classifier = cav_mae_pipeline(CLASSIFICATION_TASK, folder)
    assert len(classifier(str(clip), top_k=2)) == 2
    assert len(classifier([str(clip), str(wav), str(png)], batch_size=2, num_frames=2)) == 3
    transformers_pipeline = pipeline(CLASSIFICATION_TASK, model=str(folder))
    assert len(transformers_pipeline(str(clip), top_k=1)) == 1
    code, out, err = run_cli(["classify", clip, wav, png, "--model", folder, "--json", "--batch-size", 2], capsys)
    assert code == 0, err
    assert len(json.loads(out)) == 3
    code, _, err = run_cli(
        ["embed", clip, "--model", folder, "--output", tmp_path / "index.safetensors", "-q"], capsys
    )
    assert code == 0, err
    index = tmp_path / "index.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["retrieve", str(wav), "--model", str(folder), "--index", str(index)]) == 0
