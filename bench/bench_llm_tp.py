"""Tensor-parallel decoding on two GPUs against the promoted one-GPU variant.

For the two-GPU machine (nvidia-h200-x2), one call. Two parts, in one run:

1. **The 7B shape's speed** (Llama-2-7B-shaped, random bf16 weights, batch 1, a
   32-token prompt then 32 greedy tokens). One GPU: the program the daemon promotes for
   a causal LM there, ``quantize.bf16 -> compile.inductor`` (``decode.pt2`` with sibling
   Linears fused, compiled with CUDA graphs and the recorded options). Two GPUs: what
   ``shard.tensor_parallel -> compile.inductor`` serves, built the same way in each
   rank's process (the split plan from the export graph, the rank's module, its fused
   decoding program, compiled with its all-reduces inside the CUDA graph), every rank
   running the decoding loop (``targets/sharded.py``). These rows call the same
   functions as the daemon's worker but skip writing and reading the artifacts (27 GB
   per variant); part 2 runs the daemon's whole path. Printed: ms per token, the floor
   (the bytes each GPU reads per token over the copy bandwidth measured in this run),
   the ratio two/one, and the share of a token's time that its 64 all-reduces take
   (measured alone: 64 chained all-reduces of one token's hidden state captured in one
   CUDA graph).
2. **Greedy equality on a trained model, through the daemon.** A small Llama trained on
   English text for a few seconds (``tests/helpers.py: trained_llama``; random weights
   make the top logits nearly tie, which says nothing about tokens), dropped into
   ``kiln optimize`` with the default quality gate and two cuda targets: ``one``
   (``compile.inductor``, ``quantize.bf16 -> compile.inductor``) and ``two`` (devices = 2;
   the same after ``shard.tensor_parallel``). Printed per variant: decode ms/token,
   quality, and the sharded variants' load check (greedy tokens over both GPUs against
   the unsharded model's on 4 text prompts x 16 tokens); then the one-GPU variants'
   tokens against the two-GPU ones' on the same prompts.

Run on the two-GPU machine:  python3 bench/bench_llm_tp.py
Check the script on a CPU:   python3 bench/bench_llm_tp.py --tiny   (small models, gloo)
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import kiln_folder, optimize, print_table

def shape_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=2000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    from bench_llm import llama_7b_config

    return llama_7b_config()


def build(tiny: bool, device: str):
    """The seeded random bf16 model, created on ``device`` (the same weights on every GPU)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(shape_config(tiny)).to(torch.bfloat16).eval()


