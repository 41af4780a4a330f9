"""
Pipelines for CAV-MAE, registered with Transformers on `import cavmae_hf`:

- `"audio-visual-classification"` ([`AudioVisualClassificationPipeline`]): labels of a video, an audio file, an
  image, or a dict `{"audio": waveform, "sampling_rate": int, "frames": [images]}` (either modality may be missing).
- `"audio-visual-feature-extraction"` ([`AudioVisualFeatureExtractionPipeline`]): pooled audio, visual and joint
  embeddings (and optionally the token states) of the same inputs.

```python
import cavmae_hf
from transformers import pipeline

classifier = pipeline("audio-visual-classification", model="path/to/cav-mae-audioset")
classifier("clip.mp4", top_k=5)           # [{"label": "Speech", "score": 0.91}, ...]
classifier(["a.mp4", "b.mp4"], batch_size=2)
```

Files are decoded with [`cavmae_hf.media`]: a video gives its 16 kHz mono audio track and `num_frames` frames
sampled uniformly over its first 10 s (as the reference prepared its data). Several frames of one clip are
classified together: the audio's modality-specific layers run once per clip, only the visual and shared layers run
per frame, and the per-frame probabilities are averaged (see `CavMaeForAudioVisualClassification`).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoModelForAudioClassification
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.base import Pipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator
from transformers.utils import logging

from . import media
from .feature_extraction_cav_mae import CavMaeFeatureExtractor
from .modeling_cav_mae import AUDIO, JOINT, VISUAL, CavMaeInputError, validate_inputs

logger = logging.get_logger(__name__)

CLASSIFICATION_TASK = "audio-visual-classification"
FEATURE_EXTRACTION_TASK = "audio-visual-feature-extraction"
DEFAULT_NUM_FRAMES = 10

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus", ".aac", ".m4a", ".wma", ".aiff", ".aif"})


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Clip:
    """One clip to run through a CAV-MAE model: mono `audio` `[N]` at `sampling_rate` and/or RGB `frames`."""

    audio: np.ndarray | None = None
    sampling_rate: int | None = None
    frames: list = field(default_factory=list)
    source: str | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(
            name for name, present in ((AUDIO, self.audio is not None), (VISUAL, bool(self.frames))) if present
        )


def load_clip(source, num_frames: int = DEFAULT_NUM_FRAMES, sampling_rate: int = media.DEFAULT_SAMPLING_RATE) -> Clip:
    """
    Decode what a pipeline was given into a [`Clip`]:

    - a path to an image (by extension): one frame;
    - a path to an audio file (by extension), or to a media file without a video stream: audio only;
    - a path to any other media file: its audio track and `num_frames` frames (a video without an audio stream
      gives frames only, with a warning);
    - a dict `{"audio": waveform, "sampling_rate": int, "frames": [images]}` (either modality may be missing;
      `"array"` / `"raw"` are accepted for `"audio"`, `"images"` for `"frames"`), resampled to `sampling_rate`;
    - a [`Clip`] (resampled if needed).

    Raises:
        MediaError: unreadable, missing or empty files.
        CavMaeInputError: inputs of the wrong kind.
    """
    if isinstance(source, Clip):
        clip = source
    elif isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), num_frames, sampling_rate)
    elif isinstance(source, dict):
        clip = _clip_from_dict(source)
    else:
        raise CavMaeInputError(
            "Expected a file path, a dict with 'audio'/'sampling_rate'/'frames', or a Clip; "
            f"got {type(source).__name__}."
        )
    if clip.audio is not None and clip.sampling_rate != sampling_rate:
        clip = Clip(
            media.resample(clip.audio, clip.sampling_rate, sampling_rate), sampling_rate, clip.frames, clip.source
        )
    return clip


def _load_path(path: Path, num_frames: int, sampling_rate: int) -> Clip:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return Clip(frames=[_load_image(path)], source=str(path))
    if suffix in AUDIO_EXTENSIONS:
        audio, rate = media.load_audio(path, sampling_rate=sampling_rate)
        return Clip(audio=audio, sampling_rate=rate, source=str(path))
    has_audio, has_video = _probe_streams(path)
    if not has_video:
        audio, rate = media.load_audio(path, sampling_rate=sampling_rate)
        return Clip(audio=audio, sampling_rate=rate, source=str(path))
    if not has_audio:
        logger.warning(f"{path} has no audio stream: only its frames are used.")
    video = media.load_video(path, num_frames=num_frames, sampling_rate=sampling_rate, load_audio=has_audio)
    return Clip(audio=video.audio, sampling_rate=video.sampling_rate, frames=list(video.frames), source=str(path))


def _probe_streams(path: Path) -> tuple[bool, bool]:
    """(has an audio stream, has a video stream), reading only the header."""
    import av

    if not path.is_file():
        raise media.MediaError(f"File not found: {path}")
    try:
        with av.logging.Capture(), av.open(str(path), metadata_errors="ignore") as container:  # no FFmpeg log lines
            return bool(container.streams.audio), bool(container.streams.video)
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error).strip() or type(error).__name__
        raise media.MediaError(f"{path} is not a readable media file ({reason}).") from None


def _load_image(path: Path):
    from PIL import Image

    if not path.is_file():
        raise media.MediaError(f"File not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise media.MediaError(f"{path} is not a readable image ({error}).") from None


def _clip_from_dict(inputs: dict) -> Clip:
    known = {"audio", "array", "raw", "sampling_rate", "frames", "images", "path"}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise CavMaeInputError(f"Unknown keys {unknown} in the input dict; use 'audio', 'sampling_rate' and 'frames'.")
    audio = next((inputs[key] for key in ("audio", "array", "raw") if inputs.get(key) is not None), None)
    frames = next((inputs[key] for key in ("frames", "images") if inputs.get(key) is not None), None)
    if audio is None and frames is None:
        raise CavMaeInputError("The input dict has neither 'audio' nor 'frames'.")
    if audio is not None:
        if inputs.get("sampling_rate") is None:
            raise CavMaeInputError("The input dict has 'audio' but no 'sampling_rate'.")
        audio = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if frames is not None and not isinstance(frames, (list, tuple)):
        frames = list(frames) if getattr(frames, "ndim", 0) == 4 else [frames]
    return Clip(audio, inputs.get("sampling_rate"), list(frames or []), inputs.get("path"))


def clip_features(feature_extractor: CavMaeFeatureExtractor, clip: Clip) -> dict[str, torch.Tensor]:
    """Model inputs of one clip: `input_features` `[1, T, F]` and/or `pixel_values` `[1, num_frames, 3, S, S]`."""
    features = {}
    if clip.audio is not None:
        extracted = feature_extractor(audio=clip.audio, sampling_rate=clip.sampling_rate, return_tensors="pt")
        features["input_features"] = extracted["input_features"]
    if clip.frames:
        features["pixel_values"] = feature_extractor(images=[list(clip.frames)], return_tensors="pt")["pixel_values"]
    return features


def feature_extractor_for(config) -> CavMaeFeatureExtractor:
    """A [`CavMaeFeatureExtractor`] matching the input sizes of a CAV-MAE `config` (for models saved without one)."""
    return CavMaeFeatureExtractor(
        num_mel_bins=config.num_mel_bins, max_length=config.audio_length, image_size=config.image_size
    )


def load_feature_extractor(model_dir, config) -> CavMaeFeatureExtractor:
    """The feature extractor saved in `model_dir` (a local directory), else one built from `config`."""
    from transformers import AutoFeatureExtractor

    if (Path(model_dir) / "preprocessor_config.json").is_file():
        return AutoFeatureExtractor.from_pretrained(model_dir)
    return feature_extractor_for(config)


def load_model_as_saved(model_dir, dtype=None):
    """The CAV-MAE model of `model_dir` as the class it was saved as (`config.architectures`), so that no weight is
    left unused; a feature-extraction pipeline then uses its `cav_mae` encoder."""
    from transformers import AutoConfig

    from .modeling_cav_mae import CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel

    classes = {cls.__name__: cls for cls in (CavMaeModel, CavMaeForPreTraining, CavMaeForAudioVisualClassification)}
    config = AutoConfig.from_pretrained(model_dir)
    saved_as = next((classes[name] for name in (config.architectures or []) if name in classes), CavMaeModel)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return saved_as.from_pretrained(model_dir, config=config, **kwargs)


def cav_mae_pipeline(task: str, model, device=None, dtype=None) -> Pipeline:
    """
    `transformers.pipeline(task, model=model)` for a CAV-MAE model directory, Hub id or loaded model; for a local
    directory and the feature-extraction task, the checkpoint is loaded as the class it was saved as (no "unused
    weights" report for classification or pretraining checkpoints) with the directory's feature extractor.
    """
    from transformers import pipeline

    kwargs = {} if device is None else {"device": device}
    if isinstance(model, (str, os.PathLike)) and task == FEATURE_EXTRACTION_TASK and Path(model).is_dir():
        loaded = load_model_as_saved(model, dtype=dtype)
        return pipeline(task, model=loaded, feature_extractor=load_feature_extractor(model, loaded.config), **kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return pipeline(task, model=str(model) if isinstance(model, os.PathLike) else model, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------
def _signature(features: dict) -> tuple:
    """Clips with equal signatures (which inputs, how many frames) can be concatenated into one model call."""
    return tuple(sorted((key, tuple(value.shape[1:])) for key, value in features.items()))


def collate_clips(items: list[dict]) -> dict:
    """
    Batch the preprocessed clips of a DataLoader batch. Clips that carry the same inputs (modalities and frame
    count) are concatenated into one group; a batch mixing, say, silent videos and full clips runs one model call
    per group. Returns `{"groups": [(positions, {name: tensor [b, ...]}), ...]}`.
    """
    positions_by_signature = {}
    for position, item in enumerate(items):
        positions_by_signature.setdefault(_signature(item), []).append(position)
    groups = []
    for positions in positions_by_signature.values():
        keys = items[positions[0]].keys()
        groups.append((positions, {key: torch.cat([items[p][key] for p in positions]) for key in keys}))
    return {"groups": groups}


class _CavMaePipeline(Pipeline):
    """Input decoding, feature extraction, grouped batching and dtype handling shared by the CAV-MAE pipelines."""

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_tokenizer = False
    _load_feature_extractor = None  # loaded from the model directory when there is one, else built from the config

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.model.config, "model_type", None) != "cav_mae":
            raise ValueError(f"The {self.task!r} pipeline needs a CAV-MAE model, got {type(self.model).__name__}.")
        self.model.eval()
        if self.feature_extractor is None:
            self.feature_extractor = feature_extractor_for(self.model.config)
        self._check_feature_extractor()

    def _check_feature_extractor(self):
        config, extractor = self.model.config, self.feature_extractor
        expected = {
            "max_length": config.audio_length,
            "num_mel_bins": config.num_mel_bins,
            "image_size": config.image_size,
        }
        mismatched = {
            k: (getattr(extractor, k, None), v) for k, v in expected.items() if getattr(extractor, k, None) != v
        }
        if mismatched:
            details = ", ".join(f"{k}={got} (model: {want})" for k, (got, want) in mismatched.items())
            raise ValueError(f"The feature extractor does not fit the model: {details}.")

    # Steps ------------------------------------------------------------------------------------------------------
    def preprocess(self, inputs, num_frames: int = DEFAULT_NUM_FRAMES) -> dict[str, torch.Tensor]:
        clip = load_clip(inputs, num_frames=num_frames, sampling_rate=self.feature_extractor.sampling_rate)
        return clip_features(self.feature_extractor, clip)

    def _forward(self, model_inputs, **forward_params):
        """Run each group of equal-shaped clips once; return `{"clips": [per-clip dict of tensors]}` in input order."""
        groups = model_inputs["groups"] if "groups" in model_inputs else [([0], model_inputs)]
        clips = [None] * sum(len(positions) for positions, _ in groups)
        for positions, inputs in groups:
            outputs = self.run_model(self._cast(inputs), **forward_params)
            for row, position in enumerate(positions):
                clips[position] = {name: value[row] for name, value in outputs.items()}
        return {"clips": clips}

    def run_model(self, inputs: dict[str, torch.Tensor], **forward_params) -> dict[str, torch.Tensor]:
        """Batched model outputs `{name: [b, ...]}` for inputs of one group."""
        raise NotImplementedError

    @staticmethod
    def _single_clip(model_outputs) -> dict:
        clips = model_outputs["clips"]
        return clips[0] if isinstance(clips, list) else clips  # unbatched by the pipeline's iterator: one dict

    def _cast(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        return {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        if batch_size == 1:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        # As the base class, but clips are batched by `collate_clips` (no padding: clips of one shape are stacked).
        if hasattr(inputs, "__len__"):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
            num_workers = min(num_workers, 1)
        loader = torch.utils.data.DataLoader(
            dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate_clips
        )
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    @staticmethod
    def _reject_unknown(kwargs: dict):
        if kwargs:
            raise TypeError(f"Unexpected pipeline arguments: {sorted(kwargs)}")

    @staticmethod
    def _num_frames_param(num_frames) -> dict:
        if num_frames is None:
            return {}
        if int(num_frames) < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}.")
        return {"num_frames": int(num_frames)}


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------
class AudioVisualClassificationPipeline(_CavMaePipeline):
    """
    Audio-visual classification with [`CavMaeForAudioVisualClassification`].

    Inputs: a path to a video (its audio track and `num_frames` frames), an audio file, an image, a dict
    `{"audio": waveform, "sampling_rate": int, "frames": [images]}` (either may be missing), or a list of those.
    With several frames the per-frame probabilities are averaged; the audio encoder runs once per clip.

    Scores are sigmoid probabilities for multi-label models (`config.problem_type ==
    "multi_label_classification"`, e.g. AudioSet), softmax otherwise, raw values for regression; override with
    `function_to_apply`.

    Returns, per input, a list of `{"label": str, "score": float}`, best first (`top_k` of them, default 5;
    `top_k=None` for all labels).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        architectures = getattr(self.model.config, "architectures", None) or []
        if not hasattr(self.model, "classifier"):
            raise ValueError(
                f"The {self.task!r} pipeline needs CavMaeForAudioVisualClassification, got {type(self.model).__name__}."
            )
        if architectures and not any(name.endswith("ForAudioVisualClassification") for name in architectures):
            logger.warning(
                f"This checkpoint was saved as {', '.join(architectures)}, not as a classifier: its classification "
                "head is newly initialised and its scores are meaningless until it is fine-tuned."
            )

    def _sanitize_parameters(self, num_frames=None, function_to_apply=None, **kwargs):
        postprocess_params = {}
        if "top_k" in kwargs:
            top_k = kwargs.pop("top_k")
            num_labels = self.model.config.num_labels
            postprocess_params["top_k"] = num_labels if top_k is None else min(int(top_k), num_labels)
            if postprocess_params["top_k"] < 1:
                raise ValueError(f"top_k must be at least 1, got {top_k}.")
        if function_to_apply is not None:
            if function_to_apply not in ("softmax", "sigmoid", "none"):
                raise ValueError(
                    f"function_to_apply must be 'softmax', 'sigmoid' or 'none', got {function_to_apply!r}."
                )
            postprocess_params["function_to_apply"] = function_to_apply
        self._reject_unknown(kwargs)
        return self._num_frames_param(num_frames), {}, postprocess_params

    def run_model(self, inputs):
        output = self.model(**inputs)
        return {"logits": output.logits}

    def postprocess(self, model_outputs, top_k: int = 5, function_to_apply: str | None = None):
        logits = self._single_clip(model_outputs)["logits"].float()
        scores = self.scores_from_logits(logits, function_to_apply or self.default_function)
        top_scores, top_ids = scores.topk(min(top_k, scores.shape[-1]))
        id2label = self.model.config.id2label
        return [{"label": id2label[i], "score": s} for s, i in zip(top_scores.tolist(), top_ids.tolist())]

    @property
    def default_function(self) -> str:
        problem_type = self.model.config.problem_type
        if problem_type == "multi_label_classification":
            return "sigmoid"
        if problem_type == "regression" or (problem_type is None and self.model.config.num_labels == 1):
            return "none"
        return "softmax"

    @staticmethod
    def scores_from_logits(logits: torch.Tensor, function_to_apply: str) -> torch.Tensor:
        if function_to_apply == "softmax":
            return logits.softmax(dim=-1)
        if function_to_apply == "sigmoid":
            return logits.sigmoid()
        return logits


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------
def encode_clips(
    encoder, input_features=None, pixel_values=None, output_token_states: bool = False
) -> dict[str, torch.Tensor]:
    """
    Embeddings of a batch of clips from a [`CavMaeModel`] (`encoder`), with the audio encoded once per clip.

    Args:
        input_features: `[B, T, F]` or None.
        pixel_values: `[B, C, H, W]` or `[B, num_frames, C, H, W]`, or None.
    Returns (the entries of the given modalities; D = hidden size, Fr = frames):
        `audio_embeds` `[B, D]`: mean-pooled audio stream.
        `frame_embeds` `[B, Fr, D]`: mean-pooled visual stream of each frame.
        `visual_embeds` `[B, D]`: mean of `frame_embeds` over the frames.
        `joint_embeds` `[B, D]` (both modalities): mean-pooled joint stream, averaged over the frames.
        With `output_token_states`: `audio_last_hidden_state` `[B, Na, D]`, `visual_last_hidden_state`
        `[B, Fr, Nv, D]` and (both modalities) `last_hidden_state` `[B, Fr, Na + Nv, D]`.
    """
    validate_inputs(encoder.config, input_features, pixel_values, allow_frames=True)
    outputs = {}
    audio = visual = None
    if input_features is not None:
        audio = encoder.encode_modality(encoder.embed(AUDIO, input_features), AUDIO)
        audio_stream = encoder.encode_shared(audio, AUDIO)
        outputs["audio_embeds"] = audio_stream.mean(dim=1)
        if output_token_states:
            outputs["audio_last_hidden_state"] = audio_stream
    if pixel_values is not None:
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        batch_size, num_frames = pixel_values.shape[:2]
        visual = encoder.encode_modality(encoder.embed(VISUAL, pixel_values.flatten(0, 1)), VISUAL)
        visual_stream = encoder.encode_shared(visual, VISUAL)
        outputs["frame_embeds"] = visual_stream.mean(dim=1).unflatten(0, (batch_size, num_frames))
        outputs["visual_embeds"] = outputs["frame_embeds"].mean(dim=1)
        if output_token_states:
            outputs["visual_last_hidden_state"] = visual_stream.unflatten(0, (batch_size, num_frames))
    if audio is not None and visual is not None:
        joint = torch.cat([audio.repeat_interleave(num_frames, dim=0), visual], dim=1)
        joint_stream = encoder.encode_shared(joint, JOINT).unflatten(0, (batch_size, num_frames))
        outputs["joint_embeds"] = joint_stream.mean(dim=2).mean(dim=1)
        if output_token_states:
            outputs["last_hidden_state"] = joint_stream
    return outputs


class AudioVisualFeatureExtractionPipeline(_CavMaePipeline):
    """
    Audio-visual embeddings with [`CavMaeModel`] (or the `cav_mae` encoder of a pretraining or classification
    model). Inputs as for `"audio-visual-classification"`.

    Returns, per input, a dict with the entries of the modalities it has (D = hidden size):
    `audio_embeds` `[D]`, `visual_embeds` `[D]` (mean over frames), `frame_embeds` `[num_frames, D]`,
    `joint_embeds` `[D]` (both modalities); with `return_token_states=True` also `audio_last_hidden_state`
    `[Na, D]`, `visual_last_hidden_state` `[num_frames, Nv, D]`, `last_hidden_state` `[num_frames, Na + Nv, D]`.
    Values are nested lists, or float32 tensors with `return_tensors=True`; `normalize=True` L2-normalises the
    embeddings (not the token states).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = getattr(self.model, "cav_mae", self.model)

    def _sanitize_parameters(
        self, num_frames=None, return_token_states=None, return_tensors=None, normalize=None, **kwargs
    ):
        self._reject_unknown(kwargs)
        forward_params = {} if return_token_states is None else {"output_token_states": bool(return_token_states)}
        postprocess_params = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = bool(return_tensors)
        if normalize is not None:
            postprocess_params["normalize"] = bool(normalize)
        return self._num_frames_param(num_frames), forward_params, postprocess_params

    def run_model(self, inputs, output_token_states: bool = False):
        return encode_clips(self.encoder, output_token_states=output_token_states, **inputs)

    def postprocess(self, model_outputs, return_tensors: bool = False, normalize: bool = False):
        result = {}
        for name, value in self._single_clip(model_outputs).items():
            value = value.float()
            if normalize and name.endswith("_embeds"):
                value = torch.nn.functional.normalize(value, dim=-1)
            result[name] = value if return_tensors else value.tolist()
        return result


# ----------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------
_registered = False


def register_pipelines():
    """Register the `"audio-visual-classification"` and `"audio-visual-feature-extraction"` tasks with
    `transformers.pipeline`. Called on `import cavmae_hf`; idempotent."""
    global _registered
    if _registered:
        return
    PIPELINE_REGISTRY.register_pipeline(
        CLASSIFICATION_TASK,
        pipeline_class=AudioVisualClassificationPipeline,
        pt_model=AutoModelForAudioClassification,
        type="multimodal",
    )
    PIPELINE_REGISTRY.register_pipeline(
        FEATURE_EXTRACTION_TASK,
        pipeline_class=AudioVisualFeatureExtractionPipeline,
        pt_model=AutoModel,
        type="multimodal",
    )
    _registered = True
