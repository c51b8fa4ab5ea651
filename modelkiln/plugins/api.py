"""The types a plugin author implements or receives.

A plugin contributes objects through the hooks in ``hookspecs.py``:

- a ``Step`` transforms a model held in one form, a torch module or an ONNX file
  (quantize, prune, ...);
- a ``Runtime`` converts a model into the form it serves (e.g. exports to ONNX), saves
  it as a serving artifact, and loads the artifact the way serving code would;
- a ``CheckpointFormat`` recognises a checkpoint folder by its file names and loads it
  safely into a ``LoadedCheckpoint``;
- a ``RegistryKind`` is a place checkpoints come from: it finds ``FoundCheckpoint`` version
  folders, and for a remote registry brings them in and hears of promotions.

Event hooks receive the typed dicts below (``VariantEvent``, ``PromotionEvent``,
``JobEvent``): what ``kiln variants --json``, ``kiln promoted --json`` print.

Nothing here imports torch or onnxruntime, so plugins can be listed instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, TypedDict

from ..errors import CheckpointRejected, StepNotApplicable

# The forms a model takes between steps.
TORCH = "torch"  # ModelHandle.obj is a torch.nn.Module returning one tensor
ONNX = "onnx"  # ModelHandle.obj is the Path of an ONNX file
# ModelHandle.obj is a steps.shard.ShardedModel: one module per rank plus the plan. No
# step takes this form, so a shard ends its recipe; the torch runtime saves and serves it.
SHARDED = "torch-sharded"
# ModelHandle.obj is a Hugging Face-wrapped torch module whose weights are to be written
# as size-capped shards and streamed while it runs (plugins.size_capped). Like SHARDED,
# it ends its recipe.
STREAMED = "torch-streamed"

# The input that marks a sequence's real tokens (1) and its padding (0).
MASK = "attention_mask"
# A ModelHandle note: its Linear weights hold the 2:4 sparsity pattern, for the runtime to
# serve with sparse kernels where the device has them.
SPARSE24 = "sparse24"

__all__ = [
    "MASK",
    "ONNX",
    "SHARDED",
    "SPARSE24",
    "STREAMED",
    "TORCH",
    "FoundCheckpoint",
    "CheckpointFormat",
    "CheckpointRejected",
    "InputSpec",
    "JobEvent",
    "LoadContext",
    "LoadedCheckpoint",
    "ModelHandle",
    "Param",
    "PromotionEvent",
    "QualityGate",
    "RegistryKind",
    "Runtime",
    "Step",
    "StepContext",
    "StepNotApplicable",
    "VariantEvent",
]


@dataclass(frozen=True)
class Param:
    """One typed parameter of a step, shown by ``kiln plugins``."""

    name: str
    type: type
    default: Any
    description: str


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    ``shape`` is the shape of the sample inputs, batch first as -1. ``dims`` names the
    dimensions that vary between requests, one entry per dimension (None: fixed), e.g.
    ``("batch", "sequence")`` for token ids of any length; empty means only the batch
    varies. Inputs that share a name share the size (``input_ids`` and
    ``attention_mask``); ``limits`` caps a named dimension (the positions a model has).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    # For integer inputs (token ids): sample values are drawn from [0, high).
    high: int | None = None
    dims: tuple[str | None, ...] = ()
    limits: tuple[tuple[str, int], ...] = ()
    # Where the model itself takes the batch (``shape`` and every array the pipeline
    # holds are batch first; the runtime moves the batch here): a recurrent state
    # [layers, batch, width] has 1. None: the model takes no batch dimension (a scalar
    # such as a sample rate); the rows hold one value each and the first is fed.
    batch_axis: int | None = 0

    def dynamic(self) -> dict[int, str]:
        """Dimension index -> name, for every dimension that varies."""
        named = {i: name for i, name in enumerate(self.dims) if name}
        return named or {0: "batch"}

    def symbolic_shape(self) -> list:
        """The shape as serving code sees it, in the model's own order: a name for each
        dimension that varies."""
        dynamic = self.dynamic()
        shape = [dynamic.get(i, size) for i, size in enumerate(self.shape)]
        if self.batch_axis is None:
            return shape[1:]
        return shape[1:self.batch_axis + 1] + shape[:1] + shape[self.batch_axis + 1:]

    def to_model(self, rows):
        """Batch-first ``rows`` as the model takes them (see ``batch_axis``)."""
        return to_model_layout(rows, self.batch_axis)

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "high": self.high,
                "dims": list(self.dims), "limits": dict(self.limits), "batch_axis": self.batch_axis}

    @classmethod
    def from_dict(cls, data: dict) -> InputSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"], data.get("high"),
                   tuple(data.get("dims") or ()), tuple(sorted((data.get("limits") or {}).items())),
                   data.get("batch_axis", 0))


def batch_axes(shapes: dict[str, list]) -> dict[str, int | None]:
    """Which dimension of each model input holds the batch, from the graph's own input
    shapes (each dimension an int when fixed, a str when it has a symbolic name, None
    when it varies unnamed): the symbolic name the most inputs share (a request's inputs
    have their batch in common), the earliest in the first input on a tie; for an input
    without it, its first varying dimension, else dimension 0; None for a scalar."""
    counts: dict[str, int] = {}
    for shape in shapes.values():
        for name in {d for d in shape if isinstance(d, str)}:
            counts[name] = counts.get(name, 0) + 1
    most = max(counts.values(), default=0)
    batch = None
    if most > 1:
        order = [d for shape in shapes.values() for d in shape if isinstance(d, str)]
        batch = min((name for name, n in counts.items() if n == most), key=order.index)
    axes: dict[str, int | None] = {}
    for input_name, shape in shapes.items():
        if not shape:
            axes[input_name] = None
        elif batch is not None and batch in shape:
            axes[input_name] = list(shape).index(batch)
        else:
            axes[input_name] = next((i for i, d in enumerate(shape) if not isinstance(d, int) or d <= 0), 0)
    return axes


def to_model_layout(rows, batch_axis: int | None):
    """Batch-first ``rows`` (a numpy array) with the batch moved to ``batch_axis``, or the
    first row's value where the model takes no batch (``None``)."""
    import numpy as np

    if batch_axis is None:
        return np.ascontiguousarray(rows[0])
    return np.ascontiguousarray(np.moveaxis(rows, 0, batch_axis)) if batch_axis else rows


