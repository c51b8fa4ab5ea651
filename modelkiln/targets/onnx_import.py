"""ONNX graphs as torch modules, so that an ONNX checkpoint gets the torch toolbox too:
structured pruning, distillation, 16-bit types and the torch targets.

The importer covers the operators vision exports are made of (convolutions, batch
normalisation, activations, pooling, resizing, slicing and reshaping by constants,
products), each as the torch operator that computes it; the layers that hold weights
become ``torch.nn`` modules (``Conv2d``, ``ConvTranspose2d``, ``BatchNorm2d``,
``Linear``), so that torch-pruning's dependency graph and the optimizers see them as they
see any module. Shapes computed at run time (``Shape``, ``Gather`` on shapes) are not
followed: such a graph is refused with the operator's name, as is any operator outside
:data:`OPERATORS`. An import is only taken once its outputs match onnxruntime's on the
checkpoint's samples (:func:`import_checked`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StepNotApplicable

# Relative error above which an import does not compute what onnxruntime computes.
MATCH_TOLERANCE = 1e-3


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int], spatial: int) -> tuple[list[int], list[int] | None]:
    """ONNX pads (every begin, then every end) as a symmetric padding, or ``[0...]`` and
    the explicit ``F.pad`` list where begin and end differ."""
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return begin, None
    explicit = []
    for b, e in zip(reversed(begin), reversed(end)):  # F.pad lists the last dimension first
        explicit += [b, e]
    return [0] * spatial, explicit


def _module_class():
    """The module class, made where torch is first needed (``kiln --help`` imports no torch)."""
    import torch

    operators = _torch_operators()

    class Imported(torch.nn.Module):
        """An ONNX graph run node by node with torch operators; weighted layers are
        submodules (``layers``), other constants buffers."""

        def __init__(self, program, layers, constants, input_names, output_name):
            super().__init__()
            self.program = program  # (operator, inputs, outputs, attributes, layer key)
            self.layers = torch.nn.ModuleDict(layers)
            self.constant_names = {}
            for index, (name, value) in enumerate(constants.items()):
                self.register_buffer(f"constant_{index}", value, persistent=True)
                self.constant_names[name] = f"constant_{index}"
            self.input_names = input_names
            self.output_name = output_name

        def forward(self, *inputs):
            values = dict(zip(self.input_names, inputs))
            for name, buffer in self.constant_names.items():
                values[name] = getattr(self, buffer)
            for op, ins, outs, attrs, layer in self.program:
                args = [values[i] if i else None for i in ins]
                values[outs[0]] = operators[op](args, attrs, self.layers[layer] if layer else None)
            return values[self.output_name]

    return Imported


def _torch_operators() -> dict:
    """``operator -> run(args, attributes, layer)`` for every operator the importer takes."""
    import torch
    import torch.nn.functional as F

    def padded(x, attrs, value=0.0):
        return F.pad(x, attrs["explicit_pads"], value=value) if attrs.get("explicit_pads") else x

    def clip(args, attrs):
        low = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
        high = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
        return torch.clamp(args[0], None if low is None else float(low), None if high is None else float(high))

    def sliced(x, attrs):
        index = [slice(None)] * x.dim()
        for axis, start, end, step in zip(attrs["axes"], attrs["starts"], attrs["ends"], attrs["steps"]):
            index[axis] = slice(start, end, step)
        return x[tuple(index)]

    def unsqueezed(x, axes):
        for axis in sorted(axes):
            x = x.unsqueeze(axis)
        return x

    def resized(x, attrs):
        if attrs.get("sizes"):
            return F.interpolate(x, size=attrs["sizes"], mode="nearest")
        return F.interpolate(x, scale_factor=attrs["scales"], mode="nearest")

    layer = {op: (lambda a, t, m: m(padded(a[0], t))) for op in ("Conv", "ConvTranspose", "BatchNormalization")}
    binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
              "MatMul": torch.matmul}
    return {
        **layer,
        **{op: (lambda a, t, m, f=f: f(a[0], a[1])) for op, f in binary.items()},
        "Gemm": lambda a, t, m: m(a[0]),
        "Relu": lambda a, t, m: torch.relu(a[0]),
        "LeakyRelu": lambda a, t, m: F.leaky_relu(a[0], t.get("alpha", 0.01)),
        "Sigmoid": lambda a, t, m: torch.sigmoid(a[0]),
        "HardSigmoid": lambda a, t, m: torch.clamp(a[0] * t.get("alpha", 0.2) + t.get("beta", 0.5), 0.0, 1.0),
        "HardSwish": lambda a, t, m: F.hardswish(a[0]),
        "Tanh": lambda a, t, m: torch.tanh(a[0]),
        "Clip": lambda a, t, m: clip(a, t),
        "Concat": lambda a, t, m: torch.cat(a, dim=t["axis"]),
        "MaxPool": lambda a, t, m: F.max_pool2d(padded(a[0], t, float("-inf")), t["kernel_shape"], t.get("strides", 1),
                                                t["padding"], ceil_mode=bool(t.get("ceil_mode", 0))),
        "AveragePool": lambda a, t, m: F.avg_pool2d(padded(a[0], t), t["kernel_shape"], t.get("strides", 1),
                                                    t["padding"], ceil_mode=bool(t.get("ceil_mode", 0)),
                                                    count_include_pad=bool(t.get("count_include_pad", 0))),
        "GlobalAveragePool": lambda a, t, m: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
        "Resize": lambda a, t, m: resized(a[0], t),
        "Slice": lambda a, t, m: sliced(a[0], t),
        "Reshape": lambda a, t, m: a[0].reshape([a[0].shape[i] if d == 0 else d for i, d in enumerate(t["shape"])]),
        "Transpose": lambda a, t, m: a[0].permute(t.get("perm") or list(reversed(range(a[0].dim())))),
        "Flatten": lambda a, t, m: a[0].reshape(*a[0].shape[:t.get("axis", 1)], -1),
        "Softmax": lambda a, t, m: torch.softmax(a[0], dim=t.get("axis", -1)),
        "Identity": lambda a, t, m: a[0],
        "Squeeze": lambda a, t, m: a[0].squeeze(tuple(t["axes"])),
        "Unsqueeze": lambda a, t, m: unsqueezed(a[0], t["axes"]),
    }


OPERATORS = ("Conv", "ConvTranspose", "BatchNormalization", "Gemm", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid",
             "HardSwish", "Tanh", "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Concat", "MaxPool", "AveragePool",
             "GlobalAveragePool", "Resize", "Slice", "Reshape", "Transpose", "Flatten", "MatMul", "Softmax",
             "Identity", "Squeeze", "Unsqueeze", "Constant")


def _refused(what: str) -> StepNotApplicable:
    return StepNotApplicable(f"cannot import the ONNX graph into torch: {what}")


def _tensor(array):
    import torch

    return torch.from_numpy(np.array(array))


def _convolution(node, attrs: dict, ins: list, constant):
    import torch

    weight = constant(ins[1], "weight")
    spatial = weight.ndim - 2
    if spatial != 2 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _refused(f"{node.op_type} {node.name} is not a 2-D convolution with explicit pads")
    padding, explicit = _pads(list(attrs.get("pads", [0] * 2 * spatial)), spatial)
    groups, bias = attrs.get("group", 1), len(ins) > 2 and bool(ins[2])
    layer: torch.nn.Conv2d | torch.nn.ConvTranspose2d
    if node.op_type == "Conv":
        layer = torch.nn.Conv2d(weight.shape[1] * groups, weight.shape[0], weight.shape[2:], attrs.get("strides", 1),
                                (padding[0], padding[1]), attrs.get("dilations", 1), groups, bias)
    else:
        if explicit or attrs.get("output_padding") or attrs.get("output_shape"):
            raise _refused(f"ConvTranspose {node.name} with uneven pads or an output shape")
        layer = torch.nn.ConvTranspose2d(weight.shape[0], weight.shape[1] * groups, weight.shape[2:],
                                         attrs.get("strides", 1), (padding[0], padding[1]), 0, groups, bias,
                                         attrs.get("dilations", 1))
    layer.weight.data = _tensor(weight).float()
    if layer.bias is not None:  # made where the node has a bias
        layer.bias.data = _tensor(constant(ins[2], "bias")).float()
    return layer, {"explicit_pads": explicit}


def _batch_norm(node, attrs: dict, ins: list, constant):
    import torch

    scale, shift, mean, var = (constant(name, "statistics") for name in ins[1:5])
    layer = torch.nn.BatchNorm2d(len(scale), eps=attrs.get("epsilon", 1e-5))
    # affine and track_running_stats (BatchNorm2d's defaults): all four are there
    assert layer.running_mean is not None and layer.running_var is not None
    layer.weight.data, layer.bias.data = _tensor(scale).float(), _tensor(shift).float()
    layer.running_mean.data, layer.running_var.data = _tensor(mean).float(), _tensor(var).float()
    return layer, {}


def _gemm(node, attrs: dict, ins: list, constant):
    import torch

    weight = constant(ins[1], "weight")
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise _refused(f"Gemm {node.name} with transA, alpha or beta")
    weight = weight if attrs.get("transB", 0) else weight.T
    bias = len(ins) > 2 and bool(ins[2])
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias)
    layer.weight.data = _tensor(weight).float()
    if bias:
        layer.bias.data = _tensor(constant(ins[2], "bias")).float().reshape(-1)
    return layer, {}


_LAYERS = {"Conv": _convolution, "ConvTranspose": _convolution, "BatchNormalization": _batch_norm, "Gemm": _gemm}


def _pooling(node, attrs, ins, constant):
    spatial = len(attrs["kernel_shape"])
    if spatial != 2:
        raise _refused(f"{node.op_type} {node.name} is not 2-D")
    attrs["padding"], attrs["explicit_pads"] = _pads(list(attrs.get("pads", [0] * 2 * spatial)), spatial)
    return attrs, ins


def _resize(node, attrs, ins, constant):
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "nearest":  # coordinate modes agree at whole scales: the check at import says where not
        raise _refused(f"Resize {node.name} in mode {mode}")
    scales = constant(ins[2], "scales") if len(ins) > 2 and ins[2] else np.zeros(0)
    if scales.size:
        return {"scales": [float(v) for v in scales[2:]]}, ins[:1]
    return {"sizes": [int(v) for v in constant(ins[3], "sizes")[2:]]}, ins[:1]


def _slice(node, attrs, ins, constant):
    starts, ends = constant(ins[1], "starts"), constant(ins[2], "ends")
    axes = constant(ins[3], "axes") if len(ins) > 3 and ins[3] else np.arange(len(starts))
    steps = constant(ins[4], "steps") if len(ins) > 4 and ins[4] else np.ones(len(starts), np.int64)
    largest = np.iinfo(np.int64).max // 2  # ONNX's "to the end"
    return {"starts": [int(v) for v in starts], "ends": [int(min(v, largest)) for v in ends],
            "axes": [int(v) for v in axes], "steps": [int(v) for v in steps]}, ins[:1]


def _reshape(node, attrs, ins, constant):
    return {"shape": [int(d) for d in constant(ins[1], "shape")]}, ins[:1]


def _axes(node, attrs, ins, constant):
    return ({"axes": [int(a) for a in constant(ins[1], "axes")]}, ins[:1]) if len(ins) > 1 else (attrs, ins)


def _clip(node, attrs, ins, constant):
    bounds = {key: float(constant(name, key)) for key, name in zip(("min", "max"), ins[1:3]) if name}
    return {**attrs, **bounds}, ins[:1]


# Operators whose inputs past the first are constants that become attributes.
_FIXED = {"MaxPool": _pooling, "AveragePool": _pooling, "Resize": _resize, "Slice": _slice, "Reshape": _reshape,
          "Squeeze": _axes, "Unsqueeze": _axes, "Clip": _clip}


def import_onnx(path: Path):
    """The ONNX model at ``path`` as a torch module taking its inputs in order and
    returning its first output; StepNotApplicable naming the first operator (or use of
    one) it does not take."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = _attributes(node).get("value")
            if value is None:
                raise _refused(f"a Constant without a tensor value ({node.name or node.output[0]})")
            known[node.output[0]] = numpy_helper.to_array(value)
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in OPERATORS or n.domain not in ("", "ai.onnx")})
    if unsupported:
        raise _refused(f"operator {', '.join(unsupported)} is not among those the importer takes "
                       "(targets/onnx_import.py)")
    program, layers = [], {}
    used: set[str] = set()
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant":
            continue

        def constant(name, what, node=node):
            if name not in known:
                raise _refused(f"{node.op_type} {node.name or node.output[0]} takes its {what} from the graph at "
                               "run time")
            return known[name]

        attrs, ins, key = _attributes(node), list(node.input), None
        if node.op_type in _LAYERS:
            key = f"layer_{index}"
            layers[key], attrs = _LAYERS[node.op_type](node, attrs, ins, constant)
            ins = ins[:1]
        elif node.op_type in _FIXED:
            attrs, ins = _FIXED[node.op_type](node, attrs, ins, constant)
        used.update(i for i in ins if i)
        program.append((node.op_type, ins, list(node.output), attrs, key))
    inputs = [i.name for i in graph.input if i.name not in known]
    constants = {name: _tensor(value) for name, value in known.items() if name in used}
    return _module_class()(program, layers, constants, inputs, graph.output[0].name).eval()


