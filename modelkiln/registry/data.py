"""Evaluation, calibration and training data shipped beside a checkpoint, read without
pickle.

Arrays (``eval.npz``, ``calibration.npz``, ``train.npz``) hold ``inputs`` for a model
with one input, or one array per input name (``input_ids``, ``attention_mask``, ...),
plus ``labels`` (integers) in ``eval.npz``. Text (``eval.jsonl``, ``calibration.jsonl``,
``train.jsonl``: one ``{"text": ...}`` object per line, ``"label"`` optional in
``eval.jsonl``) is tokenized with the checkpoint's own tokenizer. Images (a
``calibration/``, ``eval/`` or ``train/`` folder of PNG or JPEG files) are decoded with
Pillow and made into the model's input as its ``[architectures.<model>.images]`` table
says (:func:`load_images`).
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


# Uncompressed size of a data file's arrays, at most: a few kilobytes of a compressed
# archive can claim gigabytes.
MAX_DATA_BYTES = 2 * 2**30


def _load_npz(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise CheckpointRejected(f"{path}: not an .npz archive (a plain .npy, or something else); save the arrays "
                                 "with numpy.savez(path, name=array, ...)")
    try:
        with zipfile.ZipFile(path) as archive:
            claimed = sum(member.file_size for member in archive.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointRejected(f"{path}: not a readable .npz file ({exc})") from None
    if claimed > MAX_DATA_BYTES:
        raise CheckpointRejected(f"{path}: its arrays take {claimed / 2**30:.1f} GiB uncompressed; at most "
                                 f"{MAX_DATA_BYTES / 2**30:.0f} GiB of sample data is read: ship fewer rows")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "pickle" not in str(exc):  # a header that does not describe its data, say
            raise CheckpointRejected(f"{path}: not a readable .npz file ({exc})") from None
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
        if array.ndim == 0 and name in ("inputs", "labels"):
            # One number is a scalar input's value (a sample rate) only under that input's name.
            raise CheckpointRejected(f"{path}: array {name} is a single number; save one row per sample")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            if array.ndim == 0:
                raise CheckpointRejected(f"{path}: array {name} is NaN or infinite")
            bad = int((~np.isfinite(array.reshape(len(array), -1)).all(axis=1)).sum())
            raise CheckpointRejected(f"{path}: array {name} holds NaN or infinite values in {bad} of its "
                                     f"{len(array)} rows; nothing can be measured on them: drop those rows")
    return arrays


def load_eval(directory: Path) -> dict[str, np.ndarray] | None:
    """``eval.npz``: the inputs every variant is judged on, never trained on; with
    ``labels`` (one integer class per row) they are scored by accuracy, without them by
    fidelity to the original model's outputs."""
    path = directory / EVAL_FILE
    if not path.exists():
        return None
    arrays = _load_npz(path, ())
    labels = arrays.get("labels")
    if labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        raise CheckpointRejected(f"{path}: labels has shape {labels.shape} and dtype {labels.dtype}; give one "
                                 "integer class per row (shape [rows]), or leave labels out to judge by fidelity")
    rows = {name: len(array) for name, array in arrays.items() if array.ndim}  # scalars hold no rows
    inputs = [name for name in arrays if name != "labels"]
    if len(set(rows.values())) != 1 or not next(iter(rows.values()), 0) or not inputs:
        raise CheckpointRejected(
            f"{path}: its arrays have {rows} rows; the inputs (and labels, where given) must match, with at "
            "least one row"
        )
    return arrays


def _load_inputs(directory: Path, name: str) -> dict[str, np.ndarray] | None:
    path = directory / name
    if not path.exists():
        return None
    arrays = _load_npz(path, ())
    if not arrays or any(array.ndim and len(array) == 0 for array in arrays.values()):
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Image files read per folder at most, and pixels per image: a few kilobytes of PNG can
# claim gigapixels (Pillow's own bomb check only warns below twice its limit).
MAX_IMAGES = 1024
MAX_IMAGE_PIXELS = 64_000_000


def image_files(folder: Path) -> list[Path]:
    """The PNG and JPEG files directly in ``folder``, by name; empty when it is no folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(folder: Path, images: dict) -> np.ndarray:
    """The image files of ``folder`` as one float32 array, a row per file (by name, at most
    :data:`MAX_IMAGES`), made as ``images`` (``config.ImagesConfig`` as a dict) says:
    converted to its channels, resized to its size (bilinear), divided by its scale, less
    its mean and over its std per channel, in its layout."""
    try:
        from PIL import Image
    except ImportError:
        raise CheckpointRejected(f"{folder}: reading image files needs Pillow, which is not installed here: "
                                 "pip install 'modelkiln[images]' (or pillow), then drop the checkpoint again") from None

    files = image_files(folder)[:MAX_IMAGES]
    if not files:
        raise CheckpointRejected(f"{folder}: holds no .png or .jpg files")
    size = images.get("size") or []
    channels = images.get("channels", "RGB")
    rows, shapes = [], set()
    for path in files:
        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise CheckpointRejected(f"{path}: {image.width}x{image.height} pixels; at most "
                                             f"{MAX_IMAGE_PIXELS:,} are read: ship smaller images")
                picture = image.convert("L" if channels == "L" else "RGB")
                if size:
                    picture = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(picture, dtype=np.float32)
        except CheckpointRejected:
            raise
        except Exception as exc:  # a truncated or mislabelled file: name it
            raise CheckpointRejected(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels[..., ::-1] if channels == "BGR" else pixels
        shapes.add(pixels.shape)
        rows.append(pixels)
    if len(shapes) > 1:
        raise CheckpointRejected(f"{folder}: its images have different sizes {sorted(shapes)}; set size = "
                                 "[height, width] in the model's [architectures.<model>.images] table")
    array = np.stack(rows) / np.float32(images.get("scale", 255.0))
    if images.get("mean"):
        array = array - np.asarray(images["mean"], np.float32)
    if images.get("std"):
        array = array / np.asarray(images["std"], np.float32)
    if images.get("layout", "NCHW") == "NCHW":
        array = array.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(array, dtype=np.float32)
