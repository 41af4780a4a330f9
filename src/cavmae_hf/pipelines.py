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
sampled uniformly over its first 10 s, exactly as the reference's preprocessing scripts extracted them
(`frame_selection=`, `frame_transform=` and `audio_precision=` of a call choose `load_video`'s alternatives).
Several frames of one clip are classified together: the audio's modality-specific layers run once per clip, only
the visual and shared layers run per frame, and the per-frame probabilities are averaged (see
`CavMaeForAudioVisualClassification`).

Given a list or an iterator of inputs, the pipelines decode and preprocess the next inputs in `num_workers` threads
(default: one per CPU core) while the model runs on the current batch: decoding (PyAV), the frames' resizing and
JPEG round trip (Pillow) and the fbank (torch) release the GIL, so they run beside the model on the other cores;
results come back in input order, and an input that fails to load raises at its turn. `num_workers=0` preprocesses
each input in the calling thread just before its batch. `batch_size=N` runs the model on N clips at a time
(clips with the same inputs are stacked: see [`collate_clips`]); a model loaded with `dtype=torch.bfloat16` runs
in bfloat16 (on CPUs with bfloat16 instructions, about twice as fast as float32).
"""

import collections
import json
import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoModelForAudioClassification
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.base import Pipeline
from transformers.pipelines.pt_utils import PipelineIterator
from transformers.utils import logging

from .media import (
    AUDIO_PRECISIONS,
    Clip,
    DEFAULT_AUDIO_SECONDS,
    DEFAULT_SAMPLING_RATE,
    FRAME_SELECTIONS,
    FRAME_TRANSFORMS,
    MediaError,
    check_file,
    load_audio,
    load_video,
    probe_streams,
    resample,
)
from .configuration_cav_mae import CavMaeArgumentError, CavMaeError
from .feature_extraction_cav_mae import CavMaeFeatureExtractionError, CavMaeFeatureExtractor
from .modeling_cav_mae import CavMaeInputError

logger = logging.get_logger(__name__)

CLASSIFICATION_TASK = "audio-visual-classification"
FEATURE_EXTRACTION_TASK = "audio-visual-feature-extraction"
DEFAULT_NUM_FRAMES = 10

WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHTS_PICKLE = "pytorch_model.bin"
WEIGHTS_PICKLE_INDEX = "pytorch_model.bin.index.json"

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".opus", ".aac", ".m4a", ".wma", ".aiff", ".aif"})


class CheckpointLoadError(CavMaeError):
    """A saved CAV-MAE directory cannot be used: missing or unreadable config or weights, weights that do not fit the
    config, a pickle that needs more than tensors (refused), or a model whose outputs are NaN / Inf."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def load_clip(
    source,
    num_frames: int = DEFAULT_NUM_FRAMES,
    sampling_rate: int = DEFAULT_SAMPLING_RATE,
    audio_seconds: float | None = DEFAULT_AUDIO_SECONDS,
    video_options: dict | None = None,
) -> Clip:
    """
    Decode what a pipeline was given into a [`Clip`]:

    - a path to an image (by extension): one frame;
    - a path to an audio file (by extension), or to a media file without a video stream: audio only;
    - a path to any other media file: its audio track and `num_frames` frames (a video without an audio stream
      gives frames only, with a warning);
    - a dict `{"audio": waveform, "sampling_rate": int, "frames": [images]}` (either modality may be missing;
      `"array"` / `"raw"` are accepted for `"audio"`, `"images"` for `"frames"`), resampled to `sampling_rate`;
    - a waveform (numpy array or torch tensor, `[samples]` or `[channels, samples]`), taken to be at
      `sampling_rate` (as `AudioClassificationPipeline` takes raw arrays; give a dict to state another rate);
    - a PIL image: one frame;
    - a [`Clip`] (resampled if needed).

    Files are decoded only as far as needed: `audio_seconds` of audio (None: all of it) and the frames sampled from
    the first 10 s, so a long file costs no more than a short one. Integer PCM in a dict is scaled to [-1, 1] and
    `[samples, channels]` audio is turned to `[channels, samples]` before resampling, as the feature extractor reads
    them. `video_options` go to [`cavmae_hf.media.load_video`] for video files (`frame_selection`,
    `frame_transform`, `audio_precision`; by default a video is read as the reference's preprocessing read it).

    Raises:
        MediaError: unreadable, missing or empty files.
        CavMaeInputError: inputs of the wrong kind.
    """
    if isinstance(source, Clip):
        clip = source
    elif isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), num_frames, sampling_rate, audio_seconds, video_options)
    elif isinstance(source, dict):
        clip = _clip_from_dict(source)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        clip = Clip(audio=_waveform(source), sampling_rate=sampling_rate)
    elif _is_pil_image(source):
        clip = Clip(frames=[source])
    else:
        raise CavMaeInputError(
            "Expected a file path, a waveform array, a PIL image, a dict with 'audio'/'sampling_rate'/'frames', or a "
            f"Clip; got {type(source).__name__}."
        )
    if clip.audio is not None and clip.sampling_rate != sampling_rate:
        audio = _channels_first(_pcm_to_float(clip.audio))
        clip = Clip(resample(audio, clip.sampling_rate, sampling_rate), sampling_rate, clip.frames, clip.source)
    return clip


