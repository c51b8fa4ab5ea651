"""Built-in quantize steps.

``quantize.int8_dynamic``: int8 weights, activations quantized on the fly. onnxruntime's
``quantize_dynamic`` for onnxruntime artifacts, ``torch.ao`` dynamic quantization of
Linear layers for torch artifacts (saved as TorchScript, which carries the packed int8
weights that torch.export cannot).

``quantize.int8_static``: int8 weights and activations with scales calibrated ahead of
time, in onnxruntime's QDQ format (per-channel weights by default), after onnxruntime's
own pre-processing (symbolic shape inference and graph optimisation, which fuses ops so
that fewer boundaries need quantizing). Calibration reads ``calibration.npz`` when the
checkpoint ships it, else the sample inputs.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import StepNotApplicable
from . import hookimpl
from .api import ONNX, TORCH, ModelHandle, Param, Step


class Int8Dynamic(Step):
    name = "quantize.int8_dynamic"
    description = "int8 weights with dynamically quantized activations (MatMul/Gemm/Linear)"
    params = (
        Param("per_channel", bool, False, "one weight scale per output channel (onnxruntime)"),
    )
    forms = {"onnxruntime": ONNX, "torch": TORCH}

    def apply(self, model, params, context):
        if model.form == ONNX:
            return self._onnx(model, params, context)
        return self._torch(model, context)

    def _onnx(self, model, params, context):
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = context.new_path("int8_dynamic/model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(model.obj), str(out), weight_type=QuantType.QInt8,
                per_channel=params["per_channel"],
            )
        quantized = sum(
            1 for node in onnx.load(str(out), load_external_data=False).graph.node
            if "Integer" in node.op_type or "Quant" in node.op_type
        )
        if quantized == 0:
            raise StepNotApplicable("the model has no operators onnxruntime quantizes dynamically")
        context.record["quantized_nodes"] = quantized
        return ModelHandle(ONNX, out, model.inputs, dict(model.notes))

    def _torch(self, model, context):
        import torch

        linears = sum(isinstance(m, torch.nn.Linear) for m in model.obj.modules())
        if linears == 0:
            raise StepNotApplicable("the model has no Linear layers to quantize dynamically")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = torch.ao.quantization.quantize_dynamic(
                model.obj, {torch.nn.Linear}, dtype=torch.qint8
            )
        context.record["quantized_linears"] = linears
        notes = {**model.notes, "serialize": "torchscript"}
        return ModelHandle(TORCH, quantized, model.inputs, notes)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over in-memory arrays."""

    def __init__(self, arrays: dict, batch_size: int):
        total = len(next(iter(arrays.values())))
        self._batches = iter(
            {name: np.ascontiguousarray(a[i:i + batch_size]) for name, a in arrays.items()}
            for i in range(0, total, batch_size)
        )

    def get_next(self):
        return next(self._batches, None)


class Int8Static(Step):
    name = "quantize.int8_static"
    description = "int8 weights and activations, calibrated ahead of time (onnxruntime QDQ)"
    params = (
        Param("per_channel", bool, True, "one weight scale per output channel"),
        Param("calibration_rows", int, 256, "rows of calibration data used at most"),
        Param("method", str, "minmax", "calibration: minmax, entropy or percentile"),
    )
    forms = {"onnxruntime": ONNX}

    _METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

    def apply(self, model, params, context):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        method = self._METHODS.get(params["method"])
        if method is None:
            raise StepNotApplicable(f"{self.name}: method must be one of {', '.join(self._METHODS)}")
        data = context.calibration_inputs or context.sample_inputs
        rows = min(params["calibration_rows"], len(next(iter(data.values()))))
        data = {name: a[:rows] for name, a in data.items()}
        prepared = context.new_path("int8_static/prepared.onnx")
        out = context.new_path("int8_static/model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                quant_pre_process(str(model.obj), str(prepared))
            except Exception:  # pre-processing is an optimisation; quantize the model as it is
                prepared = model.obj
            quantize_static(
                str(prepared), str(out), _Batches(data, batch_size=32),
                quant_format=QuantFormat.QDQ, per_channel=params["per_channel"],
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        import onnx

        quantized = sum(1 for n in onnx.load(str(out), load_external_data=False).graph.node
                        if n.op_type == "QuantizeLinear")
        if quantized == 0:
            raise StepNotApplicable("the model has no operators onnxruntime quantizes statically")
        context.record.update(quantize_nodes=quantized, calibration_rows=rows,
                              calibration="calibration.npz" if context.calibration_inputs else "sample inputs")
        return ModelHandle(ONNX, out, model.inputs, dict(model.notes))


def _half_module(module, dtype):
    """``module`` in ``dtype``, taking and returning float32 so serving code is unchanged."""
    import torch

    class HalfPrecision(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.to(dtype)

        def forward(self, *inputs):
            cast = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
            return self.inner(*cast).float()

    return HalfPrecision(module).eval()


class HalfPrecision(Step):
    """Weights and activations in a 16-bit float type (torch). Whether the target runs it
    faster is for the measurement to say: on CPUs it halves the bytes read per token even
    without native 16-bit arithmetic, which is what bounds small-batch latency."""

    forms = {"torch": TORCH}
    dtype_name = ""

    def apply(self, model, params, context):
        import torch

        dtype = getattr(torch, self.dtype_name)
        floats = [p for p in model.obj.parameters() if p.is_floating_point()]
        if not floats:
            raise StepNotApplicable("the model has no floating-point weights")
        context.record["parameters"] = sum(p.numel() for p in floats)
        return ModelHandle(TORCH, _half_module(model.obj, dtype), model.inputs, dict(model.notes))


class BFloat16(HalfPrecision):
    name = "quantize.bf16"
    description = "bfloat16 weights and activations (torch); fp32 inputs and outputs"
    dtype_name = "bfloat16"


class Float16(HalfPrecision):
    name = "quantize.fp16"
    description = "float16 weights and activations (torch); fp32 inputs and outputs"
    dtype_name = "float16"


@hookimpl
def kiln_steps():
    return [Int8Dynamic(), Int8Static(), BFloat16(), Float16()]
