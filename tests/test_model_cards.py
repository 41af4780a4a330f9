"""Model card templates: the right template per checkpoint kind, valid Hub metadata, the reference figures."""

from importlib import resources

import pytest
from conftest import tiny_config_kwargs

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel
from cavmae_hf.model_card import ModelCardError, card_metadata, render_model_card, template_name

HUB_LICENSE = "bsd-2-clause"
CASES = [
    # model class, config overrides, template, pipeline_tag, datasets, figures the card must quote
    (
        CavMaeForPreTraining,
        {},
        "pretrained.md",
        "feature-extraction",
        ["agkphysics/AudioSet"],
        ["42.2", "51.1", "65.8"],
    ),
    (CavMaeModel, {}, "pretrained.md", "feature-extraction", ["agkphysics/AudioSet"], ["51.1"]),
    (
        CavMaeForAudioVisualClassification,
        {"num_labels": 527, "problem_type": "multi_label_classification"},
        "finetuned_audioset.md",
        "video-classification",
        ["agkphysics/AudioSet"],
        ["42.2", "51.1"],
    ),
    (
        CavMaeForAudioVisualClassification,
        {"num_labels": 309},
        "finetuned_vggsound.md",
        "video-classification",
        ["Loie/VGGSound"],
        ["65.8", "65.9"],
    ),
    (
        CavMaeForAudioVisualClassification,
        {"num_labels": 527, "classification_mode": "audio"},
        "audio_only.md",
        "audio-classification",
        ["agkphysics/AudioSet"],
        ["46.6", "38.2"],
    ),
    (
        CavMaeForAudioVisualClassification,
        {"num_labels": 527, "classification_mode": "visual"},
        "visual_only.md",
        "image-classification",
        ["agkphysics/AudioSet"],
        ["20.0"],
    ),
    (CavMaeForAudioVisualClassification, {"num_labels": 4}, "finetuned.md", "video-classification", None, []),
]


@pytest.mark.parametrize("model_class,overrides,template,pipeline_tag,datasets,figures", CASES)
def test_cards(model_class, overrides, template, pipeline_tag, datasets, figures):
    model = model_class(CavMaeConfig(**tiny_config_kwargs(**overrides)))
    assert template_name(model) == template
    card = render_model_card(model, "original.pth", extra={"model_id": "someone/cav-mae"})
    metadata = card_metadata(card)
    assert metadata["license"] == HUB_LICENSE and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == pipeline_tag and "cav-mae" in metadata["tags"]
    assert metadata.get("datasets") == datasets
    assert metadata["metrics"]
    assert "$" not in card.replace("$ ", "")  # every placeholder filled
    assert "original.pth" in card and "someone/cav-mae" in card and "@inproceedings{gong2023contrastive" in card
    for figure in figures:
        assert figure in card


def test_every_template_is_used():
    templates = {
        path.name
        for path in resources.files("cavmae_hf").joinpath("model_cards").iterdir()
        if path.name.endswith(".md")
    }
    assert templates == {case[2] for case in CASES}


def test_norm_pix_loss_note_and_extra_template():
    model = CavMaeForPreTraining(CavMaeConfig(**tiny_config_kwargs(norm_pix_loss=True)))
    assert "norm_pix_loss=True" in render_model_card(model, "x.pth")
    plain = CavMaeForPreTraining(CavMaeConfig(**tiny_config_kwargs(norm_pix_loss=False)))
    assert "norm_pix_loss=True" not in render_model_card(plain, "x.pth")
    classifier = CavMaeForAudioVisualClassification(CavMaeConfig(**tiny_config_kwargs(num_labels=527)))
    card = render_model_card(
        classifier, "x.pth", extra={"template": "audio_only.md", "reported_results": "Measured: 1.0."}
    )
    assert "audio-only" in card and "Measured: 1.0." in card


def test_invalid_front_matter_is_refused():
    with pytest.raises(ModelCardError, match="front matter"):
        card_metadata("# no metadata")
    with pytest.raises(ModelCardError, match="pipeline_tag"):
        card_metadata("---\nlicense: mit\nlibrary_name: transformers\ntags:\n  - a\n---\n")
    with pytest.raises(ModelCardError, match="datasets"):
        card_metadata(
            "---\nlicense: mit\nlibrary_name: transformers\ntags: [a]\npipeline_tag: x\n"
            "datasets:\n  - $dataset_tag\n---\n"
        )
