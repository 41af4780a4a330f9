"""Shared test helpers: the fixtures folder, tiny configurations, deterministic seeds, one torch thread, the
in-process command line."""

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


def tiny_config_kwargs(**overrides):
    """A CAV-MAE small enough for unit tests: 64 audio frames x 32 mel bins (8 patches), 32 x 32 frames (4)."""
    kwargs = dict(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_modality_specific_layers=2,
        num_shared_layers=1,
        patch_size=8,
        image_size=32,
        num_mel_bins=32,
        audio_length=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"Ground-truth fixtures not found at {FIXTURES}: the shared/ folder must sit beside the repo.")
    return FIXTURES


@pytest.fixture
def tiny_config():
    from cavmae_hf import CavMaeConfig

    return CavMaeConfig(**tiny_config_kwargs())


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_module():
    """One torch thread for a whole test module, its module-scoped fixtures included (`_seed_and_one_thread` below
    only covers each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv, capsys):
    """Run the `cavmae` command line in-process on `argv` (paths allowed); returns (exit code, stdout, stderr)."""
    from cavmae_hf import cli

    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny models gain nothing from a second thread, and on a busy 2-core machine contention makes them 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
