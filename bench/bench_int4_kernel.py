"""int4 weight-only products on a GPU: bf16, PyTorch's tinygemm and ``modelkiln::int4_mm``.

Llama-2-7B's Linear shapes (in -> out: 4096 -> 4096 attention output, 4096 -> 11008 gate
and up, 11008 -> 4096 down, 4096 -> 12288 fused q/k/v) at M = 1 ... 2048 tokens per call,
group 128, random weights:

- bf16: ``torch.nn.functional.linear`` (cuBLAS);
- tinygemm: ``torch.ops.aten._weight_int4pack_mm``, the kernel ``quantize.weight_only``
  uses on cuda today, its inputs derived from the stored form (``compressed.py``);
- int4_mm: the op as a layer calls it, with the launch ``BY_TOKENS`` names for M;
  "other" is the op's other method at that M (the fused kernel with the table's widest
  tiles, or the weight dequantized for cuBLAS), to show where the table's bound belongs.

Each call is timed in a CUDA graph (``triton.testing.do_bench_cudagraph``: no launch
overhead), cycling through copies of the weights that together exceed L2 several times,
so that each call reads its weight from memory as a model's forward pass does. Each
answer is checked against the dequantized weight's product in float32. The second table
adds the shapes up per decoder block (q/k/v, output, gate, up, down), the issue's
acceptance figures.

``--sweep`` instead times a bounded set of tiles per M (8 to 24, see ``candidates``) and
prints, per M, those with the lowest time summed over the shapes: rows to paste into
``int4.BY_TOKENS``. Each candidate compiles once (a second or two) and is timed per shape:
count about a minute per M, and narrow it with ``--m`` and ``--shapes``.

Run on the GPU machine (without --sweep, 112 timings of about 0.3 s each and six kernel
compiles: two minutes expected on an H100, not yet measured):

    PYTHONPATH=. python3 bench/bench_int4_kernel.py [--m 1 8 16 32 64 256 2048] [--group 128]
    PYTHONPATH=. python3 bench/bench_int4_kernel.py --sweep --m 1 16 32
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table

# name: (in_features, out_features)
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "up": (4096, 11008), "down": (11008, 4096)}
# One Llama-2-7B decoder block: gate and up are two products of one shape.
BLOCK = {"qkv": 1, "o": 1, "up": 2, "down": 1}
TOKENS = [1, 8, 16, 32, 64, 256, 2048]
# tinygemm's widest K tiling, which quantize.weight_only picks for these widths.
TINYGEMM_TILES = 8
# The weights each timing cycles through amount to this many L2 caches at least.
L2_MULTIPLE = 4


class Layer:
    """One shape's weights in each form, ``copies`` times (see L2_MULTIPLE)."""

    def __init__(self, in_features: int, out_features: int, group: int, copies_for_bytes: int):
        import torch

        from modelkiln.targets import compressed

        # Quantized and packed on the CPU, where compressed-tensors' packing runs.
        weight = torch.randn(out_features, in_features) * 0.02
        form = compressed.int4_groups(weight, group)
        form.scale = form.scale.to(torch.bfloat16)
        stored = form.tensors(torch.bfloat16)
        packed, scale = stored["weight_packed"].cuda(), stored["weight_scale"].cuda()
        self.copies = max(2, math.ceil(copies_for_bytes / (packed.numel() * 4 + scale.numel() * 2)))
        bf16 = form.dequantized().to(torch.bfloat16).cuda()
        tiny = compressed.int4_cuda_packed(form, TINYGEMM_TILES, "cuda")
        tiny_scales = compressed.int4_kernel_scales(form, torch.bfloat16).cuda()
        self.group = group
        self.exact = form.dequantized().cuda()  # float32: the reference the answers are checked against
        self.bf16 = [bf16.clone() for _ in range(self.copies)]
        self.tinygemm = [(tiny.clone(), tiny_scales.clone()) for _ in range(self.copies)]
        self.stored = [(packed.clone(), scale.clone()) for _ in range(self.copies)]
        del weight, form, bf16, tiny, tiny_scales


def cycling(call, copies: int, rep: int) -> float:
    """Microseconds per ``call(i)`` in a CUDA graph, i cycling through the copies."""
    import triton.testing

    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        call(state["i"])

    return triton.testing.do_bench_cudagraph(step, rep=rep, return_mode="median") * 1000.0


def errors(y, want) -> float:
    return ((y.float() - want).norm() / want.norm()).item()


def other_launch(tokens: int):
    """The op's method that BY_TOKENS does not pick for ``tokens``."""
    from modelkiln.targets.kernels import int4

    chosen = int4.tiles_for(tokens)
    fused = [tiles for _, tiles in int4.BY_TOKENS if tiles.method == "fused"]
    dequantize = [tiles for _, tiles in int4.BY_TOKENS if tiles.method == "dequantize"]
    if chosen.method == "fused":
        return dequantize[0] if dequantize else int4.Tiles(0, 64, 256, method="dequantize")
    return fused[-1]


