"""Class labels: the reference's label file (`index,mid,display_name`), read once for the data loaders and the
converter, and the AudioSet labels that ship with the package."""

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .configuration_cav_mae import CavMaeError

AUDIOSET_LABELS = "data/audioset_labels.csv"


class LabelFileError(CavMaeError):
    """A label file is missing or is not the reference's `index,mid,display_name` CSV; the message says where."""


@dataclass
class LabelSet:
    """Class names in index order, with the reference's machine ids (`mid`, e.g. `/m/09x0r`) when known."""

    names: list[str]
    mids: list[str] | None = None

    def __post_init__(self):
        self._lookup = {name: index for index, name in enumerate(self.names)}
        self._lookup.update({mid: index for index, mid in enumerate(self.mids or [])})

    def __len__(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}

    def index_of(self, token: str) -> int:
        """Index of a class given by its mid, its display name or its index as text."""
        token = token.strip()
        if token in self._lookup:
            return self._lookup[token]
        if token.isdigit() and int(token) < len(self.names):
            return int(token)
        raise LabelFileError(f"Unknown label {token!r}: not a mid, name or index of the {len(self.names)} classes.")


def read_label_csv(path) -> LabelSet:
    """
    The reference's label file: a CSV with columns `index,mid,display_name` (`mid` may be missing), one row per
    class, indices 0..N-1 in any order; UTF-8, with or without a byte-order mark.

    Raises:
        LabelFileError: a missing or unreadable file, missing columns, an index that is not a whole number,
            appears twice or leaves a gap (with the line).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"Label file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError:
        raise LabelFileError(f"{path} is not UTF-8 text; save the label CSV as UTF-8.") from None
    except csv.Error as error:
        raise LabelFileError(f"{path} is not a readable CSV ({error}).") from None
    return _label_set(rows, path)


def audioset_labels() -> LabelSet:
    """The 527 AudioSet classes of the reference's label file, shipped with the package."""
    with resources.files("cavmae_hf").joinpath(AUDIOSET_LABELS).open(encoding="utf-8") as handle:
        return _label_set(list(csv.DictReader(handle)), AUDIOSET_LABELS)


def _label_set(rows: list[dict], path) -> LabelSet:
    if not rows or not {"index", "display_name"} <= set(rows[0]):
        raise LabelFileError(f"{path} must be a CSV with columns index,mid,display_name.")
    by_index = {}
    for line, row in enumerate(rows, start=2):
        try:
            index = int(str(row["index"]).strip())
        except ValueError:
            raise LabelFileError(f"{path}, line {line}: index {row['index']!r} is not a whole number.") from None
        if index in by_index:
            raise LabelFileError(f"{path}, line {line}: index {index} appears twice.")
        by_index[index] = row
    if sorted(by_index) != list(range(len(by_index))):
        missing = sorted(set(range(len(by_index))) - set(by_index))
        raise LabelFileError(
            f"{path}: the indices must be 0..{len(by_index) - 1}, one row each; missing {missing[:5]}."
        )
    ordered = [by_index[index] for index in range(len(by_index))]
    mids = [row["mid"] for row in ordered] if "mid" in rows[0] else None
    return LabelSet(names=[row["display_name"] for row in ordered], mids=mids)
