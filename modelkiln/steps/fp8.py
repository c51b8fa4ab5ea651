"""Built-in FP8 quantization for GPUs that multiply in FP8 (compute capability 8.9+:
Ada, Hopper): ``quantize.fp8`` and ``quantize.fp8_weight_only``.

Both store each Linear weight in float8_e4m3fn with one float32 scale per output channel
(its largest magnitude at e4m3's largest value, 448): half of bf16's bytes, and a far
finer grid near zero than int8's for the bell-shaped weights of a trained model.

- ``quantize.fp8`` (W8A8): each token's inputs are scaled by their own largest magnitude
  and cast to FP8 as the layer runs, and one FP8 tensor-core product
  (``torch._scaled_mm`` with row-wise scales) applies both scales in its epilogue. The
  per-token scaling is plain tensor arithmetic in the program, so ``compile.inductor``
  fuses it into one kernel per input (the layers reading the same input share it)
  rather than separate launches; serve it compiled.
- ``quantize.fp8_weight_only`` (W8A16): the inputs stay 16-bit and the weights are
  widened as they are read, which keeps the activations exact, for small batches where
  reading the weights is the time.

The model's output head stays in its float type, as llm-compressor's FP8 schemes leave it
and as vLLM and SGLang read it. A causal LM's folder stores the FP8 weights as they are,
in compressed-tensors' float-quantized (W8A8) or naive-quantized (W8A16) format
(``targets/compressed.py``), which transformers, vLLM and SGLang load. Elsewhere (a CPU,
an older GPU) each step is skipped with the reason.
"""

from __future__ import annotations

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import TORCH, ModelHandle, Step
from .layers import linear_layers

# Compute capability from which NVIDIA GPUs multiply in FP8.
FP8_CAPABILITY = (8, 9)
# The FP8 product takes widths that are multiples of this.
FP8_MULTIPLE = 16
# Output layers left in their float type: every score the user reads comes out of them.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def fp8_layer_class():
    import torch
    import torch.nn as nn

    from ..targets import compressed as ct

    class Fp8Linear(nn.Module):
        """A Linear with FP8 weights and per-channel scales; W8A8 (``activations``) scales
        each token's inputs into FP8 as it runs, W8A16 widens the weights as it reads them."""

        def __init__(self, linear: nn.Linear, activations: bool, device):
            super().__init__()
            form = ct.fp8_channels(linear.weight.detach().to(device),
                                   dict(ct.FP8_TOKEN_ACTIVATIONS) if activations else None)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.quantize_inputs = activations
            self.register_buffer("weight", form.q)
            # [1, out] float32: the layout the product's row-wise scaling reads.
            self.register_buffer("scale_row", form.scale.reshape(1, -1).float().contiguous())
            # The stored form waits on the host; the device holds only what the product reads.
            self.compressed = ct.Compressed(form.q.cpu(), form.scale.cpu(), None, 8, None, "float", form.activations)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(device),
                                                                      requires_grad=False)

        def derived_from_stored(self) -> dict:
            """How each kernel tensor follows from ``compressed`` (``targets/derived.py``);
            ``weight`` is the stored tensor itself."""
            return {"scale_row": {"derive": "fp8_scale_row"}}

        def forward(self, x):
            rows = x.reshape(-1, self.in_features)
            if self.quantize_inputs:
                out = _w8a8(rows, self.weight, self.scale_row)
            else:
                out = _w8a16(rows, self.weight, self.scale_row)
            out = out.to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

    def _w8a8(rows, weight, scale_row):
        scale = rows.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / ct.FP8_MAX
        quantized = (rows.float() / scale).clamp(-ct.FP8_MAX, ct.FP8_MAX).to(torch.float8_e4m3fn)
        # Row-wise scaled FP8 products return bfloat16.
        return torch._scaled_mm(quantized, weight.t(), scale_a=scale, scale_b=scale_row, out_dtype=torch.bfloat16)

    def _w8a16(rows, weight, scale_row):
        return torch.nn.functional.linear(rows, weight.to(rows.dtype)) * scale_row.to(rows.dtype)

    return Fp8Linear


def fp8_layers(module) -> tuple[list, dict]:
    """``([(name, Linear)], {name: why it stays float})`` for the layers of ``module``."""

    def unfit(layer) -> str | None:
        if layer.in_features % FP8_MULTIPLE or layer.out_features % FP8_MULTIPLE:
            return f"{layer.out_features} x {layer.in_features}: not multiples of {FP8_MULTIPLE}"
        if not layer.weight.is_floating_point():
            return f"weights of {layer.weight.dtype}"
        return None

    return linear_layers(module, HEAD_NAMES, unfit)


def check_device(device: str) -> None:
    """Raise StepNotApplicable unless ``device`` multiplies in FP8."""
    import torch

    if not device.startswith("cuda"):
        raise StepNotApplicable(f"FP8 products run on NVIDIA GPUs of compute capability 8.9 or later (Ada, Hopper); "
                                f'this target\'s device is {device} (list the step under a target with device = "cuda")')
    if not torch.cuda.is_available():
        raise StepNotApplicable("FP8 products need CUDA, and this PyTorch build or host has none")
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_CAPABILITY:
        raise StepNotApplicable(f"{device} (compute capability {capability[0]}.{capability[1]}) has no FP8 tensor "
                                "cores; they came with compute capability 8.9 (Ada, Hopper)")


class _Fp8Step(Step):
    forms = {"torch": TORCH}
    activations = True

    def apply(self, model, params, context):
        check_device(context.device)
        return convert(model, context, self.activations)


def convert(model, context, activations: bool) -> ModelHandle:
    """``model`` with its Linear layers in FP8, converted in place layer by layer (a 7B
    model has no room for a copy), on the target's device."""
    import torch

    layers, left = fp8_layers(model.obj)
    if not layers:
        raise StepNotApplicable(f"the model has no floating-point Linear layer the FP8 product takes (widths "
                                f"multiples of {FP8_MULTIPLE}, the head left in float)")
    layer_class = fp8_layer_class()
    model.obj.to(context.device)  # built where it runs: moved in place, never copied
    with torch.no_grad():
        for name, layer in layers:
            model.obj.set_submodule(name, layer_class(layer, activations, context.device))
    context.record.update(quantized_layers=len(layers), float_layers=left,
                          scheme="W8A8 FP8, weights per channel, inputs per token" if activations
                          else "W8A16 FP8, weights per channel")
    return ModelHandle(TORCH, model.obj.eval(), model.inputs, dict(model.notes))


class Fp8(_Fp8Step):
    name = "quantize.fp8"
    description = ("FP8 weights (per channel) and FP8 inputs (per token, scaled as the layer runs), one FP8 "
                   "tensor-core product per Linear; cuda targets of compute capability 8.9+ (Ada, Hopper); serve "
                   "with compile.inductor")
    activations = True


class Fp8WeightOnly(_Fp8Step):
    name = "quantize.fp8_weight_only"
    description = ("FP8 weights (per channel), 16-bit inputs: half of bf16's bytes to read at small batch; cuda "
                   "targets of compute capability 8.9+")
    activations = False


@hookimpl
def kiln_steps():
    return [Fp8(), Fp8WeightOnly()]
