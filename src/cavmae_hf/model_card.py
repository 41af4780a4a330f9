"""Model cards for converted and trained CAV-MAE checkpoints, rendered from the templates in `model_cards/`."""

from importlib import resources
from string import Template

TEMPLATES = {
    "CavMaeForPreTraining": "pretrained.md",
    "CavMaeModel": "pretrained.md",
    "CavMaeForAudioVisualClassification": "finetuned.md",
}


def render_model_card(model, source_name: str, extra: dict | None = None) -> str:
    """Fill the template that fits `model`'s class with its configuration and `source_name`."""
    config = model.config
    num_labels = getattr(config, "num_labels", 0)
    dataset = {527: "AudioSet", 309: "VGGSound"}.get(num_labels, "custom")
    values = {
        "source": source_name,
        "model_class": type(model).__name__,
        "num_parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
        "hidden_size": config.hidden_size,
        "specific_layers": config.num_modality_specific_layers,
        "shared_layers": config.num_shared_layers,
        "audio_length": config.audio_length,
        "image_size": config.image_size,
        "num_labels": num_labels,
        "dataset": dataset,
        "dataset_tag": {"AudioSet": "agkphysics/AudioSet", "VGGSound": "Loie/VGGSound"}.get(dataset, "custom"),
        "classification_mode": config.classification_mode,
        "problem_type": config.problem_type or "single_label_classification",
        "norm_pix_loss": config.norm_pix_loss,
    }
    values.update(extra or {})
    template = resources.files("cavmae_hf").joinpath(f"model_cards/{TEMPLATES[type(model).__name__]}").read_text()
    return Template(template).safe_substitute(values)
