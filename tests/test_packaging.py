"""Packaging: the build declares every folder it ships (no setuptools warnings), and running the demo in a checkout
leaves nothing for git to pick up."""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_build_declares_its_data_folders_and_ships_them(tmp_path):
    """`data/` and `model_cards/` hold no Python: declared as packages (find_namespace), setuptools builds them
    without its "Package 'cavmae_hf.data' is absent from the `packages` configuration" warnings (~60 lines in
    every install)."""
    build = [sys.executable, "-c", "from setuptools import setup; setup()", "build_py", "--build-lib", str(tmp_path)]
    completed = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    assert "absent from the `packages` configuration" not in output and "Package would be ignored" not in output
    assert (tmp_path / "cavmae_hf" / "data" / "audioset_labels.csv").is_file()
    assert len(list((tmp_path / "cavmae_hf" / "model_cards").glob("*.md"))) >= 6
    assert (tmp_path / "cavmae_hf_cli.py").is_file()  # the console script's module


def test_the_demo_output_in_a_checkout_is_ignored_by_git():
    from cavmae_hf import demo

    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    default = Path(parser.get_default("output_dir"))
    assert not default.is_absolute()  # relative to where the demo runs: the checkout's root, typically
    for written in ("demo.png", "results.json", "videos/class_0/clip_0.mp4", "pretrained/model.safetensors"):
        ignored = subprocess.run([git, "check-ignore", "-q", str(default / written)], cwd=ROOT, timeout=60)
        assert ignored.returncode == 0, f"{default / written} would show up in `git status`"
