"""Serving a 2:4-sparse variant (``prune.sparse24``) with the sparse kernels.

The program holds its masked weights dense and answers anywhere as it is. On a GPU with
sparse tensor cores, every 16-bit 2-D weight whose groups of four along the input
dimension hold at most two non-zeros (and whose widths the kernels take) is replaced by
``torch.sparse.to_sparse_semi_structured(weight)``; the Linear products then run on
cuSPARSELt.

Then the model runs as CUDA graphs, one per input shape: cuSPARSELt builds its plan on
the host at every call, which only a replayed graph skips. Inductor's own CUDA graphs
leave a model holding these tensor subclasses out, so a compiled variant is compiled
without them and captured here, the one form that beat dense (BENCHMARKS.md, "Figures
behind the code").
"""

from __future__ import annotations

import threading
from collections import OrderedDict

# serving.json's key naming a 2:4-sparse program.
SERVING_KEY = "sparse24"
# The kernels (cuSPARSELt, 16-bit) take weights whose widths are multiples of this.
KERNEL_MULTIPLE = 16
# Input shapes whose CUDA graphs are kept; the oldest goes when another is captured.
GRAPHS_KEPT = 16


def has_pattern(weight) -> bool:
    """Whether ``weight`` holds at most two non-zeros in every four along its rows."""
    if weight.ndim != 2 or weight.shape[1] % 4 or not weight.any():
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(1) <= 2).all())


def kernel_widths(rows: int, columns: int) -> bool:
    """Whether the sparse kernels take a weight of ``rows`` x ``columns``."""
    return not rows % KERNEL_MULTIPLE and not columns % KERNEL_MULTIPLE


def kernels_take(weight, any_dtype: bool = False) -> bool:
    """Whether the sparse kernels take ``weight``: 2-D, 16-bit (or ``any_dtype``), widths
    multiples of KERNEL_MULTIPLE, the 2:4 pattern."""
    import torch

    return ((any_dtype or weight.dtype in (torch.float16, torch.bfloat16)) and weight.ndim == 2
            and kernel_widths(*weight.shape) and has_pattern(weight))


def patterned(module, any_dtype: bool = False) -> int:
    """How many weights of ``module`` the sparse kernels would take (16-bit, or of
    ``any_dtype``, with the 2:4 pattern and widths the kernels take)."""
    return sum(kernels_take(w, any_dtype) for w in module.parameters())


def sparsify(module) -> int:
    """Replace each 2:4-patterned 16-bit weight of ``module`` (on a GPU) by its
    semi-structured sparse form, in place; returns how many were replaced."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    replaced = 0
    for name, weight in list(module.named_parameters()):
        if not weight.is_cuda or not kernels_take(weight):
            continue
        owner, _, attr = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        sparse = to_sparse_semi_structured(weight.detach().contiguous())
        setattr(holder, attr, torch.nn.Parameter(sparse, requires_grad=False))
        replaced += 1
    return replaced


def uncompiled_graphs(compile_as: dict) -> dict:
    """``compile_as`` (a compiled.serving_entry) with Inductor's CUDA graphs off: the
    graphs are captured around the compiled model instead (see CudaGraphs)."""
    options = {**compile_as.get("options", {}), "triton.cudagraphs": False}
    return {**compile_as, "options": options}


class CudaGraphs:
    """``module`` (tensors in, one tensor out) replayed from one CUDA graph per input
    shape and dtype; the first call of a shape warms the module up on a side stream and
    captures it. Every answer is a fresh tensor (the graph's own output is overwritten by
    the next replay); callers on several threads take turns (a graph's inputs are shared)."""

    def __init__(self, module) -> None:
        self.module = module
        self.graphs: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, *inputs):
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        with self.lock:
            entry = self.graphs.get(key)
            if entry is None:
                entry = self.graphs[key] = self._capture(inputs)
                while len(self.graphs) > GRAPHS_KEPT:
                    self.graphs.popitem(last=False)
            graph, static_inputs, static_output = entry
            for static, given in zip(static_inputs, inputs):
                static.copy_(given)
            graph.replay()
            return static_output.clone()

    def _capture(self, inputs):
        import torch

        static_inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compiles, tunes and plans outside the graph
                self.module(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.module(*static_inputs)
        return graph, static_inputs, static_output
