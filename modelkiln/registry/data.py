"""Evaluation, calibration and training data shipped beside a checkpoint, read without
pickle.

Arrays (``eval.npz``, ``calibration.npz``, ``train.npz``) hold ``inputs`` for a model
with one input, or one array per input name (``input_ids``, ``attention_mask``, ...),
plus ``labels`` (integers) in ``eval.npz``. Text (``eval.jsonl``, ``calibration.jsonl``,
``train.jsonl``: one ``{"text": ...}`` object per line, ``"label"`` optional in
``eval.jsonl``) is tokenized with the checkpoint's own tokenizer.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointRejected

EVAL_FILE = "eval.npz"
CALIBRATION_FILE = "calibration.npz"
# Unlabelled inputs steps may train on (recovery fine-tunes, distillation).
TRAIN_FILE = "train.npz"
TEXT_FILES = ("eval.jsonl", "calibration.jsonl", "train.jsonl")
DATA_FILES = (EVAL_FILE, CALIBRATION_FILE, TRAIN_FILE, *TEXT_FILES)
# Lines of text read at most: enough for a stable score, bounded for big files.
MAX_TEXT_LINES = 4096


def _load_npz(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        # numpy raises ValueError for object arrays when pickles are not allowed.
        raise CheckpointRejected(
            f"{path}: holds pickled objects, which are never loaded; save plain numeric "
            f"arrays with numpy.savez ({exc})"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointRejected(f"{path}: not a readable .npz file ({exc})") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise CheckpointRejected(
            f"{path}: missing array(s) {', '.join(missing)}; it holds {sorted(arrays)}"
        )
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise CheckpointRejected(f"{path}: array {name} has dtype {array.dtype}; use numbers")
    return arrays


def load_eval(directory: Path) -> dict[str, np.ndarray] | None:
    path = directory / EVAL_FILE
    if not path.exists():
        return None
    arrays = _load_npz(path, ("labels",))
    rows = {name: len(array) for name, array in arrays.items()}
    if len(set(rows.values())) != 1 or not rows["labels"] or len(rows) < 2:
        raise CheckpointRejected(
            f"{path}: its arrays have {rows} rows; inputs and labels must match, with at least one row"
        )
    return arrays


def _load_inputs(directory: Path, name: str) -> dict[str, np.ndarray] | None:
    path = directory / name
    if not path.exists():
        return None
    arrays = _load_npz(path, ())
    if not arrays or any(len(array) == 0 for array in arrays.values()):
        raise CheckpointRejected(f"{path}: holds no rows; save inputs (or one array per input name)")
    return arrays


def load_calibration(directory: Path) -> dict[str, np.ndarray] | None:
    return _load_inputs(directory, CALIBRATION_FILE)


def load_train(directory: Path) -> dict[str, np.ndarray] | None:
    return _load_inputs(directory, TRAIN_FILE)


def load_text(directory: Path, kind: str) -> tuple[list[str], np.ndarray | None] | None:
    """The texts of ``<kind>.jsonl`` (``kind``: eval, calibration or train) and their
    labels when every line has one; None when the file is not there."""
    path = directory / f"{kind}.jsonl"
    if not path.exists():
        return None
    import json

    texts, labels = [], []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"line {number}: {exc.msg} (column {exc.colno})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f'line {number} is not an object with a "text" string')
                label = row.get("label")
                if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
                    raise ValueError(f'line {number}: "label" must be an integer')
                texts.append(row["text"])
                labels.append(label)
                if len(texts) == MAX_TEXT_LINES:
                    break
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointRejected(
            f'{path}: not JSON lines of {{"text": ...}} ({exc}); write one object per line'
        ) from None
    if not texts:
        raise CheckpointRejected(f"{path}: holds no text")
    has_labels = all(label is not None for label in labels)
    return texts, np.asarray(labels, dtype=np.int64) if has_labels and kind == "eval" else None
