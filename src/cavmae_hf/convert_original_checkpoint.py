"""
Convert an original CAV-MAE checkpoint (`YuanGongND/cav-mae`, a flat `.pth` state dict, usually saved from
`nn.DataParallel` with a `module.` prefix) into a `save_pretrained` directory.

    python -m cavmae_hf.convert_original_checkpoint --checkpoint cav-mae-scale++.pth --output cav-mae-scale++
    python -m cavmae_hf.convert_original_checkpoint --checkpoint as-full-51.2.pth --output cav-mae-as2m

Pretraining checkpoints (with decoder) become `CavMaeForPreTraining`, fine-tuned ones (with `mlp_head`)
`CavMaeForAudioVisualClassification`, encoder-only ones `CavMaeModel`. Sizes, depths, the split between
modality-specific and shared layers, the audio length and the number of labels are read from the tensor shapes.
Every key must be mapped: unmapped or missing keys stop the conversion with their list. `--partial` is for
starting points that cover only part of the model: missing weights keep their initialisation, keys that map to
nothing are left out, both listed; shapes must still match. (The reference's ImageNet-MAE initialisation for
pretraining, `IN-initial.pth`, is a whole pretraining checkpoint and needs no `--partial`.)
"""

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_cav_mae import CavMaeConfig, CavMaeError
from .feature_extraction_cav_mae import CavMaeFeatureExtractor
from .labels import audioset_labels, read_label_csv
from .modeling_cav_mae import CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel

AUDIOSET_NUM_LABELS = 527
VGGSOUND_NUM_LABELS = 309


class CheckpointConversionError(CavMaeError):
    """The file is not an original CAV-MAE checkpoint, or some of its keys or shapes cannot be mapped."""


# Original key patterns -> our names. `{i}` is a layer index, `{s}` a tensor suffix (weight/bias).
_LAYER_PARTS = {
    r"attn\.qkv": "attention.qkv",
    r"attn\.proj": "attention.proj",
    r"mlp\.fc1": "mlp.fc1",
    r"mlp\.fc2": "mlp.fc2",
}
_STREAM_NORMS = {"": "joint", "_a": "audio", "_v": "visual"}
_STACKS = {
    "blocks_a": ("cav_mae.audio_layers", "audio"),
    "blocks_v": ("cav_mae.visual_layers", "visual"),
    "blocks_u": ("cav_mae.shared_layers", None),
    "decoder_blocks": ("decoder.layers", "joint"),
}
_SINGLE_KEYS = {
    "patch_embed_a.proj": "cav_mae.embeddings.audio_patch_embeddings",
    "patch_embed_v.proj": "cav_mae.embeddings.visual_patch_embeddings",
    "pos_embed_a": "cav_mae.embeddings.audio_position_embeddings",
    "pos_embed_v": "cav_mae.embeddings.visual_position_embeddings",
    "modality_a": "cav_mae.embeddings.audio_modality_embedding",
    "modality_v": "cav_mae.embeddings.visual_modality_embedding",
    "norm_a": "cav_mae.final_layernorm.audio",
    "norm_v": "cav_mae.final_layernorm.visual",
    "norm": "cav_mae.final_layernorm.joint",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",
    "decoder_modality_a": "decoder.audio_modality_embedding",
    "decoder_modality_v": "decoder.visual_modality_embedding",
    "decoder_pos_embed_a": "decoder.audio_position_embeddings",
    "decoder_pos_embed_v": "decoder.visual_position_embeddings",
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred_a": "decoder.audio_prediction",
    "decoder_pred_v": "decoder.visual_prediction",
    "mlp_head.0": "classifier.layernorm",
    "mlp_head.1": "classifier.dense",
}

# Parameters stored under their own name, not as a module's weight/bias.
_BARE_PARAMETERS = {
    "pos_embed_a",
    "pos_embed_v",
    "modality_a",
    "modality_v",
    "mask_token",
    "decoder_modality_a",
    "decoder_modality_v",
    "decoder_pos_embed_a",
    "decoder_pos_embed_v",
}


@dataclass
class KeyMapping:
    """Result of mapping an original state dict: our keys, and what could not be mapped or is unused by design."""

    state_dict: dict = field(default_factory=dict)
    unmapped: list = field(default_factory=list)
    unused: list = field(default_factory=list)
    initialized: list = field(default_factory=list)  # with `partial`: our keys the checkpoint has no weights for
    ignored: list = field(default_factory=list)  # with `partial`: keys of the checkpoint that were left out


