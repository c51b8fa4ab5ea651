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

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import TORCH, ModelHandle, Param, Step

# Rows of calibration data used for the activation maxima.
CALIBRATION_ROWS = 512


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
    batch = [torch.from_numpy(np.ascontiguousarray(data[spec.name][:CALIBRATION_ROWS])) for spec in inputs]
    try:
        with torch.no_grad():
            module(*batch)
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
        context.record.update(record, calibration="calibration.npz" if context.calibration_inputs else "sample inputs")
        return ModelHandle(TORCH, module, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [Smooth()]
