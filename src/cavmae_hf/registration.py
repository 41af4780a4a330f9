"""Registration of the CAV-MAE classes with the Transformers Auto classes."""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForPreTraining,
)

from .configuration_cav_mae import CavMaeConfig
from .feature_extraction_cav_mae import CavMaeFeatureExtractor
from .modeling_cav_mae import CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel

_registered = False


def register_auto_classes():
    """Make `AutoConfig`, `AutoModel`, `AutoModelForPreTraining`, `AutoModelForAudioClassification` and
    `AutoFeatureExtractor` resolve `model_type="cav_mae"`, and let saved checkpoints carry `auto_map` so that
    users without the package can load them with `trust_remote_code=True`."""
    global _registered
    if _registered:
        return
    AutoConfig.register(CavMaeConfig.model_type, CavMaeConfig, exist_ok=True)
    AutoModel.register(CavMaeConfig, CavMaeModel, exist_ok=True)
    AutoModelForPreTraining.register(CavMaeConfig, CavMaeForPreTraining, exist_ok=True)
    AutoModelForAudioClassification.register(CavMaeConfig, CavMaeForAudioVisualClassification, exist_ok=True)
    AutoFeatureExtractor.register(CavMaeConfig, CavMaeFeatureExtractor, exist_ok=True)
    CavMaeConfig.register_for_auto_class()
    CavMaeModel.register_for_auto_class("AutoModel")
    CavMaeForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    CavMaeForAudioVisualClassification.register_for_auto_class("AutoModelForAudioClassification")
    CavMaeFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
    _registered = True
