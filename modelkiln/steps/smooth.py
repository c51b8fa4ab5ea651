"""Built-in smoothing step: move activation outliers into the weights before int8.

Trained transformers carry a few input channels whose activations are orders of
magnitude larger than the rest; dynamic int8 quantizes each activation tensor with one
scale, so those channels leave the others a handful of levels. SmoothQuant's remedy
(Xiao et al., 2022) is exact in float: for each Linear, divide input channel j by
``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` and multiply the weight column by it.
The division is an explicit elementwise scale in front of the Linear (one cheap op; a
graph-level pass could fold it into a preceding LayerNorm). Per-channel maxima come from
``calibration.npz``, else the sample inputs.

``quantize.smooth`` only rebalances; chain it before a quantizer:
``quantize.smooth -> quantize.int8_dynamic``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import TORCH, ModelHandle, Param, Step
from ..targets.onnxrt import session_feed
from .graphs import save_rewritten

# Rows of calibration data used for the activation maxima.
CALIBRATION_ROWS = 512
PROBE_ROWS = 8


def _scale_class():
    import torch.nn as nn

    class InputScale(nn.Module):
        """Multiplies its input by a per-channel factor (1 / s of the Linear after it)."""

        def __init__(self, factor):
            super().__init__()
            self.register_buffer("factor", factor)

        def forward(self, x):
            return x * self.factor

    return InputScale


def smooth_module(module, inputs, data: dict, alpha: float):
    """A smoothed copy of ``module``: ``(copy, renamed, record)``.

    :param inputs: the model's input specs (their names pick the arrays of ``data``).
    :param data: calibration arrays, by input name.
    :returns: the copy; ``renamed`` maps each smoothed Linear's name to its new name
        (``name.1``: it now sits behind its input scale); the figures for the lineage.
    """
    import copy

    import numpy as np
    import torch

    module = copy.deepcopy(module).eval()
    linears = {name: m for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32}
    if not linears:
        raise StepNotApplicable("the model has no float32 Linear layer to smooth")
    maxima: dict = {}

    def record(name):
        def hook(_, args, __):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in linears.items()]
    rows = min(CALIBRATION_ROWS, len(data[inputs[0].name]))
    try:
        with torch.no_grad():
            for start in range(0, rows, PROBE_ROWS * 4):  # bounded memory: the maxima merge across chunks
                module(*(torch.from_numpy(np.ascontiguousarray(data[spec.name][start:min(rows, start + PROBE_ROWS * 4)]))
                         for spec in inputs))
    finally:
        for hook in hooks:
            hook.remove()
    scale_class, ratios, renamed = _scale_class(), [], {}
    for name, linear in linears.items():
        if name not in maxima:
            continue  # not reached by these inputs
        weight_max = linear.weight.detach().abs().amax(0).clamp(min=1e-5)
        s = (maxima[name].clamp(min=1e-5) ** alpha / weight_max ** (1 - alpha)).clamp(min=1e-5)
        with torch.no_grad():
            linear.weight.mul_(s)
        module.set_submodule(name, torch.nn.Sequential(scale_class(1 / s), linear))
        ratios.append(float(s.max() / s.min()))
        renamed[name] = f"{name}.1"
    return module, renamed, {"smoothed_layers": len(ratios), "largest_scale_spread": max(ratios, default=1.0),
                             "alpha": alpha}


def smooth_onnx(path: Path, data: dict, alpha: float, out: Path) -> dict:
    """SmoothQuant on an ONNX graph, for models that reach the quantizer as ONNX: each
    activation that feeds MatMuls or Gemms with a constant float weight (a block's q/k/v
    share one) is multiplied by ``1 / s`` in a new ``Mul``, and those weights' input
    channels by ``s``: exact in float. The maxima are read from the graph's own tensors on ``data``
    (calibration arrays by input name, padded positions included: dynamic quantization
    sees them too). Writes ``out``; returns the figures for the lineage."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[0] in weights or node.input[1] not in weights:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        tensor = weights[node.input[1]]
        if (len(tensor.dims) == 2 and tensor.data_type == onnx.TensorProto.FLOAT
                and not attributes.get("transA", 0)):
            groups.setdefault(node.input[0], []).append(node)
    if not groups:
        raise StepNotApplicable("the model has no MatMul or Gemm with a float32 weight to smooth")

    def input_axis(node) -> int:
        """The weight's axis along the input channels: rows, or columns of a Gemm's B^T."""
        transposed = any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute)
        return 1 if node.op_type == "Gemm" and transposed else 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in groups)
    probe_path = out.parent / "smooth-probe.onnx"
    onnx.save_model(probe, str(probe_path), save_as_external_data=probe.ByteSize() > 1_800_000_000,
                    location=probe_path.name + ".data")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the names
    session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
    feed = session_feed(session)
    names = list(groups)
    maxima: dict = {}
    rows = len(next(iter(data.values())))
    # A few rows at a time: every probed activation of a batch is held at once.
    for start in range(0, min(rows, CALIBRATION_ROWS), PROBE_ROWS):
        batch = feed({name: array[start:start + PROBE_ROWS] for name, array in data.items()})
        for name, value in zip(names, session.run(names, batch)):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = np.maximum(maxima[name], peak) if name in maxima else peak
    del session
    for leftover in out.parent.glob(probe_path.name + "*"):
        leftover.unlink()
    scales, ratios = {}, []
    for name, nodes in groups.items():
        weight_max = np.max([np.abs(numpy_helper.to_array(weights[n.input[1]])).max(axis=1 - input_axis(n))
                             for n in nodes], axis=0)
        s = np.clip(np.clip(maxima[name], 1e-5, None) ** alpha / np.clip(weight_max, 1e-5, None) ** (1 - alpha),
                    1e-5, None).astype(np.float32)
        scales[name] = s
        ratios.append(float(s.max() / s.min()))
        for node in nodes:
            scale = s[:, None] if input_axis(node) == 0 else s[None, :]
            smoothed = numpy_helper.from_array(numpy_helper.to_array(weights[node.input[1]]) * scale,
                                               f"{node.input[1]}.smoothed.{node.name}")
            graph.initializer.append(smoothed)
            node.input[1] = smoothed.name
    # Each Mul goes right before the first node that reads its activation: the node list
    # stays in topological order.
    nodes, placed = [], set()
    for node in graph.node:
        for name in node.input:
            if name in scales and name not in placed:
                graph.initializer.append(numpy_helper.from_array(1.0 / scales[name], f"{name}.smooth_inverse"))
                nodes.append(helper.make_node("Mul", [name, f"{name}.smooth_inverse"], [f"{name}.smoothed"],
                                              name=f"{name}.smooth"))
                placed.add(name)
        if node.op_type in ("MatMul", "Gemm") and node.input[0] in scales and node in groups[node.input[0]]:
            node.input[0] = f"{node.input[0]}.smoothed"
        nodes.append(node)
    save_rewritten(model, nodes, out)
    return {"smoothed_groups": len(scales), "largest_scale_spread": max(ratios), "alpha": alpha}


class Smooth(Step):
    name = "quantize.smooth"
    description = "SmoothQuant: per-channel activation scales folded into Linear weights (exact in float), before int8"
    params = (Param("alpha", float, 0.5, "migration strength in [0, 1]: 0 leaves activations, 1 moves all into weights"),)
    forms = {"onnxruntime": TORCH, "torch": TORCH}

    def apply(self, model, params, context):
        alpha = params["alpha"]
        if not 0 <= alpha <= 1:
            raise StepNotApplicable(f"{self.name}: alpha must be in [0, 1], got {alpha}")
        data = context.calibration_inputs or context.sample_inputs
        module, _, record = smooth_module(model.obj, model.inputs, data, alpha)
        context.record.update(record, calibration="the checkpoint's calibration data" if context.calibration_inputs else "sample inputs")
        return ModelHandle(TORCH, module, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [Smooth()]
