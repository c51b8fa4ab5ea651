"""Built-in quantize steps.

``quantize.int8_dynamic``: int8 weights, activations quantized on the fly. For
onnxruntime artifacts one activation scale per row by default (``per_row.py``: a
request's answer does not depend on its batch), or onnxruntime's own ``quantize_dynamic``
(one scale per tensor: ``activations = "per_tensor"``); ``torch.ao`` dynamic
quantization of Linear layers for torch artifacts (saved as TorchScript, which carries
the packed int8 weights that torch.export cannot). Accuracy-aware by default: a result
that misses the quality gate is tuned (``tuning.py``): first other forms are tried whole
(on onnxruntime SmoothQuant on the graph, after per-channel weight scales on the
per-tensor form; on torch SmoothQuant on the module), then the most sensitive layers are
kept in float.

On onnxruntime both int8 steps write the host's int8 form (``targets.host``): where its
U8S8 kernel sums pairs of products in saturating 16 bits (AVX2, AVX-512 without VNNI),
7-bit weights (``reduce_range``), which keep every sum exact; elsewhere full int8.

``quantize.int8_static``: int8 weights and uint8 activations with scales calibrated ahead
of time, in onnxruntime's QDQ format (per-channel weights by default), after onnxruntime's
own pre-processing (symbolic shape inference and graph optimisation, which fuses ops so
that fewer boundaries need quantizing). uint8 activations against int8 weights (U8S8) is
the form onnxruntime's x86 kernels run fast; int8 activations ran several times slower on
both a VNNI Xeon and an AVX2 host (BENCHMARKS.md, "Figures behind the code"). Calibration
reads ``calibration.npz`` when the checkpoint ships it, else the sample inputs.
Only the operators that carry the time are quantized (MatMul, Gemm, Conv by default):
quantizing every operator onnxruntime can (residual Adds, the embedding Gather, ...) cost a
pretrained MiniLM far more of its quality than the MatMuls alone did. Accuracy-aware like the
dynamic one: SmoothQuant on the graph (alpha 0.5, then 0.8), then the most sensitive
layers kept in float; each candidate calibrates again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import ONNX, TORCH, ModelHandle, Param, Step
from ..targets.harness import run_chunked
from ..targets.host import SEVEN_BIT_WEIGHTS, half_precision_reason, host_int8_form, host_probe
from ..targets.onnxrt import session_runner
from .int8_forms import CONV_OPERATORS, fastest, has_operators, prepare
from .per_row import quantizable_nodes, quantize_per_row
from .smooth import smooth_module, smooth_onnx
from .tuning import tune

# SmoothQuant's migration strength when the tuner tries smoothing (its paper's default).
SMOOTH_ALPHA = 0.5
# On the onnxruntime path, tried in turn: a pretrained MiniLM encoder's per-sentence cosine
# was best at 0.7-0.8 and worse with 0.5 than without smoothing (BENCHMARKS.md), while an
# extreme outlier channel (x1000) needs 0.5.
ONNX_SMOOTH_ALPHAS = (0.8, 0.5)


def _onnx_outputs(path, context) -> np.ndarray:
    return run_chunked(session_runner(path, context.threads), context.sample_inputs, 64)


def _torch_outputs(module, context) -> np.ndarray:
    import torch

    def run(batch):
        with torch.inference_mode():
            return module(*(torch.from_numpy(a) for a in batch.values())).float().numpy()

    return run_chunked(run, context.sample_inputs, 64)


def _smoothed_once(source_path, data: dict, context, alpha: float, folder: str):
    """A source for builders: the ONNX file at ``source_path`` smoothed at ``alpha`` on
    ``data`` on first use (the tuner may never need it), the same file after."""
    smoothed: list[Path] = []

    def source():
        if not smoothed:
            path = context.new_path(f"{folder}/smoothed-{alpha}/model.onnx")
            smooth_onnx(source_path, data, alpha, path)
            smoothed.append(path)
        return smoothed[0]
    return source


def _onnx_tuned(build, alternatives, layers: list[str], params: dict, context):
    """``build``'s candidate, tuned until the gate passes where the recipe asks (``tune``):
    the alternatives whole, then ``layers`` kept in float (``tuning.tune``); the tuner's
    record goes to the lineage."""
    if not params["tune"]:
        return build(frozenset(), None)
    out, record = tune(build, lambda path: context.quality(_onnx_outputs(path, context)), layers, context,
                       params["tune_budget"], alternatives)
    context.record.update(record)
    return out


def _host_form(context) -> str:
    """The int8 form this host's kernels compute exactly (``targets.host``), recorded in
    the lineage with the reason."""
    form, reason = host_int8_form()
    context.record.update(int8_form=form, int8_form_reason=reason)
    return form


def _onnx_weighted_nodes(path, operators=("MatMul", "Gemm", *CONV_OPERATORS)) -> list[str]:
    """Nodes of ``operators`` with a constant weight, largest weight first."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    nodes = [(sizes[n.input[1]], n.name) for n in graph.node
             if n.op_type in operators and len(n.input) > 1 and n.input[1] in sizes and n.name]
    return [name for _, name in sorted(nodes, reverse=True)]


