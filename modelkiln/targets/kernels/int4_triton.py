"""The Triton kernels behind ``modelkiln::int4_mm`` (``int4.py``): a W4A16 matrix
product that reads int4 weights as compressed-tensors stores them, and a kernel that
turns them into a float weight for torch's own matrix product at large batches.

Imported only where Triton is installed; ``int4.py`` picks the launch per call.

The stored form, per output row ``n``: ``weight_packed[n, j]`` (int32) holds inputs
``8 j .. 8 j + 7``, input ``8 j + i`` in bits ``4 i .. 4 i + 3`` as the level
``u = q + 8`` (0..15), and ``weight_scale[n, g]`` scales inputs ``g * group ..``:
``w = (u - 8) * scale``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

# A level u (0..15) OR-ed into the low mantissa bits of 128 (bf16) or 1024 (fp16), whose
# unit in the last place is 1, is the float 128 + u or 1024 + u: a float weight by its bits
# alone, without an integer-to-float conversion (a quarter-rate instruction on the GPU,
# which would bound a batch-1 product that reads 4 bits a weight). The product of such
# weights is then off by (base + 8) times the sum of the inputs, taken off after the dot.
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@triton.jit
def _nibble(words, i: tl.constexpr):
    return (words >> (4 * i)) & 0xF


@triton.jit
def _interleave(n0, n1, n2, n3, n4, n5, n6, n7, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """Eight [ROWS, WORDS] tensors, nibble i of each word, as one [ROWS, 8 * WORDS]:
    nibble i of word j in column 8 j + i."""
    # tl.join adds a last axis, so the last join sets the lowest bit of a nibble's place:
    # nibbles four apart are joined first, then pairs two apart, then one apart.
    low = tl.join(tl.join(n0, n4), tl.join(n2, n6))
    high = tl.join(tl.join(n1, n5), tl.join(n3, n7))
    return tl.reshape(tl.join(low, high), (ROWS, 8 * WORDS))


@triton.jit
def _biased_levels(words, MAGIC_BITS: tl.constexpr, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                   WORDS: tl.constexpr):
    """[ROWS, 8 * WORDS] floats ``base + u`` of the words' levels (see MAGIC)."""
    n0 = (_nibble(words, 0) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    n1 = (_nibble(words, 1) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    n2 = (_nibble(words, 2) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    n3 = (_nibble(words, 3) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    n4 = (_nibble(words, 4) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    n5 = (_nibble(words, 5) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    n6 = (_nibble(words, 6) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    n7 = (_nibble(words, 7) | MAGIC_BITS).to(tl.int16).to(DTYPE, bitcast=True)
    return _interleave(n0, n1, n2, n3, n4, n5, n6, n7, ROWS, WORDS)


@triton.jit
def _level_minus_8(words, i: tl.constexpr):
    # The float32 twin of MAGIC: the level in the low mantissa bits of 2 ** 23 (unit in
    # the last place 1), then 2 ** 23 + 8 taken off, exactly: no conversion instruction.
    return (_nibble(words, i) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _scaled_weights(words, scale, DTYPE: tl.constexpr, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """[ROWS, 8 * WORDS] weights ``(u - 8) * scale`` in DTYPE; ``scale`` (float32) is
    [ROWS, 1] or one per word, [ROWS, WORDS]."""
    n0 = (_level_minus_8(words, 0) * scale).to(DTYPE)
    n1 = (_level_minus_8(words, 1) * scale).to(DTYPE)
    n2 = (_level_minus_8(words, 2) * scale).to(DTYPE)
    n3 = (_level_minus_8(words, 3) * scale).to(DTYPE)
    n4 = (_level_minus_8(words, 4) * scale).to(DTYPE)
    n5 = (_level_minus_8(words, 5) * scale).to(DTYPE)
    n6 = (_level_minus_8(words, 6) * scale).to(DTYPE)
    n7 = (_level_minus_8(words, 7) * scale).to(DTYPE)
    return _interleave(n0, n1, n2, n3, n4, n5, n6, n7, ROWS, WORDS)


@triton.jit
def _word_scales(s_ptr, offs_n, stride_sn, k0, offs_w, in_n, mask, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float32 scales of a [rows, BLOCK_K // 8] tile of words starting at input k0:
    [rows, 1] where the tile lies in one group, else one per word."""
    if BLOCK_K <= GROUP:
        scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + k0 // GROUP, mask=in_n[:, None], other=0.0)
    else:
        scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + (k0 + 8 * offs_w)[None, :] // GROUP,
                        mask=mask, other=0.0)
    return scale.to(tl.float32)


@triton.jit
def _int4_mm_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    MAGIC_BITS: tl.constexpr, OFFSET: tl.constexpr, DOT_F32: tl.constexpr,
):
    """y[M, N] = x[M, K] @ w.T for one [BLOCK_M, BLOCK_N] tile and one of SPLIT_K slices of
    K (program ids 0 and 1); with SPLIT_K > 1, y is float32 and the slices add into it."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Row tiles in bands of GROUP_M: programs that run together read the same weight
    # columns, which then come from L2.
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows
    pid_n = (pid % band) // rows

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = tl.program_id(1) * per_split
    k_last = tl.minimum(k_first + per_split, k_tiles)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    in_m = offs_m < M
    in_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    # The product is computed transposed, y.T = w @ x.T: the weights, made in registers,
    # are the dot's first operand, which Hopper's wgmma takes from registers (the second
    # comes from shared memory), and the tokens are its narrow side (16 at least, not 64).
    # In the other order Triton 3.9 failed to compile some tiles for sm_90 (64x128,
    # weights scaled in the tile). The unpacked weights still cross shared memory once to
    # reach the operand's layout (STS + ldmatrix in the sm_90 code).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(k_first, k_last):
        k0 = t * BLOCK_K
        x_mask = in_m[:, None]
        w_mask = in_n[:, None]
        if not EVEN_K:
            x_mask = x_mask & (k0 + offs_k < K)[None, :]
            w_mask = w_mask & (k0 // 8 + offs_w < K // 8)[None, :]
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=x_mask, other=0.0)
        words = tl.load(w_rows + (k0 // 8 + offs_w)[None, :], mask=w_mask, other=0)
        if SCALE_AFTER_DOT:
            # The step lies in one group: its scale multiplies the step's product, so the
            # weights enter the dot as biased levels (MAGIC) with nothing else done to them.
            w = _biased_levels(words, MAGIC_BITS, x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K // 8)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            if DOT_F32:
                part = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)))
            else:
                part = tl.dot(w, tl.trans(x))
            scale = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=in_n, other=0.0).to(tl.float32)
            acc += (part - OFFSET * x_sum[None, :]) * scale[:, None]
        else:
            scale = _word_scales(s_ptr, offs_n, stride_sn, k0, offs_w, in_n, w_mask, GROUP, BLOCK_K)
            w = _scaled_weights(words, scale, x_ptr.dtype.element_ty, BLOCK_N, BLOCK_K // 8)
            if DOT_F32:
                acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
            else:
                acc = tl.dot(w, tl.trans(x), acc)

    y_offsets = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    y_mask = in_n[:, None] & in_m[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptr + y_offsets, acc, mask=y_mask, sem="relaxed")


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out[N, K] = (u - 8) * scale in out's float type, one [BLOCK_N, BLOCK_K] tile a program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    in_n = offs_n < N
    mask = in_n[:, None]
    if not EVEN_K:
        mask = mask & (k0 // 8 + offs_w < K // 8)[None, :]
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 8 + offs_w)[None, :], mask=mask, other=0)
    scale = _word_scales(s_ptr, offs_n, stride_sn, k0, offs_w, in_n, mask, GROUP, BLOCK_K)
    w = _scaled_weights(words, scale, out_ptr.dtype.element_ty, BLOCK_N, BLOCK_K // 8)
    out_mask = in_n[:, None] & (k0 + offs_k < K)[None, :]
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + (k0 + offs_k)[None, :], w, mask=out_mask)


# The interpreter (TRITON_INTERPRET=1, the tests' way to run these kernels on a CPU)
# multiplies bf16 matrices as raw 16-bit integers; there the dot's operands are widened to
# float32 first, which is exact, so the tests still check the values the GPU multiplies.
INTERPRETED = isinstance(_int4_mm_kernel, InterpretedFunction)


def block_k_for(block_k: int, in_features: int, group: int) -> int:
    """The K tile actually used: no wider than the input (a power of two, 16 at least),
    and either inside one group or a whole number of groups."""
    block_k = min(block_k, max(16, 1 << (in_features.bit_length() - 1)))
    if group % block_k and block_k % group:
        block_k = math.gcd(block_k, group)
    return block_k


def fused_constants(tiles, in_features: int, group: int, dtype) -> dict:
    """The compile-time arguments of ``_int4_mm_kernel`` for ``tiles`` (``int4.Tiles``)."""
    block_k = block_k_for(tiles.block_k, in_features, group)
    magic_bits, base = MAGIC[dtype]
    return {
        "GROUP": group, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_K": block_k,
        "SPLIT_K": max(1, min(tiles.split_k, triton.cdiv(in_features, block_k))), "GROUP_M": tiles.group_m,
        "SCALE_AFTER_DOT": tiles.scale_after_dot and group % block_k == 0, "EVEN_K": in_features % block_k == 0,
        "MAGIC_BITS": magic_bits, "OFFSET": base + 8.0, "DOT_F32": INTERPRETED and dtype == torch.bfloat16,
    }


def dequantize_constants(tiles, in_features: int, group: int) -> dict:
    """The compile-time arguments of ``_dequantize_kernel`` for ``tiles``."""
    block_k = block_k_for(tiles.block_k, in_features, group)
    return {"GROUP": group, "BLOCK_N": tiles.block_n, "BLOCK_K": block_k, "EVEN_K": in_features % block_k == 0}


def fused(x, weight_packed, weight_scale, tiles):
    """``x @ w.T`` by ``_int4_mm_kernel`` with ``tiles`` (``int4.Tiles``); x [M, K] bf16
    or fp16, contiguous rows."""
    m, k = x.shape
    n = weight_packed.shape[0]
    constants = fused_constants(tiles, k, k // weight_scale.shape[1], x.dtype)
    split_k = constants["SPLIT_K"]
    if split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n), split_k)
    wrap_triton(_int4_mm_kernel)[grid](
        x, weight_packed, weight_scale, y, m, n, k,
        x.stride(0), weight_packed.stride(0), weight_scale.stride(0), y.stride(0),
        **constants, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return y if split_k == 1 else y.to(x.dtype)


def dequantize(weight_packed, weight_scale, dtype, tiles):
    """The float weight [N, K] in ``dtype``, by ``_dequantize_kernel``."""
    n, words = weight_packed.shape
    k = words * 8
    constants = dequantize_constants(tiles, k, k // weight_scale.shape[1])
    out = torch.empty((n, k), dtype=dtype, device=weight_packed.device)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(k, constants["BLOCK_K"]))
    wrap_triton(_dequantize_kernel)[grid](
        weight_packed, weight_scale, out, n, k, weight_packed.stride(0), weight_scale.stride(0), out.stride(0),
        **constants, num_warps=tiles.num_warps, num_stages=1,
    )
    return out


def launch(x, weight_packed, weight_scale, tiles):
    """``x @ w.T`` the way ``tiles.method`` says: the fused kernel, or the weight
    dequantized and multiplied by torch (cuBLAS on a GPU)."""
    if tiles.method == "dequantize":
        return torch.nn.functional.linear(x, dequantize(weight_packed, weight_scale, x.dtype, tiles))
    return fused(x, weight_packed, weight_scale, tiles)


_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_for(tiles, capability: tuple[int, int] = (9, 0), dtype=torch.bfloat16, in_features: int = 4096,
                group: int = 128):
    """Compile the kernel ``tiles`` launches for a GPU of ``capability``, on any machine
    (Triton's bundled ptxas; no GPU needed), as a launch with 16-aligned pointers and
    strides would: what an edit of ``int4.BY_TOKENS`` must pass. Returns Triton's compiled
    kernel (``.metadata.shared``: bytes of shared memory; ``.asm``: ttgir, ptx, cubin).
    Not under the interpreter, whose kernels are not compiled."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_for compiles nothing under TRITON_INTERPRET=1; unset it")
    element = _TYPE_NAMES[dtype]
    if tiles.method == "dequantize":
        kernel, constants = _dequantize_kernel, dequantize_constants(tiles, in_features, group)
        pointers = {"w_ptr": "*i32", "s_ptr": f"*{element}", "out_ptr": f"*{element}"}
        integers: tuple[str, ...] = ("N", "K", "stride_wn", "stride_sn", "stride_on")
        options = {"num_warps": tiles.num_warps, "num_stages": 1}
    else:
        kernel, constants = _int4_mm_kernel, fused_constants(tiles, in_features, group, dtype)
        output = element if constants["SPLIT_K"] == 1 else "fp32"
        pointers = {"x_ptr": f"*{element}", "w_ptr": "*i32", "s_ptr": f"*{element}", "y_ptr": f"*{output}"}
        integers = ("M", "N", "K", "stride_xm", "stride_wn", "stride_sn", "stride_ym")
        options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    signature = {**pointers, **dict.fromkeys(integers, "i32"), **dict.fromkeys(constants, "constexpr")}
    aligned = [*pointers, *(name for name in integers if name != "M")]  # M: any count of tokens
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=target, options=options)