def _all_reduce_ms(device: str, hidden: int, count: int, mode: str, one_shot: bool) -> float:
    """Milliseconds for ``count`` chained all-reduces of one token's hidden state, compiled
    as the decoding step is (one CUDA graph on a GPU): NCCL's, or the one-shot kernel over
    symmetric memory that the ranks' programs use where the GPUs can read each other's."""
    import torch

    from modelkiln.targets.collectives import _slot
    from modelkiln.targets.compiled import compile_loaded, serving_entry
    from modelkiln.targets.decoding import _Marks

    buffer = None
    if one_shot:
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(hidden, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(buffer, "0")
        torch._dynamo.mark_static_address(buffer)

    def reduces(x):
        for _ in range(count):
            if buffer is None:
                x = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", "0"))
            else:
                x = torch.ops.symm_mem.one_shot_all_reduce_copy(_slot(buffer, x), x, "sum", "0")
            x = x * 0.5
        return x

    compiled = compile_loaded(reduces, serving_entry(mode))
    x = torch.ones(1, 1, hidden, dtype=torch.bfloat16, device=device)
    for _ in range(5):
        x = compiled(x).clone()  # the graph's output buffer is its own: next input a copy
    marks = _Marks(device)
    marks.mark()
    for _ in range(50):
        x = compiled(x).clone()
    marks.mark()
    return marks.elapsed()[0] / 50


def warm(compiled, device: str, tiny: bool) -> None:
    """Compile (and record the CUDA graphs of) the prefill and one-token shapes."""
    from modelkiln.targets.decoding import greedy_tokens, prompt_ids

    greedy_tokens(compiled, prompt_ids(shape_config(tiny).vocab_size)[0], 4, device)


def rank_main(rank: int, ranks: int, port: int, tiny: bool, mode: str, results, barrier) -> None:
    """One rank of the two-GPU row: split, export, compile, decode; rank 0 reports. The
    three processes compile at once, then the one-GPU row is timed alone, then this."""
    import torch
    import torch.distributed as dist

    from modelkiln.registry.formats import hf_wrapper
    from modelkiln.steps.shard import find_head_splits, find_splits, split_module
    from modelkiln.targets.compiled import compile_loaded, serving_entry
    from modelkiln.targets.decoding import export_decoder, find_causal_lm, time_decoding
    from modelkiln.targets.sharded import WORLD_GROUP, _backend, fast_all_reduces

    cuda = not tiny
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=ranks)
    t0 = time.time()
    wrapper = hf_wrapper(build(tiny, device))
    ids = torch.zeros(2, 16, dtype=torch.long, device=device)
    with torch.no_grad():
        splits = find_splits(wrapper, (ids,), ranks) + find_head_splits(wrapper, ranks)
        local = split_module(wrapper, splits, rank, ranks)
        del wrapper
        if cuda:
            torch.cuda.empty_cache()
        lm = find_causal_lm(local)
        program, fused = export_decoder(lm)
    per_rank = sum(p.numel() for p in local.parameters())
    del local, lm
    built = time.time() - t0
    t0 = time.time()
    module = program.module()
    all_reduce = fast_all_reduces([module], WORLD_GROUP, "cuda" if cuda else "cpu", ranks, device)
    compiled = compile_loaded(module, serving_entry(mode))
    warm(compiled, device, tiny)
    compile_s = time.time() - t0
    barrier.wait()  # all compiled
    barrier.wait()  # the one-GPU row timed
    decode = time_decoding(compiled, shape_config(tiny).vocab_size, device)
    found = {"decode": decode, "parameters_per_rank": per_rank, "splits": len(splits), "fused": fused,
             "build_s": built, "compile_s": compile_s, "all_reduce": all_reduce}
    if rank == 0:
        results.put(("two", found))
    shape = shape_config(tiny)
    reduce_ms = {}
    for kind in (["nccl", "one-shot"] if "one-shot" in all_reduce else [_backend(device)]):
        try:
            reduce_ms[kind] = _all_reduce_ms(device, shape.hidden_size, 2 * shape.num_hidden_layers, mode,
                                             kind == "one-shot")
        except Exception as exc:  # both ranks fail alike: reported, the decode figures stand
            print(f"rank {rank}: timing {kind} all-reduces alone failed: {str(exc)[:200]}", flush=True)
    if rank == 0:
        results.put(("reduce_ms", reduce_ms))
    dist.destroy_process_group()


def one_main(tiny: bool, mode: str, results, barrier) -> None:
    """The one-GPU row, on cuda:0 beside rank 0 (compiled while the ranks compile, timed
    while they wait)."""
    import torch

    from modelkiln.targets.compiled import compile_loaded, serving_entry
    from modelkiln.targets.decoding import export_decoder, time_decoding

    device = "cpu" if tiny else "cuda:0"
    if tiny:
        torch.set_num_threads(1)
    t0 = time.time()
    model = build(tiny, device)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        program, fused = export_decoder(model)
    del model
    compiled = compile_loaded(program.module(), serving_entry(mode))
    warm(compiled, device, tiny)
    compile_s = time.time() - t0
    barrier.wait()
    decode = time_decoding(compiled, shape_config(tiny).vocab_size, device)
    results.put(("one", {"decode": decode, "parameters": params, "fused": fused, "seconds": compile_s}))
    barrier.wait()


