"""Built-in distill steps.

``distill.depth``: a shallower student made from the teacher itself, as DistilBERT was:
the model's longest stack of repeated blocks (a ModuleList or Sequential of same-type
modules, such as a transformer's layers) keeps every k-th block, each initialised from
the teacher's weights, and the student is then trained by knowledge distillation on
unlabelled inputs for a step and time budget set in the recipe.

``distill.width``: a narrower student of the same depth, as Minitron's width pruning
makes one: each MLP keeps its most important hidden units and each attention block its
most important heads, importance measured on the checkpoint's own data (how much each
unit's activation, times the weights that read it, carries on real inputs: a weight's
size alone says little of a pretrained model), the kept weights copied from the teacher
and each narrowed layer refitted on those activations, so that the units it keeps stand
in for the dropped ones where they can. The student is then distilled with every
block's output fitted to the teacher's (the hidden width is the teacher's, so each block
has a target).
"""

from __future__ import annotations

import copy

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import MASK, TORCH, ModelHandle, Param
from .training import TrainingStep, budget_of, budget_params, distill, example_inputs, real_tokens, training_data


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


class Depth(TrainingStep):
    name = "distill.depth"
    description = "keep every k-th block of the repeated stack (teacher-initialised), then distill"
    params = (
        Param("keep_every", int, 2, "keep one block in this many (2 halves the depth)"),
        Param("steps", int, 500, "distillation steps"),
        Param("learning_rate", float, 1e-4, "of the distillation"),
        *budget_params("distillation"),
    )

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
                          context=context, **budget_of(params))
        context.record.update({f"distill_{k}": v for k, v in trained.items() if v is not None})
        context.record.update(
            blocks_before=len(blocks), blocks_after=len(kept), distill_data=source,
            parameters_before=sum(p.numel() for p in teacher.parameters()),
            parameters_after=sum(p.numel() for p in student.parameters()), updated=counters,
        )
        return ModelHandle(TORCH, student, model.inputs, dict(model.notes))


# Tokens of activations kept per layer to refit its narrowed weights on.
REFIT_TOKENS = 8192
# How strongly the refit is held to the original weights, as a share of the kept
# activations' mean square. On all-MiniLM-L6-v2 with half its MLP units and heads gone, before distillation: mean
# pooled cosine 0.59 without the refit, 0.48 / 0.74 / 0.75 / 0.72 with a damping of
# 0.01 / 0.1 / 1 / 3.
REFIT_DAMPING = 1.0


def _activations(module, splits, inputs: dict, rows: int = 256) -> list:
    """Per split, the activations reaching its row Linear on up to ``rows`` samples of
    ``inputs``, one row per real token (padding left out), at most REFIT_TOKENS."""
    import torch

    arrays = {name: torch.from_numpy(a[:rows]) for name, a in inputs.items()}
    mask = arrays.get(MASK)
    seen: list[list[torch.Tensor]] = [[] for _ in splits]

    def hook(index):
        def keep(layer, args):
            seen[index].append(real_tokens(args[0].detach().float(), mask))
        return keep

    handles = [module.get_submodule(split.row).register_forward_pre_hook(hook(i)) for i, split in enumerate(splits)]
    try:
        with torch.no_grad():
            module(*arrays.values())
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts)[:REFIT_TOKENS] for parts in seen]


def _importance(layer, x):
    """Each input unit's importance to ``layer``: the mean |activation| it receives on
    real tokens times the norm of the weights that read it."""
    return x.abs().mean(0) * layer.weight.detach().float().norm(dim=0)


def _refit(layer, x, kept):
    """``layer`` reading only units ``kept``, its weights and bias refitted by least
    squares so that its outputs on activations ``x`` stay as near the original's as
    those units allow (what the dropped units contributed on average moves into the
    bias, and the kept units take over what they can of the rest)."""
    import torch

    from .prune import _sliced

    weight = layer.weight.detach().float()
    target = x @ weight.T  # the layer's output on real activations, bias aside
    design = x[:, kept]
    if layer.bias is not None:
        design = torch.cat([design, torch.ones(len(x), 1)], 1)
    # Ridge towards the original weights (not towards zero): where the kept units cannot
    # stand in for the dropped ones, the fit stays near what the teacher had instead of
    # reaching for large weights that only fit these few thousand tokens.
    damping = REFIT_DAMPING * float(design.pow(2).sum(0).mean())
    prior = torch.zeros(design.shape[1], target.shape[1])
    prior[:len(kept)] = weight[:, kept].T
    gram = design.T @ design + damping * torch.eye(design.shape[1])
    solution = torch.linalg.solve(gram, design.T @ target + damping * prior)
    new = _sliced(layer, columns=kept)
    with torch.no_grad():
        new.weight.copy_(solution[:len(kept)].T.to(new.weight.dtype))
        if new.bias is not None:
            new.bias.add_(solution[-1].to(new.bias.dtype))
    return new