def quantize_conv_dynamic(source, out, excluded: frozenset, only: str | None, reduce_range: bool) -> int:
    """``source``'s Conv nodes with a constant weight as onnxruntime's ``ConvInteger``
    (int8 weights, activations quantized on the fly, one scale per tensor), written to
    ``out``; ``excluded`` stay float, or only ``only`` is quantized (none where it is not
    a Conv). ``reduce_range``: 7-bit weights, for a host whose U8S8 kernel saturates.
    Returns how many were quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    convs = _onnx_weighted_nodes(source, ("Conv",))
    chosen = [only] if only in convs else [] if only else [name for name in convs if name not in excluded]
    if not chosen:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                         reduce_range=reduce_range, nodes_to_quantize=chosen)
    return sum(1 for node in onnx.load(str(out), load_external_data=False).graph.node
               if node.op_type == "ConvInteger")


class Int8Dynamic(Step):
    name = "quantize.int8_dynamic"
    description = "int8 weights with dynamically quantized activations (MatMul/Gemm/Linear), accuracy-aware"
    params = (
        Param("activations", str, "per_row", "onnxruntime: 'per_row' (one scale per token or sample: an answer "
              "does not depend on its batch) or 'per_tensor' (onnxruntime's own, one scale per batch)"),
        Param("per_channel", bool, False, "one weight scale per output channel (onnxruntime per_tensor; per_row "
              "always has one)"),
        Param("tune", bool, True, "keep the most sensitive layers in float until the quality gate passes"),
        Param("tune_budget", int, 12, "most extra candidates built while tuning"),
    )
    forms = {"onnxruntime": ONNX, "torch": TORCH}

    def apply(self, model, params, context):
        if model.form == ONNX:
            return self._onnx(model, params, context)
        return self._torch(model, params, context)

    def _onnx(self, model, params, context):
        if params["activations"] not in ("per_row", "per_tensor"):
            raise StepNotApplicable(f"{self.name}: activations must be 'per_row' or 'per_tensor', "
                                    f"got {params['activations']!r}")
        if params["activations"] == "per_row":
            return self._onnx_per_row(model, params, context)
        return self._onnx_per_tensor(model, params, context)

    def _onnx_per_row(self, model, params, context):
        counter = iter(range(10**6))
        form = _host_form(context)
        source, convs = model.obj, []
        if has_operators(model.obj, ("Conv",)):
            source, context.record["prepared"] = prepare(model.obj, context.new_path("int8_dynamic/prepared.onnx"))
            convs = _onnx_weighted_nodes(source, ("Conv",))

        def builder(source=lambda: source):
            def build(excluded, only):
                folder = f"int8_dynamic/{next(counter)}"
                out = context.new_path(f"{folder}/model.onnx")
                quantized = quantize_per_row(source(), out, excluded, only, form)
                if convs:
                    with_convs = context.new_path(f"{folder}/conv/model.onnx")
                    count = quantize_conv_dynamic(out if quantized else source(), with_convs, excluded, only,
                                                  form == SEVEN_BIT_WEIGHTS)
                    out, quantized = (with_convs, quantized + count) if count else (out, quantized)
                if quantized == 0:
                    raise StepNotApplicable("the model has no Conv, MatMul or Gemm with a constant float32 weight")
                return out
            return build

        def smoothed_builder(alpha):
            data = context.calibration_inputs or context.sample_inputs
            return builder(_smoothed_once(source, data, context, alpha, "int8_dynamic"))

        # SmoothQuant on the graph (one Mul per smoothed activation) before any layer is
        # kept in float (which costs the most); it moves outliers into MatMul/Gemm
        # weights, so a graph of convolutions alone would only be built again as it was.
        products = quantizable_nodes(source)
        alternatives = [(f"smoothed (alpha {alpha})", smoothed_builder(alpha))
                        for alpha in (ONNX_SMOOTH_ALPHAS if products else ())]
        order = {name: rank for rank, name in enumerate(_onnx_weighted_nodes(source))}
        layers = sorted(set(products) | set(convs), key=lambda name: order.get(name, len(order)))
        out = _onnx_tuned(builder(), alternatives, layers, params, context)
        if convs:
            # ConvInteger takes one activation zero point per tensor: a convolution's
            # scale is its whole batch's, the products' stay per row.
            context.record["conv_activations"] = "per_tensor"
        return self._quantized(model, out, context, activations="per_row")

    def _onnx_per_tensor(self, model, params, context):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        counter = iter(range(10**6))
        reduce_range = _host_form(context) == SEVEN_BIT_WEIGHTS

        def names(nodes):
            # onnxruntime rewrites a Gemm into MatMul + Add before quantizing it, and the
            # selection lists are matched against the rewritten node's name.
            return sorted({alias for node in nodes for alias in (node, f"{node}_MatMul")}) or None

        def builder(per_channel, source=lambda: model.obj):
            def build(excluded, only):
                out = context.new_path(f"int8_dynamic/{next(counter)}/model.onnx")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_dynamic(
                        str(source()), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
                        reduce_range=reduce_range,
                        nodes_to_exclude=names(excluded), nodes_to_quantize=names([only]) if only else None,
                    )
                return out
            return build

        def smoothed_builder(alpha):
            data = context.calibration_inputs or context.sample_inputs
            return builder(True, _smoothed_once(model.obj, data, context, alpha, "int8_dynamic"))

        # Per-channel weight scales first (no cost at run time), then SmoothQuant on the
        # graph with them (one Mul per smoothed activation), before any layer is kept in
        # float (which costs the most).
        alternatives = [] if params["per_channel"] else [("per_channel", builder(True))]
        alternatives += [(f"smoothed (alpha {alpha}), per_channel", smoothed_builder(alpha))
                         for alpha in ONNX_SMOOTH_ALPHAS]
        out = _onnx_tuned(builder(params["per_channel"]), alternatives, _onnx_weighted_nodes(model.obj), params,
                          context)
        return self._quantized(model, out, context, activations="per_tensor")

    @staticmethod
    def _quantized(model, out, context, activations: str) -> ModelHandle:
        import onnx

        quantized = sum(1 for node in onnx.load(str(out), load_external_data=False).graph.node
                        if node.op_type in ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                                            "ConvInteger"))
        if quantized == 0:
            raise StepNotApplicable("the model has no operators onnxruntime quantizes dynamically")
        context.record.update(quantized_nodes=quantized, activations=activations)
        return ModelHandle(ONNX, out, model.inputs, dict(model.notes))

    def _torch(self, model, params, context):
        import torch

        if context.device != "cpu":
            # torch.ao's dynamic int8 Linear (quantized::linear_dynamic) has CPU kernels only.
            raise StepNotApplicable(f"{self.name}: PyTorch's dynamic int8 Linear runs on the CPU only, "
                                    f"not on {context.device}")
        linears = sorted(((m.weight.numel(), name) for name, m in model.obj.named_modules()
                          if isinstance(m, torch.nn.Linear)), reverse=True)
        if not linears:
            raise StepNotApplicable("the model has no Linear layers to quantize dynamically")
        names = [name for _, name in linears]

        def builder(module, renamed):
            def build(excluded, only):
                chosen = [only] if only else [n for n in names if n not in excluded]
                qconfig = torch.ao.quantization.default_dynamic_qconfig
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return torch.ao.quantization.quantize_dynamic(
                        module, {renamed.get(name, name): qconfig for name in chosen}, dtype=torch.qint8)
            return build

        cache = {}

        def smoothed(excluded, only):
            # Smoothed once, on first use: the tuner may never need it.
            if not cache:
                data = context.calibration_inputs or context.sample_inputs
                module, renamed, _ = smooth_module(model.obj, model.inputs, data, SMOOTH_ALPHA)
                cache["build"] = builder(module, renamed)
            return cache["build"](excluded, only)

        build = builder(model.obj, {})
        if params["tune"]:
            quantized, record = tune(build, lambda m: context.quality(_torch_outputs(m, context)),
                                     names, context, params["tune_budget"], [("smoothed", smoothed)])
            context.record.update(record)
            kept = len(record.get("kept_in_float", []))
        else:
            quantized, kept = build(frozenset(), None), 0
        context.record["quantized_linears"] = len(names) - kept
        notes = {**model.notes, "serialize": "torchscript"}
        return ModelHandle(TORCH, quantized, model.inputs, notes)


# Calibration runs one row at a time: onnxruntime's calibration session holds every
# intermediate tensor of a batch at once (BERT-base at 128 tokens: 2.5 GiB of peak memory
# at one row, 4.1 at four, 17 at 32), and the ranges it keeps are the same either way.
CALIBRATION_BATCH = 1


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over in-memory batch-first arrays,
    handed over as the model takes them (``InputSpec.to_model``)."""

    def __init__(self, arrays: dict, inputs, batch_size: int):
        total = len(next(iter(arrays.values())))
        self._batches = iter(
            {spec.name: spec.to_model(np.ascontiguousarray(arrays[spec.name][i:i + batch_size])) for spec in inputs}
            for i in range(0, total, batch_size)
        )

    def get_next(self):
        return next(self._batches, None)


