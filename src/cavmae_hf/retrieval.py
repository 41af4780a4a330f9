"""
Audio-visual retrieval with CAV-MAE embeddings.

A [`RetrievalIndex`] holds the L2-normalised pooled audio and visual embeddings of a gallery of clips (from
`CavMaeModel.get_audio_features` / `get_image_features`, here through the `"audio-visual-feature-extraction"`
pipeline, which also averages the embeddings of a clip's frames). It is saved as one safetensors file and searched
with cosine similarity by batched matrix products.

```python
from cavmae_hf.retrieval import build_index, search, RetrievalIndex

index = build_index("path/to/cav-mae", ["a.mp4", "b.mp4", "c.mp4"])
index.save("gallery.safetensors")
hits = search(RetrievalIndex.load("gallery.safetensors"), "path/to/cav-mae", "query.wav", top_k=2)
# [RetrievalHit(key='b.mp4', score=0.61, rank=1), ...]   (audio query -> visual gallery by default)
```

By default a query is matched across modalities, as CAV-MAE's contrastive objective was trained and evaluated:
an audio file (or a video's audio) against the gallery's visual embeddings, an image against its audio embeddings.
`query_modality` / `target_modality` choose otherwise (e.g. visual -> visual).
"""

import json
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .configuration_cav_mae import CavMaeError
from .media import AUDIO_PRECISIONS, FRAME_SELECTIONS, FRAME_TRANSFORMS
from .modeling_cav_mae import AUDIO, VISUAL
from .pipelines import (
    DEFAULT_NUM_FRAMES,
    FEATURE_EXTRACTION_TASK,
    AudioVisualFeatureExtractionPipeline,
    cav_mae_pipeline,
)

INDEX_FORMAT = "cavmae-retrieval-index"
INDEX_VERSION = "1"
INDEX_SUFFIX = ".safetensors"
MODALITIES = (AUDIO, VISUAL)
EMBEDDING_KEYS = {AUDIO: "audio_embeds", VISUAL: "visual_embeds"}
# `cavmae_hf.media.load_video`'s decoding options and their defaults (the reference's preprocessing)
VIDEO_OPTION_DEFAULTS = {
    "frame_selection": FRAME_SELECTIONS[0],
    "frame_transform": FRAME_TRANSFORMS[0],
    "audio_precision": AUDIO_PRECISIONS[0],
}


class RetrievalError(CavMaeError):
    """A retrieval index or query cannot be used as asked; the message says why."""


def check_index_path(path) -> Path:
    """Where an index may be written: a `.safetensors` file name (an index is never a pickle, and a `.bin` / `.pt`
    name would invite `torch.load`) in an existing directory, not a directory itself."""
    path = Path(path)
    if path.is_dir():
        raise RetrievalError(f"{path} is a directory; give the index a file name ending in {INDEX_SUFFIX}.")
    if path.suffix.lower() != INDEX_SUFFIX:
        raise RetrievalError(
            f"An index is a safetensors file: name it *{INDEX_SUFFIX}, not {path.name!r}."
        )
    if not path.parent.is_dir():
        raise RetrievalError(f"Cannot write {path}: the directory {path.parent} does not exist.")
    return path


@dataclass(frozen=True)
class RetrievalHit:
    """One result of a search: the gallery clip's `key`, its cosine `score` and its `rank` (1 = best)."""

    key: str
    score: float
    rank: int

    def to_dict(self) -> dict:
        return {"key": self.key, "score": self.score, "rank": self.rank}


