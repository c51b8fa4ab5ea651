"""Built-in prune steps.

``prune.structured``: removes whole channels (Linear output features, Conv output
channels) so the dense model really shrinks, following the dependencies between layers
with torch-pruning's dependency graph so the model stays valid. Layers that produce the
model's output keep their width; attention projections are left whole (MLP width and
channels are pruned, heads are not yet). Where unlabelled data exists it is followed by a
short recovery fine-tune distilled from the original model.

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
from .training import distill, training_data


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


# Module names of attention projections, whose widths must stay multiples of the head
# size: left whole until head pruning is supported.
_ATTENTION_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "attention.output.dense",
                    "c_attn", "qkv")


def _output_width_layers(module, example, names: dict) -> list:
    """Layers whose width is the model's output width, or that look like attention."""
    import torch
    import torch.nn as nn

    with torch.no_grad():
        out = module(*example)
    width = out.shape[-1]
    channels = out.shape[1] if out.ndim > 2 else None
    keep = []
    for m in module.modules():
        name = names.get(m, "")
        if isinstance(m, nn.Linear) and m.out_features == width:
            keep.append(m)
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels in (width, channels):
            keep.append(m)
        elif isinstance(m, nn.Linear) and any(name.endswith(a) for a in _ATTENTION_NAMES):
            keep.append(m)
    return keep


class Structured(Step):
    name = "prune.structured"
    description = "remove whole channels / MLP width (torch-pruning), then a distilled recovery fine-tune"
    params = (
        Param("amount", float, 0.5, "share of channels removed from each prunable layer, in [0, 1)"),
        Param("recovery_steps", int, 300, "fine-tune steps distilled from the original; 0 for none"),
        Param("learning_rate", float, 1e-3, "of the recovery fine-tune"),
    )
    forms = {"onnxruntime": TORCH, "torch": TORCH}

    def apply(self, model, params, context):
        import copy

        import torch
        import torch_pruning as tp

        amount = params["amount"]
        if not 0 <= amount < 1:
            raise StepNotApplicable(f"{self.name}: amount must be in [0, 1), got {amount}")
        module = model.obj
        teacher = copy.deepcopy(module).eval()
        samples = context.sample_inputs
        example = tuple(torch.from_numpy(samples[spec.name][:2]) for spec in model.inputs)
        names = {m: n for n, m in module.named_modules()}
        before = sum(p.numel() for p in module.parameters())
        pruner = tp.pruner.MetaPruner(
            module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=amount, ignored_layers=_output_width_layers(module, example, names),
        )
        pruner.step()
        after = sum(p.numel() for p in module.parameters())
        if after == before:
            raise StepNotApplicable("no layer of this model could be pruned structurally")
        try:
            with torch.no_grad():
                module(*example)
        except Exception as exc:
            raise StepNotApplicable(f"the pruned model no longer runs ({exc})") from None
        record = {"parameters_before": before, "parameters_after": after}
        data, source = training_data(context)
        if params["recovery_steps"] > 0:
            record["recovery_loss"] = distill(module, teacher, data, params["recovery_steps"],
                                              params["learning_rate"])
            record["recovery_data"] = source
        context.record.update(record)
        return ModelHandle(TORCH, module, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [Magnitude(), Structured()]