def map_key(key: str) -> str | None:
    """
    Our name for an original key, `""` for a key the original model carries but never uses (the audio/visual
    LayerNorms of modality-specific and decoder layers: the reference's block class has them everywhere, but
    only the shared layers use them), or `None` when the key is unknown.
    """
    match = re.fullmatch(r"(blocks_a|blocks_v|blocks_u|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
    if match:
        stack, index, part, suffix = match.groups()
        prefix, own_stream = _STACKS[stack]
        norm = re.fullmatch(r"norm([12])(|_a|_v)", part)
        if norm:
            position = "layernorm_before" if norm.group(1) == "1" else "layernorm_after"
            stream = _STREAM_NORMS[norm.group(2)]
            if own_stream is not None and stream != "joint":
                return ""
            return f"{prefix}.{index}.{position}.{own_stream or stream}.{suffix}"
        for pattern, ours in _LAYER_PARTS.items():
            if re.fullmatch(pattern, part):
                return f"{prefix}.{index}.{ours}.{suffix}"
        return None
    stem, dot, suffix = key.rpartition(".")
    if dot and suffix in ("weight", "bias") and stem in _SINGLE_KEYS:
        return f"{_SINGLE_KEYS[stem]}.{suffix}"
    if key in _BARE_PARAMETERS:
        return _SINGLE_KEYS[key]
    return None


def map_state_dict(original: dict) -> KeyMapping:
    mapping = KeyMapping()
    for key, tensor in original.items():
        ours = map_key(key)
        if ours is None:
            mapping.unmapped.append(key)
        elif ours == "":
            mapping.unused.append(key)
        else:
            mapping.state_dict[ours] = tensor
    return mapping


# Loading ---------------------------------------------------------------------------------------------------------
def refused_pickle_global(error: BaseException) -> str | None:
    """The Python object (`module.name`) a pickle asked for that `torch.load(weights_only=True)` refused, if that is
    why it failed (None for files that are damaged or no pickle at all)."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def load_original_state_dict(path) -> dict:
    """Read a `.pth` with `torch.load(weights_only=True)` and strip the `module.` prefix of `nn.DataParallel`.

    Only tensors, plain containers and numbers are read: a pickle that asks for any other Python object (which
    could run code) is refused without running anything.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointConversionError(f"{path} is a directory; --checkpoint takes the original .pth file.")
    if not path.is_file():
        raise CheckpointConversionError(f"Checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unpickler errors all mean the same thing to the user
        refused = refused_pickle_global(error)
        if refused is not None:
            raise CheckpointConversionError(
                f"{path} could not be read with torch.load(weights_only=True): it is a pickle that asks for "
                f"`{refused}`, which could run code when loaded, so it is refused. Only plain state dicts of tensors "
                "are converted; do not load this file with weights_only=False unless you trust its source."
            ) from None
        raise CheckpointConversionError(
            f"{path} could not be read as a PyTorch checkpoint with weights_only=True ({type(error).__name__}: "
            f"{_first_line(error)}). It may be truncated, not a checkpoint, or a pickle that needs arbitrary code, "
            "which is refused."
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointConversionError(f"{path} does not hold a flat state dict of tensors.")
    return {str(key).removeprefix("module."): tensor for key, tensor in loaded.items()}


def _first_line(error: BaseException) -> str:
    """The first sentence of torch's message (not its advice to turn the weights-only check off)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return first.split(". This file can still be loaded")[0].split(". In PyTorch 2.6")[0]


# Configuration from shapes -------------------------------------------------------------------------------------
def _count_layers(state_dict: dict, stack: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{stack}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _shape(state_dict: dict, key: str, rank: int | None = None):
    if key not in state_dict:
        raise CheckpointConversionError(
            f"The checkpoint has no `{key}`: it is not an original CAV-MAE checkpoint (or it is truncated)."
        )
    shape = tuple(state_dict[key].shape)
    if rank is not None and len(shape) != rank:
        raise CheckpointConversionError(
            f"`{key}` has shape {shape}; an original CAV-MAE checkpoint has a {rank}-D tensor there."
        )
    return shape


# Head counts of the released checkpoints by width (not stored in the weights).
RELEASED_HEADS = {768: 12}
RELEASED_DECODER_HEADS = {512: 16}


def _head_count(width: int, given: int | None, released: dict[int, int], option: str) -> int:
    if given is not None:
        return given
    if width in released:
        return released[width]
    python_name = option.replace("-", "_")
    raise CheckpointConversionError(
        f"The checkpoint's {'decoder ' if 'decoder' in option else ''}layers are {width} wide, not a released width "
        f"({', '.join(f'{w}: {h} heads' for w, h in released.items())}), and the number of attention heads is not "
        f"stored in the weights: give it with --{option} (convert_checkpoint({python_name}=...))."
    )


def infer_config(
    state_dict: dict,
    num_mel_bins: int = 128,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    **overrides,
) -> CavMaeConfig:
    """
    A `CavMaeConfig` read off the tensor shapes. Head counts are not visible in the weights: for the released widths
    they are the released models' (768: 12 heads, decoder 512: 16); any other width needs them given, else a
    `CheckpointConversionError` names the option (a guessed count would convert into a different model).
    """
    hidden_size, num_channels, patch_size, _ = _shape(state_dict, "patch_embed_v.proj.weight", rank=4)
    num_audio_patches = _shape(state_dict, "pos_embed_a", rank=3)[1]
    num_visual_patches = _shape(state_dict, "pos_embed_v", rank=3)[1]
    if patch_size < 1 or num_mel_bins < patch_size:
        raise CheckpointConversionError(f"{num_mel_bins} mel bins do not hold one {patch_size}-wide patch.")
    freq_patches = num_mel_bins // patch_size
    if num_audio_patches % freq_patches:
        raise CheckpointConversionError(
            f"{num_audio_patches} audio patches do not fit {num_mel_bins} mel bins with patch size {patch_size}."
        )
    image_side = round(num_visual_patches**0.5)
    if image_side * image_side != num_visual_patches:
        raise CheckpointConversionError(
            f"`pos_embed_v` holds {num_visual_patches} visual patches, which is not a square grid."
        )
    specific_layers = _count_layers(state_dict, "blocks_a")
    shared_layers = _count_layers(state_dict, "blocks_u")
    first_layer = "blocks_a.0" if specific_layers else "blocks_u.0"
    config = dict(
        hidden_size=hidden_size,
        num_attention_heads=_head_count(hidden_size, num_attention_heads, RELEASED_HEADS, "num-attention-heads"),
        intermediate_size=_shape(state_dict, f"{first_layer}.mlp.fc1.weight", rank=2)[0],
        num_modality_specific_layers=specific_layers,
        num_shared_layers=shared_layers,
        patch_size=patch_size,
        image_size=image_side * patch_size,
        num_channels=num_channels,
        num_mel_bins=num_mel_bins,
        audio_length=num_audio_patches // freq_patches * patch_size,
    )
    if "decoder_embed.weight" in state_dict:
        decoder_size = _shape(state_dict, "decoder_embed.weight", rank=2)[0]
        config.update(
            decoder_hidden_size=decoder_size,
            decoder_num_hidden_layers=_count_layers(state_dict, "decoder_blocks"),
            decoder_num_attention_heads=_head_count(
                decoder_size, decoder_num_attention_heads, RELEASED_DECODER_HEADS, "decoder-num-attention-heads"
            ),
            decoder_intermediate_size=_shape(state_dict, "decoder_blocks.0.mlp.fc1.weight", rank=2)[0],
        )
    if "mlp_head.1.weight" in state_dict:
        config.update(
            trainable_position_embeddings=True, num_labels=_shape(state_dict, "mlp_head.1.weight", rank=2)[0]
        )
    config.update({k: v for k, v in overrides.items() if v is not None})
    return CavMaeConfig(**config)


def model_class_for(state_dict: dict):
    if any(key.startswith("decoder_") for key in state_dict):
        return CavMaeForPreTraining
    if any(key.startswith("mlp_head.") for key in state_dict):
        return CavMaeForAudioVisualClassification
    return CavMaeModel


def default_labels(num_labels: int) -> dict[int, str] | None:
    """The AudioSet class names for a 527-label head (the released AudioSet checkpoints), else None."""
    return audioset_labels().id2label if num_labels == AUDIOSET_NUM_LABELS else None


# Conversion --------------------------------------------------------------------------------------------------
def convert_state_dict(original: dict, config: CavMaeConfig, model_class=None, partial: bool = False):
    """
    Build the model for `config` and load the mapped weights into it, checking every key and shape. With
    `partial`, missing weights keep their initialisation and unknown keys are left out (listed in the mapping's
    `initialized` and `ignored`).
    """
    model_class = model_class or model_class_for(original)
    mapping = map_state_dict(original)
    model = model_class(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapping.state_dict))
    unexpected = sorted(set(mapping.state_dict) - set(expected))
    if partial:
        mapping.initialized, missing = missing, []
        mapping.ignored = mapping.unmapped + unexpected
        mapping.unmapped, unexpected = [], []
        mapping.state_dict = {key: tensor for key, tensor in mapping.state_dict.items() if key in expected}
    mismatched = [
        f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}"
        for key, tensor in mapping.state_dict.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    not_float = [key for key, tensor in mapping.state_dict.items() if not tensor.is_floating_point()]
    not_finite = [
        key
        for key, tensor in mapping.state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    problems = []
    if not_float:
        problems.append(f"tensors that are not floating point (weights are float): {not_float}")
    if not_finite:
        problems.append(f"tensors holding NaN or Inf (a damaged or diverged checkpoint): {not_finite}")
    if mapping.unmapped:
        problems.append(f"keys of the checkpoint that map to nothing: {mapping.unmapped}")
    if unexpected:
        problems.append(f"keys the {model_class.__name__} does not have: {unexpected}")
    if missing:
        problems.append(f"keys of the {model_class.__name__} missing from the checkpoint: {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise CheckpointConversionError("Cannot convert the checkpoint:\n- " + "\n- ".join(problems))
    model.load_state_dict(mapping.state_dict, strict=not partial)
    model.freeze_parameters()
    return model.eval(), mapping


def convert_checkpoint(
    checkpoint,
    output_dir,
    label_csv=None,
    num_mel_bins: int = 128,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    classification_mode: str | None = None,
    problem_type: str | None = None,
    source_name: str | None = None,
    partial: bool = False,
):
    """
    Convert `checkpoint` into `output_dir` (safetensors, config, feature-extractor config, model card).
    `partial`: accept a checkpoint that covers only part of the model (see the module's docstring).
    """
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise CheckpointConversionError(f"--output {output_dir} is a file; give a directory to write the model into.")
    original = load_original_state_dict(checkpoint)
    model_class = model_class_for(original)
    config = infer_config(
        original,
        num_mel_bins=num_mel_bins,
        num_attention_heads=num_attention_heads,
        decoder_num_attention_heads=decoder_num_attention_heads,
        classification_mode=classification_mode,
    )
    if model_class is CavMaeForAudioVisualClassification:
        labels = read_label_csv(label_csv).id2label if label_csv else default_labels(config.num_labels)
        if labels is not None:
            if len(labels) != config.num_labels:
                raise CheckpointConversionError(
                    f"The label file has {len(labels)} labels but the checkpoint's head has {config.num_labels}."
                )
            config.id2label = labels
            config.label2id = {name: index for index, name in labels.items()}
        config.problem_type = problem_type or (
            "multi_label_classification" if config.num_labels == AUDIOSET_NUM_LABELS else "single_label_classification"
        )
    model, mapping = convert_state_dict(original, config, model_class, partial=partial)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    CavMaeFeatureExtractor.from_model_config(config).save_pretrained(output_dir)
    _write_model_card(output_dir, model, source_name or Path(checkpoint).name)
    return model, mapping


def _write_model_card(output_dir: Path, model, source_name: str):
    from .model_card import render_model_card

    (output_dir / "README.md").write_text(render_model_card(model, source_name), encoding="utf-8")


def convert_from_arguments(args) -> dict:
    """Run [`convert_checkpoint`] with the options of `cavmae convert` (see `cavmae_hf_cli.add_convert_options`);
    returns the summary the command prints."""
    model, mapping = convert_checkpoint(
        args.checkpoint,
        args.output,
        label_csv=args.label_csv,
        num_mel_bins=args.num_mel_bins,
        num_attention_heads=args.num_attention_heads,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        classification_mode=args.classification_mode,
        problem_type=args.problem_type,
        partial=args.partial,
    )
    summary = {
        "output": str(args.output),
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "unused_original_keys": len(mapping.unused),
    }
    if args.partial:
        summary.update(initialized_keys=mapping.initialized, ignored_original_keys=mapping.ignored)
    return summary


def main(argv=None) -> int:
    """`python -m cavmae_hf.convert_original_checkpoint ARGS` is `cavmae convert ARGS`; returns the exit code."""
    from .cli import main as cavmae_main

    return cavmae_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
