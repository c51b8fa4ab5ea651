"""How a loaded program is compiled (``compile.inductor``): in the measurement, in every
rank of a sharded variant, and in serving code alike.

The compile step names a ``torch.compile`` mode; the artifact records the Inductor
options that mode stands for plus coordinate-descent tuning of the generated kernels'
launch parameters (block sizes, warps), and serving code passes them as they are:
``torch.compile(module, dynamic=False, options=serving["compile"]["options"])``.
Measured on an H200, the tuning took a Llama-2-7B-shaped decoding step (bf16, CUDA
graphs) from 5.13 to 4.68 ms per token: a decoding step is some 500 small kernels (norms,
rotary embeddings, cache writes) around its matrix products, and the default launch
parameters leave those kernels slower than they need be. It costs compile time (63 s
to 112 s there), paid once per input shape when the variant loads.
"""

from __future__ import annotations


def compile_options(mode: str) -> dict:
    """Inductor's options for ``torch.compile`` ``mode``, with coordinate-descent tuning."""
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode, dynamic=False), "coordinate_descent_tuning": True}


def serving_entry(mode: str) -> dict:
    """What ``serving.json`` and ``plan.json`` record of the compilation."""
    return {"mode": mode, "options": compile_options(mode), "dynamic": False}


def compile_loaded(module, compile_as: dict):
    """``module`` compiled as ``compile_as`` (a ``serving_entry``) says."""
    import torch

    if "options" in compile_as:
        return torch.compile(module, dynamic=False, options=compile_as["options"])
    return torch.compile(module, mode=compile_as["mode"], dynamic=False)  # recorded before options were
