"""Built-in shard step: tensor parallelism over ``torch.distributed``.

``shard.tensor_parallel`` splits a model across the target's ``devices`` ranks the way
Megatron-LM splits a transformer's MLP: in each chain "Linear A -> elementwise ops ->
Linear B" (a GELU MLP; or gated, "act(gate(x)) * up(x) -> down" as in Llama), the first
Linears are split by output features (column parallel: each rank computes its slice of
the hidden activations, and elementwise ops need nothing from the other ranks) and the
last by input features (row parallel: each rank's partial product is summed with one
all-reduce, then the bias is added). One all-reduce per chain, no other communication.

The chains are found on the model's ``torch.export`` graph, not by module names, so any
architecture qualifies; a chain is split only when every intermediate value is used
inside it and the widths divide by the rank count.

Attention is split by heads where its blocks use Hugging Face's q_proj/k_proj/v_proj/
o_proj layout (Llama, Mistral, Qwen, ...; grouped-query included): each rank holds whole
key/value groups with their query heads (q/k/v column parallel) and o_proj's matching
input columns (row parallel, one all-reduce), and its config says how many heads it has,
so a static KV cache built from it holds that rank's heads only. BERT's layout (and its
descendants': RoBERTa, ELECTRA, ...) splits the same way: ``attention.self.query/key/
value`` by heads, ``attention.output.dense`` by the matching input columns. Everything
else (embeddings, norms, the head) is replicated on every rank.

The result is ``SHARDED``: one module per rank plus the plan. The torch runtime exports
each rank's module (its all-reduce is a traced functional collective) and writes the
plan; loading starts the ranks and checks the sharded output against the unsharded one
kept from here (``targets/sharded.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..errors import StepNotApplicable
from ..plugins import hookimpl
from ..plugins.api import SHARDED, TORCH, ModelHandle, Step
from ..targets.sharded import WORLD_GROUP
from .quantize import unwrap_half_precision

# Rows of the sample inputs whose unsharded outputs travel with the artifact, for the check.
CHECK_ROWS = 4
# A causal LM's greedy check: this many new tokens after each check row's first tokens.
GREEDY_TOKENS = 16


@dataclass
class Split:
    """One chain: ``columns`` split by output features, ``row`` by input features;
    for attention, by whole heads (``heads`` query and ``kv_heads`` key/value heads)."""

    columns: list[str]
    row: str
    width: int  # the hidden width the ranks share
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    def as_dict(self) -> dict:
        found = {"columns": self.columns, "row": self.row, "width": self.width}
        if self.heads:
            found.update(heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim)
        return found


@dataclass
class ShardedModel:
    """What ``SHARDED`` handles carry: the rank modules, the plan, the check data."""

    ranks: list
    splits: list[Split]
    check_inputs: dict  # name -> array, a few sample rows
    check_outputs: object  # the unsharded model's outputs on them
    # For a model computing in 16 bits: how far its outputs are from the same model's in
    # float32 (max abs), the scale of rounding that the check must allow the ranks too.
    check_rounding: float = 0.0
    replicated_parameters: int = 0
    split_parameters: int = 0
    # For a causal LM: prompts, the unsharded model's greedy tokens after them and each
    # token's margin over the runner-up logit (``greedy_reference``); None otherwise.
    greedy: dict | None = None


def _elementwise_ops():
    import torch

    aten = torch.ops.aten
    unary = {
        aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
        aten.erf.default, aten.clone.default, aten.dropout.default, aten.alias.default,
        aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar,
        aten.leaky_relu.default, aten.hardswish.default, aten.gelu_.default, aten.relu_.default,
        aten.silu_.default, aten._to_copy.default,
    }
    binary = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor}
    return unary, aten.linear.default, binary


def find_splits(module, example_args: tuple, ranks: int) -> list[Split]:  # noqa: C901 - over the complexity bound, not yet split
    """The column/row chains of ``module``, from its export graph."""
    import torch
    from torch.fx import Node

    program = torch.export.export(module, example_args)
    to_param = program.graph_signature.inputs_to_parameters
    unary, linear, binary = _elementwise_ops()
    nodes = list(program.graph.nodes)

    def owner(node) -> str | None:
        """The module path of a linear node whose weight is a parameter used only there."""
        if node.op != "call_function" or node.target != linear:
            return None
        weight = node.args[1]
        name = to_param.get(getattr(weight, "name", ""))
        if name is None or not name.endswith(".weight") or len(weight.users) != 1:
            return None  # a computed or tied weight: not a plain Linear
        return name[: -len(".weight")]

    def chain(start, row_node) -> tuple[set, list[tuple[Node, str]]] | None:
        """(intermediate nodes, column linears and their module paths) feeding ``row_node``
        elementwise, or None."""
        inner: set[Node] = set()
        columns: list[tuple[Node, str]] = []
        stack = [start]
        while stack:
            node = stack.pop()
            if node in inner:
                continue
            if (path := owner(node)) is not None:
                inner.add(node)
                columns.append((node, path))
                continue
            if node.op != "call_function" or node.target not in unary | binary:
                return None
            inner.add(node)
            operands = node.args[:1] if node.target in unary else node.args[:2]
            for arg in operands:
                if isinstance(arg, Node):
                    stack.append(arg)
                elif not isinstance(arg, (int, float)):
                    return None
        # Every value inside must be used only inside (or by the row Linear): a value
        # read elsewhere would be a slice on each rank where the rest expects it whole.
        for node in inner:
            if any(user not in inner and user is not row_node for user in node.users):
                return None
        return inner, columns

    splits: list[Split] = []
    used: set[Node] = set()
    for node in nodes:
        row = owner(node)
        if row is None or node in used:
            continue
        found = chain(node.args[0], node)
        if found is None:
            continue
        inner, columns = found
        if not columns or used & (inner | {node}):
            continue
        widths = {tuple(c.meta["val"].shape)[-1] for c, _ in columns}
        width = tuple(node.args[0].meta["val"].shape)[-1]
        if widths != {width} or width % ranks:
            continue
        used |= inner | {node}
        splits.append(Split([path for _, path in columns], row, width))
    return splits


def find_head_splits(module, ranks: int) -> list[Split]:
    """Attention blocks split by heads: every block's key/value heads must divide by
    ``ranks`` (each rank then holds whole groups), else no block is split."""
    from .prune import grouped_attention_blocks

    prefixes = {id(m): f"{name}." if name else "" for name, m in module.named_modules()}
    blocks = grouped_attention_blocks(module)
    if not blocks:
        return _bert_head_splits(module, ranks, prefixes)
    if blocks[0][3] % ranks:
        return []
    return [Split([f"{prefixes[id(block)]}{p}" for p in ("q_proj", "k_proj", "v_proj")],
                  f"{prefixes[id(block)]}o_proj", block.q_proj.out_features, heads, kv_heads, head_dim)
            for block, head_dim, heads, kv_heads in blocks]


def _bert_head_splits(module, ranks: int, prefixes: dict) -> list[Split]:
    """BERT's layout: ``<attention>.self`` holds query/key/value and the head count,
    ``<attention>.output.dense`` reads the heads' concatenated outputs. Every block must
    qualify, else none is split (one config describes them all)."""
    import torch.nn as nn

    from .prune import attention_blocks

    splits = []
    for block, (q, _, _), heads in attention_blocks(module):
        path = prefixes[id(block)].rstrip(".")
        parent, _, own = path.rpartition(".")
        if own != "self" or getattr(block, "query", None) is not q:
            return []  # another layout (q_proj & co. are found above)
        try:
            out = module.get_submodule(f"{parent}.output.dense")
        except AttributeError:
            return []
        if not isinstance(out, nn.Linear) or out.in_features != q.out_features or heads % ranks:
            return []
        splits.append(Split([f"{path}.{n}" for n in ("query", "key", "value")], f"{parent}.output.dense",
                            q.out_features, heads, heads, q.out_features // heads))
    return splits


def _row_parallel_class():
    import torch
    import torch.nn as nn

    class RowParallelLinearModule(nn.Module):
        """A Linear's slice of input features; partial products summed across ranks.

        The all-reduce is the functional collective on the named process group, so
        ``torch.export`` records it in the rank's program: the artifact needs nothing of
        modelkiln to run, only a process group of the right size under that name.
        """

        def __init__(self, weight, bias, group_name: str):
            super().__init__()
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            self.group_name = group_name

        def forward(self, x):
            partial = torch.nn.functional.linear(x, self.weight)
            total = torch.ops._c10d_functional.all_reduce(partial, "sum", self.group_name)
            total = torch.ops._c10d_functional.wait_tensor(total)
            return total if self.bias is None else total + self.bias

    return RowParallelLinearModule


def split_module(module, splits: list[Split], rank: int, ranks: int):
    """A copy of ``module`` holding rank ``rank``'s slices of the split Linears."""
    import torch.nn as nn

    local = copy.deepcopy(module)
    row_class = _row_parallel_class()
    for split in splits:
        for path in split.columns:
            # Each column Linear's own width: with grouped-query attention the query
            # projection is wider than the key/value ones, and rank r takes the r-th
            # contiguous part of each (whole heads, query heads beside their group's).
            old = local.get_submodule(path)
            share = old.out_features // ranks
            cut = slice(rank * share, (rank + 1) * share)
            new = nn.Linear(old.in_features, share, bias=old.bias is not None,
                            dtype=old.weight.dtype, device=old.weight.device)
            new.weight.data = old.weight.data[cut].clone()
            if old.bias is not None:
                new.bias.data = old.bias.data[cut].clone()
            new.requires_grad_(False)
            local.set_submodule(path, new)
        share = split.width // ranks
        old = local.get_submodule(split.row)
        bias = None if old.bias is None else old.bias.data.clone()
        local.set_submodule(split.row, row_class(old.weight.data[:, rank * share:(rank + 1) * share].clone(),
                                                 bias, WORLD_GROUP))
    heads = [s for s in splits if s.heads]
    if heads:
        from .prune import set_grouped_head_counts

        # The block that holds the head counts is the one holding the query projection.
        blocks = [local.get_submodule(s.columns[0].rpartition(".")[0]) for s in heads]
        set_grouped_head_counts(local, blocks, heads[0].heads // ranks, heads[0].kv_heads // ranks, heads[0].head_dim)
    return local.eval()


def greedy_reference(module, rows: dict) -> dict | None:
    """The unsharded causal LM's greedy continuation of the check rows' first tokens
    (at most ``decoding.PROMPT_TOKENS``, so prompt and tokens fit the decoding program's
    cache): ``{"prompts", "tokens", "margins"}``, each margin the gap between the chosen
    token's logit and the runner-up's. None for any other model. Whole forward passes,
    no cache: the reference is computed as plainly as possible."""
    import numpy as np
    import torch

    from ..targets.decoding import PROMPT_TOKENS, find_causal_lm

    lm = find_causal_lm(module)
    ids = rows.get("input_ids", next(iter(rows.values()), None))
    if lm is None or ids is None or ids.dtype != np.int64 or ids.ndim != 2:
        return None
    prompts = np.ascontiguousarray(ids[:, :PROMPT_TOKENS])
    device = next(lm.parameters()).device
    sequence = torch.from_numpy(prompts).to(device)
    tokens, margins = [], []
    with torch.inference_mode():
        for _ in range(GREEDY_TOKENS):
            logits = lm(input_ids=sequence).logits[:, -1].float()
            top = logits.topk(2, dim=-1)
            tokens.append(top.indices[:, :1])
            margins.append((top.values[:, 0] - top.values[:, 1]).cpu())
            sequence = torch.cat([sequence, top.indices[:, :1]], 1)
    return {"prompts": prompts, "tokens": torch.cat(tokens, 1).cpu().numpy(),
            "margins": torch.stack(margins, 1).numpy()}


def _compute_dtype(module):
    """The type a module computes in: quantize.bf16/fp16's wrapper says; else its weights'."""
    import torch

    inner, dtype = unwrap_half_precision(module)
    return dtype or next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)


