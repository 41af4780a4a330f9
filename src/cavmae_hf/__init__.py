"""CAV-MAE (Contrastive Audio-Visual Masked Autoencoder) for Hugging Face Transformers."""

from cavmae_hf_cli import __version__ as __version__  # the one version string (setup.cfg reads it there too)

from .configuration_cav_mae import CavMaeConfig, CavMaeConfigError, CavMaeError
from .feature_extraction_cav_mae import CavMaeFeatureExtractor
from .modeling_cav_mae import (
    CavMaeForAudioVisualClassification,
    CavMaeForPreTraining,
    CavMaeModel,
    CavMaePreTrainedModel,
)
from .registration import register_auto_classes

register_auto_classes()

__all__ = [
    "CavMaeConfig",
    "CavMaeConfigError",
    "CavMaeError",
    "CavMaeFeatureExtractor",
    "CavMaeModel",
    "CavMaePreTrainedModel",
    "CavMaeForPreTraining",
    "CavMaeForAudioVisualClassification",
]

from .pipelines import register_pipelines  # noqa: E402  (after the Auto classes it loads models with)

register_pipelines()