def describe(tiles) -> str:
    if tiles.method == "dequantize":
        return f"dequantize {tiles.block_n}x{tiles.block_k} + cuBLAS"
    text = f"{tiles.block_m}x{tiles.block_n}x{tiles.block_k}"
    if tiles.split_k > 1:
        text += f" split {tiles.split_k}"
    text += f" w{tiles.num_warps} s{tiles.num_stages}"
    return text + (" scale-after" if tiles.scale_after_dot else "")


def measure_shape(name: str, args, copies_for_bytes: int) -> list[dict]:
    """Per M: the four timings (microseconds) and the two errors of one shape."""
    import torch

    from modelkiln.targets.kernels import int4, int4_triton

    op = int4.register_op()
    in_features, out_features = SHAPES[name]
    layer = Layer(in_features, out_features, args.group, copies_for_bytes)
    found = []
    for m in args.m:
        x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ layer.exact.t()
        other = other_launch(m)
        calls = {
            "bf16": lambda i, x=x: torch.nn.functional.linear(x, layer.bf16[i]),
            "tinygemm": lambda i, x=x: torch.ops.aten._weight_int4pack_mm(x, *_tiny(layer, i)),
            "int4_mm": lambda i, x=x: op(x, *layer.stored[i]),
            "other": lambda i, x=x, other=other: int4_triton.launch(x, *layer.stored[i], other),
        }
        found.append({"m": m, "other": other, "error": errors(calls["int4_mm"](0), want),
                      "tinygemm_error": errors(calls["tinygemm"](0), want),
                      "times": {key: cycling(call, layer.copies, args.rep) for key, call in calls.items()}})
    return found


def compare(args, copies_for_bytes: int) -> None:
    import torch

    from modelkiln.targets.kernels import int4

    rows, per_block = [], {m: {"bf16": 0.0, "tinygemm": 0.0, "int4_mm": 0.0} for m in args.m}
    worst = 0.0
    for name in args.shapes:
        t0 = time.time()
        in_features, out_features = SHAPES[name]
        for found in measure_shape(name, args, copies_for_bytes):
            m, times = found["m"], found["times"]
            worst = max(worst, found["error"])
            for key in per_block[m]:
                per_block[m][key] += BLOCK[name] * times[key]
            base = times["bf16"]
            rows.append([f"{name} {in_features}->{out_features}", str(m), f"{base:.1f}",
                         f"{times['tinygemm']:.1f} ({times['tinygemm'] / base:.2f}x)",
                         f"{times['int4_mm']:.1f} ({times['int4_mm'] / base:.2f}x)", describe(int4.tiles_for(m)),
                         f"{times['other']:.1f} ({times['other'] / base:.2f}x)", describe(found["other"]),
                         f"{found['error']:.1e} / {found['tinygemm_error']:.1e}"])
        torch.cuda.empty_cache()
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    print_table(f"Llama-2-7B Linear shapes, group {args.group}, bf16 activations, microseconds per call "
                f"(CUDA graph, weights from memory); ratio to bf16 in brackets",
                rows, ["layer", "M", "bf16", "tinygemm", "int4_mm", "int4_mm launch", "other", "other launch",
                       "rel. error int4_mm / tinygemm"])
    if set(args.shapes) == set(SHAPES):
        block_rows = [[str(m), f"{t['bf16']:.1f}", f"{t['tinygemm']:.1f} ({t['tinygemm'] / t['bf16']:.2f}x)",
                       f"{t['int4_mm']:.1f} ({t['int4_mm'] / t['bf16']:.2f}x)"] for m, t in per_block.items()]
        print_table("One decoder block's Linears (q/k/v, o, gate, up, down), microseconds; issue 34 asks of int4 "
                    "<= 0.45x bf16 at M = 1, <= 1.0x at 32, <= 1.1x at a 2,048-token prefill",
                    block_rows, ["M", "bf16", "tinygemm", "int4_mm"])
    verdict = "ok" if worst < 1e-2 else "TOO LARGE"
    print(f"\nlargest relative error of int4_mm against the dequantized product: {worst:.1e} ({verdict})")


def _tiny(layer, i):
    packed, scales = layer.tinygemm[i]
    return packed, layer.group, scales


