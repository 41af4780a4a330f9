"""CAV-MAE model configuration."""

from transformers import PretrainedConfig

AUDIO_MASK_MODES = ("unstructured", "time", "freq", "tf")
CLASSIFICATION_MODES = ("multimodal", "audio", "visual")
CONTRASTIVE_NEGATIVES = ("global", "local")


class CavMaeError(ValueError):
    """
    The base of every error cavmae-hf raises on purpose (bad inputs, files, checkpoints, options): one
    `except CavMaeError` catches them all. A `ValueError`, so code written against `ValueError` keeps working.
    Defined here, in a module with no heavy imports, so that every other module can derive from it.
    """


class CavMaeConfigError(CavMaeError):
    """A configuration value (of the model, of training, of generated data) is out of range or inconsistent with
    another one."""


class CavMaeArgumentError(CavMaeError, TypeError):
    """A CAV-MAE function or pipeline got keyword arguments it does not take (also a `TypeError`, as Python's own
    error for a misspelt argument is)."""


class CavMaeConfig(PretrainedConfig):
    r"""
    Configuration of a CAV-MAE model (Gong et al., *Contrastive Audio-Visual Masked Autoencoder*, ICLR 2023).
    The defaults build the released ViT-B model: 11 modality-specific layers per modality, 1 shared layer,
    audio of 1024 frames x 128 mel bins (512 patches), images of 224 x 224 (196 patches).

    Every architecture of the paper is a configuration of the same classes:

    - CAV-MAE: the defaults.
    - vanilla AV-MAE: `num_modality_specific_layers=0, num_shared_layers=12, contrastive_loss_weight=0.0`.
    - CAV (contrastive only): `mae_loss_weight=0.0` (the decoder is not run).

    Masking and loss fields (`audio_mask_ratio`, `visual_mask_ratio`, `audio_mask_mode`, `norm_pix_loss`,
    `mae_loss_weight`, `contrastive_loss_weight`, `contrastive_temperature`, `bidirectional_contrastive`,
    `contrastive_negatives`, `classification_mode`) are read at call time, so changing them on a loaded model
    takes effect at the next forward.

    Args:
        hidden_size (`int`, *optional*, defaults to 768): width of the encoder.
        num_attention_heads (`int`, *optional*, defaults to 12): attention heads of each encoder layer.
        intermediate_size (`int`, *optional*, defaults to 3072): width of the encoder MLPs.
        num_modality_specific_layers (`int`, *optional*, defaults to 11): layers of each modality's own stack.
        num_shared_layers (`int`, *optional*, defaults to 1): layers whose attention and MLP weights serve the
            audio, visual and joint streams (each stream keeps its own LayerNorms).
        patch_size (`int`, *optional*, defaults to 16): side of the square patches of both modalities.
        image_size (`int`, *optional*, defaults to 224): side of the square input frames.
        num_channels (`int`, *optional*, defaults to 3): channels of the input frames.
        num_mel_bins (`int`, *optional*, defaults to 128): mel bins of the input spectrogram.
        audio_length (`int`, *optional*, defaults to 1024): frames of the input spectrogram.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation (exact, erf-based GELU).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): dropout after attention and MLP.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): dropout on attention weights.
        qkv_bias (`bool`, *optional*, defaults to `True`): bias of the query/key/value projection.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of every LayerNorm.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the modality and mask tokens.
        trainable_position_embeddings (`bool`, *optional*, defaults to `False`): whether the sin-cos position
            embeddings receive gradients (the reference freezes them in pretraining and trains them when
            fine-tuning).
        decoder_hidden_size (`int`, *optional*, defaults to 512): width of the pretraining decoder.
        decoder_num_hidden_layers (`int`, *optional*, defaults to 8): layers of the decoder.
        decoder_num_attention_heads (`int`, *optional*, defaults to 16): attention heads of the decoder.
        decoder_intermediate_size (`int`, *optional*, defaults to 2048): width of the decoder MLPs.
        audio_mask_ratio (`float`, *optional*, defaults to 0.75): share of audio patches removed in pretraining.
        visual_mask_ratio (`float`, *optional*, defaults to 0.75): share of visual patches removed in pretraining.
        audio_mask_mode (`str`, *optional*, defaults to `"unstructured"`): `"unstructured"`, or whole
            time columns (`"time"`), frequency rows (`"freq"`) or both (`"tf"`).
        norm_pix_loss (`bool`, *optional*, defaults to `True`): reconstruct per-patch normalised targets.
        mae_loss_weight (`float`, *optional*, defaults to 1.0): weight of the reconstruction losses; 0 skips
            the decoder.
        contrastive_loss_weight (`float`, *optional*, defaults to 0.01): weight of the InfoNCE loss; 0 skips
            the modality streams in pretraining.
        contrastive_temperature (`float`, *optional*, defaults to 0.05): InfoNCE temperature.
        bidirectional_contrastive (`bool`, *optional*, defaults to `False`): average the audio->visual and
            visual->audio InfoNCE terms (the reference default is one-directional).
        contrastive_negatives (`str`, *optional*, defaults to `"global"`): under `torch.distributed`,
            `"global"` gathers the embeddings of every process (with gradient) so that negatives come from the
            whole global batch; `"local"` keeps per-process negatives, as the reference's per-device loss
            effectively had. With one process both are the same.
        classification_mode (`str`, *optional*, defaults to `"multimodal"`): what the classifier pools:
            the joint stream (`"multimodal"`), the audio stream (`"audio"`) or the visual stream (`"visual"`).
    """

    model_type = "cav_mae"
    # per-frame scores are not part of what `Trainer` gathers as predictions (its `compute_metrics` gets the logits)
    keys_to_ignore_at_inference = ["frame_logits"]

    def __init__(
        self,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        num_modality_specific_layers=11,
        num_shared_layers=1,
        patch_size=16,
        image_size=224,
        num_channels=3,
        num_mel_bins=128,
        audio_length=1024,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        trainable_position_embeddings=False,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        decoder_intermediate_size=2048,
        audio_mask_ratio=0.75,
        visual_mask_ratio=0.75,
        audio_mask_mode="unstructured",
        norm_pix_loss=True,
        mae_loss_weight=1.0,
        contrastive_loss_weight=0.01,
        contrastive_temperature=0.05,
        bidirectional_contrastive=False,
        contrastive_negatives="global",
        classification_mode="multimodal",
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_modality_specific_layers = num_modality_specific_layers
        self.num_shared_layers = num_shared_layers
        self.patch_size = patch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.num_mel_bins = num_mel_bins
        self.audio_length = audio_length
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.trainable_position_embeddings = trainable_position_embeddings
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.audio_mask_ratio = audio_mask_ratio
        self.visual_mask_ratio = visual_mask_ratio
        self.audio_mask_mode = audio_mask_mode
        self.norm_pix_loss = norm_pix_loss
        self.mae_loss_weight = mae_loss_weight
        self.contrastive_loss_weight = contrastive_loss_weight
        self.contrastive_temperature = contrastive_temperature
        self.bidirectional_contrastive = bidirectional_contrastive
        self.contrastive_negatives = contrastive_negatives
        self.classification_mode = classification_mode
        super().__init__(**kwargs)
        self.validate_cav_mae()

    # Pipelines as remote code ---------------------------------------------------------------------------------
    @property
    def custom_pipelines(self) -> dict:
        """
        The checkpoint's pipelines for `transformers.pipeline(task, model=dir, trust_remote_code=True)` where cavmae-hf
        is not installed. Empty once `import cavmae_hf` has registered the same tasks, so that the installed
        pipelines serve without `trust_remote_code` (transformers asks for it whenever a config names custom
        pipelines). Saved with the config either way.
        """
        saved = self.__dict__.get("custom_pipelines") or {}
        if saved and _tasks_registered(saved):
            return {}
        return saved

    @custom_pipelines.setter
    def custom_pipelines(self, value):
        self.__dict__["custom_pipelines"] = value

    # Derived sizes -------------------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        """Depth of each modality's path through the encoder (modality-specific plus shared layers)."""
        return self.num_modality_specific_layers + self.num_shared_layers

    @property
    def audio_grid_size(self) -> tuple[int, int]:
        """(frequency, time) patches of the spectrogram: (8, 64) for the released models."""
        return self.num_mel_bins // self.patch_size, self.audio_length // self.patch_size

    @property
    def visual_grid_size(self) -> tuple[int, int]:
        """(height, width) patches of a frame: (14, 14) for the released models."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_audio_patches(self) -> int:
        freq, time = self.audio_grid_size
        return freq * time

    @property
    def num_visual_patches(self) -> int:
        height, width = self.visual_grid_size
        return height * width

    # Validation ----------------------------------------------------------------------------------------------
    def validate_cav_mae(self):
        """Raise a `CavMaeConfigError` naming the first inconsistent field."""
        _require(self.hidden_size > 0 and self.num_attention_heads > 0, "hidden_size and num_attention_heads must be positive")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})",
        )
        _require(
            self.decoder_hidden_size % self.decoder_num_attention_heads == 0,
            f"decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by "
            f"decoder_num_attention_heads ({self.decoder_num_attention_heads})",
        )
        _require(self.hidden_size % 4 == 0, f"hidden_size ({self.hidden_size}) must be divisible by 4 (2-D sin-cos position embeddings)")
        _require(
            self.decoder_hidden_size % 4 == 0,
            f"decoder_hidden_size ({self.decoder_hidden_size}) must be divisible by 4 (2-D sin-cos position embeddings)",
        )
        for name in ("audio_length", "num_mel_bins", "image_size"):
            value = getattr(self, name)
            _require(
                value > 0 and value % self.patch_size == 0,
                f"{name} ({value}) must be a positive multiple of patch_size ({self.patch_size})",
            )
        _require(self.num_modality_specific_layers >= 0, "num_modality_specific_layers must be >= 0")
        _require(self.num_shared_layers >= 0, "num_shared_layers must be >= 0")
        _require(self.num_hidden_layers > 0, "the encoder needs at least one layer (modality-specific or shared)")
        for name in ("audio_mask_ratio", "visual_mask_ratio"):
            ratio = getattr(self, name)
            _require(0.0 <= ratio < 1.0, f"{name} must be in [0, 1), got {ratio}")
        _require(
            self.audio_mask_mode in AUDIO_MASK_MODES,
            f"audio_mask_mode must be one of {AUDIO_MASK_MODES}, got {self.audio_mask_mode!r}",
        )
        _require(
            self.classification_mode in CLASSIFICATION_MODES,
            f"classification_mode must be one of {CLASSIFICATION_MODES}, got {self.classification_mode!r}",
        )
        _require(
            self.contrastive_negatives in CONTRASTIVE_NEGATIVES,
            f"contrastive_negatives must be one of {CONTRASTIVE_NEGATIVES}, got {self.contrastive_negatives!r}",
        )
        _require(self.contrastive_temperature > 0, f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        _require(
            self.mae_loss_weight >= 0 and self.contrastive_loss_weight >= 0,
            "mae_loss_weight and contrastive_loss_weight must be >= 0",
        )


def _tasks_registered(tasks) -> bool:
    import sys

    registry = getattr(sys.modules.get("transformers.pipelines"), "PIPELINE_REGISTRY", None)
    return registry is not None and all(task in registry.get_supported_tasks() for task in tasks)


def _require(condition: bool, message: str):
    if not condition:
        raise CavMaeConfigError(message)
