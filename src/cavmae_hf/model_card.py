"""
Model cards for converted and trained CAV-MAE checkpoints, rendered from the templates in `model_cards/`:

- `pretrained.md`: self-supervised checkpoints (`CavMaeForPreTraining`, `CavMaeModel`);
- `finetuned_audioset.md`, `finetuned_vggsound.md`: audio-visual classifiers with the AudioSet (527) or
  VGGSound (309) label sets;
- `audio_only.md`, `visual_only.md`: classifiers with `classification_mode="audio"` / `"visual"` on those sets;
- `finetuned.md`: classifiers with any other label set.

Every template starts with Hub metadata (license, library_name, tags, pipeline_tag, datasets, metrics) in YAML
front matter; [`render_model_card`] checks that it parses.
"""

from importlib import resources
from string import Template

import yaml

from .configuration_cav_mae import CavMaeError

CITATION = """## Citation
```bibtex
@inproceedings{gong2023contrastive,
  title={Contrastive Audio-Visual Masked Autoencoder},
  author={Gong, Yuan and Rouditchenko, Andrew and Liu, Alexander H. and Harwath, David and Karlinsky, Leonid and Kuehne, Hilde and Glass, James R.},
  booktitle={The Eleventh International Conference on Learning Representations},
  year={2023}
}
```

Original code and weights: https://github.com/YuanGongND/cav-mae (BSD-2-Clause). The conversion maps the weights
one to one and is checked against the original implementation; the reference figures above were not re-measured
on the converted weights."""

DATASETS = {527: ("AudioSet", "agkphysics/AudioSet"), 309: ("VGGSound", "Loie/VGGSound")}
METRICS = {"AudioSet": "mean_average_precision", "VGGSound": "accuracy"}
MODALITY_DESCRIPTIONS = {"multimodal": "audio-visual", "audio": "audio-only", "visual": "visual-only"}
PIPELINE_TAGS = {
    "multimodal": "video-classification",
    "audio": "audio-classification",
    "visual": "image-classification",
}
NORM_PIX_NOTE = (
    "\n  This model was pretrained with `norm_pix_loss=True`: its reconstructions are per-patch normalised and are "
    "shown re-scaled to the hidden patches' statistics; use a model pretrained with `norm_pix_loss=False` for faithful "
    "inpainting."
)


class ModelCardError(CavMaeError):
    """A model card could not be rendered into valid Hub metadata."""


def template_name(model) -> str:
    """The template that fits `model`'s class, classification mode and label set."""
    if not hasattr(model, "classifier"):
        return "pretrained.md"
    config = model.config
    dataset = DATASETS.get(config.num_labels, (None, None))[0]
    if dataset is None:
        return "finetuned.md"
    if config.classification_mode == "audio":
        return "audio_only.md"
    if config.classification_mode == "visual":
        return "visual_only.md"
    return "finetuned_audioset.md" if dataset == "AudioSet" else "finetuned_vggsound.md"


def template_values(model, source_name: str) -> dict:
    """The placeholders every template may use."""
    config = model.config
    is_classifier = hasattr(model, "classifier")
    num_labels = config.num_labels if is_classifier else 0
    dataset, dataset_tag = DATASETS.get(
        num_labels, ("AudioSet", "agkphysics/AudioSet") if not is_classifier else ("custom", None)
    )
    mode = config.classification_mode
    return {
        "source": source_name,
        "model_id": "PATH_OR_HUB_ID",
        "model_class": type(model).__name__,
        "num_parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
        "hidden_size": config.hidden_size,
        "specific_layers": config.num_modality_specific_layers,
        "shared_layers": config.num_shared_layers,
        "audio_length": config.audio_length,
        "num_mel_bins": config.num_mel_bins,
        "image_size": config.image_size,
        "num_labels": num_labels,
        "dataset": dataset,
        "dataset_tag": dataset_tag,
        "metric": METRICS.get(dataset, "accuracy"),
        "classification_mode": mode,
        "modality_description": MODALITY_DESCRIPTIONS.get(mode, mode),
        "pipeline_tag": PIPELINE_TAGS.get(mode, "video-classification"),
        "problem_type": config.problem_type or "single_label_classification",
        "norm_pix_loss": config.norm_pix_loss,
        "reconstruction_note": NORM_PIX_NOTE if config.norm_pix_loss else "",
        "reported_results": "",
        "citation": CITATION,
    }


def render_model_card(model, source_name: str, extra: dict | None = None) -> str:
    """
    Fill the template that fits `model` with its configuration and `source_name` (the original checkpoint's file
    name). `extra` overrides or adds values, e.g. `{"model_id": "user/cav-mae-as2m", "reported_results": "..."}`
    or `{"template": "pretrained.md"}` to choose the template.
    """
    values = template_values(model, source_name)
    values.update(extra or {})
    name = values.pop("template", None) or template_name(model)
    template = resources.files("cavmae_hf").joinpath(f"model_cards/{name}").read_text(encoding="utf-8")
    card = Template(template).safe_substitute(values)
    card_metadata(card)  # raises if the front matter is not valid
    return card


def card_metadata(card: str) -> dict:
    """The YAML front matter of a rendered card, checked for the fields the Hub uses."""
    if not card.startswith("---\n"):
        raise ModelCardError("A model card must start with YAML front matter ('---').")
    try:
        metadata = yaml.safe_load(card[4 : card.index("\n---", 4)])
    except (ValueError, yaml.YAMLError) as error:
        raise ModelCardError(f"The model card's front matter is not valid YAML: {error}") from None
    for field in ("license", "library_name", "tags", "pipeline_tag"):
        if not metadata.get(field):
            raise ModelCardError(f"The model card's metadata lacks {field!r}.")
    for field in ("tags", "datasets", "metrics"):
        values = metadata.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v and "$" not in v for v in values):
            raise ModelCardError(f"The model card's {field!r} must be a list of names, got {values!r}.")
    return metadata