def import_checked(path: Path, sample_inputs: dict, rows: int = 4):
    """:func:`import_onnx` of ``path``, taken only where its outputs on the first ``rows``
    samples match onnxruntime's within :data:`MATCH_TOLERANCE` (relative to the largest
    output); StepNotApplicable with the figures otherwise."""
    import torch

    from .onnxrt import session_runner

    module = import_onnx(path)
    first = {name: array[:rows] for name, array in sample_inputs.items()}
    expected = np.asarray(session_runner(path, 1)(first), dtype=np.float64)
    try:
        with torch.inference_mode():
            got = module(*(torch.from_numpy(np.ascontiguousarray(first[name])) for name in module.input_names))
    except Exception as exc:  # an operator used in a way the importer does not follow
        raise StepNotApplicable(f"the ONNX graph imported into torch fails on the samples ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from None
    got = got.double().numpy()
    if got.shape != expected.shape:  # e.g. a graph that reshapes to constant shapes holding a batch of 1
        raise StepNotApplicable(f"the ONNX graph imported into torch gives outputs of shape {list(got.shape)} for "
                                f"{rows} samples where onnxruntime, fed row by row, gives {list(expected.shape)}: "
                                "the graph fixes its batch (a Reshape to a constant shape, say)")
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(got - expected).max()) / scale
    if error > MATCH_TOLERANCE:
        raise StepNotApplicable(f"the ONNX graph imported into torch does not compute what onnxruntime does "
                                f"(largest difference {error:.2g} of the largest output on {rows} samples)")
    return module, error


def imported(model, context):
    """``model`` (an ONNX handle) as a torch one, checked on ``context``'s samples; the
    handle's notes say how closely it matched (``onnx_import``)."""
    from ..plugins.api import TORCH, ModelHandle

    module, error = import_checked(Path(model.obj), context.sample_inputs)
    notes = {**model.notes, "onnx_import": {"matched_onnxruntime_within": float(f"{error:.3g}"),
                                            "layers": len(module.layers)}}
    return ModelHandle(TORCH, module, model.inputs, notes)
