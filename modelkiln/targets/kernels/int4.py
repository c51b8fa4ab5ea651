"""``modelkiln::int4_mm``: a W4A16 matrix product on int4 weights in the form the
compressed-tensors format stores them (``compressed.py``), as a torch custom op.

``int4_mm(x, weight_packed, weight_scale) -> y``: ``x`` [M, K] bf16 or fp16;
``weight_packed`` int32 [N, K / 8], input ``8 j + i`` of a row in bits ``4 i`` of word
``j`` as the level ``q + 8``; ``weight_scale`` [N, K / group] (bf16 or fp16), symmetric
(no zero point); ``y = x @ (q * scale).T`` [M, N] in x's float type, accumulated in
float32. The group is K over the scale's columns (a channel-wise scale is one group of
K). The variant folder's tensors are the kernel's inputs as they are: nothing is packed
a second time.

- On a GPU with Triton, each call runs the launch that ``BY_TOKENS`` names for its M
  (tokens per call): split-K tiles for decoding, wider tiles for a prefill, and above
  a bound the weight dequantized into a float copy for torch's matrix product (cuBLAS),
  where arithmetic, not reading the weight, bounds the time. ``served_by()`` says
  which launch serves which M, for ``serving.json``. ``int4_triton.py`` holds the kernels.
- Elsewhere (a CPU, a GPU without Triton, float32 inputs) the op dequantizes in torch
  and multiplies in float32: slow, but it answers the same anywhere, so that a program
  calling it exports and loads on a CPU.

The op is defined by ``register_op()``, once per process; a program that calls it loads
(``torch.export.load``) only after that. ``torch.export`` keeps the op as one node of the
program; Inductor compiles the Triton kernels it calls (``torch.library.triton_op``).
"""

import functools
from dataclasses import asdict, dataclass

OP_NAME = "modelkiln::int4_mm"
# serving.json's entry for a program that calls the op (and the model note that asks for it).
SERVING_KEY = "int4_mm"


def serving_entry() -> dict:
    """What serving code needs to load a program calling the op, and which launch serves
    which tokens per call."""
    return {"load": "import modelkiln.targets.kernels.int4 and call register_op() before torch.export.load",
            "served_by": served_by()}


