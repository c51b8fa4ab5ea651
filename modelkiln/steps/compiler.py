"""Built-in compile step: ``torch.compile`` (TorchInductor) where the artifact is served.

A compiled module cannot be saved as such: an AOTInductor package would be the way, but
loading one crashed on the GPU machine's torch (2.11) in our trials. So the artifact stays
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

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import SHARDED, TORCH, ModelHandle, Param, Step

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


@hookimpl
def kiln_steps():
    return [Inductor()]
