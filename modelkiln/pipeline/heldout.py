"""Which rows judge a variant and which rows a step may train on, split by content.

A quality figure means something only on inputs the variant never saw. Request logs
repeat themselves, so holding rows out by position is not enough: a sentence that
appears four times in ``calibration.jsonl`` would be held out once and trained on three
times. Every row therefore gets a content key (its text with case, width and spacing
normalised; for arrays a hash of its values, padding left out), duplicates count once,
and nothing whose key a quality sample has is trained on.

Where the checkpoint ships ``eval.*`` that is the quality set. Otherwise the quality
samples are taken from the distinct calibration rows by the order of their keys' hashes
(the same rows whatever order the file lists them in, spread over the file rather than
its first lines), and training gets the rest.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np

from ..plugins.api import MASK


def text_key(text: str) -> str:
    """A text as its content: Unicode compatibility forms folded, case folded, runs of
    white space one space (``"Hello  World"`` and ``"hello world"`` are one sentence)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def array_keys(rows: dict[str, np.ndarray]) -> list[str]:
    """One key per row of ``rows`` (arrays by input name, rows first): a hash of every
    input's values in that row, where an attention mask marks padding only the real
    positions (the same sentence padded to two lengths is one row)."""
    mask = rows.get(MASK)
    count = len(next(iter(rows.values()))) if rows else 0
    keys = []
    for row in range(count):
        digest = hashlib.sha256()
        real = mask[row].astype(bool) if mask is not None and mask.ndim == 2 else None
        for name in sorted(rows):
            value = np.ascontiguousarray(rows[name][row])
            if real is not None and value.ndim >= 1 and value.shape[0] == real.shape[0]:
                value = np.ascontiguousarray(value[real])
            digest.update(name.encode())
            digest.update(str(value.dtype).encode() + str(value.shape).encode())
            digest.update(value.tobytes())
        keys.append(digest.hexdigest())
    return keys


def first_of_each(keys: list[str]) -> list[int]:
    """The index of each distinct key's first row, in order."""
    seen: set[str] = set()
    kept = []
    for index, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            kept.append(index)
    return kept


def spread_order(keys: list[str], indices: list[int]) -> list[int]:
    """``indices`` ordered by the hash of their keys: the quality samples are a prefix of
    this order, a choice that depends on the rows' content alone, not on how the file is
    sorted."""
    return sorted(indices, key=lambda i: hashlib.sha256(b"quality:" + keys[i].encode()).digest())


@dataclass(frozen=True)
class DataSplit:
    """How a checkpoint's rows were shared between the quality samples and training.

    ``quality_rows``: the distinct rows the quality samples hold; ``training_rows``: the
    distinct rows a training step gets; ``trained_on_samples``: no distinct row was left
    to train on, so training steps train on the quality samples themselves and their
    score cannot vouch for them. ``heldout_rows`` is what judges a trained variant on
    rows it never saw: the quality rows, or none where it trained on them.
    ``quality_source`` and ``training_source`` name where each side came from; a
    ``removed`` count says how many training rows were dropped as equal to a sample."""

    quality_rows: int
    training_rows: int
    quality_source: str
    training_source: str
    removed: int = 0
    trained_on_samples: bool = False

    @property
    def heldout_rows(self) -> int:
        return 0 if self.trained_on_samples else self.quality_rows

    def as_dict(self) -> dict:
        return {"quality_rows": self.quality_rows, "heldout_rows": self.heldout_rows,
                "training_rows": self.training_rows,
                "quality_source": self.quality_source, "training_source": self.training_source,
                "removed_as_quality_samples": self.removed, "trained_on_samples": self.trained_on_samples}


def unseen(keys: list[str], heldout: set[str]) -> tuple[list[int], int]:
    """The first row of each distinct key that is not ``heldout``, and how many distinct
    keys were dropped because they are."""
    kept, dropped = [], 0
    for index in first_of_each(keys):
        if keys[index] in heldout:
            dropped += 1
        else:
            kept.append(index)
    return kept, dropped
