"""Horizontal fusion of sibling Linear layers in a loaded ``torch.export`` program.

Linear layers that read the same input (a transformer block's query, key and value
projections; a gated MLP's gate and up projections) each launch a matrix product that,
at batch 1, reads its weights once and does little else: a memory-bound GEMV whose
fixed cost (a launch, a ramp-up and a tail) is paid per layer. Concatenating their
weights makes one larger product whose output is split back, so a Llama block runs 4
products instead of 7 and each streams more bytes per launch.

The rewrite works on the graph of ``ExportedProgram.module()`` (weights as attributes,
``aten.linear`` calls), so it applies to any exported model, not to named architectures;
outputs are those of separate products up to the order of floating-point sums inside
each one. The torch runtime re-exports the rewritten graph before saving, so the
artifact itself holds the fused weights and serving code still needs only
``torch.export.load`` (as onnxruntime fuses a graph for every session, baseline
included, this applies to every exported program, not as a recipe step). Measured on
an H100 (BENCHMARKS.md): a Llama-2-7B-shaped decoding step compiled with CUDA graphs
went from 1.48x-1.56x to 1.39x-1.41x its weight-reading floor.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict

log = logging.getLogger(__name__)


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _drop_attr(gm, target: str) -> None:
    owner, _, name = target.rpartition(".")
    delattr(_attr(gm, owner) if owner else gm, name)


def fuse_sibling_linears(gm) -> int:  # noqa: C901 - over the complexity bound, not yet split
    """Fuse, in place, each group of ``aten.linear`` calls of ``gm`` that share their input
    and whose weights (and biases, all or none) are constant attributes of one dtype,
    device and input width. Returns how many calls were fused away."""
    import torch

    linear = torch.ops.aten.linear.default
    groups = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not linear or node.kwargs:
            continue
        weight = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if weight.op != "get_attr" or (bias is not None and bias.op != "get_attr"):
            continue
        w = _attr(gm, weight.target)
        if w.dim() != 2:
            continue
        groups[(node.args[0], w.dtype, w.device, w.shape[1], bias is None)].append(node)

    attr_users: defaultdict[str, int] = defaultdict(int)  # an attribute may be read by several get_attr nodes (tied)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attr_users[node.target] += len(node.users)

    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    fused_away = 0
    for index, ((source, *_), nodes) in enumerate(groups.items()):
        if len(nodes) < 2:
            continue
        weights = [_attr(gm, n.args[1].target) for n in nodes]
        sizes = [int(w.shape[0]) for w in weights]
        name = f"kiln_fused_linear_{index}"
        with torch.no_grad():
            gm.register_buffer(f"{name}_weight", torch.cat([w.detach() for w in weights]))
            has_bias = len(nodes[0].args) > 2 and nodes[0].args[2] is not None
            if has_bias:
                gm.register_buffer(f"{name}_bias", torch.cat([_attr(gm, n.args[2].target).detach() for n in nodes]))
        first = min(nodes, key=order.__getitem__)
        with gm.graph.inserting_before(first):
            args = [source, gm.graph.get_attr(f"{name}_weight")]
            if has_bias:
                args.append(gm.graph.get_attr(f"{name}_bias"))
            fused = gm.graph.call_function(linear, tuple(args))
            parts = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (fused, sizes, -1))
            for i, node in enumerate(nodes):
                piece = gm.graph.call_function(operator.getitem, (parts, i))
                piece.meta = dict(node.meta)
                node.replace_all_uses_with(piece)
        for node in nodes:
            inputs = [a for a in node.args[1:] if a is not None]
            gm.graph.erase_node(node)
            for attr_node in inputs:
                attr_users[attr_node.target] -= 1
                if not attr_node.users:
                    gm.graph.erase_node(attr_node)
                if attr_users[attr_node.target] == 0:  # nothing reads the separate weight now
                    _drop_attr(gm, attr_node.target)
                    attr_users[attr_node.target] = -1
        fused_away += len(nodes) - 1
    if fused_away:
        gm.graph.lint()
        gm.recompile()
    return fused_away


def fused_program(program, args: tuple, kwargs: dict, dynamic_shapes):
    """``program`` with its sibling Linear layers fused and exported again, and how many
    calls were fused away; ``program`` itself (and 0) when there is nothing to fuse or
    the rewritten graph does not export. ``dynamic_shapes(module)`` gives the specs for
    the rewritten module, whose signature may name its inputs differently."""
    import torch

    module = program.module()
    fused_away = fuse_sibling_linears(module)
    if not fused_away:
        return program, 0
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes(module), strict=False), fused_away
    except Exception as exc:  # an optimisation: the unfused program serves the same outputs
        log.warning("saving the program unfused: the graph with %d sibling Linear calls fused did not export "
                    "(%s: %s)", fused_away, type(exc).__name__, str(exc)[:200])
        return program, 0
