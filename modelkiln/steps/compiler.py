"""Built-in compile steps: ``torch.compile`` (TorchInductor) where the artifact is served,
and onnxruntime's session tuned for the host (``compile.onnxruntime``, below).

A compiled module cannot be saved as such: an AOTInductor package would be the way, but
one could not be loaded back where it was tried (BENCHMARKS.md, "Figures behind the
code"). So the artifact stays
the portable ``torch.export`` program, and ``serving.json`` beside it tells serving code
to compile it once loaded, with the recorded mode and Inductor options, exactly as the
measurement does: ``torch.compile(torch.export.load(path).module(), dynamic=False,
options=...)`` (``targets/compiled.py``). A tensor-parallel variant (``shard.tensor_parallel``
first) records them in ``plan.json`` and each rank compiles its own programs: the
all-reduces are functional collectives inside the rank's graph, so with CUDA graphs a
decoding step is one graph replay per rank, NCCL calls included. The first calls of each
input shape pay the compilation (seconds to minutes); the warm-up runs absorb it.

``reduce-overhead`` (the default) adds CUDA graphs: one replay per call instead of a
launch per kernel, which is where batch-1 latency goes on a GPU.

Shapes are compiled static (``dynamic=False``): one graph, and one CUDA graph, per input
shape the service sees (each batch size; a prompt's prefill and a decoding step), each
specialised for its shape instead of one graph with a symbolic dimension.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import ONNX, SHARDED, TORCH, ModelHandle, Param, Step

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class Inductor(Step):
    name = "compile.inductor"
    description = "torch.compile the served program at load (TorchInductor kernels; CUDA graphs by default)"
    params = (Param("mode", str, "reduce-overhead", f"torch.compile mode: {', '.join(MODES)}"),)
    # A sharded variant is compiled rank by rank, its all-reduces inside each rank's graph.
    forms = {"torch": (TORCH, SHARDED)}

    def apply(self, model, params, context):
        mode = params["mode"]
        if mode not in MODES:
            raise StepNotApplicable(f"{self.name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode in CUDA_GRAPH_MODES and not context.device.startswith("cuda"):
            raise StepNotApplicable(f"{self.name}: mode {mode!r} uses CUDA graphs; target {context.target} "
                                    f"is {context.device} (use mode='default' there)")
        if model.notes.get("serialize") == "torchscript":
            raise StepNotApplicable(f"{self.name}: this model is saved as TorchScript, which torch.compile does not take")
        context.record.update(mode=mode)
        return ModelHandle(model.form, model.obj, model.inputs, {**model.notes, "compile": mode})


class OnnxSession(Step):
    """onnxruntime's session as this host runs the model fastest.

    The graph optimisations onnxruntime applies at every load are applied once, offline,
    and saved (level "extended": its "all" level adds layouts for the CPU it runs on, which
    a serving host of another kind could not read; the serving session still applies them
    at load). Then the settings a serving team would otherwise guess are timed on the
    host, taking turns on one sample row: intra-op threads (the target's, or one: a small
    model loses more to waking a second thread than it gains), whether idle threads spin
    (they hold a core a busy host needs), and the parallel executor for graphs with
    independent branches. The fastest, by more than :data:`_MARGIN` over onnxruntime's
    defaults, goes to ``serving.json``, which the measurement and serving code both read
    (``targets.onnxrt.session_options``).
    """

    name = "compile.onnxruntime"
    description = ("onnxruntime: graph optimisations saved offline; threads, spinning and execution mode chosen by "
                   "timing on this host (serving.json)")
    params = (Param("seconds", float, 10.0, "time spent timing the settings, at most"),)
    forms = {"onnxruntime": ONNX}

    # A setting must beat onnxruntime's defaults by this much to replace them: on a shared
    # host smaller differences are noise.
    _MARGIN = 0.03

    def apply(self, model, params, context):
        import onnx
        import onnxruntime as ort

        from ..targets.onnxrt import SESSION_KEY, session_feed, session_options

        optimized = context.new_path("session/model.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        if sum(f.stat().st_size for f in Path(model.obj).parent.iterdir() if f.is_file()) > 1_800_000_000:
            # Past protobuf's limit the weights go beside the optimised graph.
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             optimized.name + ".data")
        before = len(onnx.load(str(model.obj), load_external_data=False).graph.node)
        ort.InferenceSession(str(model.obj), options, providers=["CPUExecutionProvider"])
        after = len(onnx.load(str(optimized), load_external_data=False).graph.node)

        threads = max(1, context.threads)
        candidates = {"onnxruntime's defaults": {"intra_op_num_threads": threads}}
        if threads > 1:
            candidates["one thread"] = {"intra_op_num_threads": 1}
        candidates["threads do not spin"] = {"intra_op_num_threads": threads, "allow_spinning": False}
        if threads > 1:
            candidates["parallel executor"] = {"intra_op_num_threads": max(1, threads // 2),
                                               "inter_op_num_threads": 2, "execution_mode": "parallel"}
        sessions = {name: ort.InferenceSession(str(optimized), session_options(settings, threads),
                                               providers=["CPUExecutionProvider"])
                    for name, settings in candidates.items()}
        first = {name: array[:1] for name, array in context.sample_inputs.items()}
        feed = session_feed(next(iter(sessions.values())))(first)
        times = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, feed)
        started, rounds = time.perf_counter(), 0
        while rounds < 3 or (time.perf_counter() - started < params["seconds"] and rounds < 50):
            context.progress("timing session settings", rounds, 50)
            for name, session in sessions.items():  # in turns: a busy moment falls on every one
                begin = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - begin) * 1e3)
            rounds += 1
        medians = {name: round(float(np.median(t)), 3) for name, t in times.items()}
        default = "onnxruntime's defaults"
        best = min(medians, key=medians.get)
        if medians[best] > (1 - self._MARGIN) * medians[default]:
            best = default
        context.record.update(offline_optimization=f"{before} nodes -> {after}", session=best,
                              session_ms=medians, session_rounds=rounds)
        notes = {**model.notes, SESSION_KEY: {"intra_op_num_threads": threads, **candidates[best]}}
        return ModelHandle(ONNX, optimized, model.inputs, notes)


@hookimpl
def kiln_steps():
    return [Inductor(), OnnxSession()]