class RetrievalIndex:
    """
    Normalised embeddings of a gallery of clips.

    Args:
        keys: one name per clip (e.g. its path).
        embeddings: `{"audio": [N, D], "visual": [N, D]}` (either may be absent); rows are L2-normalised here.
        present: `{modality: [N] bool}`: which clips have that modality (default: all). Missing rows never match.
        metadata: free-form strings saved with the index (e.g. the model it came from).
    """

    def __init__(
        self,
        keys: Sequence[str],
        embeddings: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor] | None = None,
        metadata: dict[str, str] | None = None,
    ):
        self.keys = [str(key) for key in keys]
        self.embeddings, self.present = {}, {}
        for modality, matrix in embeddings.items():
            if modality not in MODALITIES:
                raise RetrievalError(f"Unknown modality {modality!r}; use one of {MODALITIES}.")
            if not isinstance(matrix, torch.Tensor) or not matrix.is_floating_point():
                kind = matrix.dtype if isinstance(matrix, torch.Tensor) else type(matrix).__name__
                raise RetrievalError(f"{modality} embeddings must be a float tensor, got {kind}.")
            if matrix.dim() != 2 or matrix.shape[0] != len(self.keys):
                raise RetrievalError(
                    f"{modality} embeddings must be [{len(self.keys)}, D] (one row per key), got {tuple(matrix.shape)}."
                )
            if not bool(torch.isfinite(matrix).all()):
                raise RetrievalError(f"{modality} embeddings contain NaN or Inf values.")
            mask = (present or {}).get(modality)
            mask = torch.ones(len(self.keys), dtype=torch.bool) if mask is None else mask.to(torch.bool).cpu()
            if mask.shape != (len(self.keys),):
                raise RetrievalError(
                    f"{modality} presence flags must be [{len(self.keys)}] (one per key), got {tuple(mask.shape)}."
                )
            self.embeddings[modality] = (
                torch.nn.functional.normalize(matrix.detach().float().cpu(), dim=-1) * mask[:, None]
            )
            self.present[modality] = mask
        dims = {modality: matrix.shape[1] for modality, matrix in self.embeddings.items()}
        if len(set(dims.values())) > 1:
            raise RetrievalError(f"Audio and visual embeddings have different sizes: {dims}.")
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"RetrievalIndex({len(self)} clips, modalities={self.modalities}, dim={self.dim})"

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.embeddings and bool(self.present[m].any()))

    @property
    def dim(self) -> int | None:
        return next((matrix.shape[1] for matrix in self.embeddings.values()), None)

    # Building ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_clip_embeddings(cls, keys: Sequence[str], clips: Sequence[dict], metadata=None) -> "RetrievalIndex":
        """An index from per-clip outputs of the feature-extraction pipeline (`audio_embeds` / `visual_embeds`)."""
        if len(keys) != len(clips):
            raise RetrievalError(f"{len(keys)} keys for {len(clips)} clips.")
        if not clips:
            raise RetrievalError("Cannot build an index of no clips.")
        embeddings, present = {}, {}
        for modality, name in EMBEDDING_KEYS.items():
            rows = [torch.as_tensor(clip[name], dtype=torch.float32) if name in clip else None for clip in clips]
            available = [row for row in rows if row is not None]
            if not available:
                continue
            zeros = torch.zeros_like(available[0])
            embeddings[modality] = torch.stack([zeros if row is None else row for row in rows])
            present[modality] = torch.tensor([row is not None for row in rows])
        return cls(keys, embeddings, present, metadata)

    # Persistence ------------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the index as one safetensors file named `*.safetensors` (keys and metadata in its header)."""
        path = check_index_path(path)
        tensors = {}
        for modality, matrix in self.embeddings.items():
            tensors[f"{modality}_embeds"] = matrix.contiguous()
            tensors[f"{modality}_present"] = self.present[modality].to(torch.uint8).contiguous()
        header = {**self.metadata, "format": INDEX_FORMAT, "version": INDEX_VERSION, "keys": json.dumps(self.keys)}
        save_file(tensors, str(path), metadata={str(k): str(v) for k, v in header.items()})
        return path

    @classmethod
    def load(cls, path) -> "RetrievalIndex":
        path = Path(path)
        if not path.is_file():
            raise RetrievalError(f"Index file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = dict(handle.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise RetrievalError(f"{path} is not a safetensors file ({error}).") from None
        if header.get("format") != INDEX_FORMAT:
            raise RetrievalError(f"{path} is not a CAV-MAE retrieval index (written by `cavmae embed`).")
        if header.get("version") != INDEX_VERSION:
            raise RetrievalError(
                f"{path} is a version {header.get('version')!r} index; this version of cavmae_hf reads version "
                f"{INDEX_VERSION}. Rebuild it with `cavmae embed`."
            )
        try:
            keys = json.loads(header.pop("keys"))
        except (KeyError, json.JSONDecodeError):
            keys = None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise RetrievalError(f"{path} is a damaged index: its header has no valid list of clip keys.")
        embeddings = {m: tensors[f"{m}_embeds"] for m in MODALITIES if f"{m}_embeds" in tensors}
        if not embeddings:
            raise RetrievalError(f"{path} is a damaged index: it holds no audio_embeds or visual_embeds.")
        present = {m: tensors[f"{m}_present"].bool() for m in MODALITIES if f"{m}_present" in tensors}
        metadata = {k: v for k, v in header.items() if k not in ("format", "version")}
        try:
            return cls(keys, embeddings, present, metadata)
        except RetrievalError as error:
            raise RetrievalError(f"{path} is a damaged index: {error}") from None

    # Search -----------------------------------------------------------------------------------------------------
    def scores(self, queries: torch.Tensor, modality: str) -> torch.Tensor:
        """Cosine similarities `[Q, N]` of queries `[Q, D]` with the gallery's `modality` embeddings (-inf where
        a clip lacks that modality)."""
        gallery = self._gallery(modality)
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or not queries.is_floating_point():
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise RetrievalError(f"Queries must be a float tensor [Q, D] (or [D]), got {shape}.")
        if queries.shape[-1] != gallery.shape[1]:
            raise RetrievalError(f"Queries have dimension {queries.shape[-1]}, the index {gallery.shape[1]}.")
        if not bool(torch.isfinite(queries).all()):
            raise RetrievalError("Queries contain NaN or Inf values.")
        queries = torch.nn.functional.normalize(queries.detach().float().cpu(), dim=-1)
        return (queries @ gallery.T).masked_fill(~self.present[modality], float("-inf"))

    def search(
        self, queries: torch.Tensor, modality: str, top_k: int = 5, chunk_size: int = 1024
    ) -> list[list[RetrievalHit]]:
        """
        The `top_k` gallery clips closest to each query.

        Args:
            queries: `[Q, D]` or `[D]` embeddings (normalised here).
            modality: which gallery embeddings to match (`"audio"` or `"visual"`).
            chunk_size: queries per matrix product (bounds memory for large query sets).
        Returns:
            One list of [`RetrievalHit`] per query, best first.
        """
        if isinstance(queries, torch.Tensor) and queries.dim() == 1:
            queries = queries.unsqueeze(0)
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
            raise RetrievalError(f"top_k must be a whole number of at least 1, got {top_k!r}.")
        top_k = min(int(top_k), int(self.present[self._check_modality(modality)].sum()))
        results = []
        for start in range(0, queries.shape[0], chunk_size):
            best_scores, best_ids = self.scores(queries[start : start + chunk_size], modality).topk(top_k, dim=-1)
            for scores, ids in zip(best_scores.tolist(), best_ids.tolist()):
                results.append([RetrievalHit(self.keys[i], s, rank) for rank, (s, i) in enumerate(zip(scores, ids), 1)])
        return results

    def _check_modality(self, modality: str) -> str:
        if modality not in self.modalities:
            raise RetrievalError(
                f"The index has no {modality} embeddings (it has: {', '.join(self.modalities) or 'none'})."
            )
        return modality

    def _gallery(self, modality: str) -> torch.Tensor:
        return self.embeddings[self._check_modality(modality)]


# ----------------------------------------------------------------------------------------------------------------
# From media to an index, and queries
# ----------------------------------------------------------------------------------------------------------------
def feature_extraction_pipeline(model, device=None, dtype=None) -> AudioVisualFeatureExtractionPipeline:
    """The `"audio-visual-feature-extraction"` pipeline of `model` (a directory, a Hub id or a loaded model);
    an existing pipeline is returned as it is."""
    if isinstance(model, AudioVisualFeatureExtractionPipeline):
        return model
    return cav_mae_pipeline(FEATURE_EXTRACTION_TASK, model, device=device, dtype=dtype)


def embed_clips(
    extractor,
    sources: Iterable,
    num_frames: int = DEFAULT_NUM_FRAMES,
    batch_size: int = 1,
    progress: bool = False,
    total: int | None = None,
    video_options: dict | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per-clip embeddings (`audio_embeds` `[D]`, `visual_embeds` `[D]`, ...) of `sources` (paths or clip dicts);
    `video_options`: `load_video`'s `frame_selection` / `frame_transform` / `audio_precision` for video files."""
    extractor = feature_extraction_pipeline(extractor)
    sources = list(sources)
    outputs = extractor(
        (source for source in sources),
        batch_size=batch_size,
        num_frames=num_frames,
        return_tensors=True,
        **(video_options or {}),
    )
    if progress:
        from tqdm.auto import tqdm

        outputs = tqdm(outputs, total=total or len(sources), desc="embedding", unit="clip")
    return list(outputs)


def index_metadata(model_name: str, num_frames: int, video_options: dict | None = None) -> dict[str, str]:
    """What an index records of how its clips were embedded: the model, the frames per clip and every decoding
    option (the defaults written out), so that queries can be decoded the same way."""
    unknown = set(video_options or {}) - set(VIDEO_OPTION_DEFAULTS)
    if unknown:
        raise RetrievalError(f"Unknown video options {sorted(unknown)}; known: {sorted(VIDEO_OPTION_DEFAULTS)}.")
    options = {**VIDEO_OPTION_DEFAULTS, **{k: v for k, v in (video_options or {}).items() if v is not None}}
    return {"model": str(model_name), "num_frames": str(num_frames), **options}


def recorded_video_options(index: "RetrievalIndex") -> dict[str, str]:
    """The decoding options an index was built with (none for indexes written before they were recorded)."""
    return {name: index.metadata[name] for name in VIDEO_OPTION_DEFAULTS if name in index.metadata}


def build_index(
    extractor,
    sources: Sequence,
    keys: Sequence[str] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    batch_size: int = 1,
    progress: bool = False,
    video_options: dict | None = None,
) -> RetrievalIndex:
    """Embed `sources` (paths of videos / audio files / images, or clip dicts) into a [`RetrievalIndex`] keyed by
    `keys` (default: the paths). `extractor`: a model directory, a loaded CAV-MAE model or a feature-extraction
    pipeline. `video_options` (see `embed_clips`) are recorded in the index's metadata."""
    sources = list(sources)
    if keys is None:
        keys = [str(source) if not isinstance(source, dict) else str(index) for index, source in enumerate(sources)]
    extractor = feature_extraction_pipeline(extractor)
    metadata = index_metadata(getattr(extractor.model, "name_or_path", "") or "", num_frames, video_options)
    clips = embed_clips(
        extractor, sources, num_frames=num_frames, batch_size=batch_size, progress=progress, video_options=video_options
    )
    return RetrievalIndex.from_clip_embeddings(keys, clips, metadata)


def default_modalities(
    query: dict, index: RetrievalIndex, query_modality=None, target_modality=None
) -> tuple[str, str]:
    """
    Which embedding of the query to match against which of the gallery: cross-modal by default (audio -> visual
    when the query has audio, else visual -> audio), falling back to the same modality when the index lacks the
    other one.
    """
    available = [m for m in MODALITIES if EMBEDDING_KEYS[m] in query]
    if query_modality is None:
        query_modality = AUDIO if AUDIO in available else VISUAL
    if query_modality not in available:
        raise RetrievalError(f"The query has no {query_modality} (it has: {', '.join(available) or 'nothing'}).")
    if target_modality is None:
        other = VISUAL if query_modality == AUDIO else AUDIO
        target_modality = other if other in index.modalities else query_modality
    return query_modality, target_modality


def search(
    index: RetrievalIndex,
    extractor,
    queries,
    top_k: int = 5,
    query_modality: str | None = None,
    target_modality: str | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
    video_options: dict | None = None,
) -> list[RetrievalHit] | list[list[RetrievalHit]]:
    """
    Search `index` with one query (a video, audio file or image path, or a clip dict) or a list of them.
    Returns a list of [`RetrievalHit`] per query (just one list for a single query). Video queries are decoded with
    the options the index was built with, unless `video_options` says otherwise.
    """
    single = not isinstance(queries, list)
    queries = [queries] if single else queries
    options = {**recorded_video_options(index), **{k: v for k, v in (video_options or {}).items() if v is not None}}
    embedded = embed_clips(extractor, queries, num_frames=num_frames, video_options=options)
    pairs = [default_modalities(query, index, query_modality, target_modality) for query in embedded]
    results = [None] * len(queries)
    for source, target in dict.fromkeys(pairs):  # one batched matrix product per (query, gallery) modality pair
        positions = [i for i, pair in enumerate(pairs) if pair == (source, target)]
        matrix = torch.stack([embedded[i][EMBEDDING_KEYS[source]] for i in positions])
        for position, hits in zip(positions, index.search(matrix, target, top_k=top_k)):
            results[position] = hits
    return results[0] if single else results
