"""Built-in prune steps.

``prune.magnitude``: global unstructured magnitude pruning of Linear and Conv weights.
The smallest weights across all those layers are set to zero and the pruning is made
permanent (no masks or hooks remain in the artifact); the sparsity actually reached is
recorded. Dense kernels run no faster on zeros: its value is for sparse runtimes and as
the first step of a chain (e.g. followed by quantization, whose int8 weights then
compress better).
"""

from __future__ import annotations

from ..errors import StepNotApplicable
from . import hookimpl
from .api import TORCH, ModelHandle, Param, Step


def _prunable(module):
    import torch.nn as nn

    return [(m, "weight") for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


class Magnitude(Step):
    name = "prune.magnitude"
    description = "global unstructured magnitude pruning of Linear/Conv weights, made permanent"
    params = (Param("amount", float, 0.5, "share of those weights set to zero, in [0, 1)"),)
    # Pruned in the module, before a runtime exports it.
    forms = {"onnxruntime": TORCH, "torch": TORCH}

    def apply(self, model, params, context):
        import torch
        import torch.nn.utils.prune as prune

        amount = params["amount"]
        if not 0 <= amount < 1:
            raise StepNotApplicable(f"{self.name}: amount must be in [0, 1), got {amount}")
        targets = _prunable(model.obj)
        if not targets:
            raise StepNotApplicable("the model has no Linear or Conv layers to prune")
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in targets:
            prune.remove(module, name)  # bake the mask into the weight: a plain module again
        with torch.no_grad():
            zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
            total = sum(m.weight.numel() for m, _ in targets)
        context.record.update(sparsity=zeros / total, pruned_layers=len(targets), weights=total)
        return ModelHandle(TORCH, model.obj, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [Magnitude()]
