"""Built-in distill steps.

``distill.depth``: a shallower student made from the teacher itself, as DistilBERT was:
the model's longest stack of repeated blocks (a ModuleList or Sequential of same-type
modules, such as a transformer's layers) keeps every k-th block, each initialised from
the teacher's weights, and the student is then trained by knowledge distillation on
unlabelled inputs for a step and time budget set in the recipe.
"""

from __future__ import annotations

import copy

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import TORCH, ModelHandle, Param, Step
from .training import distill, expected_training_seconds, training_data


def _repeated_stack(module):
    """(parent, attribute name, blocks) of the longest container of same-type blocks."""
    import torch.nn as nn

    best = None
    for parent in module.modules():
        for name, child in parent.named_children():
            if not isinstance(child, (nn.ModuleList, nn.Sequential)) or len(child) < 2:
                continue
            blocks = list(child)
            if len({type(b) for b in blocks}) != 1 or isinstance(blocks[0], (nn.Linear, nn.ReLU)):
                continue  # a plain MLP's layers are not a stack of blocks
            if best is None or len(blocks) > len(best[2]):
                best = (parent, name, blocks)
    return best


def _layer_count_attributes(module, old: int, new: int) -> list[str]:
    """Update counters that mirror the stack's length (num_layers, config.num_hidden_layers)."""
    changed = []
    for m in module.modules():
        for attr in ("num_layers", "num_hidden_layers", "n_layer"):
            if getattr(m, attr, None) == old:
                setattr(m, attr, new)
                changed.append(attr)
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None) == old:
            config.num_hidden_layers = new
            changed.append("config.num_hidden_layers")
    return changed


class Depth(Step):
    name = "distill.depth"
    description = "keep every k-th block of the repeated stack (teacher-initialised), then distill"
    params = (
        Param("keep_every", int, 2, "keep one block in this many (2 halves the depth)"),
        Param("steps", int, 500, "distillation steps"),
        Param("learning_rate", float, 1e-4, "of the distillation"),
        Param("max_seconds", float, 0.0, "time budget of the distillation; 0: a minute plus a second per 2M "
                                         "parameters, at most 15 min"),
    )
    forms = {"onnxruntime": TORCH, "torch": TORCH}

    def expected_seconds(self, params, baseline_seconds, size_bytes):
        return baseline_seconds + expected_training_seconds(params["max_seconds"], size_bytes)

    def apply(self, model, params, context):
        import torch.nn as nn

        keep_every = params["keep_every"]
        if keep_every < 2:
            raise StepNotApplicable(f"{self.name}: keep_every must be at least 2, got {keep_every}")
        teacher = model.obj
        student = copy.deepcopy(teacher)
        stack = _repeated_stack(student)
        if stack is None:
            raise StepNotApplicable("the model has no stack of repeated blocks to make shallower")
        parent, name, blocks = stack
        kept = blocks[keep_every - 1::keep_every]
        if not kept:
            raise StepNotApplicable(f"the stack has {len(blocks)} blocks; keep_every={keep_every} keeps none")
        container = type(getattr(parent, name))
        setattr(parent, name, container(kept) if container is nn.ModuleList else nn.Sequential(*kept))
        counters = _layer_count_attributes(student, len(blocks), len(kept))
        data, source = training_data(context)
        trained = distill(student, teacher, data, params["steps"], params["learning_rate"],
                          max_seconds=params["max_seconds"], context=context)
        context.record.update({f"distill_{k}": v for k, v in trained.items() if v is not None})
        context.record.update(
            blocks_before=len(blocks), blocks_after=len(kept), distill_data=source,
            parameters_before=sum(p.numel() for p in teacher.parameters()),
            parameters_after=sum(p.numel() for p in student.parameters()), updated=counters,
        )
        return ModelHandle(TORCH, student, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [Depth()]