def both(tiny: bool, mode: str) -> dict:
    """{"one": ..., "two": ..., "reduce_ms": ...} from three processes: two ranks and the
    one-GPU row."""
    import multiprocessing

    from modelkiln.targets.sharded import _free_port

    context = multiprocessing.get_context("spawn")
    results, port, barrier = context.Queue(), _free_port(), context.Barrier(3)
    processes = [context.Process(target=rank_main, args=(r, 2, port, tiny, mode, results, barrier))
                 for r in range(2)]
    processes.append(context.Process(target=one_main, args=(tiny, mode, results, barrier)))
    for process in processes:
        process.start()
    found = {}
    while len(found) < 3:
        key, value = results.get(timeout=900)
        found[key] = value
        shown = value
        print(f"{key}: {json.dumps(shown)[:600]}", flush=True)
    for process in processes:  # a rank stuck in NCCL's teardown must not hold the table back
        process.join(30)
        if process.is_alive():
            process.kill()
    return found


def speed(tiny: bool) -> None:
    mode = "default" if tiny else "reduce-overhead"
    if tiny:
        bandwidth = None
    else:
        from bench_gpu import bandwidth_gb_s

        bandwidth = bandwidth_gb_s()
        print(f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    found = both(tiny, mode)
    one, two = found["one"], found["two"]
    reduce = found["reduce_ms"]
    used = "one-shot" if "one-shot" in two["all_reduce"] else next(iter(reduce), None)
    two["reduce_ms"] = reduce.get(used, float("nan"))
    print(f"two GPUs' all-reduces: {two['all_reduce']}")
    print(f"{2 * shape_config(tiny).num_hidden_layers} chained all-reduces of one token's hidden state in one CUDA graph: "
          + ", ".join(f"{kind} {ms:.3f} ms ({ms / (2 * shape_config(tiny).num_hidden_layers) * 1000:.1f} us each)"
                      for kind, ms in reduce.items()))

    def floor(parameters):
        return f"{parameters * 2 / (bandwidth * 1e9) * 1000:.2f}" if bandwidth else ""

    ms_one, ms_two = one["decode"]["decode_ms_per_token"], two["decode"]["decode_ms_per_token"]
    rows = [
        ["one GPU: bf16 -> compile.inductor (promoted)", f"{ms_one:.2f}", floor(one["parameters"]),
         f"{one['decode']['decode_p95_ms']:.2f}", f"{one['decode']['prefill_ms']:.2f}", "1.00x", ""],
        [f"two GPUs: bf16 -> shard.tensor_parallel -> compile.inductor ({two['splits']} splits)", f"{ms_two:.2f}",
         floor(two["parameters_per_rank"]), f"{two['decode']['decode_p95_ms']:.2f}",
         f"{two['decode']['prefill_ms']:.2f}", f"{ms_two / ms_one:.2f}x",
         f"{two['reduce_ms']:.2f} ms ({two['reduce_ms'] / ms_two:.0%})"],
    ]
    name = "small Llama on the CPU (gloo, mode default)" if tiny else "Llama-2-7B-shaped, random bf16"
    print_table(f"{name}, batch 1, 32-token prompt, 32 greedy tokens"
                + (f"; copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""),
                rows, ["variant", "decode ms/token", "floor ms", "p95 ms", "prefill ms", "vs one GPU",
                       f"{2 * shape_config(tiny).num_hidden_layers} all-reduces alone (share)"])
    if bandwidth:
        print(f"one GPU at {ms_one / float(floor(one['parameters'])):.2f}x its floor; "
              f"two GPUs at {ms_two / float(floor(two['parameters_per_rank'])):.2f}x theirs")
    same = sum(a == b for a, b in zip(one["decode"]["tokens"], two["decode"]["tokens"]))
    print(f"greedy tokens (random weights, near ties) equal at {same} of {len(one['decode']['tokens'])} positions")


def two_target_config(tiny: bool) -> Path:
    """A default kiln folder with targets ``one`` and ``two`` (devices = 2) of the torch runtime."""
    device = "cpu" if tiny else "cuda"
    compiled = 'compile.inductor(mode="default")' if tiny else "compile.inductor"
    folder = kiln_folder(replacements={
        'runtimes = ["onnxruntime", "torch"]': 'runtimes = ["torch"]',
        "batch_sizes = [1, 8]": "batch_sizes = [1]"})
    text = (folder / "kiln.toml").read_text()
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", f"recipes = ['{compiled}', 'quantize.bf16 -> {compiled}']", text)
    cpu = text[text.index("[targets.cpu]"):text.index("[policy]")]
    one = cpu.replace("[targets.cpu]", "[targets.one]").replace('device = "cpu"', f'device = "{device}"')
    two = one.replace("[targets.one]", "[targets.two]").replace("devices = 1", "devices = 2")
    two = re.sub(r"(?m)^recipes = \[[^\]]*\]",
                 f"recipes = ['shard.tensor_parallel -> {compiled}', 'quantize.bf16 -> shard.tensor_parallel -> "
                 f"{compiled}']", two)
    assert "devices = 2" in two and "shard.tensor_parallel" in two
    (folder / "kiln.toml").write_text(text.replace(cpu, one + two))
    return folder


def equality(tiny: bool) -> None:
    import numpy as np
    import torch
    from helpers import trained_llama

    from modelkiln.config import load_config
    from modelkiln.targets.decoding import greedy_tokens

    t0 = time.time()
    model, text = trained_llama()
    trained_s = time.time() - t0
    folder = two_target_config(tiny)
    staged = folder / "staged" / "trained-llama"
    model.save_pretrained(str(staged), safe_serialization=True)
    windows = np.stack([np.frombuffer(text[i * 97:i * 97 + 64], dtype=np.uint8) for i in range(16)])
    np.savez(staged / "calibration.npz", inputs=windows.astype(np.int64))
    t0 = time.time()
    variants, promoted = optimize(load_config(folder / "kiln.toml"), staged, "trained-llama")
    daemon_s = time.time() - t0
    rows, checks, ones = [], {}, {}
    for v in sorted(variants, key=lambda v: (v["target"], v["variant"])):
        m = v.get("metrics") or {}
        decode = m.get("decode") or {}
        recipe = v["variant"].removeprefix("torch:")
        check = {}
        if v["status"] == "succeeded":
            document = json.loads((Path(v["path"]) / "variant.json").read_text())
            check = document["metrics"].get("checks", {}).get("shard_check", {})
        if check:
            checks["bf16" if "bf16" in recipe else "fp32"] = check
        elif v["status"] == "succeeded" and v["target"] == "one":
            ones["bf16" if "bf16" in recipe else "fp32"] = Path(v["path"])
        rows.append([v["target"], recipe + (" (promoted)" if v["id"] in promoted else ""), v["status"],
                     f"{decode['decode_ms_per_token']:.3f}" if decode else "", f"{m['quality']:.4f}" if m else "",
                     f"{check['greedy_equal']} of {check['greedy_positions']}, {check['greedy_ties']} ties"
                     if check else "", (v.get("reason") or "")[:70]])
    print_table(f"trained small Llama (trained {trained_s:.0f} s), default gate, {daemon_s:.0f} s in the daemon",
                rows, ["target", "variant", "status", "decode ms/token", "next-token top-1",
                       "greedy tokens over 2 ranks = unsharded", "reason"])
    # The one-GPU artifacts, loaded as serving code would, on the sharded check's prompts.
    for kind, path in ones.items():
        if kind not in checks:
            continue
        prompts = np.load(next(Path(v["path"]) for v in variants if v["target"] == "two" and v["status"] ==
                               "succeeded" and ("bf16" in v["variant"]) == (kind == "bf16")) / "greedy_check.npz")[
            "prompts"]
        device = "cpu" if tiny else "cuda:0"
        program = torch.export.load(str(path / "decode.pt2")).module().to(device)
        one = [greedy_tokens(program, p, 16, device) for p in prompts]
        two = checks[kind]["greedy_tokens"]
        same = sum(a == b for x, y in zip(one, two) for a, b in zip(x, y))
        print(f"{kind}: the one-GPU artifact's greedy tokens equal the two-GPU variant's at {same} of "
              f"{sum(len(x) for x in one)} positions ({len(prompts)} text prompts x 16 tokens)")


def main():
    tiny = "--tiny" in sys.argv
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    if not only or "speed" in only:
        speed(tiny)
    if not only or "equality" in only:
        equality(tiny)


if __name__ == "__main__":
    main()
