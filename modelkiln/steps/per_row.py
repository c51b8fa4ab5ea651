"""Dynamic int8 with one activation scale per row: a graph rewrite for onnxruntime.

onnxruntime's own dynamic quantization (``DynamicQuantizeLinear``) computes one scale
for a whole activation tensor, so a request's answer depends on what it is batched with:
a sentence in a padded batch of 16 and the same sentence alone differ (measured on a
pretrained MiniLM: BENCHMARKS.md, "Figures behind the code"), and one long or outlying request
coarsens every other's quantization. Here every row (a token of a sequence, a sample of
a 2-D input) gets its own scale, from its own largest magnitude, so a row's result is
the same whatever shares its batch, and padding never touches a real token's scale.

Per MatMul or Gemm with a constant float32 weight ``W`` (``[K, N]``) reading ``x``:

    r  = max|x|_row / 127 (a column, [..., 1]),  q = QuantizeLinear(x, r, 128) along the
         rows of a 2-D view, viewed back in x's shape          (shared by the nodes reading x)
    Wq = int8(round(W / s)),  s = max|W|_column / L
    y  = MatMulIntegerToFloat(q, Wq, 1, s, a_zero_point=128) * r  (+ the Gemm's bias)

Symmetric activations written as uint8 with zero point 128: uint8 against int8 (U8S8)
is what onnxruntime's x86 integer kernels run fast (int8 against int8 is far slower
there), and its kernels take only one activation scale and zero point per
tensor, so the per-row part is one Mul after the product. ``MatMulIntegerToFloat`` does
the integer product, its conversion and the column scales in one kernel (its output
stage), where ``MatMulInteger``, Cast and two Muls were four passes over the output.
``L`` is the host's (``targets.host``): 127, or 63 where its U8S8 kernel sums pairs of
products in saturating 16-bit integers (AVX2 and AVX-512 without VNNI), where full
int8 weights overflow those sums and quiet rows land far outside the gate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StepNotApplicable
from ..targets.host import WEIGHT_LIMITS, host_int8_form
from .graphs import save_rewritten

# Added to a row's largest magnitude: an all-zero row (padding after a mask) divides by it.
_TINY = 1e-12


def _weighted(graph, weights: dict) -> list[int]:
    """The positions of the MatMul/Gemm nodes this rewrite quantizes: a constant 2-D
    float32 weight as the second input, and for a Gemm the plain form (no transposed A,
    alpha = beta = 1). Positions, not the node objects: protobuf hands out a new wrapper
    at each access."""
    import onnx
    from onnx import helper

    chosen = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = weights.get(node.input[1])
        if node.input[0] in weights or weight is None or len(weight.dims) != 2 \
                or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        if node.op_type == "Gemm":
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
                continue
            if len(node.input) > 2 and node.input[2] and node.input[2] not in weights:
                continue
        chosen.append(index)
    return chosen


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the nodes :func:`quantize_per_row` would quantize, largest weight first."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name: t for t in graph.initializer}
    found = [graph.node[index] for index in _weighted(graph, weights)]
    nodes = [(int(np.prod(weights[n.input[1]].dims)), n.name) for n in found if n.name]
    return [name for _, name in sorted(nodes, reverse=True)]


def quantize_per_row(source: Path, out: Path, excluded: frozenset = frozenset(), only: str | None = None,
                     form: str | None = None) -> int:
    """Write ``source`` with its weighted MatMul/Gemm nodes in int8 (per-row activations,
    per-column weights) to ``out``; ``excluded`` nodes stay float, or only ``only`` is
    quantized. ``form`` is an int8 form of ``targets.host`` (this host's by default): full
    int8 weights, or 7-bit ones where the host's U8S8 kernel saturates. Returns how many nodes were
    quantized."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # QuantizeLinear along an axis, Unsqueeze's axes as an input
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, 13)
        except Exception as exc:  # the reason goes to the variant
            raise StepNotApplicable(f"the model's opset {opset} could not be raised to 13 for per-row int8 ({exc}); "
                                    "use quantize.int8_dynamic(activations='per_tensor')") from None
        opset = 13
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    chosen = {index for index in _weighted(graph, weights)
              if (graph.node[index].name == only if only else graph.node[index].name not in excluded)}
    if not chosen:
        return 0
    limit = WEIGHT_LIMITS[form or host_int8_form()[0]]
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    constants: dict[str, np.ndarray] = {
        "per_row.zero_point": np.array(128, np.uint8),
        "per_row.tiny": np.array(_TINY / 127, np.float32), "per_row.step": np.array(1 / 127, np.float32),
        "per_row.one": np.array(1.0, np.float32), "per_row.flat": np.array([-1], np.int64),
        "per_row.last": np.array([-1], np.int64),
    }

    def row_max(x, y):  # over the last axis, kept: [..., 1], the shape that scales a product's rows
        if opset >= 18:  # the axes became an input
            return helper.make_node("ReduceMax", [x, "per_row.last"], [y], keepdims=1)
        return helper.make_node("ReduceMax", [x], [y], axes=[-1], keepdims=1)

    rows: dict[tuple[str, int], str] = {}  # (activation, width) -> the prefix of its quantized form
    nodes, added = [], []
    for index, node in enumerate(graph.node):
        if index not in chosen:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if node.op_type == "Gemm" and any(a.name == "transB" and helper.get_attribute_value(a)
                                          for a in node.attribute):
            weight = weight.T
        width = weight.shape[0]
        x = node.input[0]
        p = f"{x}.per_row"
        if (x, width) not in rows:
            # One scale per row from its largest magnitude, kept as a column ([..., 1]) that
            # scales the products' rows; QuantizeLinear takes it flat along a 2-D view
            # ([rows, width], a reshape: no copy), whose codes are viewed back in x's shape.
            added.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{p}.view"))
            nodes += [
                helper.make_node("Abs", [x], [f"{p}.abs"]),
                row_max(f"{p}.abs", f"{p}.max"),
                helper.make_node("Mul", [f"{p}.max", "per_row.step"], [f"{p}.step"]),
                helper.make_node("Max", [f"{p}.step", "per_row.tiny"], [f"{p}.column"]),
                helper.make_node("Reshape", [f"{p}.column", "per_row.flat"], [f"{p}.scale"]),
                helper.make_node("Shape", [f"{p}.scale"], [f"{p}.count"]),
                helper.make_node("Expand", ["per_row.zero_point", f"{p}.count"], [f"{p}.zero"]),
                helper.make_node("Reshape", [x, f"{p}.view"], [f"{p}.x"]),
                helper.make_node("QuantizeLinear", [f"{p}.x", f"{p}.scale", f"{p}.zero"], [f"{p}.rows"], axis=0),
                helper.make_node("Shape", [x], [f"{p}.shape"]),
                helper.make_node("Reshape", [f"{p}.rows", f"{p}.shape"], [f"{p}.q"]),
            ]
            rows[(x, width)] = p
        step = np.maximum(np.abs(weight).max(axis=0), _TINY) / limit
        codes = np.round(weight / step).clip(-limit, limit)
        name = f"{node.input[1]}.per_row.{node.name or index}"
        added += [numpy_helper.from_array(codes.astype(np.int8), f"{name}.q"),
                  numpy_helper.from_array(step.astype(np.float32), f"{name}.scale")]
        y = node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        # One kernel for the integer product, its conversion and the column scales (its
        # output stage); the row scales are one Mul after it, the bias one Add.
        nodes += [
            helper.make_node("MatMulIntegerToFloat", [f"{p}.q", f"{name}.q", "per_row.one", f"{name}.scale",
                                                      "per_row.zero_point"],
                             [f"{y}.per_row.columns"], domain="com.microsoft"),
            helper.make_node("Mul", [f"{y}.per_row.columns", f"{p}.column"], [f"{y}.per_row.biasless" if bias else y]),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [f"{y}.per_row.biasless", bias], [y]))
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    graph.initializer.extend(added)
    save_rewritten(model, nodes, out)
    return len(chosen)