def _narrow(module, split, kept, x) -> None:
    """Keep only units ``kept`` (sorted indices into the split's width): the column
    Linears' outputs and the row Linear's inputs, refitted on activations ``x``."""
    import torch

    from .prune import _sliced

    kept = torch.tensor(kept)
    for path in split.columns:
        module.set_submodule(path, _sliced(module.get_submodule(path), rows=kept))
    row = module.get_submodule(split.row)
    module.set_submodule(split.row, _refit(row, x, kept))


def _keep_count(width: int, share: float, multiple: int) -> int:
    """How many of ``width`` units to keep when ``share`` goes: at least one ``multiple``,
    a whole number of them (kernels like widths in multiples of 8)."""
    kept = round(width * (1 - share) / multiple) * multiple
    return max(multiple, min(width, kept))


class Width(TrainingStep):
    name = "distill.width"
    description = ("narrower MLPs and fewer attention heads, kept by their importance on the checkpoint's data "
                   "(same depth, teacher-initialised), then distilled block by block")
    params = (
        Param("mlp", float, 0.5, "share of every MLP's hidden units removed, in [0, 1)"),
        Param("heads", float, 0.5, "share of every attention block's heads removed, in [0, 1) (multi-head "
                                   "attention; grouped-query blocks keep theirs)"),
        Param("steps", int, 2000, "distillation steps"),
        Param("learning_rate", float, 2e-4, "of the distillation"),
        *budget_params("distillation"),
    )

    def apply(self, model, params, context):
        import torch

        from .shard import find_head_splits, find_splits

        mlp, heads = params["mlp"], params["heads"]
        self.check_shares(mlp=mlp, heads=heads)
        teacher = model.obj
        student = copy.deepcopy(teacher).eval()
        example = example_inputs(model, context)
        with torch.no_grad():
            mlps = find_splits(student, example, 1) if mlp > 0 else []
        stack = _repeated_stack(student)
        if stack is not None:
            # The blocks' MLPs only: a head's Linear -> tanh -> Linear (BERT's pooler and
            # classifier) has the same shape and is no MLP to narrow.
            paths = {id(m): name for name, m in student.named_modules()}
            blocks = tuple(paths[id(block)] + "." for block in stack[2])
            mlps = [split for split in mlps if split.row.startswith(blocks)] or mlps
        attention = [s for s in find_head_splits(student, 1) if s.heads == s.kv_heads] if heads > 0 else []
        if not mlps and not attention:
            raise StepNotApplicable("the model has no MLP (Linear -> activation -> Linear) or multi-head "
                                    "attention block to narrow")
        data, source = training_data(context)
        splits = mlps + attention
        seen = _activations(student, splits, data)
        scores = [_importance(student.get_submodule(split.row), x) for split, x in zip(splits, seen)]
        record = {"importance_data": source, "refit_tokens": int(len(seen[0]))}
        if mlps:
            for split, score, x in zip(mlps, scores, seen):
                _narrow(student, split, sorted(score.topk(_keep_count(split.width, mlp, 8)).indices.tolist()), x)
            record.update(mlp_width_before=mlps[0].width, mlp_width_after=_keep_count(mlps[0].width, mlp, 8),
                          mlps=len(mlps))
        if attention:
            from .prune import _rows, set_grouped_head_counts

            count, size = attention[0].heads, attention[0].head_dim
            keep = _keep_count(count, heads, 1)
            blocks = []
            for split, score, x in zip(attention, scores[len(mlps):], seen[len(mlps):]):
                per_head = score.reshape(split.heads, split.head_dim).sum(1)
                _narrow(student, split, _rows(sorted(per_head.topk(keep).indices.tolist()), size).tolist(), x)
                blocks.append(student.get_submodule(split.columns[0].rpartition(".")[0]))
            set_grouped_head_counts(student, blocks, keep, keep, size)
            record.update(attention_heads_before=count, attention_heads_after=keep, attention_blocks=len(attention))
        try:
            with torch.no_grad():
                student(*example)
        except Exception as exc:
            raise StepNotApplicable(f"the narrowed model no longer runs ({exc})") from None
        matched = []
        if stack is not None:
            teacher_stack = _repeated_stack(teacher)
            matched = list(zip(stack[2], teacher_stack[2])) if teacher_stack and len(teacher_stack[2]) == len(
                stack[2]) else []
        trained = distill(student, teacher, data, params["steps"], params["learning_rate"],
                          context=context, **budget_of(params), matched=matched)
        context.record.update(record)
        context.record.update({f"distill_{k}": v for k, v in trained.items() if v is not None})
        context.record.update(
            distill_data=source, blocks_matched=len(matched),
            parameters_before=sum(p.numel() for p in teacher.parameters()),
            parameters_after=sum(p.numel() for p in student.parameters()),
        )
        return ModelHandle(TORCH, student, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [Depth(), Width()]