@dataclass
class LoadContext:
    """What a format needs besides the folder: the daemon's own settings for this model."""

    model: str
    # The [architectures.<model>] table, or None when the config has none.
    architecture: Any | None = None


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into memory: a torch module, or an ONNX file, plus its inputs."""

    format: str
    inputs: list[InputSpec]
    module: Any | None = None  # torch.nn.Module returning one tensor
    onnx_path: Path | None = None
    info: dict = field(default_factory=dict)
    # The name of the one output the pipeline compares (the original's own name).
    output: str = "output"
    # ``tokenize(texts, max_length) -> {input name: int64 array}``, padded to the longest
    # text, where the checkpoint ships a tokenizer; None otherwise.
    tokenize: Callable[[list[str], int], dict] | None = None
    # Files of the checkpoint folder that every variant folder gets a copy of, because
    # serving code needs them beside the model (a tokenizer, a config).
    serving_files: list[str] = field(default_factory=list)


@dataclass
class ModelHandle:
    """A model on its way from checkpoint to artifact.

    ``form`` is ``TORCH`` (``obj`` is a ``torch.nn.Module``) or ``ONNX`` (``obj`` is the
    ``Path`` of an ONNX file; steps write new files into their work folder and never
    change the one they were given). ``notes`` carries hints for saving (e.g.
    ``{"serialize": "torchscript"}`` when torch.export cannot carry a quantized module).
    """

    form: str
    obj: Any
    inputs: list[InputSpec]
    notes: dict = field(default_factory=dict)


class QualityGate(Protocol):
    """How a variant's quality will be judged: the original model's outputs on the sample
    inputs, the metric, the original's quality and the largest accepted relative drop."""

    baseline_quality: float

    def score(self, outputs) -> float:
        """``outputs`` (on the sample inputs, batch first) scored as the gate scores them."""

    def passes(self, quality: float) -> bool:
        """Whether a variant of this quality passes the gate."""


