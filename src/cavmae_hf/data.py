"""
Datasets, on-the-fly preprocessing, augmentation and batching for training CAV-MAE with the `Trainer`.

Every builder returns a `datasets.Dataset` of clip *references* with one schema, so that the same transform serves
all layouts and nothing is decoded until a batch is drawn:

| column    | type                                  | meaning                                                       |
| --------- | ------------------------------------- | ------------------------------------------------------------- |
| `clip_id` | string                                | the clip's name (the reference's `video_id`)                  |
| `video`   | string or None                        | a video file: its audio track and its frames                  |
| `audio`   | `{"bytes", "path"}` or None           | an audio file or encoded audio (WAV, FLAC, ...), if separate  |
| `frames`  | list of `Image(decode=False)`         | pre-extracted frames (paths or encoded bytes), in time order  |
| `labels`  | list of `ClassLabel` (or int32)       | class indices; empty for unlabelled clips                     |

Layouts: [`dataset_from_folder`] (videos in class sub-folders, or a flat folder), [`dataset_from_csv`] (a CSV of
video paths and labels) and [`dataset_from_reference_json`] (the CAV-MAE reference's data files: a JSON list of
`wav`, `video_id`, `video_path`, `labels` with frames at `video_path/frame_{i}/video_id.jpg`, and a label CSV
`index,mid,display_name`). [`decode_clips`] turns video rows into encoded audio and frames once, so later epochs
skip the video decoder.

The data path, for the Trainer or any DataLoader: `dataset.with_transform(transform)` with an
[`AudioVisualTransform`] decodes each clip the DataLoader draws (PyAV and soundfile, no torchcodec: the waveform and
only the frames it needs), and [`AudioVisualDataCollator`] turns the decoded clips of a batch into model inputs at
once: the Kaldi fbank of [`CavMaeFeatureExtractor`] over the whole batch, the frames resized and cropped as bytes and
normalised as one tensor, and the reference's training-time augmentation: a random frame of 10 (the middle one at
evaluation, or all of them for multi-frame evaluation), SpecAugment frequency/time masking (`freqm`, `timem`), mixup
of waveforms, frames and labels (lambda ~ Beta(10, 10)), the noise + time-roll augmentation, and label smoothing.
Streams (`datasets.IterableDataset`) go through [`with_transform`] (a [`TransformedStream`]).

Faults: a clip that fails to load is left out of its batch with a warning naming it and counted (`on_error="skip"`,
the default; [`cavmae_hf.training.SkippedClipsCallback`] logs the count),
stops the run with a [`CavMaeDataError`] naming it (`"raise"`), or, only when asked (`"stand_in"`), is replaced by
the reference's constant stand-in; `max_skipped` / `max_skipped_fraction` make a mostly broken dataset fail loudly.
Training augmentation is drawn from a generator seeded per batch by `(seed, epoch, clips)`, so a resumed run repeats
it. The builders take `allowed_root` to refuse paths that resolve outside a folder ([`check_paths_within_root`]).
"""

import csv
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from . import media
from .configuration_cav_mae import CavMaeArgumentError, CavMaeError
from .feature_extraction_cav_mae import CavMaeFeatureExtractor
from .labels import LabelFileError, LabelSet, read_label_csv

logger = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 10
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")
MIXUP_ALPHA = 10.0
# The reference's stand-ins for clips that fail to load: fbank 0.01 (before normalisation) and images 0.01.
FAILED_LOAD_VALUE = 0.01
ON_ERROR_CHOICES = ("skip", "raise", "stand_in")
# The share of broken clips is judged only once this many clips were seen (a few early failures are not a trend).
MIN_CLIPS_FOR_SKIP_FRACTION = 20
SKIPPED_CLIPS = "skipped_clips"


class CavMaeDataError(CavMaeError):
    """A data file, layout or clip cannot be read as CAV-MAE data; the message says which and why."""


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------
def label_feature(label_set: LabelSet) -> datasets.List:
    """The `datasets` feature of a multi-label column over `label_set`'s classes."""
    return datasets.List(datasets.ClassLabel(names=list(label_set.names)))


def labels_for_classification(label_set: LabelSet) -> dict:
    """The config fields a classifier needs for `label_set`: `num_labels`, `id2label`, `label2id`."""
    return {"num_labels": len(label_set), "id2label": label_set.id2label, "label2id": label_set.label2id}


def label_set_of(dataset) -> LabelSet | None:
    """The [`LabelSet`] stored in a dataset's `labels` feature (None for unlabelled datasets)."""
    feature = (dataset.features or {}).get("labels")
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return LabelSet(names=list(inner.names))
    return None


