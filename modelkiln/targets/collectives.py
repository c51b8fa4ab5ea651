"""The all-reduces of a tensor-parallel rank's program, made cheap for one token.

A decoding step of a sharded model sums two small partial results per block across the
ranks (one token's hidden state: 8 KB for a 4096-wide bf16 model). NCCL's ring
all-reduce costs some 10 us for that on two NVLink-linked H200s even inside a CUDA
graph, a fifth of a 7B step. A one-shot all-reduce over symmetric memory (every rank
writes its part into a buffer its peers can read, waits on a signal, then reads and
sums all parts itself) is one kernel and no ring. PyTorch ships it as
``torch.ops.symm_mem.one_shot_all_reduce_copy``; this module puts it in place of the
functional all-reduces of a loaded program, before ``torch.compile`` sees it.

The symmetric buffer is allocated and exchanged between the ranks here, at load, not in
the compiled program's first run: allocations made in that run would land in the CUDA
graph's memory pool, which must hold only the graph's own tensors. Messages that may be
larger (a forward program's, whose batch has no bound) stay on NCCL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from torch.distributed.distributed_c10d import GroupName

# All-reduces whose messages can never exceed this take the one-shot path. It bounds
# the symmetric buffer, and it lets a decoding program's all-reduces through: their
# messages are one token's hidden state in a decoding step and up to the whole cache's
# positions in a prefill (63 x 4096 bf16 = 516 KB for a 7B model's program), where one
# kernel reading the peers' parts still beats NCCL's ring.
ONE_SHOT_MAX_BYTES = 1 << 20


def one_shot_available(device: str, ranks: int) -> str | None:
    """Why the one-shot path cannot serve ranks on ``device``, or None when it can."""
    import torch

    if not device.startswith("cuda"):
        return "the ranks are not on GPUs"
    try:
        _ = torch.ops.symm_mem.one_shot_all_reduce_copy  # the lookup raises where this build lacks it
    except (AttributeError, RuntimeError):
        return f"PyTorch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy"
    for a in range(ranks):
        for b in range(ranks):
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return f"GPU {a} cannot read GPU {b}'s memory directly (no peer access)"
    return None


def _upper_numel(value) -> int | None:
    """The most elements a tensor of this traced value can have (its dims' upper bounds)."""
    numel = 1
    for dim in value.shape:
        if isinstance(dim, int):
            numel *= dim
            continue
        node = dim.node
        bound = node.shape_env.bound_sympy(node.expr).upper
        try:  # an unbounded dim's bound is an infinity that will not become an int
            numel *= int(bound)
        except (TypeError, ValueError, OverflowError, AttributeError):
            return None
    return numel


def _slot(buffer, like):
    """The front of the symmetric ``buffer`` shaped as ``like``: the kernel's staging area."""
    return buffer[: like.numel()].view_as(like)


def one_shot_candidates(module, group_name: str, max_bytes: int = ONE_SHOT_MAX_BYTES):
    """The (wait, all_reduce) node pairs of ``module``'s graph that the one-shot path can
    take (sums on ``group_name`` whose messages never exceed ``max_bytes``, all of one
    dtype), the most elements any of them sends, and that dtype."""
    import torch

    functional = torch.ops._c10d_functional
    chosen, largest, dtype = [], 0, None
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target is not functional.wait_tensor.default:
            continue
        reduce = node.args[0]
        if (reduce.op != "call_function" or reduce.target is not functional.all_reduce.default
                or reduce.args[1] != "sum" or reduce.args[2] != group_name or len(reduce.users) != 1):
            continue
        value = reduce.args[0].meta.get("val")
        numel = None if value is None else _upper_numel(value)
        if numel is None or numel * value.element_size() > max_bytes or dtype not in (None, value.dtype):
            continue
        dtype = value.dtype
        largest = max(largest, numel)
        chosen.append((node, reduce))
    return chosen, largest, dtype


def use_one_shot(module, group_name: str, device: str, max_bytes: int = ONE_SHOT_MAX_BYTES) -> int:
    """Replace ``module``'s (a loaded ``torch.export`` program's) sum all-reduces whose
    messages never exceed ``max_bytes`` with one-shot all-reduces over one symmetric
    buffer, allocated and exchanged now; return how many were replaced. Every rank must
    call it at the same point (the exchange is collective)."""
    import torch
    import torch.distributed._symmetric_memory as symm_mem

    chosen, largest, dtype = one_shot_candidates(module, group_name, max_bytes)
    if not chosen:
        return 0
    buffer = symm_mem.empty(largest, dtype=dtype, device=torch.device(device))
    symm_mem.rendezvous(buffer, cast("GroupName", group_name))  # torch's type for a group's name
    # CUDA graphs copy a graph's inputs into their own memory unless their address is
    # static: the kernel must see this buffer itself, the one its peers know.
    torch._dynamo.mark_static_address(buffer)
    module.register_buffer("_kiln_one_shot_buffer", buffer, persistent=False)
    graph = module.graph
    for wait, reduce in chosen:
        with graph.inserting_before(wait):
            slot = graph.call_function(_slot, (graph.get_attr("_kiln_one_shot_buffer"), reduce.args[0]))
            summed = graph.call_function(torch.ops.symm_mem.one_shot_all_reduce_copy.default,
                                         (slot, reduce.args[0], "sum", group_name))
            summed.meta = dict(wait.meta)
        wait.replace_all_uses_with(summed)
        graph.erase_node(wait)
        graph.erase_node(reduce)
    graph.lint()
    module.recompile()
    return len(chosen)
