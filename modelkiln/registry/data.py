"""Evaluation and calibration data shipped beside a checkpoint, read without pickle."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointRejected

EVAL_FILE = "eval.npz"
CALIBRATION_FILE = "calibration.npz"
# Unlabelled inputs steps may train on (recovery fine-tunes, distillation).
TRAIN_FILE = "train.npz"
DATA_FILES = (EVAL_FILE, CALIBRATION_FILE, TRAIN_FILE)


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
    arrays = _load_npz(path, ("inputs", "labels"))
    if len(arrays["inputs"]) != len(arrays["labels"]) or len(arrays["inputs"]) == 0:
        raise CheckpointRejected(
            f"{path}: inputs has {len(arrays['inputs'])} rows but labels has "
            f"{len(arrays['labels'])}; they must match and be non-empty"
        )
    return arrays


def _load_inputs(directory: Path, name: str) -> dict[str, np.ndarray] | None:
    path = directory / name
    if not path.exists():
        return None
    arrays = _load_npz(path, ("inputs",))
    if len(arrays["inputs"]) == 0:
        raise CheckpointRejected(f"{path}: inputs is empty")
    return arrays


def load_calibration(directory: Path) -> dict[str, np.ndarray] | None:
    return _load_inputs(directory, CALIBRATION_FILE)


def load_train(directory: Path) -> dict[str, np.ndarray] | None:
    return _load_inputs(directory, TRAIN_FILE)