def _is_pil_image(value) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def audio_seconds_for(feature_extractor) -> float:
    """Seconds of audio the fbank frames of `feature_extractor` use (at least the default 10.3 s a video's track is
    decoded for): `(max_length - 1) * shift + window`."""
    frame_shift = getattr(feature_extractor, "frame_shift_ms", 10.0) / 1000.0
    frame_length = getattr(feature_extractor, "frame_length_ms", 25.0) / 1000.0
    needed = (feature_extractor.max_length - 1) * frame_shift + frame_length
    return max(DEFAULT_AUDIO_SECONDS, math.ceil(needed * 100) / 100)


def _pcm_to_float(audio: np.ndarray) -> np.ndarray:
    """Integer PCM scaled to [-1, 1] as the feature extractor scales it (uint8, int16, int32); floats unchanged."""
    if audio.dtype == np.uint8:
        return (audio.astype(np.float32) - 128.0) / 128.0
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if audio.dtype == np.int32:
        return (audio.astype(np.float64) / 2147483648.0).astype(np.float32)
    if audio.dtype.kind in "iub":
        raise CavMaeInputError(f"Audio of dtype {audio.dtype} is not PCM: use float, int16 or int32.")
    return audio


def _channels_first(audio: np.ndarray) -> np.ndarray:
    """`[channels, samples]` from `[samples, channels]` (up to 16 channels, the feature extractor's rule)."""
    if audio.ndim == 2 and audio.shape[0] > audio.shape[1] and audio.shape[1] <= 16:
        return np.ascontiguousarray(audio.T)
    return audio