@dataclass
class StepContext:
    """What a step may use: a private work folder, the target, and sample data."""

    work_dir: Path
    target: str
    # The runtime the variant is built for: a step may do different things for each.
    runtime: str
    device: str
    threads: int
    # name -> array, batch first: eval/calibration inputs or generated samples.
    sample_inputs: dict
    calibration_inputs: dict | None = None
    # Unlabelled inputs steps that fine-tune or distill train on: train.* where shipped,
    # else the calibration data, else generated rows; no row equal to a quality sample
    # (see ``split``).
    training_inputs: dict | None = None
    # The quality gate the variant will meet, for steps that tune themselves against it
    # (see QualityGate); None where nothing will judge the step's result.
    gate: QualityGate | None = None
    # Anything the step wants kept in the variant's lineage (e.g. measured sparsity).
    record: dict = field(default_factory=dict)
    # The target's device count: ranks of a sharded variant.
    devices: int = 1
    # The target's memory budget for one variant's weights, MiB (0: none).
    memory_mb: int = 0
    # What this worker process may use in all, MiB: workers.memory_limit_mb, or the
    # host's share when that is 0. Steps that train size their batches within it.
    worker_memory_mb: int = 0
    # Called with what a long step is doing (see ``progress``); set by the worker.
    reporter: Callable[..., None] | None = None
    # The file training_inputs came from, for the lineage.
    training_source: str = "train.npz"
    # What a causal LM is measured at besides one sequence (the target's
    # decode_batch_sizes and prefill_tokens): the runtime exports its decoding programs
    # for them.
    decode_batch_sizes: tuple = (1,)
    prefill_tokens: tuple = ()
    # How the checkpoint's rows were shared out (``pipeline.heldout.DataSplit.as_dict``):
    # ``quality_rows`` judge the variant (``heldout_rows`` of them never trained on),
    # ``training_rows`` may be trained on, and
    # ``trained_on_samples`` says no row was left to train on but the samples themselves.
    split: dict | None = None
    # Where files of the same content are stored once across the artifacts root's
    # variants (``targets/blobs.py``): a runtime hard-links a weight file from there
    # rather than write a second copy. None: write every file.
    blob_dir: Path | None = None

    def progress(self, activity: str, done: int, total: int, **figures) -> None:
        """Report that ``activity`` has done ``done`` of ``total`` (steps, layers, ...),
        with figures such as ``loss`` or ``eta_seconds``. Cheap to call every iteration:
        the worker keeps the newest and the daemon shows it (``kiln status``, its log)."""
        if self.reporter is not None:
            self.reporter(activity, done, total, **figures)

    def quality(self, outputs) -> float:
        """``outputs`` (on sample_inputs) scored the way the quality gate scores them."""
        return self._gate().score(outputs)

    def passes(self, quality: float) -> bool:
        """Whether a variant of this quality would pass the policy's quality gate."""
        return self._gate().passes(quality)

    def _gate(self) -> QualityGate:
        if self.gate is None:
            raise StepNotApplicable("no quality gate is set for this step, so it cannot tune itself")
        return self.gate

    def new_path(self, name: str) -> Path:
        path = self.work_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


