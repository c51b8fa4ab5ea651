"""Built-in prune steps.

``prune.structured`` removes whole channels, MLP width and (``heads``) whole attention
heads, so the dense model really shrinks; torch-pruning's dependency graph keeps the
model valid, and the layers that produce its output keep their width. Attention in the
``q_proj/k_proj/v_proj/o_proj`` layout with grouped-query attention or rotary embeddings,
which that graph does not finish on, is cut here by hand: whole key/value groups, the
same number per block, so one config describes them all. Head counts are updated on the
blocks and the config (a static KV cache is sized from it). A short recovery fine-tune
distilled from the original follows where data exists.

``prune.magnitude`` zeroes the smallest Linear and Conv weights across the model and
makes it permanent (no masks or hooks remain); it records the sparsity reached. Dense
kernels run no faster on zeros: it serves sparse runtimes and chains (int8 weights with
many zeros compress better).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import TORCH, ModelHandle, Param, Step
from .training import TrainingStep, budget_of, budget_params, distill, example_inputs, training_data

if TYPE_CHECKING:
    import torch.nn as nn


def _linear_layers(block, names) -> list[nn.Linear] | None:
    """``block``'s layers named ``names``, where every one is a Linear layer."""
    import torch.nn as nn

    layers = [layer for layer in (getattr(block, name, None) for name in names) if isinstance(layer, nn.Linear)]
    return layers if len(layers) == len(names) else None


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
# size: channel pruning leaves them whole; head pruning takes whole heads from q/k/v.
_ATTENTION_NAMES = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "attention.output.dense",
                    "c_attn", "qkv")
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_HEAD_COUNTS = ("num_attention_heads", "num_heads")