def _load_path(path: Path, num_frames: int, sampling_rate: int, audio_seconds, video_options=None) -> Clip:
    check_file(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return Clip(frames=[_load_image(path)], source=str(path))
    if suffix in AUDIO_EXTENSIONS:
        audio, rate = load_audio(path, sampling_rate=sampling_rate, max_seconds=audio_seconds)
        return Clip(audio=audio, sampling_rate=rate, source=str(path))
    has_audio, has_video = _probe_streams(path)
    if not has_video:
        audio, rate = load_audio(path, sampling_rate=sampling_rate, max_seconds=audio_seconds)
        return Clip(audio=audio, sampling_rate=rate, source=str(path))
    if not has_audio:
        logger.warning(f"{path} has no audio stream: only its frames are used.")
    video = load_video(
        path,
        num_frames=num_frames,
        sampling_rate=sampling_rate,
        load_audio=has_audio,
        audio_seconds=audio_seconds,
        **(video_options or {}),
    )
    return video


def _probe_streams(path: Path) -> tuple[bool, bool]:
    """(has an audio stream, has a video stream), reading only the header; an mp4 whose cut-off index hides a
    stream is refused as truncated rather than taken for a silent (or audio-only) file."""
    check_file(path)
    return probe_streams(path)


def _load_image(path: Path):
    """An image file as an upright RGB PIL image: EXIF orientation applied, 16-bit grey scaled to 8 bits (not
    clipped), the first frame of an animation, any mode (P, LA, RGBA, CMYK, I;16) converted as the feature extractor
    converts arrays and images it is given."""
    from PIL import Image, ImageOps

    check_file(path)
    try:
        with Image.open(path) as image:
            image.seek(0)  # an animated GIF / WebP or a multi-page TIFF: its first frame
            image.load()
            upright = ImageOps.exif_transpose(image)  # a loaded copy, turned as the EXIF orientation tag says
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # PIL's errors for unreadable images
        raise MediaError(f"{path} is not a readable image ({error}).") from None
    return CavMaeFeatureExtractor._to_pil(upright)


def _clip_from_dict(inputs: dict) -> Clip:
    known = {"audio", "array", "raw", "sampling_rate", "frames", "images", "path"}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise CavMaeInputError(f"Unknown keys {unknown} in the input dict; use 'audio', 'sampling_rate' and 'frames'.")
    audio = next((inputs[key] for key in ("audio", "array", "raw") if inputs.get(key) is not None), None)
    frames = next((inputs[key] for key in ("frames", "images") if inputs.get(key) is not None), None)
    if frames is not None and not isinstance(frames, (list, tuple)):
        frames = list(frames) if getattr(frames, "ndim", 0) == 4 else [frames]
    if frames is not None and len(frames) == 0:
        frames = None  # an empty list of frames: no visual input
    if audio is None and frames is None:
        raise CavMaeInputError("The input dict has neither 'audio' nor 'frames' (or they are empty).")
    sampling_rate = None
    if audio is not None:
        sampling_rate = _sampling_rate(inputs.get("sampling_rate"))
        audio = _waveform(audio)
    for frame in frames or []:
        if isinstance(frame, (str, os.PathLike, bytes)):
            raise CavMaeInputError(
                f"'frames' must hold images (PIL images, HWC arrays or CHW tensors), got {type(frame).__name__}; "
                "pass an image file as the input itself, not inside 'frames'."
            )
    return Clip(audio, sampling_rate, list(frames or []), inputs.get("path"))


def _sampling_rate(value) -> int:
    if value is None:
        raise CavMaeInputError("The input dict has 'audio' but no 'sampling_rate'.")
    integral = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
    if not integral or value <= 0:
        raise CavMaeInputError(f"'sampling_rate' must be a positive whole number of Hz, got {value!r}.")
    return int(value)


def _waveform(audio) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu()
        audio = audio.float() if audio.dtype in (torch.float16, torch.bfloat16) else audio
        return audio.numpy()
    if isinstance(audio, (str, bytes, os.PathLike)):
        raise CavMaeInputError(
            f"'audio' must be a waveform (an array of samples), got {type(audio).__name__}; pass an audio file as "
            "the input itself, not inside the dict."
        )
    try:
        array = np.asarray(audio)
    except ValueError:  # ragged nested lists
        array = np.asarray(audio, dtype=object)
    if array.dtype.kind not in "iuf":
        raise CavMaeInputError(f"'audio' must be an array of numbers, got values of dtype {array.dtype}.")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def clip_features(feature_extractor: CavMaeFeatureExtractor, clip: Clip) -> dict[str, torch.Tensor]:
    """Model inputs of one clip: `input_features` `[1, T, F]` and/or `pixel_values` `[1, num_frames, 3, S, S]`."""
    features = {}
    if clip.audio is not None:
        audio = clip.audio
        if getattr(audio, "ndim", 1) not in (1, 2):
            raise CavMaeInputError(
                f"Audio must be [samples], [channels, samples] or [samples, channels], got shape {tuple(audio.shape)}."
            )
        # One clip: a 2-D waveform is its channels (a bare 2-D array would be read as a batch of mono clips).
        with _naming(clip.source):
            extracted = feature_extractor(audio=[audio], sampling_rate=clip.sampling_rate, return_tensors="pt")
        features["input_features"] = extracted["input_features"]
    if clip.frames:
        with _naming(clip.source):
            features["pixel_values"] = feature_extractor(images=[list(clip.frames)], return_tensors="pt")[
                "pixel_values"
            ]
    return features


@contextmanager
def _naming(source: str | None):
    """Prefix feature-extraction errors with the file they come from ("Audio clip 0 ..." says nothing about which
    of the files given to a pipeline or to the command line is at fault)."""
    try:
        yield
    except CavMaeFeatureExtractionError as error:
        if source is None:
            raise
        raise type(error)(f"{source}: {error}") from None


def load_feature_extractor(model_dir, config) -> CavMaeFeatureExtractor:
    """The feature extractor saved in `model_dir` (a local directory), else one built from `config`.

    Raises:
        CheckpointLoadError: `preprocessor_config.json` exists but cannot be read, or describes another extractor
            (a silent fallback to the defaults would compute features the model was not trained on).
    """
    from transformers import AutoFeatureExtractor

    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return CavMaeFeatureExtractor.from_model_config(config)
    try:
        extractor = AutoFeatureExtractor.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointLoadError(f"{path} could not be read: {_first_line(error)}") from None
    if not isinstance(extractor, CavMaeFeatureExtractor):
        raise CheckpointLoadError(f"{path} describes a {type(extractor).__name__}, not a CavMaeFeatureExtractor.")
    return extractor


# ----------------------------------------------------------------------------------------------------------------
# Loading saved directories, with their weights checked first
# ----------------------------------------------------------------------------------------------------------------
def _first_line(error: BaseException) -> str:
    """The first line of an error message, without torch's advice to turn the weights-only check off."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split(". This file can still be loaded")[0].split(". In PyTorch 2.6")[0]


def read_config(model_dir):
    """The `CavMaeConfig` of a saved directory; a clear [`CheckpointLoadError`] for a missing or unreadable
    `config.json` or one of another model type."""
    from .configuration_cav_mae import CavMaeConfig

    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise CheckpointLoadError(f"Model directory not found: {model_dir}")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointLoadError(f"{model_dir} is not a saved model directory (no config.json).")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointLoadError(f"{config_file} is not valid JSON ({error}).") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type != CavMaeConfig.model_type:
        raise CheckpointLoadError(
            f"{model_dir} holds a model of type {model_type!r}, not a CAV-MAE checkpoint (model_type 'cav_mae')."
        )
    try:
        return CavMaeConfig.from_pretrained(model_dir)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointLoadError(f"{config_file} is not a valid CAV-MAE configuration: {_first_line(error)}") from None


def _weight_files(model_dir: Path) -> tuple[list[Path], bool]:
    """The weight files of `model_dir` and whether they are pickles (`pytorch_model.bin`, read only with
    `weights_only=True`); safetensors first, as `from_pretrained` prefers them."""
    for single, index, pickled in (
        (WEIGHTS_SAFETENSORS, WEIGHTS_SAFETENSORS_INDEX, False),
        (WEIGHTS_PICKLE, WEIGHTS_PICKLE_INDEX, True),
    ):
        if (model_dir / single).is_file():
            return [model_dir / single], pickled
        if (model_dir / index).is_file():
            try:
                weight_map = json.loads((model_dir / index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointLoadError(f"{model_dir / index} is not a valid weight index ({error}).") from None
            files = []
            for shard in shards:
                path = model_dir / str(shard)
                if Path(str(shard)).name != str(shard) or not path.is_file():
                    raise CheckpointLoadError(
                        f"{model_dir / index} names a shard that is not in {model_dir}: {shard!r}."
                    )
                files.append(path)
            return files, pickled
    raise CheckpointLoadError(f"{model_dir} has no weights ({WEIGHTS_SAFETENSORS} not found).")


def checkpoint_shapes(model_dir) -> dict[str, tuple[int, ...]]:
    """`{tensor name: shape}` of the weights of a saved directory, read from the safetensors headers (no tensor is
    loaded), or for a `pytorch_model.bin` with `torch.load(weights_only=True)` onto the meta device: a pickle that
    needs more than tensors is refused without running anything."""
    from safetensors import SafetensorError, safe_open

    from .convert_original_checkpoint import refused_pickle_global

    files, pickled = _weight_files(Path(model_dir).expanduser())
    shapes = {}
    for path in files:
        if pickled:
            try:
                state = torch.load(path, map_location="meta", weights_only=True)
            except Exception as error:  # zip, EOF and unpickler errors: damaged, no checkpoint, or refused
                if refused_pickle_global(error) is not None:
                    raise CheckpointLoadError(
                        f"{path} is a pickle that asks for `{refused_pickle_global(error)}`, which could run code when "
                        "loaded, so it is refused. Use model.safetensors weights from a source you trust."
                    ) from None
                raise CheckpointLoadError(
                    f"{path} is not a readable PyTorch checkpoint: {_first_line(error)}"
                ) from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointLoadError(f"{path} does not hold a state dict of tensors.")
            shapes.update({key: tuple(value.shape) for key, value in state.items()})
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointLoadError(
                f"{path} is not a readable safetensors file: it is truncated or corrupt ({_first_line(error)}); "
                "download or save it again."
            ) from None
    return shapes


def check_weights_fit(model_dir, config, model_class):
    """Raise a [`CheckpointLoadError`] listing the tensors of `model_dir` whose shapes differ from what `config`
    builds, before `from_pretrained` would reinitialise or reject them with a long report."""
    shapes = checkpoint_shapes(model_dir)
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in model_class(config).state_dict().items()}
    prefix = getattr(model_class, "base_model_prefix", "cav_mae")
    matched, mismatched = 0, []
    for key, shape in shapes.items():
        for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if candidate in expected:
                matched += 1
                if expected[candidate] != shape:
                    mismatched.append(f"{key}: file {shape} vs config {expected[candidate]}")
                break
    if mismatched:
        raise CheckpointLoadError(
            f"The weights of {model_dir} do not fit its config.json: {len(mismatched)} tensor(s) differ, e.g. "
            f"{'; '.join(mismatched[:3])}. The config or the weights were changed, or come from different models."
        )
    if shapes and not matched:
        raise CheckpointLoadError(f"None of the {len(shapes)} tensors of {model_dir} belong to a CAV-MAE model.")


def saved_class(config):
    """The CAV-MAE class a directory was saved as (`config.architectures`), `CavMaeModel` if it names none."""
    from .modeling_cav_mae import CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel

    classes = {cls.__name__: cls for cls in (CavMaeModel, CavMaeForPreTraining, CavMaeForAudioVisualClassification)}
    return next((classes[name] for name in (config.architectures or []) if name in classes), CavMaeModel)


def load_model(model_dir, model_class=None, dtype=None):
    """
    `model_class.from_pretrained(model_dir)` (default: the class it was saved as) for a local directory, after
    checking it: a CAV-MAE `config.json`, readable weights whose shapes fit it, no pickle that needs code (weights
    are read with `weights_only=True`). Failures raise [`CheckpointLoadError`] with one clear sentence.
    """
    model_dir = Path(model_dir).expanduser()
    config = read_config(model_dir)
    model_class = model_class or saved_class(config)
    check_weights_fit(model_dir, config, model_class)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return model_class.from_pretrained(model_dir, config=config, weights_only=True, **kwargs)


def load_model_as_saved(model_dir, dtype=None):
    """The CAV-MAE model of `model_dir` as the class it was saved as (`config.architectures`), so that no weight is
    left unused; a feature-extraction pipeline then uses its `cav_mae` encoder."""
    return load_model(model_dir, None, dtype=dtype)


def cav_mae_pipeline(task: str, model, device=None, dtype=None) -> Pipeline:
    """
    `transformers.pipeline(task, model=model)` for a CAV-MAE model directory, Hub id or loaded model. A local
    directory is checked and loaded here (see [`load_model`]) with its own feature extractor: the classification
    task loads `CavMaeForAudioVisualClassification`, the feature-extraction task the class it was saved as (no
    "unused weights" report for classification or pretraining checkpoints).
    """
    from transformers import pipeline

    from .modeling_cav_mae import CavMaeForAudioVisualClassification

    kwargs = {} if device is None else {"device": device}
    if isinstance(model, (str, os.PathLike)) and Path(model).expanduser().is_dir():
        model_class = CavMaeForAudioVisualClassification if task == CLASSIFICATION_TASK else None
        loaded = load_model(model, model_class, dtype=dtype)
        extractor = load_feature_extractor(Path(model).expanduser(), loaded.config)
        return pipeline(task, model=loaded, feature_extractor=extractor, **kwargs)
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


def default_num_workers() -> int:
    """Preprocessing threads of the pipelines when the call names none: one per CPU core available to the process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def preprocessed(inputs, preprocess, params: dict, num_workers: int, look_ahead: int):
    """
    `preprocess(item, **params)` of each item of `inputs` (a list or any iterator, consumed in the calling thread),
    in order. With `num_workers` >= 1 the items are preprocessed in that many threads, up to `look_ahead` items
    ahead of the consumer; an exception is raised when its item's turn comes. Closing the generator cancels what
    has not started.
    """
    if num_workers < 1:
        for item in inputs:
            yield preprocess(item, **params)
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="cavmae-preprocess")
    pending = collections.deque()
    try:
        for item in inputs:
            pending.append(pool.submit(preprocess, item, **params))
            if len(pending) > look_ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(items, batch_size: int):
    """Lists of `batch_size` consecutive items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


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
            raise CavMaeInputError(
                f"The {self.task!r} pipeline needs a CAV-MAE model, got {type(self.model).__name__}."
            )
        self.model.eval()
        if self.feature_extractor is None:
            # transformers leaves it None when the directory's preprocessor_config.json failed to load: that file is
            # read again here so that a damaged one is an error, not a silent fall-back to default preprocessing.
            saved = Path(str(getattr(self.model, "name_or_path", "") or "")).expanduser()
            if saved.is_dir():
                self.feature_extractor = load_feature_extractor(saved, self.model.config)
            else:
                self.feature_extractor = CavMaeFeatureExtractor.from_model_config(self.model.config)
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
            raise CheckpointLoadError(f"The feature extractor does not fit the model: {details}.")
        rate = getattr(extractor, "sampling_rate", None)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
            raise CheckpointLoadError(
                f"The feature extractor's sampling_rate must be a positive integer, got {rate!r}."
            )

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, tuple):
            inputs = list(inputs)  # several inputs, as a list (transformers would take a tuple for one input)
        if isinstance(inputs, list) and not inputs:
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            return []  # bad arguments are still reported above
        if kwargs.get("num_workers") is None and self._num_workers is None:
            kwargs["num_workers"] = default_num_workers()
        workers = kwargs["num_workers"] if kwargs.get("num_workers") is not None else self._num_workers
        if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 0:
            raise CavMaeInputError(f"num_workers must be a whole number of at least 0, got {workers!r}.")
        return super().__call__(inputs, *args, **kwargs)

    # Steps ------------------------------------------------------------------------------------------------------
    def preprocess(
        self, inputs, num_frames: int = DEFAULT_NUM_FRAMES, video_options: dict | None = None
    ) -> dict[str, torch.Tensor]:
        clip = load_clip(
            inputs,
            num_frames=num_frames,
            sampling_rate=self.feature_extractor.sampling_rate,
            audio_seconds=audio_seconds_for(self.feature_extractor),
            video_options=video_options,
        )
        return clip_features(self.feature_extractor, clip)

    def _forward(self, model_inputs, **forward_params):
        """Run each group of equal-shaped clips once; return `{"clips": [per-clip dict of tensors]}` in input order."""
        groups = model_inputs["groups"] if "groups" in model_inputs else [([0], model_inputs)]
        clips = [None] * sum(len(positions) for positions, _ in groups)
        for positions, inputs in groups:
            outputs = self.run_model(self._cast(inputs), **forward_params)
            self._check_finite(outputs)
            for row, position in enumerate(positions):
                clips[position] = {name: value[row] for name, value in outputs.items()}
        return {"clips": clips}

    def run_model(self, inputs: dict[str, torch.Tensor], **forward_params) -> dict[str, torch.Tensor]:
        """Batched model outputs `{name: [b, ...]}` for inputs of one group."""
        raise NotImplementedError

    def _check_finite(self, outputs: dict[str, torch.Tensor]):
        """The inputs were finite (the feature extractor and the model check them): NaN / Inf outputs come from the
        weights (a damaged checkpoint) or from overflow in a low-precision dtype."""
        bad = [name for name, value in outputs.items() if not bool(torch.isfinite(value).all())]
        if bad:
            raise CheckpointLoadError(
                f"The model produced NaN or Inf ({', '.join(bad)}) from finite inputs: its weights hold NaN / Inf, or "
                f"{self.model.dtype} overflowed (try dtype=torch.float32)."
            )

    @staticmethod
    def _single_clip(model_outputs) -> dict:
        clips = model_outputs["clips"]
        return clips[0] if isinstance(clips, list) else clips  # unbatched by the pipeline's iterator: one dict

    def _cast(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        return {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # As the base class, but preprocessing runs ahead in threads rather than DataLoader processes (see the
        # module's docstring), and clips are batched by `collate_clips` (no padding: clips of one shape are stacked).
        look_ahead = batch_size + 2 * num_workers  # the next batch is being decoded while the model runs
        features = preprocessed(inputs, self.preprocess, preprocess_params, num_workers, look_ahead)
        if batch_size == 1:
            model_iterator = PipelineIterator(features, self.forward, forward_params)
        else:
            batches = (collate_clips(batch) for batch in batched(features, batch_size))
            model_iterator = PipelineIterator(batches, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    @staticmethod
    def _reject_unknown(kwargs: dict):
        if kwargs:
            raise CavMaeArgumentError(f"Unexpected pipeline arguments: {sorted(kwargs)}")

    @staticmethod
    def _decoding_params(num_frames, frame_selection, frame_transform, audio_precision) -> dict:
        """`num_frames` and the options of `cavmae_hf.media.load_video` for video files (`frame_selection`,
        `frame_transform`, `audio_precision`; None: the default, which reproduces the reference's preprocessing)."""
        params = {}
        if num_frames is not None:
            if not isinstance(num_frames, numbers.Integral) or isinstance(num_frames, bool) or num_frames < 1:
                raise CavMaeInputError(f"num_frames must be a whole number of at least 1, got {num_frames!r}.")
            params["num_frames"] = int(num_frames)
        choices = {"frame_selection": FRAME_SELECTIONS, "frame_transform": FRAME_TRANSFORMS}
        choices["audio_precision"] = AUDIO_PRECISIONS
        options = dict(frame_selection=frame_selection, frame_transform=frame_transform, audio_precision=audio_precision)
        given = {name: value for name, value in options.items() if value is not None}
        for name, value in given.items():
            if value not in choices[name]:
                raise CavMaeInputError(f"{name} must be one of {choices[name]}, got {value!r}.")
        if given:
            params["video_options"] = given
        return params


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------
class AudioVisualClassificationPipeline(_CavMaePipeline):
    """
    Audio-visual classification with [`CavMaeForAudioVisualClassification`].

    Inputs: a path to a video (its audio track and `num_frames` frames), an audio file, an image, a waveform array
    (at the feature extractor's sampling rate), a PIL image, a dict `{"audio": waveform, "sampling_rate": int,
    "frames": [images]}` (either may be missing), or a list of those.
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
            raise CavMaeInputError(
                f"The {self.task!r} pipeline needs CavMaeForAudioVisualClassification, got {type(self.model).__name__}."
            )
        if architectures and not any(name.endswith("ForAudioVisualClassification") for name in architectures):
            logger.warning(
                f"This checkpoint was saved as {', '.join(architectures)}, not as a classifier: its classification "
                "head is newly initialised and its scores are meaningless until it is fine-tuned."
            )

    def _sanitize_parameters(
        self,
        num_frames=None,
        function_to_apply=None,
        frame_selection=None,
        frame_transform=None,
        audio_precision=None,
        **kwargs,
    ):
        postprocess_params = {}
        if "top_k" in kwargs:
            top_k = kwargs.pop("top_k")
            num_labels = self.model.config.num_labels
            if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1):
                raise CavMaeInputError(f"top_k must be a whole number of at least 1 (or None for all labels), got {top_k!r}.")
            postprocess_params["top_k"] = num_labels if top_k is None else min(int(top_k), num_labels)
        if function_to_apply is not None:
            if function_to_apply not in ("softmax", "sigmoid", "none"):
                raise CavMaeInputError(
                    f"function_to_apply must be 'softmax', 'sigmoid' or 'none', got {function_to_apply!r}."
                )
            postprocess_params["function_to_apply"] = function_to_apply
        self._reject_unknown(kwargs)
        preprocess_params = self._decoding_params(num_frames, frame_selection, frame_transform, audio_precision)
        return preprocess_params, {}, postprocess_params

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
    Embeddings of a batch of clips from a [`CavMaeModel`] (`encoder`), which encodes the audio once per clip.

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
    if pixel_values is not None and pixel_values.dim() == 4:
        pixel_values = pixel_values.unsqueeze(1)
    encoded = encoder(input_features=input_features, pixel_values=pixel_values)
    outputs = {}
    if input_features is not None:
        outputs["audio_embeds"] = encoded.audio_embeds
    if pixel_values is not None:
        outputs["frame_embeds"] = encoded.visual_embeds
        outputs["visual_embeds"] = encoded.visual_embeds.mean(dim=1)
    if encoded.pooler_output is not None:
        outputs["joint_embeds"] = encoded.pooler_output.mean(dim=1)
    if output_token_states:
        for name in ("audio_last_hidden_state", "visual_last_hidden_state", "last_hidden_state"):
            if getattr(encoded, name) is not None:
                outputs[name] = getattr(encoded, name)
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
        self,
        num_frames=None,
        return_token_states=None,
        return_tensors=None,
        normalize=None,
        frame_selection=None,
        frame_transform=None,
        audio_precision=None,
        **kwargs,
    ):
        self._reject_unknown(kwargs)
        forward_params = {} if return_token_states is None else {"output_token_states": bool(return_token_states)}
        postprocess_params = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = bool(return_tensors)
        if normalize is not None:
            postprocess_params["normalize"] = bool(normalize)
        preprocess_params = self._decoding_params(num_frames, frame_selection, frame_transform, audio_precision)
        return preprocess_params, forward_params, postprocess_params

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
class _CheckedLoading:
    """`from_pretrained` of a local directory checks it first, as [`load_model`] does (a CAV-MAE `config.json`,
    readable weight files whose shapes fit it), so that `transformers.pipeline(task, model=directory)` names a
    damaged file and what to do instead of failing inside safetensors or torch with no file name. Transformers
    reports the [`CheckpointLoadError`] inside its own `ValueError` ("Could not load model ..."), whose message
    ends with it."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        directory = Path(str(pretrained_model_name_or_path)).expanduser()
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and directory.is_dir():
            config = read_config(directory)
            check_weights_fit(directory, config, cls._model_mapping[type(config)])
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class CheckedAutoModelForAudioClassification(_CheckedLoading, AutoModelForAudioClassification):
    """The model class of the `"audio-visual-classification"` pipeline (see `_CheckedLoading`)."""


class CheckedAutoModel(_CheckedLoading, AutoModel):
    """The model class of the `"audio-visual-feature-extraction"` pipeline (see `_CheckedLoading`)."""


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
        pt_model=CheckedAutoModelForAudioClassification,
        type="multimodal",
    )
    PIPELINE_REGISTRY.register_pipeline(
        FEATURE_EXTRACTION_TASK,
        pipeline_class=AudioVisualFeatureExtractionPipeline,
        pt_model=CheckedAutoModel,
        type="multimodal",
    )
    _registered = True
