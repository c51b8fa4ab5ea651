"""Built-in quantize steps.

``quantize.int8_dynamic``: int8 weights, activations quantized on the fly. onnxruntime's
``quantize_dynamic`` for onnxruntime artifacts, ``torch.ao`` dynamic quantization of
Linear layers for torch artifacts (saved as TorchScript, which carries the packed int8
weights that torch.export cannot).
"""

from __future__ import annotations

import warnings

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


@hookimpl
def kiln_steps():
    return [Int8Dynamic()]