def _head_count(block):
    for holder in (block, getattr(block, "config", None)):
        for attr in _HEAD_COUNTS:
            value = getattr(holder, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def attention_blocks(module) -> list[tuple[nn.Module, list[nn.Linear], int]]:
    """``(block, [q, k, v], heads)`` for each multi-head attention block whose heads can be
    pruned: q/k/v Linear layers of one width that divides by the head count (grouped-query
    blocks, whose k/v are narrower, are left out)."""
    found = []
    for block in module.modules():
        for names in _QKV_NAMES:
            layers = _linear_layers(block, names)
            if layers is None:
                continue
            heads = _head_count(block)
            widths = {layer.out_features for layer in layers}
            if heads and heads > 1 and len(widths) == 1 and widths.pop() % heads == 0:
                found.append((block, layers, heads))
    return found


def _hf_config(module):
    config = getattr(module, "config", None)
    if config is None:  # the Hugging Face model sits inside the wrapper
        config = next((m.config for m in module.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")),
                      None)
    return config


def _set_head_counts(module, blocks, pruner) -> dict:
    """After pruning: tell each block (and the config) how many heads it has now."""
    counts = []
    for block, (q, _, _), _ in blocks:
        now = pruner.num_heads[q]
        head_size = q.out_features // now
        for attr in _HEAD_COUNTS:
            if isinstance(getattr(block, attr, None), int):
                setattr(block, attr, now)
        if isinstance(getattr(block, "all_head_size", None), int):
            block.all_head_size = q.out_features
        if isinstance(getattr(block, "attention_head_size", None), int):
            block.attention_head_size = head_size
        counts.append(now)
    config = _hf_config(module)
    if config is not None and counts and len(set(counts)) == 1 and getattr(config, "num_attention_heads", None):
        before = config.num_attention_heads
        # Keep the head size: code that derives it from hidden_size / heads would be wrong now.
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // before
        if getattr(config, "num_key_value_heads", None) == before:
            config.num_key_value_heads = counts[0]
        config.num_attention_heads = counts[0]
    return {"attention_heads_before": sum(b[2] for b in blocks), "attention_heads_after": sum(counts)}


def grouped_attention_blocks(module) -> list[tuple]:
    """``(block, head_dim, heads, kv_heads)`` for each block in Hugging Face's
    q_proj/k_proj/v_proj/o_proj layout whose widths are whole heads; every block must
    have the same counts (one config describes them), else none is returned."""
    config = _hf_config(module)
    found = []
    for block in module.modules():
        layers = _linear_layers(block, ("q_proj", "k_proj", "v_proj", "o_proj"))
        if layers is None:
            continue
        q, k, v, o = layers
        head_dim = getattr(block, "head_dim", None) or getattr(config, "head_dim", None)
        if not isinstance(head_dim, int) or head_dim <= 0:
            return []
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        if (q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features
                or o.in_features != q.out_features or kv_heads == 0 or heads % kv_heads):
            return []
        found.append((block, head_dim, heads, kv_heads))
    return found if len({b[1:] for b in found}) == 1 else []


def _rows(indices, size):
    import torch

    return torch.cat([torch.arange(i * size, (i + 1) * size) for i in indices])


def _sliced(layer, rows=None, columns=None):
    """A new Linear holding ``rows`` (outputs) and ``columns`` (inputs) of ``layer``."""
    import torch.nn as nn

    weight = layer.weight.detach()
    weight = weight if rows is None else weight[rows]
    weight = weight if columns is None else weight[:, columns]
    bias = layer.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias.detach() if rows is None else bias.detach()[rows])
    return new


def prune_grouped_heads(module, blocks, share: float) -> dict:
    """Remove ``share`` of the key/value groups of every block in ``blocks`` (from
    ``grouped_attention_blocks``), in place; the least important go, by the squared
    magnitude of the group's q/k/v rows and o_proj columns."""
    import torch

    _, head_dim, heads, kv_heads = blocks[0]
    per_group = heads // kv_heads
    keep = max(1, round(kv_heads * (1 - share)))
    if keep == kv_heads:
        return {}
    for block, *_ in blocks:
        with torch.no_grad():
            q, k, v, o = block.q_proj.weight, block.k_proj.weight, block.v_proj.weight, block.o_proj.weight
            score = (q.float().reshape(kv_heads, per_group * head_dim, -1).pow(2).sum((1, 2))
                     + k.float().reshape(kv_heads, head_dim, -1).pow(2).sum((1, 2))
                     + v.float().reshape(kv_heads, head_dim, -1).pow(2).sum((1, 2))
                     + o.float().reshape(o.shape[0], kv_heads, per_group * head_dim).pow(2).sum((0, 2)))
        kept = sorted(score.topk(keep).indices.tolist())
        query_rows = _rows([g * per_group + i for g in kept for i in range(per_group)], head_dim)
        kv_rows = _rows(kept, head_dim)
        block.q_proj = _sliced(block.q_proj, rows=query_rows)
        block.k_proj = _sliced(block.k_proj, rows=kv_rows)
        block.v_proj = _sliced(block.v_proj, rows=kv_rows)
        block.o_proj = _sliced(block.o_proj, columns=query_rows)
    set_grouped_head_counts(module, [b[0] for b in blocks], keep * per_group, keep, head_dim)
    return {"attention_heads_before": heads * len(blocks), "attention_heads_after": keep * per_group * len(blocks),
            "key_value_heads_after": keep * len(blocks), "attention_heads_method": "whole key/value groups, by hand"}


def set_grouped_head_counts(module, blocks, heads: int, kv_heads: int, head_dim: int) -> None:
    """Tell each attention block, and the model's config (which sizes the static KV
    cache), how many query and key/value heads it holds now."""
    for block in blocks:
        for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                            ("all_head_size", heads * head_dim)):
            if isinstance(getattr(block, attr, None), int):
                setattr(block, attr, value)
    config = _hf_config(module)
    if config is not None and getattr(config, "num_attention_heads", None):
        config.head_dim = head_dim  # pinned: hidden_size / heads is not the head size any more
        config.num_attention_heads = heads
        if getattr(config, "num_key_value_heads", None) is not None:
            config.num_key_value_heads = kv_heads