@dataclass(frozen=True)
class Tiles:
    """How one call runs. ``method`` "fused": the W4A16 kernel with [block_m, block_n]
    output tiles, K in block_k steps split ``split_k`` ways (the slices add into a float32
    buffer), row tiles banded by ``group_m``; ``scale_after_dot``: where a K step lies in
    one group, the scale multiplies the step's product instead of each weight. "dequantize":
    the weight into x's float type in [block_n, block_k] tiles, then torch's matmul."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    scale_after_dot: bool = True
    method: str = "fused"


# The launch for each range of tokens per call: the first row whose bound is at least M.
# Chosen from the kernel's arithmetic for an H100 (132 SMs) and Llama-2-7B's widths, not
# from timings yet: bench/bench_int4_kernel.py times them, and its --sweep tries others.
BY_TOKENS: tuple[tuple[int | None, Tiles], ...] = (
    # Decoding: reading the weight bounds the time. One row tile; K split four ways so
    # that a 4096-wide layer runs 256 programs, enough loads in flight to keep memory busy;
    # scales after the dot, so that a weight costs a shift and a mask, not a multiply.
    (16, Tiles(16, 64, 128, split_k=4)),
    (32, Tiles(32, 64, 128, split_k=4)),
    (64, Tiles(64, 64, 128, split_k=2)),
    # From here a weight serves enough rows that scaling it once in the tile costs less
    # than scaling the float32 tile of products at every K step.
    (128, Tiles(64, 128, 64, split_k=2, scale_after_dot=False)),
    (512, Tiles(128, 128, 64, num_warps=8, num_stages=3, scale_after_dot=False)),
    # A prefill: the matrix product bounds the time and cuBLAS's is the fastest there;
    # writing the float weight first costs about one read of it more.
    (None, Tiles(0, 64, 256, method="dequantize")),
)


def tiles_for(tokens: int) -> Tiles:
    """The launch ``BY_TOKENS`` names for ``tokens`` rows of x."""
    for bound, tiles in BY_TOKENS:
        if bound is None or tokens <= bound:
            return tiles
    raise ValueError("BY_TOKENS must end with a row whose bound is None")


def served_by() -> list[dict]:
    """Which launch serves which tokens per call: ``{"tokens": [first, last or None],
    "kernel": OP_NAME, **tiles}`` per row of ``BY_TOKENS``, for ``serving.json``."""
    rows, first = [], 1
    for bound, tiles in BY_TOKENS:
        rows.append({"tokens": [first, bound], "kernel": OP_NAME, **asdict(tiles)})
        if bound is None:
            break
        first = bound + 1
    return rows


def unsupported(in_features: int, out_features: int, group_size: int) -> str | None:
    """Why the op cannot take a layer of these widths and group (``in_features`` for a
    channel-wise scale), or None when it can."""
    if in_features % 8:
        return f"in_features must be a multiple of 8 (whole int32 words of levels), got {in_features}"
    if group_size <= 0 or in_features % group_size:
        return f"the group size {group_size} must divide in_features = {in_features}"
    if group_size % 16 and group_size != 8:
        # A K step of the kernel (16 inputs at least) lies inside a group or spans whole ones.
        return f"the group size must be 8 or a multiple of 16, got {group_size}"
    if out_features <= 0:
        return f"out_features must be positive, got {out_features}"
    return None


def check(x, weight_packed, weight_scale) -> None:
    """Raise ValueError unless the op can take these inputs."""
    import torch

    if x.dim() != 2 or weight_packed.dim() != 2 or weight_scale.dim() != 2:
        raise ValueError(f"{OP_NAME} takes x [M, K], weight_packed [N, K / 8] and weight_scale "
                         f"[N, groups]; got {tuple(x.shape)}, {tuple(weight_packed.shape)}, "
                         f"{tuple(weight_scale.shape)} (flatten x's leading dimensions: int4_linear)")
    if weight_packed.dtype != torch.int32:
        raise ValueError(f"{OP_NAME}: weight_packed must be int32 (compressed-tensors' packing), "
                         f"got {weight_packed.dtype}")
    if not x.is_floating_point() or not weight_scale.is_floating_point():
        raise ValueError(f"{OP_NAME}: x and weight_scale must be floating point, got {x.dtype} and "
                         f"{weight_scale.dtype}")
    k, (n, words), (rows, groups) = x.shape[1], weight_packed.shape, weight_scale.shape
    if k != words * 8 or rows != n or groups == 0 or k % groups:
        raise ValueError(f"{OP_NAME}: x has {k} inputs, weight_packed {words} words of 8 levels for {n} "
                         f"outputs and weight_scale {groups} groups for {rows}: they do not describe one layer")
    reason = unsupported(k, n, k // groups)
    if reason:
        raise ValueError(f"{OP_NAME}: {reason}")


def dequantize(weight_packed, weight_scale, dtype=None):
    """The float weight [N, K] the stored form stands for, ``(level - 8) * scale``
    computed in float32 (as ``Compressed.dequantized()``), in ``dtype`` if given."""
    import torch

    n, words = weight_packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=weight_packed.device)
    levels = (weight_packed.unsqueeze(-1) >> shifts) & 15
    q = levels.reshape(n, weight_scale.shape[1], -1).float() - 8
    weight = (q * weight_scale.float().unsqueeze(-1)).reshape(n, words * 8)
    return weight if dtype is None else weight.to(dtype)


def reference_mm(x, weight_packed, weight_scale):
    """The op's answer computed in torch, in float32: its implementation where the Triton
    kernels do not run."""
    return (x.float() @ dequantize(weight_packed, weight_scale).t()).to(x.dtype)


def triton_available() -> bool:
    """Whether the Triton kernels can be imported here."""
    try:
        from . import int4_triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def register_op():
    """Define ``modelkiln::int4_mm`` in this process (once) and return it."""
    import torch

    try:
        from . import int4_triton
    except ImportError:
        launch = None
    else:
        launch = int4_triton.launch

    def int4_mm(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        check(x, weight_packed, weight_scale)
        if launch is not None and x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
            if x.shape[0] == 0:
                return x.new_empty((0, weight_packed.shape[0]))
            return launch(x.contiguous(), weight_packed.contiguous(), weight_scale.contiguous(),
                          tiles_for(x.shape[0]))
        return reference_mm(x, weight_packed, weight_scale)

    # triton_op lets Inductor see (and compile) the Triton kernels inside; without Triton
    # installed it would only warn that it finds none, so the op is then a plain custom op.
    define = torch.library.triton_op if launch is not None else torch.library.custom_op
    op = define(OP_NAME, int4_mm, mutates_args=())

    # The op's shape rule, also under torch.export: a tracer then never runs the launch
    # choice by M, which would pin a dynamic number of tokens to one range of BY_TOKENS.
    @op.register_fake
    def _(x, weight_packed, weight_scale):
        check(x, weight_packed, weight_scale)
        return x.new_empty((x.shape[0], weight_packed.shape[0]))

    return op


def int4_linear(x, weight_packed, weight_scale, bias=None):
    """``torch.nn.functional.linear`` for an int4 layer in its stored form, x [..., K]:
    what a weight-only layer's forward calls (after ``register_op()``, e.g. in its
    ``__init__``: the op must exist before a tracer meets it)."""
    import torch

    out = torch.ops.modelkiln.int4_mm(x.reshape(-1, x.shape[-1]), weight_packed, weight_scale)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight_packed.shape[0])
