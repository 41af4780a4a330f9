"""
Optional side-by-side comparison with the original CAV-MAE implementation (github.com/YuanGongND/cav-mae).

Nothing of the reference is copied into this project: when `CAVMAE_REFERENCE_SRC` points at a checkout of the
reference repository's `src` folder, its `models` package is imported from there. It needs `timm==0.4.5`
importable (see benchmarks/README.md for a set-up that keeps it out of the project's environment, e.g.
`pip install --no-deps --target DIR timm==0.4.5` and `CAVMAE_REFERENCE_DEPS=DIR`). Two shims make the 2021-era code
import on a current stack, without changing what it computes:

- `torchvision` is stubbed when missing (timm 0.4.5 imports its transforms at import time; the models never call
  them);
- `numpy.float` (removed in NumPy 1.24) is aliased to `float`, as the reference's position-embedding code uses it.

The reference model gets our model's weights through the converter's key mapping: the reference model's own
(random) state dict is mapped to our names and loaded into our model, so both compute with identical weights.
"""

import contextlib
import importlib
import io
import os
import sys
import types

import numpy as np
import torch

REFERENCE_ENV = "CAVMAE_REFERENCE_SRC"
DEPS_ENV = "CAVMAE_REFERENCE_DEPS"


def reference_src() -> str | None:
    path = os.environ.get(REFERENCE_ENV)
    if not path:
        return None
    if not os.path.isdir(os.path.join(path, "models")):
        raise SystemExit(f"{REFERENCE_ENV}={path} is not the reference's src folder (no models/ inside).")
    return path


def _stub_torchvision():
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        pass

    class _Anything:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            raise RuntimeError("torchvision is stubbed for the benchmark; the reference models never call it")

    def _module(name):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: _Anything  # noqa: E731 - PEP 562 module attribute hook
        module.__path__ = []
        return module

    torchvision = _module("torchvision")
    transforms = _module("torchvision.transforms")
    functional = _module("torchvision.transforms.functional")
    transforms.functional = functional
    torchvision.transforms = transforms
    sys.modules.update(
        {"torchvision": torchvision, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    )


def _import_first_from(path: str | None) -> None:
    if path and path not in sys.path:
        sys.path.insert(0, path)


def load_reference_models():
    """The reference's `models` module (with `CAVMAE`, `CAVMAEFT`), or None when `CAVMAE_REFERENCE_SRC` is unset."""
    src = reference_src()
    if src is None:
        return None
    _import_first_from(os.environ.get(DEPS_ENV))
    if not hasattr(np, "float"):
        np.float = float  # the reference's pos_embed.py uses the alias removed in NumPy 1.24
    _stub_torchvision()
    if src not in sys.path:
        sys.path.insert(0, src)
    import timm

    if not timm.__version__.startswith("0.4."):
        raise SystemExit(f"The reference needs timm 0.4.x (it overrides timm 0.4 internals); found timm {timm.__version__}.")
    return importlib.import_module("models")


def build_reference(models, kind: str, config, num_labels: int | None = None):
    """A reference `CAVMAE` (kind="pretrain") or `CAVMAEFT` (kind="finetune") of the size of `config`."""
    common = dict(
        img_size=config.image_size,
        audio_length=config.audio_length,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        modality_specific_depth=config.num_modality_specific_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its set-up
        if kind == "pretrain":
            return models.CAVMAE(
                decoder_embed_dim=config.decoder_hidden_size,
                decoder_depth=config.decoder_num_hidden_layers,
                decoder_num_heads=config.decoder_num_attention_heads,
                norm_pix_loss=config.norm_pix_loss,
                tr_pos=False,
                **common,
            )
        return models.CAVMAEFT(label_dim=num_labels, tr_pos=True, **common)


def load_reference_weights_into(ours: torch.nn.Module, reference: torch.nn.Module):
    """Copy the reference model's weights into ours through the converter's key mapping (strict)."""
    from cavmae_hf.convert_original_checkpoint import map_state_dict

    mapping = map_state_dict(reference.state_dict())
    if mapping.unmapped:
        raise RuntimeError(f"reference keys without a mapping: {mapping.unmapped}")
    ours.load_state_dict(mapping.state_dict, strict=True)
    ours.freeze_parameters()


def reference_encoder_streams(reference, audio, frames):
    """
    The three streams our `CavMaeModel` returns for both modalities, computed with the reference model's own modules
    (its `forward_feat` gives the audio and visual streams; the joint stream is the `blocks_u` / `norm` pass of its
    fine-tuning `forward`): (joint, audio, visual), each after its final LayerNorm.
    """
    a = reference.patch_embed_a(audio.unsqueeze(1).transpose(2, 3)) + reference.pos_embed_a + reference.modality_a
    v = reference.patch_embed_v(frames) + reference.pos_embed_v + reference.modality_v
    for block in reference.blocks_a:
        a = block(a)
    for block in reference.blocks_v:
        v = block(v)
    joint, audio_stream, visual_stream = torch.cat((a, v), dim=1), a, v
    for block in reference.blocks_u:
        joint = block(joint)
    for block in reference.blocks_u:
        audio_stream = block(audio_stream, "a")
    for block in reference.blocks_u:
        visual_stream = block(visual_stream, "v")
    return reference.norm(joint), reference.norm_a(audio_stream), reference.norm_v(visual_stream)


LOADER_DEPS_ENV = "CAVMAE_REFERENCE_LOADER_DEPS"


def _soundfile_load(path, *args, **kwargs):
    """`torchaudio.load` as the reference called it (float32 `[channels, samples]`, rate), read with soundfile:
    torchaudio 2.9+ reads files only through torchcodec, which this stack does not have."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), rate


def load_reference_dataloader():
    """
    The reference's `dataloader` module (with `AudiosetDataset`), or None when `CAVMAE_REFERENCE_SRC` is unset. It
    imports torchaudio and torchvision: `CAVMAE_REFERENCE_LOADER_DEPS` is a folder holding both, installed with
    `pip install --no-deps --target DIR torchaudio==2.11.0 torchvision==0.28.0` and torchaudio's compiled libraries
    moved out of `DIR/torchaudio/lib` (its `compliance.kaldi` and masking transforms are plain torch). Shims:
    torchvision's operator registrations (which need its own compiled library) are skipped (the reference uses only
    its PIL transforms), and `torchaudio.load` reads WAV files with soundfile.
    """
    src = reference_src()
    if src is None:
        return None
    _import_first_from(os.environ.get(LOADER_DEPS_ENV))
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchaudio

    torchaudio.load = _soundfile_load
    _import_first_from(src)
    return importlib.import_module("dataloader")
