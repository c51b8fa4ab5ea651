"""Built-in low-bit steps: ternary and binary weights, recovered by distillation.

``quantize.ternary`` constrains each Linear weight to ``scale * {-1, 0, +1}`` and
``quantize.binary`` to ``scale * {-1, +1}``, one scale per output channel: the ternary
threshold is 0.7 times the row's mean magnitude and its scale the mean magnitude of the
weights above it (Li and Liu's Ternary Weight Networks); the binary scale is the row's
mean magnitude (XNOR-Net's). Few trained models survive that as they are, so the step
trains them back (quantization-aware, the constrained weights used in the forward pass
and the float ones updated through a straight-through estimator) by distillation from
the original on the checkpoint's unlabelled data, within the step's time budget, as the
BitNet line of work does.

The artifact stores the codes packed (2 bits a weight for ternary, 1 for binary, in
uint8) with the scales. onnxruntime folds the exported unpacking into a float weight once,
when the session is created; for torch the layers are TorchScript that unpack at their
first call and keep the result (a torch.export program would unpack at every call: 40x
slower than fp32 on a 2048-wide MLP).
The output head (the last Linear) stays float unless ``head`` is set: on a classifier it
is small and carries the most of the quality.
"""

from __future__ import annotations

import copy

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import TORCH, ModelHandle, Param
from .training import TrainingStep, budget_of, budget_params, distill, training_data

# TWN's threshold: weights within 0.7 x the row's mean magnitude become 0.
TERNARY_THRESHOLD = 0.7
# bits -> (codes per byte, the number of code values, code -> weight sign)
_CODES = {2: (4, 4, lambda code: code - 1), 1: (8, 2, lambda code: 2 * code - 1)}


def constrain(weight, bits: int):
    """``(codes, scale)``: ``weight`` [out, in] as signs in {-1, 0, 1} (2 bits) or {-1, 1}
    (1 bit), and one scale per output row [out, 1]; ``codes * scale`` is the weight used."""
    import torch

    magnitude = weight.abs()
    if bits == 1:
        return torch.where(weight >= 0, 1.0, -1.0), magnitude.mean(dim=1, keepdim=True)
    kept = magnitude > TERNARY_THRESHOLD * magnitude.mean(dim=1, keepdim=True)
    codes = torch.sign(weight) * kept
    scale = (magnitude * kept).sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True).clamp(min=1)
    return codes, scale


