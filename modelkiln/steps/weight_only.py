"""Built-in weight-only quantization: int8 or block-wise int4 weights, float activations.

``quantize.weight_only`` stores Linear / MatMul weights in 8 or 4 bits and computes with
float activations. It pays where reading the weights bounds the time (batch-1 decoding of
language models, wide layers at small batch) and not where arithmetic does: on this
project's 2-core AVX2 development host a BERT-base encoder at sequence 128 ran slower
with 4-bit weights than in fp32 (see BENCHMARKS.md). The measurement decides.

- onnxruntime: ``MatMulNBits`` from onnxruntime's own quantizer, symmetric, one scale per
  ``block_size`` weights along the input dimension. Gemm nodes with a constant weight
  (the exporter's form of a Linear on 2-D inputs) are first rewritten into MatMul + Add,
  which that quantizer takes.
- torch (cpu): each Linear becomes a module calling PyTorch's packed weight-only kernels:
  ``_weight_int8pack_mm`` (one scale per output channel) or ``_weight_int4pack_mm_for_cpu``
  (one scale per group), which ``torch.export`` carries.
- torch (cuda), int8: not offered. An int8 weight converted in the matrix product
  (``linear(x, weight.to(x.dtype)) * scale``, the form gpt-fast compiles into one kernel)
  was measured: TorchInductor did not fuse the conversion into the product of the
  exported program, so every call converted the whole weight and a decoding step was
  many times slower than in bf16 (BENCHMARKS.md, "Figures behind the code"). Without a
  fused dequantizing kernel the variant only costs a build and a measurement; int4
  (below) has one.
- torch (cuda), int4: block-wise int4 with bf16 activations, by modelkiln's own Triton
  kernel ``int4_mm`` where Triton is installed (``targets/kernels/int4.py``: it reads the
  stored compressed-tensors form as it is and picks its tiles by the tokens per call, so
  that a server's batches do not fall behind bf16), else PyTorch's tinygemm kernel
  (``_weight_int4pack_mm``, the one gpt-fast uses; compute capability 8.0+), which is
  fast at batch 1 and slower than bf16 from 16 tokens on (BENCHMARKS.md); layers whose
  widths the kernel does not take stay in float. Its next tokens drift from the
  original's, which the quality gate judges.

On torch the integers are chosen by error feedback on the checkpoint's data where it
has rows apart from the quality samples (``method = "auto"``, GPTQ's method,
``error_feedback.py``), else rounded to nearest; the grid is the same either way.

On torch the integers are those the compressed-tensors format stores (symmetric int4 in
groups of ``block_size``, ``W4A16``; symmetric int8 per channel, ``W8A16``): a causal LM's
variant folder holds them in that format for LLM servers, and each kernel's packing is
derived from them (``targets/compressed.py``). Until this release int4 was asymmetric
with a float zero, a grid compressed-tensors cannot state.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import ONNX, TORCH, ModelHandle, Param, Step

def _gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, W, C) with a constant W (alpha = beta = 1, no transposed A) into
    MatMul(A, W') + Add(C), in place; returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    rewritten, nodes = 0, []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in initializers
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        name = node.name or f"gemm{rewritten}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), f"{name}_weight_kn"))
        product = f"{name}_product" if len(node.input) > 2 and node.input[2] else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], f"{name}_weight_kn"], [product], name=f"{name}_MatMul"))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{name}_Add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return rewritten


def _torch_layer_class():
    import torch
    import torch.nn as nn

    from ..targets import compressed as ct

    class WeightOnlyLinear(nn.Module):
        """A Linear with packed int8 or int4 weights; float32 activations in and out. Its
        weights are kept as compressed-tensors stores them (``compressed``: what the
        variant's folder holds) and the kernel's packing is derived from that."""

        def __init__(self, linear: nn.Linear, bits: int, block_size: int, form: ct.Compressed | None = None):
            super().__init__()
            out_features = linear.out_features
            self.bits, self.block_size, self.out_features = bits, block_size, out_features
            if bits == 8:
                self.compressed = form or ct.int8_channels(linear.weight)
                self.register_buffer("packed", self.compressed.q)
                self.register_buffer("scales", self.compressed.scale[:, 0].float().contiguous())
            else:
                self.compressed = form or ct.int4_groups(linear.weight, block_size)
                self.register_buffer("packed", ct.int4_cpu_packed(self.compressed))
                self.register_buffer("scales", ct.int4_kernel_scales(self.compressed, torch.float32))
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

        def derived_from_stored(self) -> dict:
            """How each kernel tensor follows from ``compressed`` (``targets/derived.py``)."""
            if self.bits == 8:
                return {"packed": {"derive": "int8_values"}, "scales": {"derive": "int8_scales"}}
            return {"packed": {"derive": "int4_cpu_packed"}, "scales": {"derive": "int4_scales", "dtype": "float32"}}

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1]).float()
            if self.bits == 8:
                out = torch.ops.aten._weight_int8pack_mm(rows, self.packed, self.scales)
            else:
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.block_size, self.scales)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

    return WeightOnlyLinear


def _int4_cuda_tiles(in_features: int, out_features: int, block: int) -> int:
    """The widest K tiling PyTorch's CUDA int4 kernel (tinygemm) takes for this layer, or 0
    when it takes none: input width divisible by 16 x tiles and by the group, output by 8."""
    if in_features % block or out_features % 8:
        return 0
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), 0)


def _int4_cuda_layer_class():
    import torch
    import torch.nn as nn

    from ..targets import compressed as ct

    class Int4WeightLinear(nn.Module):
        """Block-wise symmetric int4 weights in PyTorch's CUDA tinygemm layout, computed by
        ``_weight_int4pack_mm`` (bf16 activations: the kernel's only type; others are cast
        in and back)."""

        def __init__(self, linear: nn.Linear, block_size: int, tiles: int, device: str,
                     form: ct.Compressed | None = None):
            super().__init__()
            out_features = linear.out_features
            self.block_size, self.out_features, self.tiles = block_size, out_features, tiles
            # Quantized where it will run (the checkpoint may still be on the cpu), kept
            # as compressed-tensors stores it with the scales in the kernel's bf16, and
            # packed on the device: the packing op exists for cuda only.
            form = form or ct.int4_groups(linear.weight.detach().to(device), block_size)
            form = ct.Compressed(form.q.to(device), form.scale.to(device, torch.bfloat16), None, 4, block_size)
            self.register_buffer("packed", ct.int4_cuda_packed(form, tiles, device))
            self.register_buffer("scales", ct.int4_kernel_scales(form, torch.bfloat16))
            # The stored form waits on the host: the GPU holds only what the kernel reads.
            self.compressed = ct.Compressed(form.q.cpu(), form.scale.cpu(), None, 4, block_size)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(device),
                                                                      requires_grad=False)

        def derived_from_stored(self) -> dict:
            """How each kernel tensor follows from ``compressed`` (``targets/derived.py``)."""
            return {"packed": {"derive": "int4_cuda_packed", "tiles": self.tiles},
                    "scales": {"derive": "int4_scales", "dtype": "bfloat16"}}

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.block_size, self.scales).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

    return Int4WeightLinear


def _int4_stored_layer_class():
    import torch
    import torch.nn as nn

    from ..targets import compressed as ct
    from ..targets.kernels import int4

    class Int4StoredLinear(nn.Module):
        """Block-wise symmetric int4 weights as compressed-tensors stores them (int32 words
        of eight levels, bf16 scales), computed by modelkiln's ``int4_mm`` kernel, which
        reads that form as it is (``targets/kernels/int4.py``): the program's weights are
        the folder's. bf16 activations (others are cast in and back)."""

        def __init__(self, linear: nn.Linear, block_size: int, device: str, form: ct.Compressed | None = None):
            super().__init__()
            int4.register_op()  # before any tracer meets the op
            self.block_size, self.out_features = block_size, linear.out_features
            form = form or ct.int4_groups(linear.weight.detach().to(device), block_size)
            on_device = ct.Compressed(form.q.to(device), form.scale.to(device), None, 4, block_size)
            stored = on_device.tensors(torch.bfloat16)
            self.register_buffer("weight_packed", stored["weight_packed"])
            self.register_buffer("weight_scale", stored["weight_scale"])
            self.compressed = ct.Compressed(form.q.cpu(), form.scale.cpu(), None, 4, block_size)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(device),
                                                                      requires_grad=False)

        def derived_from_stored(self) -> dict:
            """``weight_packed`` is the folder's tensor as it is; the scales are the folder's
            in the kernel's bf16 (the folder keeps the model's float type)."""
            return {"weight_scale": {"derive": "int4_stored_scales", "dtype": "bfloat16"}}

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            out = torch.ops.modelkiln.int4_mm(rows, self.weight_packed, self.weight_scale).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

    return Int4StoredLinear