# ----------------------------------------------------------------------------------------------------------------
# Dataset builders
# ----------------------------------------------------------------------------------------------------------------
def clip_dataset_features(label_set: LabelSet | None) -> datasets.Features:
    """The schema every builder produces (see the module docstring)."""
    return datasets.Features(
        {
            "clip_id": datasets.Value("string"),
            "video": datasets.Value("string"),
            "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "frames": datasets.List(datasets.Image(decode=False)),
            "labels": label_feature(label_set) if label_set is not None else datasets.List(datasets.Value("int32")),
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# Path restriction
# ----------------------------------------------------------------------------------------------------------------
class _PathGuard:
    """Checks that paths resolve (after `..` and symlinks) inside `root`; resolved folders are cached, so that the
    10 frames of a clip cost one `realpath` of their folder each rather than one per path component."""

    def __init__(self, root, source):
        self.root = Path(os.path.realpath(root))
        self.source = source
        self._folders: dict[str, str] = {}

    def resolve(self, path: str) -> str:
        # no lexical normalisation: `link/..` must go where the OS goes, to the link target's parent
        folder, name = os.path.split(os.path.join(os.getcwd(), path))
        if folder not in self._folders:
            self._folders[folder] = os.path.realpath(folder)
        candidate = os.path.join(self._folders[folder], name)
        return os.path.realpath(candidate) if name in ("", ".", "..") or os.path.islink(candidate) else candidate

    def check(self, path, what: str) -> None:
        if path is None:
            return
        resolved = Path(self.resolve(str(path)))
        if not resolved.is_relative_to(self.root):
            raise CavMaeDataError(
                f"{self.source}: the {what} {str(path)!r} resolves to {resolved}, outside the allowed root "
                f"{self.root}. Move the file under the root, or drop allowed_root to accept paths anywhere."
            )

    def check_columns(self, columns: dict) -> None:
        """Check the `video`, `audio.path` and `frames[].path` entries of a batch of rows in the clip schema."""
        ids = columns.get("clip_id") or [None] * len(next(iter(columns.values()), []))
        for position, clip_id in enumerate(ids):
            name = f"clip {clip_id!r}" if clip_id is not None else f"row {position}"
            if columns.get("video") is not None:
                self.check(columns["video"][position], f"video of {name}")
            audio = columns["audio"][position] if columns.get("audio") is not None else None
            if audio is not None:
                self.check(audio.get("path"), f"audio file of {name}")
            for frame in (columns["frames"][position] or []) if columns.get("frames") is not None else []:
                self.check(frame.get("path") if isinstance(frame, dict) else frame, f"frame of {name}")


def _allowed_root(allowed_root, default: Path) -> Path | None:
    """`allowed_root` as a folder: True means `default` (the data file's own folder), None/False no restriction."""
    if allowed_root is None or allowed_root is False:
        return None
    root = Path(default if allowed_root is True else allowed_root)
    if not root.is_dir():
        raise CavMaeDataError(f"allowed_root {str(root)!r} is not a folder.")
    return root


def check_paths_within_root(dataset, root, batch_size: int = 1000) -> None:
    """
    Raise [`CavMaeDataError`] naming the first path of `dataset` (its `video`, `audio` and `frames` columns) that
    resolves, after `..` components and symlinks, outside the folder `root`. The dataset builders run this check
    when given `allowed_root`; call it yourself on clip datasets from elsewhere (e.g. the Hub) before training on
    files listed by someone else. Paths are checked when this runs: files swapped for symlinks later are not.
    """
    guard = _PathGuard(root, source=f"dataset ({len(dataset)} clips)" if hasattr(dataset, "__len__") else "dataset")
    columns = [name for name in ("clip_id", "video", "audio", "frames") if name in (dataset.column_names or [])]
    subset = dataset.with_format(None).select_columns(columns)
    if isinstance(dataset, datasets.IterableDataset):
        batches = subset.iter(batch_size=batch_size)
    else:
        batches = (subset[start : start + batch_size] for start in range(0, len(subset), batch_size))
    for batch in batches:
        guard.check_columns(batch)


def _video_rows(videos: Sequence[tuple[Path, list[int]]]) -> dict[str, list]:
    return {
        "clip_id": [path.stem for path, _ in videos],
        "video": [str(path) for path, _ in videos],
        "audio": [None] * len(videos),
        "frames": [[] for _ in videos],
        "labels": [labels for _, labels in videos],
    }


def _checked(rows: dict[str, list], allowed_root: Path | None, source) -> dict[str, list]:
    if allowed_root is not None:
        _PathGuard(allowed_root, source).check_columns(rows)
    return rows


def dataset_from_folder(
    root, label_set: LabelSet | None = None, extensions=VIDEO_EXTENSIONS, allowed_root=None
) -> datasets.Dataset:
    """
    A dataset of the video files under `root`.

    - `root/<class>/<clip>.mp4`: one class per sub-folder (the `ImageFolder` convention). Classes are the sorted
      sub-folder names unless `label_set` gives them (then a folder may be named by a class's name or mid).
    - `root/<clip>.mp4`: no sub-folders, unlabelled clips (for pretraining).

    `allowed_root` (a folder, or True for `root` itself) refuses, with a [`CavMaeDataError`] naming it, any video
    that resolves outside that folder (a symlink pointing elsewhere).
    """
    root = Path(root)
    if not root.is_dir():
        raise CavMaeDataError(f"Video folder not found: {root}")
    allowed_root = _allowed_root(allowed_root, root)
    extensions = tuple(extension.lower() for extension in extensions)
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not class_dirs:
        videos = [(path, []) for path in sorted(root.iterdir()) if path.suffix.lower() in extensions]
        if not videos:
            raise CavMaeDataError(f"No video files ({', '.join(extensions)}) in {root}.")
        rows = _checked(_video_rows(videos), allowed_root, root)
        return datasets.Dataset.from_dict(rows, features=clip_dataset_features(label_set))
    label_set = label_set or LabelSet(names=[path.name for path in class_dirs])
    videos = []
    for class_dir in class_dirs:
        label = label_set.index_of(class_dir.name)
        files = sorted(path for path in class_dir.rglob("*") if path.suffix.lower() in extensions)
        videos.extend((path, [label]) for path in files)
    if not videos:
        raise CavMaeDataError(f"No video files ({', '.join(extensions)}) in the class folders of {root}.")
    rows = _checked(_video_rows(videos), allowed_root, root)
    return datasets.Dataset.from_dict(rows, features=clip_dataset_features(label_set))


def dataset_from_csv(
    csv_path,
    label_set: LabelSet | None = None,
    video_column: str = "video",
    label_column: str | None = "labels",
    label_separator: str = ",",
    allowed_root=None,
) -> datasets.Dataset:
    """
    A dataset from a CSV with a column of video paths (absolute, or relative to the CSV's folder) and, optionally,
    a column of labels: class names, mids or indices, several separated by `label_separator` (quote the field).
    Without `label_set` the classes are the sorted distinct labels of the file. A `label` column is used when
    `labels` is absent.

    `allowed_root` (a folder, or True for the CSV's folder) refuses, with a [`CavMaeDataError`] naming it, any
    video path that resolves outside that folder after `..` and symlinks (absolute paths elsewhere included).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CavMaeDataError(f"CSV not found: {csv_path}")
    allowed_root = _allowed_root(allowed_root, csv_path.parent)
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or video_column not in rows[0]:
        raise CavMaeDataError(f"{csv_path} needs a header with a {video_column!r} column.")
    if label_column is not None and label_column not in rows[0] and "label" in rows[0]:
        label_column = "label"
    has_labels = label_column is not None and label_column in rows[0]
    tokens = [
        [token.strip() for token in row[label_column].split(label_separator) if token.strip()] if has_labels else []
        for row in rows
    ]
    if has_labels and label_set is None:
        label_set = LabelSet(names=sorted({token for row_tokens in tokens for token in row_tokens}))
    videos = []
    for row, row_tokens in zip(rows, tokens):
        path = Path(row[video_column])
        path = path if path.is_absolute() else csv_path.parent / path
        videos.append((path, [label_set.index_of(token) for token in row_tokens]))
    features = clip_dataset_features(label_set if has_labels else None)
    return datasets.Dataset.from_dict(_checked(_video_rows(videos), allowed_root, csv_path), features=features)


def dataset_from_reference_json(
    json_path, label_csv=None, num_frames: int = DEFAULT_NUM_FRAMES, frame_extension: str = "jpg", allowed_root=None
) -> datasets.Dataset:
    """
    A dataset from the CAV-MAE reference's data files: a JSON list (or `{"data": [...]}`) of
    `{"video_id", "wav", "video_path", "labels"}` with `labels` a comma-separated string of mids, frames at
    `video_path/frame_{i}/video_id.jpg` for i < `num_frames`, and `label_csv` (`index,mid,display_name`). Without
    `label_csv` the classes are the sorted distinct mids. Relative paths are taken from the JSON's folder. Frame
    files are looked up when a batch is drawn; a missing one is replaced by the nearest earlier frame, as in the
    reference.

    `allowed_root` (a folder, or True for the JSON's folder) refuses, with a [`CavMaeDataError`] naming it, any
    `wav`, `video_path` or frame path (a `video_id` with `../` included) that resolves outside that folder after
    `..` and symlinks.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise CavMaeDataError(f"Data JSON not found: {json_path}")
    allowed_root = _allowed_root(allowed_root, json_path.parent)
    with open(json_path, encoding="utf-8") as handle:
        entries = json.load(handle)
    entries = entries["data"] if isinstance(entries, dict) else entries
    required = {"video_id", "wav", "video_path"}
    for position, entry in enumerate(entries):
        if not required <= set(entry):
            raise CavMaeDataError(f"{json_path}: entry {position} lacks {sorted(required - set(entry))}.")
    tokens = [[token for token in entry.get("labels", "").split(",") if token] for entry in entries]
    label_set = read_label_csv(label_csv) if label_csv is not None else None
    if label_set is None and any(tokens):
        mids = sorted({token for row in tokens for token in row})
        label_set = LabelSet(names=list(mids), mids=mids)

    def resolve(path: str) -> str:
        return str(Path(path) if Path(path).is_absolute() else json_path.parent / path)

    def frame_paths(entry: dict) -> list[dict]:
        folder, name = resolve(entry["video_path"]), f"{entry['video_id']}.{frame_extension}"
        return [{"bytes": None, "path": os.path.join(folder, f"frame_{index}", name)} for index in range(num_frames)]

    data = {
        "clip_id": [entry["video_id"] for entry in entries],
        "video": [None] * len(entries),
        "audio": [{"bytes": None, "path": resolve(entry["wav"])} for entry in entries],
        "frames": [frame_paths(entry) for entry in entries],
        "labels": [[label_set.index_of(token) for token in row] for row in tokens],
    }
    data = _checked(data, allowed_root, json_path)
    return datasets.Dataset.from_dict(data, features=clip_dataset_features(label_set))


def balanced_sample_weights(dataset) -> np.ndarray:
    """
    Per-clip sampling weights that up-sample rare classes, as the reference's `gen_weight_file.py`: a clip's weight
    is the sum over its labels of `1000 / (clips with that label + 0.01)`. Use with
    `CavMaeTrainingArguments(balanced_sampling=True)` (the reference's `--bal bal`).
    """
    label_lists = dataset.with_format(None)["labels"] if hasattr(dataset, "with_format") else dataset["labels"]
    num_labels = 1 + max((label for labels in label_lists for label in labels), default=-1)
    counts = np.zeros(num_labels)
    for labels in label_lists:
        np.add.at(counts, labels, 1)
    class_weights = 1000.0 / (counts + 0.01)
    return np.array([class_weights[labels].sum() for labels in label_lists], dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecodedClip(media.Clip):
    """
    A [`cavmae_hf.media.Clip`] decoded for training: its mono float32 `audio` at `sampling_rate` and its chosen
    frames. The [`AudioVisualTransform`] that decoded it also sets `labels` (class indices), `key` (what identifies
    the clip for the augmentation seeds), `transform` (itself: [`AudioVisualDataCollator`] asks it to batch the clip)
    and `stand_in` (the reference's constant stand-in for a clip that failed to load, with `on_error="stand_in"`).
    """

    labels: Sequence[int] = ()
    key: tuple = ()
    transform: "AudioVisualTransform | None" = field(default=None, repr=False)
    stand_in: bool = False


def _read_encoded_audio(audio: dict, sampling_rate: int, max_seconds: float | None) -> np.ndarray:
    if audio.get("bytes") is not None:
        import soundfile

        data, rate = soundfile.read(io.BytesIO(audio["bytes"]), dtype="float32", always_2d=True)
        waveform = np.ascontiguousarray(data[:, 0])
        if max_seconds is not None:
            waveform = waveform[: int(np.ceil(max_seconds * rate))]
        return media.resample(waveform, rate, sampling_rate)
    waveform, _ = media.load_audio(audio["path"], sampling_rate=sampling_rate, max_seconds=max_seconds)
    return waveform


def _open_frame(frame: dict) -> Image.Image:
    source = io.BytesIO(frame["bytes"]) if frame.get("bytes") is not None else frame["path"]
    with Image.open(source) as image:
        return image.convert("RGB")


def _existing_frame_index(frames: list, index: int) -> int:
    """`index`, or the nearest earlier frame that exists (the reference's fallback for missing frame files)."""
    index = min(index, len(frames) - 1)
    while index > 0 and frames[index].get("bytes") is None and not os.path.exists(frames[index]["path"]):
        logger.warning("Frame %s does not exist; using the previous frame.", frames[index]["path"])
        index -= 1
    return index


def _video_of(row: dict, num_frames: int, sampling_rate: int, audio_seconds, reference_jpegs: bool):
    """`media.load_video` of a row's video for what the row lacks (its audio, its frames), or None if it lacks
    nothing. Without `reference_jpegs` the frames stay decoded at full size (`reference_frame` makes the chosen
    ones what the reference's JPEG files hold)."""
    frames, audio = row.get("frames") or [], row.get("audio")
    if frames and audio is not None:
        return None
    if not row.get("video"):
        raise CavMaeDataError(f"Clip {row.get('clip_id')!r} has neither a video nor separate audio and frames.")
    return media.load_video(
        row["video"],
        num_frames=num_frames,
        sampling_rate=sampling_rate,
        load_audio=audio is None,
        load_frames=not frames,
        audio_seconds=audio_seconds,
        frame_transform="reference_jpeg" if reference_jpegs else "none",
    )


def decode_clip(
    row: dict, frame_indices: Sequence[int], num_frames: int, sampling_rate: int, audio_seconds: float | None
) -> DecodedClip:
    """Decode one dataset row: the waveform and the frames at `frame_indices` (of `num_frames` sampled uniformly).
    Frames of a video are what the reference's extraction script stored for them (`media.reference_frame`), made
    for the chosen frames only."""
    frames = row.get("frames") or []
    clip = _video_of(row, num_frames, sampling_rate, audio_seconds, reference_jpegs=False)
    waveform = clip.audio if row.get("audio") is None else _read_encoded_audio(row["audio"], sampling_rate, audio_seconds)
    if not frames:
        images = [media.reference_frame(clip.frames[min(index, len(clip.frames) - 1)]) for index in frame_indices]
    else:
        images = [_open_frame(frames[_existing_frame_index(frames, index)]) for index in frame_indices]
    return DecodedClip(audio=waveform, sampling_rate=sampling_rate, frames=images, source=clip_source(row))


def _file_bytes(entry: dict) -> bytes:
    if entry.get("bytes") is not None:
        return entry["bytes"]
    return Path(entry["path"]).read_bytes()


def reference_files(row: dict, num_frames: int, sampling_rate: int, audio_seconds) -> tuple[bytes, list[bytes]]:
    """
    A row as the files the reference's extraction scripts wrote (`extract_audio.py`, `extract_video_frame.py`): its
    audio as a 16 kHz 16-bit mono WAV and `num_frames` frames as 224-pixel quality-75 JPEGs (`media.wav_bytes`,
    `media.reference_frame_jpeg`). Separate frame files and WAV audio of the row are kept as they are; audio in
    another format becomes that WAV.
    """
    frames = row.get("frames") or []
    clip = _video_of(row, num_frames, sampling_rate, audio_seconds, reference_jpegs=True)
    if row.get("audio") is None:
        wav = media.wav_bytes(clip.audio, sampling_rate)
    elif (row["audio"].get("path") or "").lower().endswith(".wav") or row["audio"].get("bytes") is not None:
        wav = _file_bytes(row["audio"])
    else:
        wav = media.wav_bytes(_read_encoded_audio(row["audio"], sampling_rate, audio_seconds), sampling_rate)
    if frames:
        jpegs = [_file_bytes(frames[_existing_frame_index(frames, index)]) for index in range(num_frames)]
    else:
        jpegs = [clip.frame_jpegs[min(index, len(clip.frame_jpegs) - 1)] for index in range(num_frames)]
    return wav, jpegs


def clip_source(row: dict) -> str:
    """Where a row's clip comes from, for messages: its video, audio file or first frame file."""
    audio = row.get("audio") or {}
    frames = row.get("frames") or [{}]
    frame = frames[0] if isinstance(frames[0], dict) else {"path": frames[0]}
    for source in (row.get("video"), audio.get("path"), frame.get("path")):
        if source:
            return str(source)
    return "encoded bytes"


def describe_failure(row: dict, error: BaseException) -> str:
    """`clip 'id' (source): ErrorType: message`, the line that names a clip that failed to load."""
    message = str(error).rstrip(". ")
    return f"clip {row.get('clip_id')!r} ({clip_source(row)}): {type(error).__name__}: {message}"


def check_skip_limits(
    skipped: int, seen: int, max_skipped: int | None, max_skipped_fraction: float | None, last: str = ""
) -> None:
    """
    Raise [`CavMaeDataError`] when `skipped` broken clips of `seen` exceed `max_skipped` (a count) or, once
    `MIN_CLIPS_FOR_SKIP_FRACTION` clips were seen, `max_skipped_fraction` of them: a mostly broken dataset (or a
    wrong path prefix, a missing codec) fails loudly instead of training on what little loads.
    """
    limit = None
    if max_skipped is not None and skipped > max_skipped:
        limit = f"more than max_skipped={max_skipped}"
    elif (
        max_skipped_fraction is not None
        and seen >= MIN_CLIPS_FOR_SKIP_FRACTION
        and skipped > max_skipped_fraction * seen
    ):
        limit = f"more than max_skipped_fraction={max_skipped_fraction:g} of the {seen} clips seen"
    if limit is not None:
        raise CavMaeDataError(
            f"{skipped} clips failed to load, {limit} (last: {last}). The data is mostly unreadable: check the "
            "paths and the files (decode_clips / --decode_once lists every failure), or raise the limit."
        )


def _check_on_error(on_error: str, choices: Sequence[str]) -> str:
    if on_error == "warn":  # the name of "stand_in" before skipping existed
        warnings.warn("on_error='warn' is now called 'stand_in'.", FutureWarning, stacklevel=3)
        on_error = "stand_in"
    if on_error not in choices:
        raise CavMaeDataError(f"on_error must be one of {', '.join(map(repr, choices))}, got {on_error!r}.")
    return on_error


def _decode_rows_to_bytes(batch: dict, num_frames: int, sampling_rate: int, audio_seconds, on_error="raise") -> dict:
    kept = []
    for row in _rows(batch):
        try:
            wav, jpegs = reference_files(row, num_frames, sampling_rate, audio_seconds)
        except Exception as error:  # noqa: BLE001 - decoders of damaged files raise many types
            if on_error == "raise":
                raise CavMaeDataError(f"Could not decode {describe_failure(row, error)}") from error
            verb = "dropping it" if on_error == "skip" else "keeping it undecoded"
            logger.warning("Could not decode %s; %s.", describe_failure(row, error), verb)
            if on_error == "keep":
                kept.append(row)
            continue
        audio = {"bytes": wav, "path": None}
        frames = [{"bytes": jpeg, "path": None} for jpeg in jpegs]
        kept.append({**row, "audio": audio, "frames": frames, "video": None})
    return {column: [row[column] for row in kept] for column in batch}


def decode_clips(
    dataset: datasets.Dataset,
    num_frames: int = DEFAULT_NUM_FRAMES,
    sampling_rate: int = 16000,
    audio_seconds: float | None = media.DEFAULT_AUDIO_SECONDS,
    num_proc: int | None = None,
    desc: str = "Decoding clips",
    on_error: str = "raise",
    max_skipped: int | None = None,
    max_skipped_fraction: float | None = 0.5,
) -> datasets.Dataset:
    """
    Decode every clip once into what the reference's `extract_audio.py` / `extract_video_frame.py` wrote (see
    [`reference_files`]): a 16-bit WAV at `sampling_rate` and `num_frames` 224-pixel quality-75 JPEG frames, about
    0.4 MB a 10 s clip, so that training epochs read small blobs instead of running the video decoder, and give the
    same model inputs as from the video. The result has the same schema; `datasets` caches it.

    `on_error` decides what a clip that cannot be decoded does: `"raise"` (a [`CavMaeDataError`] naming the clip
    and the cause), `"skip"` (a warning naming it, and the clip is left out of the result; more than
    `max_skipped` clips or `max_skipped_fraction` of them raise), or `"keep"` (a warning, and the row stays as it
    was, for the training transform's own `on_error` to handle).
    """
    on_error = _check_on_error(on_error, ("raise", "skip", "keep"))
    decoded = dataset.map(
        _decode_rows_to_bytes,
        batched=True,
        batch_size=16,
        num_proc=num_proc,
        fn_kwargs={
            "num_frames": num_frames,
            "sampling_rate": sampling_rate,
            "audio_seconds": audio_seconds,
            "on_error": on_error,
        },
        features=dataset.features,
        desc=desc,
    )
    skipped = len(dataset) - len(decoded)
    if skipped:
        logger.warning("decode_clips: %d of %d clips could not be decoded and were left out.", skipped, len(dataset))
        if skipped == len(dataset):
            raise CavMaeDataError(f"None of the {len(dataset)} clips could be decoded (see the warnings above).")
        check_skip_limits(skipped, len(dataset), max_skipped, max_skipped_fraction, "see the warnings above")
    return decoded


def _rows(batch: dict) -> list[dict]:
    """A batch of columns -> a list of rows."""
    columns = list(batch)
    size = len(batch[columns[0]]) if columns else 0
    return [{column: batch[column][i] for column in columns} for i in range(size)]


# ----------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------
def _mask_along_axis(
    features: torch.Tensor, max_width: int, axis: int, fill_value: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One band per sample along `axis` (1 = time, 2 = frequency) of `[B, T, F]`, drawn as torchaudio's
    `FrequencyMasking`/`TimeMasking`: `w ~ U(0, max_width)`, `start ~ U(0, size - w)`, the band
    `[int(start), int(start) + int(w))`."""
    batch_size, size = features.shape[0], features.shape[axis]
    width = torch.rand(batch_size, generator=generator) * max_width
    start = torch.rand(batch_size, generator=generator) * (size - width)
    first = start.long()
    end = first + width.long()
    positions = torch.arange(size)
    band = (positions >= first[:, None]) & (positions < end[:, None])
    band = band[:, :, None] if axis == 1 else band[:, None, :]
    return features.masked_fill(band, fill_value)


def spec_augment(
    features: torch.Tensor,
    freqm: int = 0,
    timem: int = 0,
    fill_value: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    SpecAugment as the reference: per clip one frequency band of up to `freqm` bins, then one time band of up to
    `timem` frames, set to `fill_value`. The reference masks the fbank before normalisation with 0, which is
    `(0 - audio_mean) / audio_std` in normalised features. `features`: `[B, T, F]`. Draws from `generator`
    (default: torch's global generator).
    """
    if freqm > 0:
        features = _mask_along_axis(features, freqm, axis=2, fill_value=fill_value, generator=generator)
    if timem > 0:
        features = _mask_along_axis(features, timem, axis=1, fill_value=fill_value, generator=generator)
    return features


def add_noise_and_roll(features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    The reference's noise augmentation on normalised features `[B, T, F]`: per clip, uniform noise in `[0, a / 10)`
    with `a ~ U(0, 1)`, and a roll along time by a shift drawn from `[-T, T)`. The roll comes first here, as two
    slice copies per clip, and the noise is added to the result in place: i.i.d. noise rolled is i.i.d. noise, so
    the distribution is the reference's. Draws from `generator` (default: torch's global generator).
    """
    batch_size, length, _ = features.shape
    scale = torch.rand(batch_size, 1, 1, generator=generator) / 10
    noise = torch.rand(features.shape, generator=generator, dtype=features.dtype, device=features.device)
    shifts = torch.randint(-length, length, (batch_size,), generator=generator)
    rolled = torch.empty_like(features)
    for row, source, shift in zip(rolled, features, (shifts % length).tolist()):
        row[shift:] = source[: length - shift]
        row[:shift] = source[length - shift :]
    return rolled.add_(noise.mul_(scale.to(features.dtype)))


def draw_mixup(
    batch_size: int, probability: float, alpha: float = MIXUP_ALPHA, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Mixup partners and weights for a batch: each clip is mixed with probability `probability` with a uniformly
    drawn clip of the batch (which may be itself), with weight `lambda ~ Beta(alpha, alpha)` on its own data.
    Returns `(partners [B] long, lambdas [B] float)`; unmixed clips get themselves and lambda 1. Draws from
    `generator` (default: torch's global generator).
    """
    partners = torch.arange(batch_size)
    lambdas = torch.ones(batch_size)
    if probability <= 0:
        return partners, lambdas
    mixed = torch.rand(batch_size, generator=generator) < probability
    draws = torch.randint(0, batch_size, (batch_size,), generator=generator)
    if generator is None:
        beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample((batch_size,))
    else:  # torch's Beta takes no generator: numpy's, seeded from it
        numpy_rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
        beta = torch.from_numpy(numpy_rng.beta(alpha, alpha, batch_size)).float()
    return torch.where(mixed, draws, partners), torch.where(mixed, beta, lambdas)


def mix_waveforms(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """`weight * first + (1 - weight) * second`, each without its mean, `second` zero-padded or cut to `first`'s
    length, the mix without its mean (the reference mixes waveforms before the fbank)."""
    first = first - first.mean()
    second = second - second.mean()
    if len(second) < len(first):
        second = np.pad(second, (0, len(first) - len(second)))
    mixed = weight * first + (1 - weight) * second[: len(first)]
    return (mixed - mixed.mean()).astype(np.float32)


def smoothed_targets(
    labels: Sequence[Sequence[int]],
    num_labels: int,
    smoothing: float = 0.0,
    partners: torch.Tensor | None = None,
    lambdas: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Targets `[B, num_labels]` as the reference builds them: every class starts at `smoothing / num_labels`; an
    unmixed clip's classes are set to `1 - smoothing`; a mixed clip adds `lambda * (1 - smoothing)` to its own
    classes and `(1 - lambda) * (1 - smoothing)` to its partner's.
    """
    batch_size = len(labels)
    targets = torch.full((batch_size, num_labels), smoothing / num_labels)
    for i, own in enumerate(labels):
        weight = 1.0 if lambdas is None else float(lambdas[i])
        partner = i if partners is None else int(partners[i])
        if weight == 1.0 and partner == i:
            targets[i, list(own)] = 1.0 - smoothing
            continue
        for label in own:
            targets[i, label] += weight * (1.0 - smoothing)
        for label in labels[partner]:
            targets[i, label] += (1.0 - weight) * (1.0 - smoothing)
    return targets


# ----------------------------------------------------------------------------------------------------------------
# The transform and the collator
# ----------------------------------------------------------------------------------------------------------------
CLIP_COLUMN = "clip"
RAW_COLUMNS = ("video", "audio", "frames")
# Slots of a skip counter: one per DataLoader worker (and one for the process itself), so that no two processes add
# to the same number. Workers beyond this share slots (a lost increment is then possible, never a crash).
SKIP_COUNTER_SLOTS = 128


def _clip_key(row: dict) -> tuple:
    """What identifies a row for the augmentation seed: its id and the files it comes from."""
    audio = row.get("audio") or {}
    frames = row.get("frames") or [{}]
    return (row.get("clip_id"), row.get("video"), audio.get("path"), (frames[0] or {}).get("path"))


def augmentation_seed(seed: int, epoch: int, keys: Sequence[tuple]) -> int:
    """A 63-bit seed from `(seed, epoch, the clips' keys)` (a key: a clip's id and files): the same clips of the same
    epoch get the same seed in every process, DataLoader worker and resumed run."""
    text = repr((int(seed), int(epoch), [tuple(key) for key in keys]))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _shared_counter(size=()) -> torch.Tensor:
    """An integer tensor in shared memory (torch hands it to DataLoader workers by reference), or a plain one where
    shared memory is not available."""
    counter = torch.zeros(size, dtype=torch.long)
    try:
        return counter.share_memory_()
    except (RuntimeError, OSError):  # pragma: no cover - e.g. no /dev/shm
        return counter


class SkipCounter:
    """Clips that failed to load, counted in shared memory with one slot per DataLoader worker, so that the process
    that owns the DataLoader reads what all its workers (persistent ones included) counted."""

    def __init__(self):
        self._slots = _shared_counter((SKIP_COUNTER_SLOTS,))
        self._taken = 0

    def add(self, count: int) -> None:
        if count:
            worker = torch.utils.data.get_worker_info()
            slot = 0 if worker is None else 1 + worker.id % (SKIP_COUNTER_SLOTS - 1)
            self._slots[slot] += count

    @property
    def total(self) -> int:
        """Clips counted so far, by this process and its DataLoader workers."""
        return int(self._slots.sum())

    def take(self) -> int:
        """Clips counted since the last `take` (of this process)."""
        total = self.total
        new, self._taken = total - self._taken, total
        return new


def _check_raw_columns(batch: dict) -> None:
    if not any(column in batch for column in RAW_COLUMNS):
        raise CavMaeDataError(
            f"The clip rows reached the transform without their {', '.join(RAW_COLUMNS)} columns (it got "
            f"{sorted(batch) or 'no columns'}). The Trainer drops dataset columns that the model's forward does not "
            "take: pass TrainingArguments(remove_unused_columns=False) (CavMaeTrainingArguments does by default)."
        )


class AudioVisualTransform:
    """
    The reference's data pipeline for training and evaluation, in two steps:

    1. `transform(batch)` (what `dataset.with_transform(transform)` runs on the rows a DataLoader draws) decodes each
       clip: its waveform and the frames it needs (a random one of `num_frames` in training), into
       `{"clip": [DecodedClip, ...]}`, one per clip that loaded.
    2. [`AudioVisualDataCollator`] (the Trainer's `data_collator`) hands the decoded clips of a batch back to the
       transform that decoded them, whose `collate` computes the batch's model inputs at once: the Kaldi fbank of
       all waveforms in one call, the frames resized and cropped as bytes and normalised as one tensor, and the
       training augmentation. `input_features` `[B, T, F]`, `pixel_values` `[B, 3, S, S]` (or
       `[B, num_frames, 3, S, S]` with `frame_index="all"`), and with `num_labels` `labels` `[B, num_labels]` (float
       multi-hot, smoothed and mixed as the reference).

    A clip that fails to load is left out of its batch (`on_error="skip"`), counted in `skip_counter` (read by
    [`cavmae_hf.training.SkippedClipsCallback`], which logs the total), and named in a warning.

    Args:
        feature_extractor ([`CavMaeFeatureExtractor`]): fbank and frame preprocessing; its `max_length`,
            `num_mel_bins` and `image_size` must match the model.
        training (`bool`): draw a random frame of `num_frames` and apply the augmentations below; otherwise take
            `frame_index` and apply none.
        num_frames (`int`, defaults to 10): frames per clip (sampled uniformly from a video).
        frame_index (`int`, `"middle"` or `"all"`, defaults to `"middle"`): the evaluation frame; `"middle"` is
            frame `num_frames // 2` (the reference's frame 5 of 10); `"all"` returns every frame, for the
            classifier's multi-frame evaluation.
        freqm, timem (`int`): SpecAugment's largest frequency / time band (reference fine-tuning: 48 and 192 of
            1024 frames).
        mixup (`float`): share of clips mixed with another clip of the batch (reference fine-tuning: 0.5).
        noise (`bool`): the noise + time-roll augmentation (reference: on for pretraining and fine-tuning).
        label_smoothing (`float`): reference fine-tuning: 0.1.
        num_labels (`int`, *optional*): emit `labels`; None for pretraining.
        on_error (`"skip"`, `"raise"` or `"stand_in"`, defaults to `"skip"`): what a clip that fails to load
            (missing, truncated or corrupt file, no audio track, ...) does. `"skip"`: a warning names the clip and
            the error, the clip is left out (its batch is one smaller) and counted; a batch in which every clip
            fails raises. `"raise"`: a [`CavMaeDataError`] naming the clip stops the run. `"stand_in"`: the
            reference's behaviour, the clip is replaced by constants (fbank 0.01 before normalisation, frames
            0.01), logged and counted; only to reproduce the reference exactly.
        max_skipped (`int`, *optional*): raise once more clips than this failed to load.
        max_skipped_fraction (`float`, *optional*, defaults to 0.5): raise once more than this share of the clips
            seen failed to load (judged from the 20th clip on). The counts are per process, and per DataLoader
            worker with `dataloader_num_workers > 0`.
        seed (`int`, *optional*): base seed of the training augmentation. With a seed, the random frame of a clip
            is drawn from a generator seeded by `(seed, epoch, the clip)` and a batch's mixup, SpecAugment and
            noise from one seeded by `(seed, epoch, the batch's clips)`, never from torch's global generator, so a
            run resumed from a checkpoint repeats the augmentation of the uninterrupted run, whichever DataLoader
            worker draws the batch; call [`set_epoch`] every epoch. [`cavmae_hf.training.AugmentationEpochCallback`]
            does both (it sets a None seed to `TrainingArguments.data_seed`, or `seed`); [`CavMaeTrainer`] adds it.
            Left None, the augmentation draws from torch's global generator, fresh every epoch.

    Attributes:
        skip_forbidden (`str` or None): when set, `"skip"` raises instead, with this reason: a consumer that needs
            whole batches (distributed evaluation gathers equal batches from every process) forbids skipping.
            [`CavMaeTrainer`] sets it on evaluation transforms under DDP.
        skip_counter ([`SkipCounter`]): clips that failed to load (skipped or replaced), over this process and its
            DataLoader workers.
        skipped_clips (`int`), seen_clips (`int`): clips that failed to load / were given so far, in this process
            or worker (what `max_skipped` and `max_skipped_fraction` judge).
        epoch (`int`): the epoch mixed into the augmentation seed.
    """

    def __init__(
        self,
        feature_extractor: CavMaeFeatureExtractor,
        training: bool = False,
        num_frames: int = DEFAULT_NUM_FRAMES,
        frame_index="middle",
        freqm: int = 0,
        timem: int = 0,
        mixup: float = 0.0,
        noise: bool = False,
        label_smoothing: float = 0.0,
        num_labels: int | None = None,
        on_error: str = "skip",
        max_skipped: int | None = None,
        max_skipped_fraction: float | None = 0.5,
        seed: int | None = None,
    ):
        on_error = _check_on_error(on_error, ON_ERROR_CHOICES)
        if not (frame_index in ("middle", "all") or isinstance(frame_index, int)):
            raise CavMaeDataError(f"frame_index must be an int, 'middle' or 'all', got {frame_index!r}.")
        if max_skipped is not None and max_skipped < 0:
            raise CavMaeDataError(f"max_skipped must be at least 0, got {max_skipped}.")
        if max_skipped_fraction is not None and not 0 <= max_skipped_fraction <= 1:
            raise CavMaeDataError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}.")
        if (mixup > 0 or label_smoothing > 0) and num_labels is None and training:
            logger.info("mixup / label smoothing mix labels; without num_labels only the inputs are mixed.")
        self.feature_extractor = feature_extractor
        self.training = training
        self.num_frames = num_frames
        self.frame_index = frame_index
        self.freqm = freqm
        self.timem = timem
        self.mixup = mixup
        self.noise = noise
        self.label_smoothing = label_smoothing
        self.num_labels = num_labels
        self.on_error = on_error
        self.max_skipped = max_skipped
        self.max_skipped_fraction = max_skipped_fraction
        self.seed = seed
        self.skip_forbidden = None
        self.skip_counter = SkipCounter()
        self._epoch = _shared_counter()
        self.skipped_clips = 0
        self.seen_clips = 0

    @property
    def audio_seconds(self) -> float:
        """Audio the fbank of `max_length` frames uses (plus a little): decoding stops there."""
        extractor = self.feature_extractor
        return ((extractor.max_length - 1) * extractor.frame_shift_ms + extractor.frame_length_ms) / 1000 + 0.02

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Mix `epoch` into the augmentation seed, so that every epoch augments a clip differently. The epoch lives
        in shared memory, so that DataLoader workers, persistent ones included, see the change."""
        self._epoch.fill_(int(epoch))

    def frame_indices(self, generator: torch.Generator | None = None) -> list[int]:
        if self.training:
            return [int(torch.randint(0, self.num_frames, (), generator=generator))]
        if self.frame_index == "all":
            return list(range(self.num_frames))
        if self.frame_index == "middle":
            return [self.num_frames // 2]
        return [self.frame_index]

    # Step 1: decoding, per clip ----------------------------------------------------------------------------------
    def __call__(self, batch: dict) -> dict:
        """Decode a batch of dataset rows (columns, as `with_transform` gives them) into
        `{"clip": [DecodedClip, ...]}`: one per clip that loaded (with `"skip"`), or per row."""
        _check_raw_columns(batch)
        rows = _rows(batch)
        clips, failures = self._decode(rows)
        self._count(len(rows), failures)
        return {CLIP_COLUMN: [clip for clip in clips if clip is not None]}

    def _generator(self, keys: Sequence[tuple]) -> torch.Generator | None:
        """The generator of these clips' draws in training with a `seed`; None (torch's global generator) without
        one, and in evaluation, which draws nothing."""
        if not self.training or self.seed is None:
            return None
        return torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, keys))

    def _decode(self, rows: list[dict]) -> tuple[list[DecodedClip | None], list[tuple[int, str]]]:
        """The clips (None where one failed with `"skip"`) and the failures as `(position, description)`."""
        clips, failures = [], []
        extractor = self.feature_extractor
        for position, row in enumerate(rows):
            key = _clip_key(row)
            indices = self.frame_indices(self._generator([key]))
            try:
                clip = decode_clip(row, indices, self.num_frames, extractor.sampling_rate, self.audio_seconds)
            except Exception as error:  # noqa: BLE001 - decoders of damaged files raise many types
                clip = self._failed(row, error, len(indices), self.skipped_clips + len(failures) + 1)
                failures.append((position, describe_failure(row, error)))
            if clip is not None:
                clip.labels, clip.key, clip.transform = row.get("labels") or [], key, self
            clips.append(clip)
        return clips, failures

    def _failed(self, row: dict, error: BaseException, num_images: int, failed_so_far: int) -> DecodedClip | None:
        """What a clip that failed to load becomes: an error, nothing (`"skip"`) or the stand-in."""
        description = describe_failure(row, error)
        if self.on_error == "raise":
            raise CavMaeDataError(f"Could not load {description}") from error
        if self.on_error == "skip" and self.skip_forbidden:
            raise CavMaeDataError(f"Could not load {description}; {self.skip_forbidden}") from error
        action = "skipping it" if self.on_error == "skip" else "using the reference's constant stand-in"
        logger.warning("Could not load %s; %s (%d clips failed so far).", description, action, failed_so_far)
        if self.on_error == "skip":
            return None
        extractor = self.feature_extractor
        blank = Image.new("RGB", (extractor.image_size, extractor.image_size))
        silence = np.zeros(extractor.sampling_rate, np.float32)
        return DecodedClip(silence, extractor.sampling_rate, [blank] * num_images, stand_in=True)

    def _count(self, num_rows: int, failures: list[tuple[int, str]]) -> None:
        """Update the counters; raise when a whole batch failed (with `"skip"`) or a limit is passed."""
        self.seen_clips += num_rows
        self.skipped_clips += len(failures)
        self.skip_counter.add(len(failures))
        if not failures:
            return
        if self.on_error == "skip" and len(failures) == num_rows:
            listed = "; ".join(description for _, description in failures[:5])
            more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
            raise CavMaeDataError(
                f"Every clip of a batch of {num_rows} failed to load, so there is nothing to train on: {listed}"
                f"{more}. Check these files (decode_clips(..., on_error='skip') removes broken clips up front)."
            )
        check_skip_limits(
            self.skipped_clips, self.seen_clips, self.max_skipped, self.max_skipped_fraction, failures[-1][1]
        )

    # Step 2: model inputs, per batch -----------------------------------------------------------------------------
    def collate(self, clips: Sequence[DecodedClip]) -> dict[str, torch.Tensor]:
        """The model inputs of a batch of clips this transform decoded (see the class docstring)."""
        if not clips:
            raise CavMaeDataError(
                "Cannot collate an empty batch (with on_error='skip', every clip of it failed to load)."
            )
        generator = self._generator([clip.key for clip in clips])
        partners, lambdas = draw_mixup(len(clips), self.mixup if self.training else 0.0, generator=generator)
        waveforms = [
            mix_waveforms(clip.audio, clips[int(partner)].audio, float(weight)) if weight < 1 else clip.audio
            for clip, partner, weight in zip(clips, partners, lambdas)
        ]
        extractor = self.feature_extractor
        input_features = extractor(audio=waveforms, sampling_rate=extractor.sampling_rate, return_tensors="pt")[
            "input_features"
        ]
        pixel_values = self.pixel_values(clips)
        if self.training:
            mixed = (lambdas < 1).nonzero().flatten()
            if len(mixed):  # only the mixed clips: a pass over the whole batch for lambda = 1 would change nothing
                weights = lambdas[mixed].view((-1,) + (1,) * (pixel_values.dim() - 1))
                pixel_values[mixed] = weights * pixel_values[mixed] + (1 - weights) * pixel_values[partners[mixed]]
            input_features = spec_augment(
                input_features, self.freqm, self.timem, fill_value=self._raw_zero, generator=generator
            )
        for index, clip in enumerate(clips):
            if clip.stand_in:
                input_features[index] = self._normalise(FAILED_LOAD_VALUE)
                pixel_values[index] = FAILED_LOAD_VALUE
        if self.training and self.noise:
            input_features = add_noise_and_roll(input_features, generator=generator)
        output = {"input_features": input_features, "pixel_values": pixel_values}
        if self.num_labels is not None:
            smoothing = self.label_smoothing if self.training else 0.0
            output["labels"] = smoothed_targets(
                [clip.labels for clip in clips], self.num_labels, smoothing, partners, lambdas
            )
        return output

    def pixel_values(self, clips: Sequence[DecodedClip]) -> torch.Tensor:
        """The clips' frames as the feature extractor preprocesses them (bit for bit), resized and cropped as bytes
        and normalised as one tensor: `[B, 3, S, S]`, or `[B, F, 3, S, S]` with `frame_index="all"`."""
        extractor = self.feature_extractor
        crops = np.stack([[cropped_frame(frame, extractor) for frame in clip.frames] for clip in clips])
        pixels = torch.from_numpy(crops).permute(0, 1, 4, 2, 3).contiguous().float().div_(255.0)
        mean = torch.tensor(extractor.image_mean, dtype=torch.float32).view(1, 1, 3, 1, 1)
        std = torch.tensor(extractor.image_std, dtype=torch.float32).view(1, 1, 3, 1, 1)
        pixels = pixels.sub_(mean).div_(std)
        return pixels if self.frame_index == "all" and not self.training else pixels[:, 0]

    @property
    def _raw_zero(self) -> float:
        """A raw fbank value of 0 in the feature extractor's normalised units."""
        return self._normalise(0.0)

    def _normalise(self, value: float) -> float:
        extractor = self.feature_extractor
        return (value - extractor.audio_mean) / extractor.audio_std if extractor.do_normalize else value


def cropped_frame(image: Image.Image, extractor: CavMaeFeatureExtractor) -> np.ndarray:
    """`[S, S, 3]` uint8: the image upright in RGB, resized (bicubic) on its shorter side and center-cropped exactly
    as [`CavMaeFeatureExtractor.preprocess_image`] does before it converts to float."""
    from .feature_extraction_cav_mae import _center_crop_box, _pil_to_rgb, _resized_size

    image = _pil_to_rgb(image)
    size = extractor.image_size
    image = image.resize(_resized_size(*image.size, extractor.resize_size or size), Image.BICUBIC)
    return np.asarray(image.crop(_center_crop_box(*image.size, size)), dtype=np.uint8)


def pretraining_transforms(
    feature_extractor: CavMaeFeatureExtractor,
    noise: bool = True,
    num_frames: int = DEFAULT_NUM_FRAMES,
    **error_options,
):
    """(train, eval) transforms of the reference's pretraining: random frame and noise + roll in training, the
    middle frame at evaluation; no labels, no SpecAugment, no mixup. `error_options` (`on_error`, `max_skipped`,
    `max_skipped_fraction`, `seed`) go to both, see [`AudioVisualTransform`]."""
    return (
        AudioVisualTransform(feature_extractor, training=True, num_frames=num_frames, noise=noise, **error_options),
        AudioVisualTransform(feature_extractor, training=False, num_frames=num_frames, **error_options),
    )


def finetuning_transforms(
    feature_extractor: CavMaeFeatureExtractor,
    num_labels: int,
    freqm: int = 48,
    timem: int = 192,
    mixup: float = 0.5,
    noise: bool = True,
    label_smoothing: float = 0.1,
    num_frames: int = DEFAULT_NUM_FRAMES,
    eval_frames="all",
    **error_options,
):
    """(train, eval) transforms of the reference's fine-tuning (defaults: its AudioSet / VGGSound recipe for 1024
    frames; scale `timem` with the audio length). Evaluation uses every frame by default (multi-frame evaluation);
    `eval_frames="middle"` uses frame 5 of 10. `error_options` (`on_error`, `max_skipped`, `max_skipped_fraction`,
    `seed`) go to both, see [`AudioVisualTransform`]; clips skipped in evaluation are missing from the
    predictions (use `on_error="raise"` where predictions must line up with the dataset's rows)."""
    train = AudioVisualTransform(
        feature_extractor,
        training=True,
        num_frames=num_frames,
        freqm=freqm,
        timem=timem,
        mixup=mixup,
        noise=noise,
        label_smoothing=label_smoothing,
        num_labels=num_labels,
        **error_options,
    )
    evaluation = AudioVisualTransform(
        feature_extractor,
        training=False,
        num_frames=num_frames,
        frame_index=eval_frames,
        num_labels=num_labels,
        **error_options,
    )
    return train, evaluation


class TransformedStream(torch.utils.data.IterableDataset):
    """
    A streamed clip dataset (`datasets.IterableDataset`) decoded by `transform` in groups of `batch_size` rows, as a
    torch `IterableDataset` for the Trainer's DataLoader (batched by [`AudioVisualDataCollator`]). The stream is
    read through its own iterator, so that DataLoader workers share its shards out; `set_epoch` reaches its
    shuffle. With `num_examples`, `len()` is the clips of one epoch, which is how the Trainer learns where an epoch
    of a stream ends (without it, a stream is one epoch of `max_steps`).
    """

    def __init__(self, stream, transform: AudioVisualTransform, batch_size: int = 32, num_examples: int | None = None):
        super().__init__()
        self.stream = stream
        self.transform = transform
        self.batch_size = batch_size
        self.num_examples = num_examples

    def __iter__(self):
        rows = []
        for row in self.stream:
            rows.append(row)
            if len(rows) == self.batch_size:
                yield from self._decoded(rows)
                rows = []
        if rows:
            yield from self._decoded(rows)

    def _decoded(self, rows: list[dict]):
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        for clip in self.transform(columns)[CLIP_COLUMN]:
            yield {CLIP_COLUMN: clip}

    def __len__(self) -> int:
        if self.num_examples is None:
            # a TypeError, as len() of an object without a length raises: the Trainer's has_length() expects one
            raise CavMaeArgumentError("This stream has no length: give num_examples (the clips of one epoch).")
        return self.num_examples

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


def with_transform(dataset, transform: AudioVisualTransform, batch_size: int = 32, num_examples: int | None = None):
    """
    Attach `transform` to a clip dataset: `Dataset.with_transform` for map-style datasets (the Trainer's DataLoader
    then hands it the rows of each batch), a [`TransformedStream`] (decoding `batch_size` rows at a time, with
    `num_examples` clips an epoch if given) for a `datasets.IterableDataset`.
    """
    if isinstance(dataset, datasets.IterableDataset):
        return TransformedStream(dataset, transform, batch_size, num_examples)
    return dataset.with_transform(transform)


def attached_transforms(dataset) -> list[AudioVisualTransform]:
    """
    The [`AudioVisualTransform`]s a dataset runs: the `with_transform` of a `datasets.Dataset` (its `format`), the
    `transform` of a [`TransformedStream`], through wrappers that keep the wrapped set as `dataset` (torch's
    `Subset`, accelerate's `IterableDatasetShard`). The training callbacks use this to find what to seed and count.
    """
    found = []
    for _ in range(10):  # wrappers of wrappers; bounded in case one refers to itself
        if dataset is None:
            break
        if isinstance(dataset, datasets.Dataset):
            found.append((dataset.format.get("format_kwargs") or {}).get("transform"))
        found.append(getattr(dataset, "transform", None))
        dataset = getattr(dataset, "dataset", None)
    return [transform for transform in found if isinstance(transform, AudioVisualTransform)]


class AudioVisualDataCollator:
    """
    The Trainer's `data_collator` for clips decoded by an [`AudioVisualTransform`]: hands each batch of decoded clips
    back to the transform that decoded them, which returns the model inputs (`input_features`, `pixel_values`, and
    `labels` when it has `num_labels`). Takes the rows a DataLoader gathers (`[{"clip": DecodedClip}, ...]`) or a
    slice of a transformed dataset (`{"clip": [...]}`); a dict of model inputs already batched passes through.
    """

    model_input_names = ("input_features", "pixel_values", "labels")

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if isinstance(examples, dict) and CLIP_COLUMN not in examples:
            return {name: examples[name] for name in self.model_input_names if name in examples}
        try:
            clips = examples[CLIP_COLUMN] if isinstance(examples, dict) else [row[CLIP_COLUMN] for row in examples]
        except (KeyError, TypeError):
            raise CavMaeDataError(
                "AudioVisualDataCollator batches clips decoded by an AudioVisualTransform: attach one to the dataset "
                "with dataset.with_transform(transform) (or cavmae_hf.data.with_transform for streams)."
            ) from None
        if not clips:
            raise CavMaeDataError(
                "Cannot collate an empty batch (with on_error='skip', every clip of it failed to load)."
            )
        transform = clips[0].transform
        if any(clip.transform is not transform for clip in clips):
            raise CavMaeDataError("A batch mixes clips decoded by different transforms; batch each dataset apart.")
        return transform.collate(clips)


__all__ = [
    "AudioVisualDataCollator",
    "AudioVisualTransform",
    "CavMaeDataError",
    "DecodedClip",
    "LabelSet",
    "SkipCounter",
    "TransformedStream",
    "add_noise_and_roll",
    "attached_transforms",
    "augmentation_seed",
    "balanced_sample_weights",
    "check_paths_within_root",
    "check_skip_limits",
    "clip_dataset_features",
    "cropped_frame",
    "dataset_from_csv",
    "dataset_from_folder",
    "dataset_from_reference_json",
    "decode_clip",
    "decode_clips",
    "describe_failure",
    "draw_mixup",
    "finetuning_transforms",
    "label_set_of",
    "labels_for_classification",
    "mix_waveforms",
    "pretraining_transforms",
    "read_label_csv",
    "LabelFileError",
    "reference_files",
    "smoothed_targets",
    "spec_augment",
    "with_transform",
]
