"""The inputs a checkpoint is judged and timed on, settled once by the inspect phase.

Shipped data comes first: ``eval`` (scored with its labels when it has them, by fidelity
to the original when it has none), else ``calibration``, as arrays (``.npz``) or as text
(``.jsonl``, tokenized with the checkpoint's own tokenizer at natural lengths, padded to
the longest). Without data, samples are generated from the model's inputs: fixed
dimensions as the model declares them, and for token ids with an attention mask, lengths
that vary from row to row with the rest padded and masked, as a batch of real requests is.
The rows steps may train on are settled here too, apart from the samples by content
(``heldout``).

A model whose inputs have a ``sequence`` dimension is timed at the samples' median
length (what a typical request costs) and at their longest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import CheckpointRejected
from ..plugins.api import MASK, InputSpec
from ..registry.data import image_files, load_calibration, load_eval, load_images, load_text, load_train
from .heldout import DataSplit, array_keys, first_of_each, spread_order, text_key, unseen

# Eval rows used for a quality score: enough for a stable accuracy, bounded for big sets.
MAX_EVAL_ROWS = 4096
# For models that take sequences, whose reference outputs hold a vector per token.
MAX_SEQUENCE_EVAL_ROWS = 512
SEQUENCE = "sequence"


@dataclass
class SampleSet:
    inputs: list[InputSpec]
    samples: dict  # input name -> array, batch first: the quality samples
    labels: np.ndarray | None
    calibration: dict | None  # the whole calibration file, for post-training quantization
    train: dict  # the rows training steps train on: none of them equal to a quality sample
    source: str  # where the samples came from: a file name, or "generated"
    split: DataSplit

    @property
    def train_source(self) -> str:
        return self.split.training_source


@dataclass
class _Data:
    """One data file's rows as it ships them, before text is tokenized: the split is made
    on texts (a causal LM's windows run across them) or array rows."""

    source: str  # the file's name
    keys: list[str]  # each row's content (heldout.text_key / array_keys)
    texts: list[str] | None  # a text file's lines
    arrays: dict | None  # an array file's rows by input name
    labels: np.ndarray | None

    def take(self, indices: list[int]) -> "_Data":
        pick = np.asarray(indices, dtype=np.int64)
        return _Data(self.source, [self.keys[i] for i in indices],
                     None if self.texts is None else [self.texts[i] for i in indices],
                     None if self.arrays is None else {k: v[pick] for k, v in self.arrays.items()},
                     None if self.labels is None else self.labels[pick])

    def rows(self, loaded) -> dict:
        """The rows by input name (text tokenized with the checkpoint's tokenizer)."""
        if self.arrays is not None:
            return dict(self.arrays)
        return loaded.tokenize(self.texts, text_length_limit(loaded.inputs))


# Generated rows a training step may train on when the checkpoint ships no data, per
# quality sample (and at least TRAIN_GENERATED_MIN): drawn apart from the samples.
TRAIN_GENERATED_PER_SAMPLE = 4
TRAIN_GENERATED_MIN = 256


def settle(loaded, directory: Path, count: int, images: dict | None = None) -> SampleSet:
    """The checkpoint's inputs as the pipeline uses them: its quality samples, calibration
    rows and training rows by input name, the training rows apart from the samples by
    content (``heldout``). ``images``: how the model's image folders become its input
    (``config.ImagesConfig`` as a dict), where its config says."""
    evaluation = _read(loaded, directory, "eval", load_eval, images)
    calibration = _read(loaded, directory, "calibration", load_calibration, images)
    train = _read(loaded, directory, "train", load_train, images)
    if evaluation is not None:
        sequence = any(SEQUENCE in spec.dims for spec in loaded.inputs) or evaluation.texts is not None
        most = MAX_SEQUENCE_EVAL_ROWS if sequence else MAX_EVAL_ROWS
        quality = evaluation.take(first_of_each(evaluation.keys)[:most])
    elif calibration is not None:
        quality = _quality_samples(loaded, calibration, count)
    else:
        quality = None
    if quality is not None:
        samples = quality.rows(loaded)
        labels = quality.labels
        source = quality.source
        inputs = _resolve_inputs(loaded, samples, directory)
    else:
        inputs = loaded.inputs
        if not inputs:
            raise CheckpointRejected(
                f"{directory}: the model's input shape is unknown; set input_shape in its "
                "[architectures.<model>] table or ship eval.npz / calibration.npz"
            )
        scalars = sorted(scalars_of(inputs))
        if scalars:  # a sample rate or a mode flag: a made-up value would judge the model on nonsense
            raise CheckpointRejected(
                f"{directory}: the model takes {', '.join(scalars)} as a scalar input, whose value cannot be made "
                f"up; ship calibration.npz or eval.npz with one array per input name, a scalar as one value "
                f"(numpy.savez('calibration.npz', ..., {scalars[0]}=numpy.array(16000)), say)")
        samples, labels, source = generate(inputs, count), None, "generated"
        generated = max(TRAIN_GENERATED_MIN, TRAIN_GENERATED_PER_SAMPLE * count)
        quality = _Data(source, array_keys(samples), None, samples, None)
        if train is None:
            train = _Data(source, *_generated_rows(inputs, generated))
    training, removed = _training_rows(quality, train if train is not None else calibration)
    if source != "generated":
        inputs, samples = _without_spare_padding(inputs, samples)
    samples = {spec.name: np.ascontiguousarray(samples[spec.name].astype(spec.dtype)) for spec in inputs}
    train_rows = samples if training is quality else training.rows(loaded)
    calibration_rows = calibration.rows(loaded) if calibration is not None else None
    split = DataSplit(quality_rows=_count(samples), training_rows=_count(train_rows), quality_source=source,
                      training_source=training.source, removed=removed, trained_on_samples=training is quality)
    return SampleSet(inputs, samples, labels, calibration_rows, train_rows, source, split)


def _quality_samples(loaded, calibration: _Data, count: int) -> _Data:
    """The calibration rows the variants are judged on: ``count`` distinct rows, a prefix
    of ``spread_order``. Text that a causal LM reads as windows running across lines
    gives fewer or more rows than lines: the fewest lines whose windows make ``count``
    rows (or all of them)."""
    order = spread_order(calibration.keys, first_of_each(calibration.keys))

    def prefix(lines: int) -> _Data:
        return calibration.take(sorted(order[:lines]))

    if calibration.texts is None:
        return prefix(count)

    def rows(lines: int) -> int:
        return len(next(iter(prefix(lines).rows(loaded).values())))

    first = min(count, len(order))
    if rows(first) == first:  # a row per line, or as many windows as lines: enough
        return prefix(first)
    wanted = min(count, rows(len(order)))
    low, high = 1, len(order)
    while low < high:
        middle = (low + high) // 2
        if rows(middle) >= wanted:
            high = middle
        else:
            low = middle + 1
    return prefix(low)


def _generated_rows(inputs: list[InputSpec], count: int) -> tuple[list[str], None, dict, None]:
    rows = generate(inputs, count, seed=1)
    return array_keys(rows), None, rows, None


def _training_rows(quality: _Data, pool: _Data | None) -> tuple[_Data, int]:
    """What training steps train on: the distinct rows of ``pool`` (train.*, else the
    calibration data) that no quality sample equals, and how many distinct rows were
    left out as equal to one; ``quality`` itself where none is left."""
    if pool is not None:
        kept, removed = unseen(pool.keys, set(quality.keys))
        if kept:
            return pool.take(kept), removed
    return quality, 0


def _count(rows: dict) -> int:
    return len(next(iter(rows.values()))) if rows else 0


def _without_spare_padding(inputs: list[InputSpec], samples: dict) -> tuple[list[InputSpec], dict]:
    """Rows taken from a longer file were padded to its longest line: cut the columns no
    sample uses (right-padded token inputs only; some tokenizers pad on the left)."""
    tokens = [spec for spec in inputs if SEQUENCE in spec.dims and len(spec.shape) == 2]
    mask = samples.get(MASK)
    if mask is None or not tokens:
        return inputs, samples
    longest = max(1, int(mask.sum(axis=1).max()))
    if not (mask[:, longest:] == 0).all():
        return inputs, samples
    samples = {k: v[:, :longest] if any(k == spec.name for spec in tokens) else v for k, v in samples.items()}
    return [replace(spec, shape=(-1, longest)) if spec in tokens else spec for spec in inputs], samples


def _read(loaded, directory: Path, kind: str, load_npz, images: dict | None = None) -> _Data | None:
    """``<kind>.npz``, a ``<kind>/`` folder of images or ``<kind>.jsonl`` as shipped, with
    each row's content key."""
    arrays = load_npz(directory)
    if arrays is not None:
        rows = _by_input_name(loaded, arrays, directory / f"{kind}.npz")
        labels = rows.pop("labels", None)
        return _Data(f"{kind}.npz", array_keys(rows), None, rows, labels)
    if image_files(directory / kind):
        if images is None:
            raise CheckpointRejected(
                f"{directory / kind}: images need their preprocessing declared once in the daemon's config: an "
                f"[architectures.<model>.images] table with size = [height, width], scale, mean, std, channels "
                f"and layout (see the README)")
        names = [spec.name for spec in loaded.inputs]
        name = images.get("input") or (names[0] if len(names) == 1 else "")
        if name not in names:
            raise CheckpointRejected(f"{directory / kind}: which input the images are is not said: set input = "
                                     f"one of {names} in the model's [architectures.<model>.images] table")
        rows = _by_input_name(loaded, {name: load_images(directory / kind, images)}, directory / kind)
        return _Data(f"{kind}/", array_keys(rows), None, rows, None)
    text = load_text(directory, kind)
    if text is None:
        return None
    if loaded.tokenize is None:
        raise CheckpointRejected(
            f"{directory / f'{kind}.jsonl'}: text needs the model's tokenizer, and the checkpoint ships none; add "
            f"its tokenizer files (tokenizer.json, tokenizer_config.json, ...) or ship {kind}.npz instead"
        )
    texts, labels = text
    return _Data(f"{kind}.jsonl", [text_key(t) for t in texts], texts, None, labels)


def text_length_limit(inputs: list[InputSpec]) -> int:
    """The most tokens one row may hold: the sequence limit, else the sample length."""
    for spec in inputs:
        limit = dict(spec.limits).get(SEQUENCE)
        if limit:
            return int(limit)
    return max((spec.shape[1] for spec in inputs if len(spec.shape) > 1), default=512)


def _by_input_name(loaded, arrays: dict, path: Path) -> dict:
    names = [spec.name for spec in loaded.inputs]
    labels = {"labels": arrays["labels"]} if "labels" in arrays else {}
    if names and all(name in arrays for name in names):
        rows = {name: arrays[name] for name in names}
    elif "inputs" in arrays and len(names) <= 1:
        rows = {names[0] if names else "input": arrays["inputs"]}
    else:
        raise CheckpointRejected(
            f"{path}: holds {sorted(arrays)}, but the model takes {names}; save one array per input "
            "name (numpy.savez(path, input_ids=..., attention_mask=...)), or `inputs` for a model "
            "with one input"
        )
    rows = _batch_first(loaded.inputs, rows, path)
    scalars = scalars_of(loaded.inputs) & set(rows)
    counts = {name: len(array) for name, array in rows.items() if name not in scalars}
    if len(set(counts.values())) > 1:
        raise CheckpointRejected(f"{path}: its arrays have different numbers of rows: {counts}")
    total = next(iter(counts.values()), 1)
    # A scalar input takes one value for a whole batch: each row holds a copy.
    rows.update({name: np.full(total, rows[name], dtype=rows[name].dtype) for name in scalars})
    return {**rows, **labels}


def scalars_of(inputs: list[InputSpec]) -> set[str]:
    """The inputs the model takes without a batch dimension (a sample rate, say)."""
    return {spec.name for spec in inputs if spec.batch_axis is None}


def _batch_first(inputs: list[InputSpec], rows: dict, path: Path) -> dict:
    """Arrays from a data file, saved as the model takes them (a state [2, rows, 128]),
    with their rows first, as the pipeline holds every array; scalars checked."""
    out = dict(rows)
    for spec in inputs:
        array = rows.get(spec.name)
        if array is None:
            continue
        if spec.batch_axis is None:
            if array.ndim != 0:
                raise CheckpointRejected(
                    f"{path}: the model takes {spec.name} as a scalar (one value for the whole batch), but the "
                    f"file holds an array of shape {array.shape}; save one value ({spec.name}=numpy.array(16000), "
                    "say)")
        elif array.ndim == 0:
            raise CheckpointRejected(f"{path}: array {spec.name} is a single number; save one row per sample")
        elif spec.batch_axis:
            if array.ndim <= spec.batch_axis:
                raise CheckpointRejected(
                    f"{path}: {spec.name} has shape {array.shape}, but the model takes its rows along dimension "
                    f"{spec.batch_axis} ({spec.symbolic_shape()}); save it as the model takes it")
            out[spec.name] = np.moveaxis(array, spec.batch_axis, 0)
    return out


def _resolve_inputs(loaded, data: dict, directory: Path) -> list[InputSpec]:
    """Shipped data decides the per-row shape (the sequence length of token ids, say)
    when its rank fits the model's input; whether the model really takes it is settled
    by the reference run that follows, which rejects the checkpoint with the error if not."""
    if not loaded.inputs:
        ((name, array),) = data.items()
        return [InputSpec(name, (-1, *array.shape[1:]), array.dtype.name)]
    resolved = []
    for spec in loaded.inputs:
        array = data[spec.name]
        if array.ndim != len(spec.shape):
            raise CheckpointRejected(
                f"{directory}: data for input {spec.name} has shape {array.shape[1:]} per row but "
                f"the model takes {tuple(spec.shape[1:])}"
            )
        resolved.append(replace(spec, shape=(-1, *array.shape[1:])))
    return resolved


def generate(inputs: list[InputSpec], count: int, seed: int = 0) -> dict:
    """Sample inputs for a model that ships no data. Token ids beside an attention mask
    get lengths from an eighth of the sample length to all of it, padded with id 0."""
    rng = np.random.default_rng(seed)
    out = {}
    names = {spec.name for spec in inputs}
    lengths = None
    for spec in inputs:
        shape = (count, *spec.shape[1:])
        if np.dtype(spec.dtype).kind not in "iu":
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            continue
        masked = MASK in names and SEQUENCE in spec.dims and len(shape) == 2
        if masked and lengths is None:
            lengths = rng.integers(max(1, shape[1] // 8), shape[1] + 1, size=count)
        if spec.name == MASK and masked and lengths is not None:
            out[spec.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(spec.dtype)
        elif spec.name == "token_type_ids":
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            values = rng.integers(0, spec.high or 2, size=shape).astype(spec.dtype)
            if masked and lengths is not None:
                values[np.arange(shape[1])[None, :] >= lengths[:, None]] = 0
            out[spec.name] = values
    return out


def lengths(inputs: list[InputSpec], samples: dict) -> dict | None:
    """The samples' median and longest real length, for a model with a sequence input
    (None otherwise): the median from the attention mask where there is one."""
    sequence = [spec for spec in inputs if SEQUENCE in spec.dims]
    if not sequence:
        return None
    longest = int(samples[sequence[0].name].shape[1])
    mask = samples.get(MASK)
    median = int(np.median(mask.sum(axis=1))) if mask is not None else longest
    return {"median": max(1, median), "max": longest}


def request_batch(inputs: list[dict], samples: dict, batch_size: int, length: int | None = None) -> dict:
    """``batch_size`` requests as a caller sends them: the first rows of the samples
    (repeated when there are fewer), cut to ``length`` tokens (every one of them real)
    for the inputs with a sequence dimension."""
    out = {}
    for spec in inputs:
        array = samples[spec["name"]]
        reps = -(-batch_size // len(array))
        rows = np.concatenate([array] * reps)[:batch_size]
        if length is not None and SEQUENCE in (spec.get("dims") or ()):
            rows = np.ones_like(rows[:, :length]) if spec["name"] == MASK else rows[:, :length]
        out[spec["name"]] = np.ascontiguousarray(rows)
    return out