def _in_float32(module):
    """A float32 copy of ``module`` (inside quantize.bf16/fp16's wrapper, which would cast
    float inputs back to 16 bits)."""
    return copy.deepcopy(unwrap_half_precision(module)[0]).float()


class TensorParallel(Step):
    name = "shard.tensor_parallel"
    description = ("split MLP Linear chains and attention heads (Llama and BERT layouts) column/row-parallel "
                   "over the target's devices (one torch.export program per rank; gloo on cpu, NCCL on cuda)")
    params = ()
    # Multi-process serving exists for the torch runtime only.
    forms = {"torch": TORCH}

    def apply(self, model, params, context):
        import numpy as np
        import torch

        from ..targets.shapes import example_args

        ranks = context.devices
        if ranks < 2:
            raise StepNotApplicable(
                f"target {context.target} has devices = {ranks}; tensor parallelism needs devices > 1"
            )
        module = model.obj.eval()
        splits = find_splits(module, example_args(model), ranks) + find_head_splits(module, ranks)
        if not splits:
            raise StepNotApplicable(
                f"no Linear -> elementwise -> Linear chain and no attention heads that divide by {ranks} to split"
            )
        rows = {name: np.ascontiguousarray(v[:CHECK_ROWS]) for name, v in context.sample_inputs.items()}

        def outputs(of):
            with torch.inference_mode():
                return of(*(torch.from_numpy(v) for v in rows.values())).float().numpy()

        expected = outputs(module)
        rounding = 0.0
        if _compute_dtype(module) in (torch.bfloat16, torch.float16):
            # The ranks sum their partial products in 16 bits, in another order than one
            # device does: they may differ from the unsharded outputs by about as much as
            # those differ from float32's. Measured here, so the check scales with the model.
            wide = outputs(_in_float32(module))
            rounding = float(np.abs(wide.astype(np.float64) - expected).max())
            context.record["check_rounding"] = rounding
        rank_modules = [split_module(module, splits, r, ranks) for r in range(ranks)]
        split_names = {f"{p}.{w}" for s in splits for p in (*s.columns, s.row) for w in ("weight", "bias")}
        split_count = sum(p.numel() for n, p in module.named_parameters() if n in split_names)
        total = sum(p.numel() for p in module.parameters())
        context.record.update(
            ranks=ranks, splits=[s.as_dict() for s in splits], split_parameters=split_count,
            replicated_parameters=total - split_count,
            parameters_per_rank=sum(p.numel() for p in rank_modules[0].parameters()),
        )
        greedy = greedy_reference(module, rows)
        if greedy is not None:
            context.record["greedy_check_tokens"] = int(greedy["tokens"].size)
        sharded = ShardedModel(rank_modules, splits, rows, expected, replicated_parameters=total - split_count,
                               split_parameters=split_count, check_rounding=rounding, greedy=greedy)
        return ModelHandle(SHARDED, sharded, model.inputs, dict(model.notes))


@hookimpl
def kiln_steps():
    return [TensorParallel()]