class Int8Static(Step):
    name = "quantize.int8_static"
    description = ("int8 weights and uint8 activations, calibrated ahead of time (onnxruntime QDQ or operator "
                   "form, the faster one on conv nets), accuracy-aware")
    params = (
        Param("per_channel", bool, True, "one weight scale per output channel"),
        Param("calibration_rows", int, 256, "rows of calibration data used at most"),
        Param("method", str, "minmax", "calibration: minmax, entropy or percentile (the tuner tries the others "
              "when the gate is missed)"),
        Param("operators", str, "MatMul,Gemm,Conv,ConvTranspose", "operator types quantized (comma-separated; "
              "onnxruntime's names), or 'all' for every one onnxruntime quantizes"),
        Param("form", str, "auto", "'qdq', 'qoperator', or 'auto': on a graph with convolutions each form "
              "(QDQ on the operators above, QDQ on all, the operator form on all) is timed and the fastest that "
              "keeps the gate is kept; elsewhere QDQ"),
        Param("tune", bool, True, "other calibration methods, smoothing, then the most sensitive layers kept in "
              "float until the quality gate passes"),
        Param("tune_budget", int, 8, "most extra candidates built while tuning (each one calibrates again)"),
    )
    forms = {"onnxruntime": ONNX}

    _METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
    _FORMS = ("auto", "qdq", "qoperator")

    def apply(self, model, params, context):
        method = self._METHODS.get(params["method"])
        if method is None:
            raise StepNotApplicable(f"{self.name}: method must be one of {', '.join(self._METHODS)}")
        if params["form"] not in self._FORMS:
            raise StepNotApplicable(f"{self.name}: form must be one of {', '.join(self._FORMS)}, "
                                    f"got {params['form']!r}")
        operators = _operator_list(params["operators"])
        if operators == []:
            raise StepNotApplicable(f"{self.name}: operators names no operator type")
        data = context.calibration_inputs or context.sample_inputs
        rows = min(params["calibration_rows"], len(next(iter(data.values()))))
        data = {name: a[:rows] for name, a in data.items()}
        prepared, prepared_how = prepare(model.obj, context.new_path("int8_static/prepared.onnx"))
        context.record["prepared"] = prepared_how
        counter = iter(range(10**6))
        reduce_range = _host_form(context) == SEVEN_BIT_WEIGHTS

        def builder(quant_format="qdq", types=operators, calibration=method, source=lambda: prepared):
            def build(excluded, only):
                from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

                out = context.new_path(f"int8_static/{next(counter)}/model.onnx")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_static(
                        str(source()), str(out), _Batches(data, model.inputs, batch_size=CALIBRATION_BATCH),
                        quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                        per_channel=params["per_channel"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        calibrate_method=getattr(CalibrationMethod, calibration),
                        nodes_to_exclude=sorted(excluded) or None, nodes_to_quantize=[only] if only else None,
                        op_types_to_quantize=types,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                    )
                return out
            return build

        timed = params["form"] == "auto" and has_operators(prepared, CONV_OPERATORS)
        if timed:
            chosen, build = self._fastest_form(builder, operators, method, prepared, context)
        else:
            chosen = "qoperator" if params["form"] == "qoperator" else "qdq"
            build = builder(chosen)
        quant_format, types = ("qoperator", None) if chosen.startswith("qoperator") else (
            "qdq", None if chosen == "qdq, all operators" else operators)
        # Other calibration methods first (entropy and percentile clip the outliers that
        # stretch a min-max range), then SmoothQuant on the graph's MatMuls (0.5, the
        # paper's strength, then 0.8), then the layers they still wreck stay float.
        alternatives = [(f"{chosen}, {other} calibration", builder(quant_format, types, self._METHODS[other]))
                        for other in self._METHODS if self._METHODS[other] != method]
        alternatives += [(f"{chosen}, smoothed (alpha {alpha})",
                          builder(quant_format, types, method,
                                  _smoothed_once(prepared, data, context, alpha, "int8_static")))
                         for alpha in ((0.5, 0.8) if _onnx_weighted_nodes(prepared, ("MatMul", "Gemm")) else ())]
        out = _onnx_tuned(build, alternatives, _onnx_weighted_nodes(prepared), params, context)
        import onnx

        graph = onnx.load(str(out), load_external_data=False).graph
        quantized = sum(1 for n in graph.node if n.op_type in ("QuantizeLinear", "QLinearConv", "QLinearMatMul"))
        if quantized == 0:
            raise StepNotApplicable("the model has no operators onnxruntime quantizes statically")
        context.record.update(quantize_nodes=quantized, calibration_rows=rows, activations="uint8", form=chosen,
                              calibration="the checkpoint's calibration data" if context.calibration_inputs else "sample inputs")
        return ModelHandle(ONNX, out, model.inputs, dict(model.notes))

    def _fastest_form(self, builder, operators, method, prepared, context):
        """On a graph with convolutions: each int8 form built whole and scored, and the
        fastest that keeps the gate (``int8_forms.fastest``); else the best scored, for
        the tuner to go on with. A form that passes is calibrated by the other methods
        too, and the one that scores best kept: the method changes no kernel, so the
        fidelity costs no speed (on a pretrained YOLOX, percentile ranges took the worst
        held-out image from 0.986 to 0.990). Returns the form's name and a builder that
        hands the kept candidate back for the whole graph, so it is not calibrated twice."""
        shapes = {"qdq": ("qdq", operators), "qdq, all operators": ("qdq", None),
                  "qoperator, all operators": ("qoperator", None)}
        if operators is None:  # 'all' asked for: the first form already is it
            shapes.pop("qdq, all operators")
        built = {}
        for index, (name, shape) in enumerate(shapes.items()):
            context.progress(f"int8 form: {name}", index, len(shapes))
            path = builder(*shape)(frozenset(), None)
            built[name] = (path, context.quality(_onnx_outputs(path, context)))
        first = {name: array[:1] for name, array in context.sample_inputs.items()}
        chosen = fastest(built, context.passes, prepared, _model_feed(prepared, first), context.threads,
                         context.record)
        kept_method = method
        if chosen is None:
            chosen = max(built, key=lambda name: built[name][1])
        else:
            scores = {method: built[chosen][1]}
            for other in self._METHODS.values():
                if other in scores:
                    continue
                context.progress(f"int8 form: {chosen}, {other} calibration", len(scores), len(self._METHODS))
                path = builder(*shapes[chosen], other)(frozenset(), None)
                scores[other] = context.quality(_onnx_outputs(path, context))
                if scores[other] > built[chosen][1]:
                    built[chosen], kept_method = (path, scores[other]), other
            context.record["calibration_methods"] = {name: round(float(q), 6) for name, q in scores.items()}
        context.record["method"] = kept_method
        path, build = built[chosen][0], builder(*shapes[chosen], kept_method)

        def reuse(excluded, only):
            return path if not excluded and only is None else build(excluded, only)
        return chosen, reuse


def _operator_list(text: str) -> list[str] | None:
    """The ``operators`` parameter as onnxruntime takes it: None for every operator."""
    if text.strip().lower() == "all":
        return None
    return [op.strip() for op in text.split(",") if op.strip()]


def _model_feed(path, rows: dict) -> dict:
    """Batch-first ``rows`` as the model at ``path`` takes them (its batch axis per input)."""
    from ..targets.onnxrt import session_feed
    from .int8_forms import _session

    return session_feed(_session(path, 1))(rows)


def _half_module(module, dtype):
    """``module`` in ``dtype``, taking and returning float32 so serving code is unchanged."""
    import torch

    class HalfPrecision(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.to(dtype)
            self.compute_dtype = dtype  # what a later step that unwraps the module keeps

        def forward(self, *inputs):
            cast = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
            return self.inner(*cast).float()

    return HalfPrecision(module).eval()


def unwrap_half_precision(module):
    """``(inner module, its 16-bit type)`` for a model that quantize.bf16/fp16 wrapped,
    ``(module, None)`` for any other: what a later step that needs the model itself takes."""
    dtype = getattr(module, "compute_dtype", None)
    return (module.inner, dtype) if dtype is not None else (module, None)


# Rows a Linear sees per request (at batch 1) from which arithmetic rather than reading
# the weights bounds it on a CPU: a sentence's tokens, not a feature vector's one row.
_ARITHMETIC_ROWS = 16


def _arithmetic_bound(model) -> bool:
    """Whether the model's products are bound by arithmetic at batch 1: one that generates
    is served by decoding (one row a token); else by the rows a request brings (token ids
    are one row each; a float input's last axis is its features)."""
    if any(callable(getattr(m, "can_generate", None)) and m.can_generate() for m in model.obj.modules()):
        return False
    rows = [int(np.prod(spec.shape[1:] if spec.dtype.startswith(("int", "uint")) else spec.shape[1:-1]))
            for spec in model.inputs]
    return max(rows, default=1) >= _ARITHMETIC_ROWS


class HalfPrecision(Step):
    """Weights and activations in a 16-bit float type (torch). Whether the target runs it
    faster is for the measurement to say: on CPUs it halves the bytes read per token even
    without native 16-bit arithmetic, which is what bounds small-batch latency. Except on
    a CPU where the host probe (``targets.host``) found the type's products far slower
    than float32's where the model's are bound the same way: not built (a BERT-base in
    bf16 was timed for minutes at 5.4x its float32 latency on such a host)."""

    forms = {"torch": TORCH}
    dtype_name = ""

    def apply(self, model, params, context):
        import torch

        if context.device == "cpu":
            reason = half_precision_reason(host_probe(), self.dtype_name, _arithmetic_bound(model))
            if reason:
                raise StepNotApplicable(f"{self.name}: {reason}")
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