class Step:
    """One optimization. Subclass it, set the class attributes, implement ``apply``.

    ``forms`` maps each runtime the step serves to the form it transforms for that
    runtime, e.g. ``{"onnxruntime": ONNX, "torch": TORCH}`` for a quantizer with one
    implementation per runtime, or ``{"onnxruntime": TORCH, "torch": TORCH}`` for a pruner
    that works on the module before it is exported; a tuple names several forms the step
    takes as they are (the first is the one others are converted into). The model is
    converted into that form before ``apply`` runs. A runtime missing from ``forms``, or a model that can no
    longer take the form (an ONNX model for a step that needs a module), makes the
    variant skipped, as does ``apply`` raising ``StepNotApplicable`` with a reason.
    """

    name: str = ""
    description: str = ""
    params: tuple[Param, ...] = ()
    forms: dict = {}
    # What the step costs, as a multiple of exporting and measuring the model once:
    # planning runs cheap recipes first, so the first promotion comes early.
    relative_cost: float = 1.0

    def apply(self, model: ModelHandle, params: dict, context: StepContext) -> ModelHandle:
        raise NotImplementedError

    def expected_seconds(self, params: dict, baseline_seconds: float, size_bytes: int) -> float:
        """Seconds this step is expected to add to a job on a checkpoint of ``size_bytes``
        whose baseline (export and measurement alone) takes ``baseline_seconds``. Steps
        that train override it with their time budget. Used until the catalogue has this
        recipe's real times for the model."""
        return self.relative_cost * baseline_seconds

    def trains(self, params: dict) -> bool:
        """Whether ``apply`` with ``params`` fits the model to the checkpoint's data (a
        fine-tune, a distillation, a refit; calibration statistics are not training).
        Such a step takes ``context.training_inputs`` only, which hold no row equal to a
        quality sample, and its variant is promoted only when enough rows it never saw
        judge it (``policy.min_heldout_rows``). A step that decides in ``apply`` not to fit
        anything after all (no rows to fit on) records ``fitted: False``."""
        return False


class Runtime:
    """A way to serve a model on a device (a target kind)."""

    name: str = ""
    description: str = ""
    devices: tuple[str, ...] = ("cpu",)
    # The form its artifacts are saved from.
    form: str = TORCH

    def unavailable_reason(self, device: str) -> str | None:
        """None when this host can run ``device``, else why not (checked without heavy imports)."""
        if device not in self.devices:
            return f"runtime {self.name} does not serve device {device!r}"
        return None

    def convert(self, model: ModelHandle, context: StepContext) -> ModelHandle:
        """Bring ``model`` into this runtime's form (e.g. export a module to ONNX); return it
        unchanged when it is in that form already; raise StepNotApplicable if impossible."""
        raise NotImplementedError

    def save(self, model: ModelHandle, directory: Path) -> str:
        """Write the serving artifact into ``directory``; return the main file's name."""
        raise NotImplementedError

    def load(self, directory: Path, file: str, device: str, threads: int) -> Callable[[dict], Any]:
        """Load an artifact as plain serving code would; return ``run(inputs) -> ndarray``."""
        raise NotImplementedError

    def weights(self, directory: Path) -> dict | None:
        """What ``variant.json`` says of the saved artifact's weights: their format, how
        they are quantized and which servers read them; None where there is nothing to
        say beyond the artifact itself."""
        return None


class CheckpointFormat:
    """A checkpoint file format. ``detect`` must be cheap: it runs in the daemon."""

    name: str = ""
    description: str = ""

    def detect(self, files: list[str]) -> bool:
        """True when this folder's relative file names look like this format."""
        raise NotImplementedError

    def load(self, directory: Path, context: LoadContext) -> LoadedCheckpoint:
        """Read the checkpoint without executing code from it; raise CheckpointRejected."""
        raise NotImplementedError


# -- registries -------------------------------------------------------------------------