def pack(codes, bits: int):
    """Codes [out, in] in {-1, 0, 1} / {-1, 1} as uint8 [out, ceil(in / per_byte)]."""
    import torch
    import torch.nn.functional as F

    per_byte, base, _ = _CODES[bits]
    values = (codes + 1).to(torch.int32) if bits == 2 else ((codes + 1) // 2).to(torch.int32)
    width = values.shape[1]
    values = F.pad(values, (0, -width % per_byte)).reshape(values.shape[0], -1, per_byte)
    weights = base ** torch.arange(per_byte, dtype=torch.int32)
    return (values * weights).sum(dim=-1).to(torch.uint8)


def unpack(packed, bits: int, width: int):
    """The codes ``pack`` stored, as float [out, width]."""
    import torch

    per_byte, base, _ = _CODES[bits]
    divisors = base ** torch.arange(per_byte, dtype=torch.int32, device=packed.device)
    return _low_bit_classes()[0](packed, divisors, base, bits, width)


def _low_bit_classes():
    from typing import Optional

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def unpack_codes(packed: torch.Tensor, divisors: torch.Tensor, base: int, bits: int,
                     width: int) -> torch.Tensor:
        """Integer division and remainder only: every ONNX opset, torch.export and
        TorchScript (which compiles this as it is) take them."""
        values = torch.div(packed.to(torch.int32).unsqueeze(-1), divisors, rounding_mode="floor") % base
        values = values.reshape(packed.shape[0], -1)[:, :width]
        if bits == 2:
            return (values - 1).to(torch.float32)
        return (values * 2 - 1).to(torch.float32)

    class TrainingLinear(nn.Module):
        """A float Linear whose forward pass uses its constrained weight; gradients reach
        the float weight as if the constraint were not there (straight-through)."""

        def __init__(self, linear: nn.Linear, bits: int):
            super().__init__()
            self.linear, self.bits = linear, bits

        def forward(self, x):
            weight = self.linear.weight
            codes, scale = constrain(weight, self.bits)
            used = weight + (codes * scale - weight).detach()
            return F.linear(x, used, self.linear.bias)

    class LowBitLinear(nn.Module):
        """A Linear stored as packed codes and per-row scales. Unpacked at every call
        (``cached`` False: the graph an exporter records, which onnxruntime folds once),
        or at the first call only, into ``weight_cache`` (``cached``: for TorchScript,
        whose interpreter runs the check; the runtime empties the cache before saving)."""

        # targets.torchrt.RUN_TIME_CACHE, emptied before saving. Typed here, not by an
        # annotation: this module's annotations are strings TorchScript cannot resolve.
        __annotations__ = {"weight_cache": Optional[torch.Tensor]}

        def __init__(self, linear: nn.Linear, bits: int, cached: bool = False):
            super().__init__()
            codes, scale = constrain(linear.weight.detach().float(), bits)
            per_byte, base, _ = _CODES[bits]
            self.bits, self.base, self.cached = bits, base, cached
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("packed", pack(codes, bits))
            self.register_buffer("scale", scale.float())
            self.register_buffer("divisors", base ** torch.arange(per_byte, dtype=torch.int32))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
            self.weight_cache = None

        def forward(self, x):
            weight = self.weight_cache
            if weight is None:
                weight = unpack_codes(self.packed, self.divisors, self.base, self.bits, self.in_features) * self.scale
                if self.cached:
                    self.weight_cache = weight
            bias = self.bias
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    return unpack_codes, TrainingLinear, LowBitLinear, torch


class _LowBit(TrainingStep):
    bits = 2
    params = (
        Param("head", bool, False, "constrain the output head (the last Linear) too"),
        Param("steps", int, 600, "recovery steps (distillation from the original)"),
        Param("learning_rate", float, 2e-4, "of the recovery"),
        *budget_params("recovery"),
    )

    def apply(self, model, params, context):
        import torch.nn as nn

        _, training_class, low_bit_class, torch = _low_bit_classes()
        # torch: a TorchScript archive whose layers unpack once, at their first call;
        # onnxruntime: an exported graph that unpacks, which the session folds at load.
        cached = context.runtime != "onnxruntime"
        teacher = model.obj
        student = copy.deepcopy(teacher).float()
        linears = [(name, m) for name, m in student.named_modules()
                   if isinstance(m, nn.Linear) and m.in_features >= 8]
        if not params["head"] and len(linears) > 1:
            linears = linears[:-1]
        if not linears:
            raise StepNotApplicable("the model has no Linear layer to constrain")
        for name, linear in linears:
            student.set_submodule(name, training_class(linear, self.bits))
        data, source = training_data(context)
        trained = distill(student, teacher, data, params["steps"], params["learning_rate"],
                          context=context, **budget_of(params), activity="low-bit recovery")
        float_bytes = packed_bytes = 0
        zeros = weights = 0
        with torch.no_grad():
            for name, _ in linears:
                linear = student.get_submodule(name).linear
                codes, _ = constrain(linear.weight.float(), self.bits)
                zeros += int((codes == 0).sum())
                weights += codes.numel()
                low_bit = low_bit_class(linear, self.bits, cached=cached)
                student.set_submodule(name, torch.jit.script(low_bit) if cached else low_bit)
                float_bytes += linear.weight.numel() * 4
                packed_bytes += low_bit.packed.numel() + low_bit.scale.numel() * 4
        student.eval()
        context.record.update({f"recovery_{k}": v for k, v in trained.items() if v is not None})
        context.record.update(
            bits=self.bits, scales="one per output channel", layers=len(linears), head_float=not params["head"],
            weight_bytes_before=float_bytes, weight_bytes_after=packed_bytes,
            zero_share=round(zeros / weights, 4) if self.bits == 2 else None, recovery_data=source,
        )
        notes = {**model.notes, "onnx_keep_constants": True}  # the packed codes stay packed in the file
        if cached:
            notes["serialize"] = "torchscript"
        return ModelHandle(TORCH, student, model.inputs, notes)


class Ternary(_LowBit):
    name = "quantize.ternary"
    description = ("weights in scale * {-1, 0, +1} per output channel, 2 bits each, recovered by distillation "
                   "from the original")
    bits = 2


class Binary(_LowBit):
    name = "quantize.binary"
    description = ("weights in scale * {-1, +1} per output channel, 1 bit each, recovered by distillation "
                   "from the original")
    bits = 1


@hookimpl
def kiln_steps():
    return [Ternary(), Binary()]
