"""The onnxruntime runtime: artifacts are a plain ``model.onnx`` served by an InferenceSession,
with the session's settings in ``serving.json`` where a step chose them
(``compile.onnxruntime``): serving code builds its session the same way (:func:`session_options`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import ONNX, TORCH, ModelHandle, Runtime, batch_axes, to_model_layout

MODEL_FILE = "model.onnx"
SERVING_FILE = "serving.json"
# serving.json's key, and ModelHandle.notes', for the session settings a step chose.
SESSION_KEY = "onnxruntime_session"
# What serving.json's session entry may hold, and each setting's default.
SESSION_DEFAULTS = {"intra_op_num_threads": 0, "inter_op_num_threads": 1, "execution_mode": "sequential",
                    "allow_spinning": True}
# Protobuf's hard limit: bigger models keep their weights in an external data file.
_PROTOBUF_LIMIT = 1_800_000_000
OPSET = 17


def export_to_onnx(module, inputs, example: dict, path: Path, keep_constants: bool = False) -> None:
    """Export a torch module with its inputs' names and varying dimensions (the batch, a
    sequence), and its output under the original's name (``module.output_name``).
    ``keep_constants``: leave computations on weights in the graph (packed low-bit weights
    stay packed in the file; onnxruntime folds them when it loads it).

    The TorchScript-based exporter is tried first because it takes a fraction of a second
    on models the torch.export-based one needs seconds for; the latter is the fallback.
    """
    # A module may prefer another form while it is exported (the Hugging Face wrapper
    # switches to eager attention, which onnxruntime runs faster).
    exporting = getattr(module, "exporting_to_onnx", contextlib.nullcontext)
    with exporting():
        _export(module, inputs, example, path, keep_constants)


def _export(module, inputs, example: dict, path: Path, keep_constants: bool) -> None:
    import torch

    from .shapes import dynamic_shapes, onnx_axes

    names = [spec.name for spec in inputs]
    # Two rows are enough to trace (the batch axis is dynamic); tracing with every sample
    # ran a large model over all of them, several times.
    args = tuple(torch.from_numpy(example[name][:2]) for name in names)
    with torch.inference_mode():
        output_shape = tuple(module(*args).shape)
    input_axes, output_axes = onnx_axes(inputs, output_shape)
    output = getattr(module, "output_name", None) or "output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=not keep_constants,
                input_names=names, output_names=[output], dynamic_axes={**input_axes, output: output_axes},
            )
            return
        except Exception:
            pass
        torch.onnx.export(
            module, args, str(path), dynamo=True, input_names=names, output_names=[output],
            dynamic_shapes=dynamic_shapes(module, inputs),
        )


def session_feed(session):
    """``feed(rows) -> {name: array}``: batch-first arrays by input name as ``session``'s
    model takes them (the batch moved to its own dimension, a scalar's first row)."""
    axes = batch_axes({i.name: list(i.shape) for i in session.get_inputs()})

    def feed(rows: dict) -> dict:
        return {name: to_model_layout(rows[name], axis) for name, axis in axes.items()}
    return feed


def session_options(settings: dict | None, threads: int):
    """SessionOptions as serving code builds them: ``threads`` intra-op threads, one
    inter-op thread, every graph optimisation, unless ``settings`` (serving.json's
    session entry, see :data:`SESSION_DEFAULTS`) says otherwise."""
    import onnxruntime as ort

    chosen = {**SESSION_DEFAULTS, "intra_op_num_threads": threads, **(settings or {})}
    options = ort.SessionOptions()
    options.intra_op_num_threads = chosen["intra_op_num_threads"]
    options.inter_op_num_threads = chosen["inter_op_num_threads"]
    options.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if chosen["execution_mode"] == "parallel"
                              else ort.ExecutionMode.ORT_SEQUENTIAL)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not chosen["allow_spinning"]:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def session_runner(path: Path, threads: int, settings: dict | None = None):
    """``run(inputs) -> first output`` of an InferenceSession set up as serving code
    would (``settings``: serving.json's session entry), on batch-first arrays by input
    name."""
    import onnxruntime as ort

    import numpy as np

    session = ort.InferenceSession(str(path), session_options(settings, threads), providers=["CPUExecutionProvider"])
    feed = session_feed(session)
    shapes = {i.name: list(i.shape) for i in session.get_inputs()}
    # A model exported for one row at a time (a batch dimension fixed at 1, as detectors
    # often are) is fed a batch row by row, as serving code feeds it.
    one_row = any(axis is not None and shapes[name][axis] == 1 for name, axis in batch_axes(shapes).items())

    def run(inputs: dict):
        rows = len(next(iter(inputs.values())))
        if not one_row or rows <= 1:
            return session.run(None, feed(inputs))[0]
        return np.concatenate([session.run(None, feed({name: array[i:i + 1] for name, array in inputs.items()}))[0]
                               for i in range(rows)])

    return run


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    description = "onnxruntime InferenceSession, CPUExecutionProvider; artifact model.onnx"
    devices = ("cpu",)
    form = ONNX

    def convert(self, model, context):
        if model.form == ONNX:
            return model
        if model.form != TORCH:
            raise StepNotApplicable(f"a {model.form} model cannot be served by onnxruntime")
        path = context.new_path("exported/" + MODEL_FILE)
        export_to_onnx(model.obj, model.inputs, context.sample_inputs, path,
                       keep_constants=bool(model.notes.get("onnx_keep_constants")))
        return ModelHandle(ONNX, path, model.inputs, dict(model.notes))

    def save(self, model, directory):
        import onnx

        proto = onnx.load(str(model.obj))
        large = proto.ByteSize() > _PROTOBUF_LIMIT
        onnx.save_model(
            proto, str(directory / MODEL_FILE), save_as_external_data=large,
            all_tensors_to_one_file=True, location=MODEL_FILE + ".data",
        )
        if model.notes.get(SESSION_KEY):
            (directory / SERVING_FILE).write_text(json.dumps({"session": model.notes[SESSION_KEY]}, indent=2))
        return MODEL_FILE

    def load(self, directory, file, device, threads):
        serving = directory / SERVING_FILE
        settings = json.loads(serving.read_text()).get("session") if serving.exists() else None
        return session_runner(directory / file, threads, settings)


@hookimpl
def kiln_runtimes():
    return [OnnxRuntime()]