# The cuda int4 kernels a variant may be served by.
CUDA_KERNELS = ("auto", "int4_mm", "tinygemm")


METHODS = ("auto", "gptq", "rtn")


def _fit_data(context) -> tuple[dict | None, str]:
    """The rows error feedback may fit on, and where they came from; None (and why) where
    the checkpoint's data leaves none apart from its quality samples."""
    split = context.split or {}
    if context.training_inputs is None or split.get("trained_on_samples"):
        return None, "the checkpoint's data leaves no rows apart from its quality samples"
    if split.get("training_source") == "generated" or context.training_source == "generated":
        return None, "the checkpoint ships no data (generated inputs say nothing of what it will read)"
    return context.training_inputs, context.training_source


def _rounded(module, layers: list, model, bits: int, block: int, method: str, context, device: str) -> dict:
    """``{name: Compressed}`` for ``layers`` rounded by ``method`` (empty: round to nearest
    in each layer class); the lineage says which method ran, on what data and to what
    output error. Layers' weights are left holding what their integers stand for."""
    from ..targets import compressed as ct
    from . import error_feedback

    data, source = _fit_data(context)
    if method == "rtn" or (method == "auto" and data is None):
        context.record.update(method="rtn", fitted=False,
                              **({"why_rtn": source} if method == "auto" else {}))
        return {}
    if data is None:
        raise StepNotApplicable(f"{context.target}: method gptq needs rows to fit on, and {source}: ship "
                                "train.jsonl (or calibration data beyond the quality samples), or use method rtn")
    group = block if bits == 4 else None
    nearest = ct.int4_groups if bits == 4 else (lambda weight, _: ct.int8_channels(weight))
    errors: dict = {"gptq": [], "rtn": []}

    def round_layer(weight, hessian):
        form = error_feedback.solve(weight, hessian, bits, group)
        errors["gptq"].append(error_feedback.output_error(weight, form, hessian))
        errors["rtn"].append(error_feedback.output_error(weight, nearest(weight, block), hessian))
        return form

    forms = error_feedback.quantize_with_feedback(
        module, layers, data, model.inputs, round_layer, device,
        progress=lambda done, total: context.progress("error feedback (gptq)", done, total))
    context.record.update(
        method="gptq", fit_data=source, fit_rows=min(len(next(iter(data.values()))), error_feedback.FIT_ROWS),
        output_error=float(np.mean(errors["gptq"])) if errors["gptq"] else None,
        rtn_output_error=float(np.mean(errors["rtn"])) if errors["rtn"] else None)
    return forms