@dataclass(frozen=True)
class FoundCheckpoint:
    """A checkpoint as a registry found it, a version folder: maybe new, maybe complete;
    ingest decides."""

    model: str
    version: str
    path: Path
    # Where the version came from, when the folder is a local copy (e.g. models:/name/3).
    source_uri: str | None = None
    # The folder was renamed into place whole (a finished download, a ``mv`` into the
    # watched folder): complete now, no quiet period.
    complete: bool = False

    @property
    def uri(self) -> str:
        return self.source_uri or self.path.as_uri()


def version_order(version: str) -> tuple:
    """How versions of one model sort: numbers as numbers ("9" before "10"), the rest as
    text, so "1", "2", "10" and "2024-01-05", "2024-01-06" come in the order they were
    made. Registries list versions in it, and an older version never replaces a newer
    one's promotion."""
    import re

    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", version) if part)


class RegistryKind:
    """A place checkpoints come from. Subclass it, build from ``__init__(self, config)``
    (the daemon's ``modelkiln.config.Config``), and contribute the class through
    ``kiln_registry_kinds``.

    Every kind keeps its versions as local folders ``<path>/<model>/<version>/`` that the
    daemon snapshots. A kind whose versions live elsewhere (a model registry server) sets
    ``poll_seconds`` and brings new versions into ``path`` in ``poll``; ``poll`` and
    ``publish`` run on the scheduler's thread, never on the service loop.
    """

    kind: str = ""
    # Whether file-system events under ``path`` are worth watching (checkpoints are
    # written there by people or tools, not only by ``poll``).
    watches: bool = False
    # Seconds between polls of a remote registry; 0 for a kind with nothing to poll.
    poll_seconds: float = 0.0
    path: Path

    def scan(self) -> list[FoundCheckpoint]:
        """Every version folder there is now: the reconcile scan, the source of truth."""
        raise NotImplementedError

    def locate(self, path: str) -> list[FoundCheckpoint]:
        """The version folder(s) a file-system event's path belongs to (none: ignore it)."""
        return []

    def poll(self) -> int:
        """Bring new versions into ``path``, each renamed into place whole; return how many."""
        return 0

    def publish(self, promotion: PromotionEvent, variants: list[VariantEvent]) -> None:
        """Write a current promotion back to the registry; called again after every
        promotion and poll, so it must be idempotent."""

    def release(self, found: FoundCheckpoint) -> None:
        """``found`` is recorded (its snapshot holds what it had): free a local copy
        the kind made of it, if any. A folder that is the user's stays."""


# -- event payloads ---------------------------------------------------------------------


class VariantEvent(TypedDict, total=False):
    """A variant, as ``kiln variants --json`` prints it. ``metrics`` when it succeeded;
    ``reason`` says why it failed, was skipped or cancelled, or why a measured one misses
    the quality gate (None otherwise); ``within_tolerance`` and ``fits_memory`` only where
    the policy receives it."""

    id: int
    variant: str  # "<runtime>:<recipe>"
    model: str
    version: str
    checkpoint: str  # the first 16 hex digits of the content hash
    target: str
    runtime: str
    recipe: str
    status: str  # pending, succeeded, failed, skipped, cancelled
    lineage: list[dict]
    path: str | None
    file: str | None
    metrics: dict
    # What building and measuring it took: seconds per phase, and per phase
    # ``{"peak_host_bytes", "new_disk_bytes"}`` (``build``, ``measure``).
    timings: dict
    reason: str | None
    within_tolerance: bool
    fits_memory: bool


class PromotionEvent(TypedDict):
    """A promotion, as one entry of ``kiln promoted --json``."""

    id: int
    model: str
    target: str
    variant_id: int
    variant: str
    version: str
    recipe: str
    runtime: str
    path: str  # the promoted link
    artifact: str  # the variant folder it points to
    file: str
    metrics: dict | None
    promoted_at: str
    reason: str | None


class JobEvent(TypedDict):
    """A job that failed for good."""

    id: int
    kind: str  # inspect, variant, runoff
    model: str
    version: str
    target: str | None
    variant: str | None
    attempts: int
    reason: str | None
