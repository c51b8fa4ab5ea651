"""The types a plugin author implements or receives.

A plugin contributes objects through the hooks in ``hookspecs.py``:

- a ``Step`` transforms a runtime's model representation (quantize, prune, ...);
- a ``Runtime`` turns a loaded checkpoint into that representation, saves it as a
  serving artifact, and loads the artifact the way serving code would;
- a ``CheckpointFormat`` recognises a checkpoint folder by its file names and loads it
  safely into a ``LoadedCheckpoint``.

Nothing here imports torch or onnxruntime, so plugins can be listed instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointRejected, StepNotApplicable

__all__ = [
    "CheckpointFormat",
    "CheckpointRejected",
    "InputSpec",
    "LoadContext",
    "LoadedCheckpoint",
    "ModelHandle",
    "Param",
    "Runtime",
    "Step",
    "StepContext",
    "StepNotApplicable",
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
    """One model input. ``shape`` includes the batch dimension as -1."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    # For integer inputs (token ids): sample values are drawn from [0, high).
    high: int | None = None


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


@dataclass
class ModelHandle:
    """A model as one runtime represents it while steps transform it.

    For the ``torch`` runtime ``obj`` is a ``torch.nn.Module``; for ``onnxruntime`` it is
    the ``Path`` of an ONNX file in the step's work folder. ``notes`` carries hints for
    saving (e.g. ``{"serialize": "torchscript"}`` when torch.export cannot carry a
    quantized module).
    """

    runtime: str
    obj: Any
    inputs: list[InputSpec]
    notes: dict = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step may use: a private work folder, the target, and sample data."""

    work_dir: Path
    target: str
    device: str
    threads: int
    # name -> array, batch first: eval/calibration inputs or generated samples.
    sample_inputs: dict
    calibration_inputs: dict | None = None
    # Anything the step wants kept in the variant's lineage (e.g. measured sparsity).
    record: dict = field(default_factory=dict)

    def new_path(self, name: str) -> Path:
        path = self.work_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


class Step:
    """One optimization. Subclass it, set the class attributes, implement ``apply``.

    ``apply`` raises ``StepNotApplicable`` with a reason when the model or the runtime
    is not one it handles: the variant is then recorded as skipped, not failed.
    """

    name: str = ""
    description: str = ""
    params: tuple[Param, ...] = ()
    # Runtimes whose representation this step transforms.
    runtimes: tuple[str, ...] = ()

    def apply(self, model: ModelHandle, params: dict, context: StepContext) -> ModelHandle:
        raise NotImplementedError


class Runtime:
    """A way to serve a model on a device (a target kind)."""

    name: str = ""
    description: str = ""
    devices: tuple[str, ...] = ("cpu",)

    def unavailable_reason(self, device: str) -> str | None:
        """None when this host can run ``device``, else why not (checked without heavy imports)."""
        if device not in self.devices:
            return f"runtime {self.name} does not serve device {device!r}"
        return None

    def prepare(self, checkpoint: LoadedCheckpoint, context: StepContext) -> ModelHandle:
        """Turn a loaded checkpoint into this runtime's representation (e.g. export to ONNX)."""
        raise NotImplementedError

    def save(self, model: ModelHandle, directory: Path) -> str:
        """Write the serving artifact into ``directory``; return the main file's name."""
        raise NotImplementedError

    def load(self, directory: Path, file: str, device: str, threads: int) -> Callable[[dict], Any]:
        """Load an artifact as plain serving code would; return ``run(inputs) -> ndarray``."""
        raise NotImplementedError


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