def _output_width_layers(module, example, names: dict, prunable_heads=()) -> list:
    """Layers whose width is the model's output width, or that look like attention
    (except the q/k/v layers in ``prunable_heads``)."""
    import torch
    import torch.nn as nn

    with torch.no_grad():
        out = module(*example)
    width = out.shape[-1]
    channels = out.shape[1] if out.ndim > 2 else None
    keep: list[nn.Module] = []
    for m in module.modules():
        name = names.get(m, "")
        if m in prunable_heads:
            continue
        if isinstance(m, nn.Linear) and m.out_features == width:
            keep.append(m)
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels in (width, channels):
            keep.append(m)
        elif isinstance(m, nn.Linear) and any(name.endswith(a) for a in _ATTENTION_NAMES):
            keep.append(m)
    return keep


class Structured(TrainingStep):
    name = "prune.structured"
    description = "remove whole channels / MLP width (torch-pruning), then a distilled recovery fine-tune"
    params = (
        Param("amount", float, 0.5, "share of channels removed from each prunable layer, in [0, 1)"),
        Param("heads", float, 0.0, "share of attention heads removed from each attention block, in [0, 1)"),
        Param("recovery_steps", int, 300, "fine-tune steps distilled from the original; 0 for none"),
        Param("learning_rate", float, 1e-3, "of the recovery fine-tune"),
        *budget_params("recovery fine-tune"),
    )

    def apply(self, model, params, context):
        import copy

        import torch
        import torch_pruning as tp

        amount, heads = params["amount"], params["heads"]
        self.check_shares(amount=amount, heads=heads)
        module = model.obj
        teacher = copy.deepcopy(module).eval()
        example = example_inputs(model, context)
        names = {m: n for n, m in module.named_modules()}
        before = sum(p.numel() for p in module.parameters())
        # torch-pruning's dependency graph never finishes on rotary embeddings'
        # half-rotations of q/k (Llama-style blocks) and takes no grouped-query blocks:
        # there torch-pruning prunes channels only, and heads are pruned by hand after it
        # (before it, its graph of the model left with one key/value head never finished
        # either).
        rotary = heads > 0 and any("Rotary" in type(m).__name__ for m in module.modules())
        blocks = attention_blocks(module) if heads > 0 and not rotary else []
        record = {}
        head_layers = {layer for _, layers, _ in blocks for layer in layers}
        if amount > 0 or head_layers:
            ignored = _output_width_layers(module, example, names, head_layers)
            ratio = amount
            if amount == 0:
                # torch-pruning prunes nothing at a ratio of 0, heads included: prune heads
                # only by leaving every other layer out of its reach.
                ignored += [layer for layer, _ in _prunable(module) if layer not in head_layers]
                ratio = heads
            pruner = tp.pruner.MetaPruner(
                module, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=ratio, ignored_layers=ignored,
                num_heads={layer: count for _, layers, count in blocks for layer in layers},
                prune_num_heads=bool(blocks), prune_head_dims=False, head_pruning_ratio=heads,
            )
            pruner.step()
            if blocks:
                record = _set_head_counts(module, blocks, pruner)
        if heads > 0 and not blocks:
            grouped = grouped_attention_blocks(module)
            record = prune_grouped_heads(module, grouped, heads) if grouped else {}
            if not record:
                record["attention_heads"] = ("kept: fewer key/value heads than pruning takes one of" if grouped
                                             else "kept: no attention block with prunable heads found")
        after = sum(p.numel() for p in module.parameters())
        if after == before:
            why = f" (attention heads {record['attention_heads']})" if "attention_heads" in record else ""
            raise StepNotApplicable(f"no layer of this model could be pruned structurally{why}")
        try:
            with torch.no_grad():
                module(*example)
        except Exception as exc:
            raise StepNotApplicable(f"the pruned model no longer runs ({exc})") from None
        record.update(parameters_before=before, parameters_after=after)
        data, source = training_data(context)
        if params["recovery_steps"] > 0:
            trained = distill(module, teacher, data, params["recovery_steps"], params["learning_rate"],
                              context=context, **budget_of(params), activity="recovery fine-tune")
            record.update({f"recovery_{k}": v for k, v in trained.items() if v is not None})
            record["recovery_data"] = source
        context.record.update(record)
        return ModelHandle(TORCH, module, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [Magnitude(), Structured()]