CUDA_INT8 = ("int8 is not offered on cuda: PyTorch has no fused int8 weight-only matmul, and converting "
             "the weights at every call made a 7B decoding step 11x slower than bf16")


class WeightOnly(Step):
    name = "quantize.weight_only"
    description = ("int8 or block-wise int4 weights, float activations (onnxruntime MatMulNBits; torch packed "
                   "kernels on cpu; on cuda int4 only: " + CUDA_INT8 + ")")
    params = (
        Param("bits", int, 4, "4 or 8"),
        Param("block_size", int, 32, "weights sharing one scale (int4; onnxruntime int8 too): 16, 32, 64, 128"),
        Param("method", str, "auto", "how each weight's integer is chosen (torch): gptq (error feedback on the "
                                     "checkpoint's data, never its quality samples), rtn (round to nearest), "
                                     "auto (gptq where the data leaves rows apart from the quality samples, "
                                     "else rtn)"),
        Param("kernel", str, "auto", "cuda int4: int4_mm (modelkiln's Triton kernel on the stored form, tiles by "
                                     "tokens per call), tinygemm (PyTorch's; slow from 16 tokens on), auto "
                                     "(int4_mm where Triton is installed)"),
    )
    forms = {"onnxruntime": ONNX, "torch": TORCH}

    def trains(self, params):
        # Error feedback fits the integers to the data's statistics: its variant is judged
        # only on rows it never saw, as a fine-tune's is.
        return params.get("method", "auto") != "rtn" and params.get("bits", 4) in (4, 8)

    def apply(self, model, params, context):
        bits, block = params["bits"], params["block_size"]
        if bits not in (4, 8):
            raise StepNotApplicable(f"{self.name}: bits must be 4 or 8, got {bits}")
        if block not in (16, 32, 64, 128):
            raise StepNotApplicable(f"{self.name}: block_size must be 16, 32, 64 or 128, got {block}")
        if params.get("method", "auto") not in METHODS:
            raise StepNotApplicable(f"{self.name}: method must be one of {', '.join(METHODS)}, got "
                                    f"{params['method']!r}")
        if model.form == ONNX:
            if params.get("method", "auto") == "gptq":
                raise StepNotApplicable(f"{self.name}: method gptq is for the torch runtime; onnxruntime's "
                                        "MatMulNBits weights are rounded to nearest (method rtn or auto)")
            context.record.update(method="rtn", fitted=False)
            return self._onnx(model, bits, block, context)
        return self._torch(model, bits, block, params.get("method", "auto"), context, params.get("kernel", "auto"))

    def _onnx(self, model, bits, block, context):
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        graph_model = onnx.load(str(model.obj))
        rewritten = _gemm_to_matmul(graph_model)
        quantizer = MatMulNBitsQuantizer(graph_model, bits=bits, block_size=block, is_symmetric=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer.process()
        out = context.new_path(f"weight_only/int{bits}/model.onnx")
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        count = sum(1 for node in quantizer.model.model.graph.node if node.op_type == "MatMulNBits")
        if count == 0:
            raise StepNotApplicable("the model has no MatMul or Gemm with a constant weight to quantize")
        context.record.update(quantized_nodes=count, gemm_rewritten=rewritten, bits=bits, block_size=block)
        return ModelHandle(ONNX, out, model.inputs, dict(model.notes))

    def _torch(self, model, bits, block, method, context, kernel="auto"):
        import copy

        import torch

        if context.device.startswith("cuda"):
            return self._cuda(model, bits, context, block, method, kernel)
        if context.device != "cpu":
            raise StepNotApplicable(f"{self.name}: no torch kernels here for device {context.device}")
        layer_class = _torch_layer_class()
        module = copy.deepcopy(model.obj)
        names = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
                 and m.weight.dtype == torch.float32
                 and (bits == 8 or (m.in_features % block == 0 and m.out_features % 16 == 0))]
        if not names:
            raise StepNotApplicable(f"the model has no float32 Linear layer this kernel takes "
                                    f"(int4 needs input widths divisible by block_size = {block} and "
                                    "output widths by 16)")
        forms = _rounded(module, [(name, module.get_submodule(name)) for name in names], model, bits,
                         block, method, context, "cpu")
        for name in names:
            module.set_submodule(name, layer_class(module.get_submodule(name), bits, block, forms.get(name)))
        context.record.update(quantized_layers=len(names), bits=bits, block_size=block)
        return ModelHandle(TORCH, module.eval(), model.inputs, dict(model.notes))

    def _cuda(self, model, bits, context, block: int = 32, method: str = "rtn", kernel: str = "auto"):
        import torch

        module = model.obj  # converted in place, layer by layer: a 7B model has no room for a copy
        if bits == 8:
            raise StepNotApplicable(f"{self.name}: {CUDA_INT8}; use bits=4")
        floats = [(name, m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
                  and m.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)]
        if block not in (32, 64, 128):
            raise StepNotApplicable(f"{self.name}: PyTorch's int4 kernel on cuda takes block_size 32, 64 or 128, "
                                    f"got {block}")
        if torch.cuda.get_device_capability(context.device) < (8, 0):
            raise StepNotApplicable(f"{self.name}: PyTorch's int4 kernel needs a GPU of compute capability 8.0 "
                                    "or newer")
        if torch.cuda.is_available():
            # Built where it runs: error feedback's passes over the data, and every
            # layer's rounding, on the GPU (the weights move in place, nothing is copied).
            module.to(context.device)
        from ..targets.kernels import int4

        if kernel not in CUDA_KERNELS:
            raise StepNotApplicable(f"{self.name}: kernel must be one of {', '.join(CUDA_KERNELS)}, got {kernel!r}")
        if kernel == "auto":
            kernel = "int4_mm" if int4.triton_available() else "tinygemm"
        if kernel == "int4_mm":
            layer_class = _int4_stored_layer_class()
            layers: list[tuple[str, tuple]] = [(name, (m, block, context.device)) for name, m in floats
                                               if int4.unsupported(m.in_features, m.out_features, block) is None]
            served = ("modelkiln int4_mm (Triton, on the stored form), bf16 activations; by tokens per call: "
                      + ", ".join(f"{row['tokens'][0]}-{row['tokens'][1] or ''} {row['method']}"
                                  for row in int4.served_by()))
        else:
            layer_class = _int4_cuda_layer_class()
            layers = [(name, (m, block, tiles, context.device)) for name, m in floats
                      if (tiles := _int4_cuda_tiles(m.in_features, m.out_features, block))]
            served = "int4 tinygemm (_weight_int4pack_mm), bf16 activations"
        if not layers:
            raise StepNotApplicable(f"the model has no floating-point Linear layer the {kernel} kernel takes "
                                    f"(widths and block_size = {block})")
        forms = _rounded(module, [(name, args[0]) for name, args in layers], model, bits, block, method, context,
                         context.device if torch.cuda.is_available() else "cpu")
        with torch.no_grad():
            for name, args in layers:
                module.set_submodule(name, layer_class(*args, form=forms.get(name)))
        context.record.update(quantized_layers=len(layers), bits=bits, block_size=block, kernel=served)
        notes = {**model.notes, **({int4.SERVING_KEY: True} if kernel == "int4_mm" else {})}
        return ModelHandle(TORCH, module.eval(), model.inputs, notes)


@hookimpl
def kiln_steps():
    return [WeightOnly()]