def candidates(m: int) -> list:
    """A bounded set of tiles for ``m`` tokens (8 to 24, the table's own among them):
    split-K and long K steps for decoding, wide tiles for prefill."""
    from modelkiln.targets.kernels import int4

    block_m = min(128, max(16, 1 << (m - 1).bit_length()))
    if m <= 16:
        grid = {"block_n": (64, 128), "block_k": (128, 256), "split_k": (1, 2, 4, 8), "scale_after_dot": (True,)}
    elif m <= 64:
        grid = {"block_n": (64, 128), "block_k": (128, 256), "split_k": (1, 2, 4), "scale_after_dot": (True, False)}
    elif m <= 512:
        grid = {"block_n": (64, 128), "block_k": (64, 128), "split_k": (1, 2), "scale_after_dot": (False,),
                "num_warps": (4, 8) if block_m == 128 else (4,), "num_stages": (3,)}
    else:
        grid = {"block_n": (128, 256), "block_k": (64,), "num_warps": (4, 8), "num_stages": (3, 4),
                "scale_after_dot": (False,)}
    found = {int4.tiles_for(m)}
    for values in itertools.product(*grid.values()):
        found.add(int4.Tiles(block_m=block_m, **dict(zip(grid, values))))
    if m > 64:
        found.add(int4.Tiles(0, 64, 256, method="dequantize"))
    return sorted(found, key=describe)


def sweep_shape(name: str, args, copies_for_bytes: int) -> dict:
    """{m: {tiles or "bf16": microseconds}} for one shape; inf where a tile fails."""
    import torch

    from modelkiln.targets.kernels import int4_triton

    in_features, out_features = SHAPES[name]
    layer = Layer(in_features, out_features, args.group, copies_for_bytes)
    found = {}
    for m in args.m:
        x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ layer.exact.t()
        times = found[m] = {"bf16": cycling(lambda i, x=x: torch.nn.functional.linear(x, layer.bf16[i]),
                                            layer.copies, args.rep)}
        for tiles in candidates(m):
            try:
                if errors(int4_triton.launch(x, *layer.stored[0], tiles), want) > 1e-2:
                    raise RuntimeError("wrong answer")
                times[tiles] = cycling(lambda i, x=x, t=tiles: int4_triton.launch(x, *layer.stored[i], t),
                                       layer.copies, args.rep)
            except Exception as error:  # a tile that does not fit (shared memory) is left out
                print(f"  {name} M={m} {describe(tiles)}: {type(error).__name__}: {error}"[:200], flush=True)
                times[tiles] = math.inf
    return found


def sweep(args, copies_for_bytes: int) -> None:
    import torch

    from modelkiln.targets.kernels import int4

    totals = {m: {} for m in args.m}
    for name in args.shapes:
        t0 = time.time()
        for m, times in sweep_shape(name, args, copies_for_bytes).items():
            for key, spent in times.items():
                totals[m][key] = totals[m].get(key, 0.0) + BLOCK[name] * spent
        torch.cuda.empty_cache()
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    rows = []
    for m, found in totals.items():
        base = found.pop("bf16")
        chosen = int4.tiles_for(m)
        ranked = sorted(found.items(), key=lambda item: item[1])[:args.top]
        for rank, (tiles, spent) in enumerate(ranked, 1):
            mark = " (table)" if tiles == chosen else ""
            rows.append([str(m), str(rank), f"{spent:.1f} ({spent / base:.2f}x)", describe(tiles) + mark, repr(tiles)])
        if chosen in found and chosen not in dict(ranked):
            rows.append([str(m), "table", f"{found[chosen]:.1f} ({found[chosen] / base:.2f}x)", describe(chosen),
                         repr(chosen)])
    print_table(f"Fastest tiles per M, microseconds summed over {', '.join(args.shapes)} (a decoder block when all "
                "four), ratio to bf16 in brackets", rows, ["M", "rank", "time", "tiles", "Tiles(...) for BY_TOKENS"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=TOKENS, help="tokens per call")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--group", type=int, default=128, help="inputs per scale: 32, 64 or 128")
    parser.add_argument("--rep", type=int, help="milliseconds of calls per timing (20; --sweep: 10)")
    parser.add_argument("--sweep", action="store_true", help="time a bounded set of tiles per M instead")
    parser.add_argument("--top", type=int, default=3, help="tiles shown per M by --sweep")
    args = parser.parse_args()
    args.rep = args.rep or (10 if args.sweep else 20)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_int4_kernel needs a CUDA GPU")
    try:
        import triton
    except ImportError:
        sys.exit("bench_int4_kernel needs Triton (pip install triton; torch's CUDA wheels bring it)")
    properties = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(properties, "L2_cache_size", 50 * 2 ** 20)
    print(f"GPU: {properties.name} ({l2_bytes / 2 ** 20:.0f} MiB L2), torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    t0 = time.time()
    (sweep if args.sweep else compare)(args, L2_MULTIPLE * l2_bytes)
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
