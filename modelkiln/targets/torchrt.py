"""The PyTorch runtime: artifacts load with plain torch.

A ``torch.export`` program (``model.pt2``) where export can carry the model, and a
TorchScript archive (``model.pt``) where it cannot (torch.ao quantized modules), so
serving code needs ``torch.export.load`` or ``torch.jit.load`` and nothing of modelkiln.
A tensor-parallel variant is one ``torch.export`` program per rank plus ``plan.json``
(see ``sharded.py``).
"""

from __future__ import annotations

import warnings

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import SHARDED, TORCH, Runtime
from . import sharded

EXPORT_FILE = "model.pt2"
SCRIPT_FILE = "model.pt"


def example_args(model, batch: int = 2):
    import torch

    args = []
    for spec in model.inputs:
        shape = [batch, *spec.shape[1:]]
        if spec.dtype.startswith("int"):
            args.append(torch.zeros(shape, dtype=getattr(torch, spec.dtype)))
        else:
            args.append(torch.randn(shape, dtype=getattr(torch, spec.dtype)))
    return tuple(args)


def dynamic_batch(module, args) -> tuple:
    """A dynamic batch dimension for every input, shaped like ``forward``'s signature:
    torch.export wants the specs of ``forward(self, *inputs)`` nested in one tuple."""
    import inspect

    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    specs = tuple({0: batch} for _ in args)
    kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    return (specs,) if kinds == [inspect.Parameter.VAR_POSITIONAL] else specs


class TorchRuntime(Runtime):
    name = "torch"
    description = "PyTorch eager on the CPU; artifact torch.export model.pt2 or TorchScript model.pt"
    devices = ("cpu",)
    form = TORCH

    def convert(self, model, context):
        if model.form not in (TORCH, SHARDED):
            raise StepNotApplicable(f"an {model.form} model has no PyTorch module to serve with torch")
        return model

    def save(self, model, directory):
        import torch

        if model.form == SHARDED:
            return sharded.save(model, directory)
        args = example_args(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model.notes.get("serialize") != "torchscript":
                try:
                    program = torch.export.export(model.obj, args, dynamic_shapes=dynamic_batch(model.obj, args))
                    torch.export.save(program, str(directory / EXPORT_FILE))
                    return EXPORT_FILE
                except Exception:
                    pass  # fall back to TorchScript below
            with torch.inference_mode():
                traced = torch.jit.trace(model.obj, args, check_trace=False)
            torch.jit.save(traced, str(directory / SCRIPT_FILE))
        return SCRIPT_FILE

    def load(self, directory, file, device, threads):
        import torch

        if file == sharded.PLAN_FILE:
            return sharded.load(directory, device, threads)
        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if file.endswith(".pt2"):
                module = torch.export.load(str(directory / file)).module()
            else:
                module = torch.jit.load(str(directory / file), map_location=device)
                module.eval()

        def run(inputs: dict):
            with torch.inference_mode():
                out = module(*(torch.from_numpy(v) for v in inputs.values()))
            return out.numpy()

        return run


@hookimpl
def kiln_runtimes():
    return [TorchRuntime()]
