"""What onnxruntime's int8 needs around it on graphs of any operator mix (conv nets above
all): the graph made ready to quantize, and among several int8 forms the one this host
runs fastest, found by timing them.

Pre-processing. Exported vision models are not what the quantizer reads well: a
PaddlePaddle export holds its weights as ``Constant`` nodes, which the quantizer cannot
take as weights (it quantized none of a PaddleOCR detector's 62 Convs); an opset below 13
has no per-channel ``DequantizeLinear`` (onnxruntime's own ``quantize_static`` then writes
a model that does not load: ``Unrecognized attribute: axis``); and symbolic shape
inference gives up on graphs whose every dimension varies. So the opset is raised to 13,
then onnxruntime's pre-processing runs (constant folding, Conv+BatchNorm and other
fusions, shape inference), with ONNX's own shape inference where the symbolic one fails.

Forms. Which of the int8 forms is fastest is the host's and the graph's to say, not a
rule: on a conv net whose convolutions are joined by SiLU (Sigmoid, Mul), quantizing the
convolutions alone leaves a dequantize and a quantize around every activation, while
quantizing every operator onnxruntime can keeps chains in int8 but adds its own
boundaries; onnxruntime's operator form (``QLinearConv``) runs other kernels than its QDQ
form. So each form that keeps the quality gate is timed, interleaved, on one sample row,
and the fastest is kept (:func:`fastest`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

# Per-channel QuantizeLinear/DequantizeLinear (their ``axis``) came with opset 13.
PER_CHANNEL_OPSET = 13
# Operators that carry a conv net's time and that onnxruntime quantizes with a weight.
CONV_OPERATORS = ("Conv", "ConvTranspose")


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def has_operators(path: Path, operators) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in operators for node in graph.node)


def prepare(source: Path, out: Path) -> tuple[Path, list[str]]:
    """``source`` made ready to quantize, written to ``out`` (or ``source`` itself where
    nothing could be done), and what was done, for the lineage. Never fails: every stage
    is an optimisation, and the model as it is can still be quantized."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    done = []
    current = source
    model = onnx.load(str(source), load_external_data=False)
    opset = default_opset(model)
    if opset < PER_CHANNEL_OPSET:
        from onnx import version_converter

        try:
            raised = version_converter.convert_version(onnx.load(str(source)), PER_CHANNEL_OPSET)
            current = out.with_name(f"opset{PER_CHANNEL_OPSET}.onnx")
            onnx.save_model(raised, str(current))
            done.append(f"opset {opset} raised to {PER_CHANNEL_OPSET}")
        except Exception as exc:  # the reason goes to the lineage
            done.append(f"opset {opset} kept ({type(exc).__name__}: {exc})"[:200])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for symbolic in (True, False):
            try:
                quant_pre_process(str(current), str(out), skip_symbolic_shape=not symbolic)
            except Exception:  # the next way, or the model as it is
                continue
            done.append("onnxruntime pre-processing (constant folding, fusions, "
                        f"{'symbolic' if symbolic else 'ONNX'} shape inference)")
            return out, done
    done.append("onnxruntime pre-processing failed: quantized as it is")
    return current, done


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_forms(paths: dict[str, Path], feed: dict, threads: int, budget_seconds: float = 20.0) -> dict[str, float]:
    """Median ms of one call of each model in ``paths`` (name -> file) on ``feed`` (as the
    model takes it), the models taking turns so that a busy moment of a shared host falls
    on every one; at most about ``budget_seconds`` in all, and at least three rounds."""
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # first calls plan memory and pack weights
        session.run(None, feed)
    started = time.perf_counter()
    rounds = 0
    while rounds < 3 or (time.perf_counter() - started < budget_seconds and rounds < 15):
        for name, session in sessions.items():
            begin = time.perf_counter()
            session.run(None, feed)
            times[name].append((time.perf_counter() - begin) * 1e3)
        rounds += 1
    return {name: round(float(np.median(t)), 3) for name, t in times.items()}


def fastest(candidates: dict[str, tuple[Path, float]], passes, reference: Path, feed: dict, threads: int,
            record: dict) -> str | None:
    """The name of the fastest of ``candidates`` (name -> (file, quality)) whose quality
    ``passes`` the gate, timed against each other and ``reference`` (the float model);
    None when none passes. What was timed goes to ``record``."""
    passing = {name: path for name, (path, quality) in candidates.items() if passes(quality)}
    record["int8_forms"] = {name: {"quality": round(float(quality), 6), "passes": name in passing}
                            for name, (_, quality) in candidates.items()}
    if not passing:
        return None
    if len(passing) == 1:
        return next(iter(passing))
    timed = time_forms({**passing, "float": reference}, feed, threads)
    for name, ms in timed.items():
        record["int8_forms"].setdefault(name, {})["ms"] = ms
    return min(passing, key=lambda name: timed[name])
