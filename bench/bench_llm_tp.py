"""Tensor-parallel decoding on two GPUs beside one: a Llama-2-7B-shaped checkpoint.

For the two-GPU machine (nvidia-h200-x2). The checkpoint: the 7B shape of
``bench_llm.py``, random weights, saved as a bf16 Hugging Face folder with
``calibration.npz`` (4 prompts of 32 tokens: the daemon's quality samples and the
sharded variant's equality check rows). The daemon's path (``kiln optimize``) runs two
targets of the torch runtime, batch 1, promoting by ``decode_ms_per_token``:

- ``one``: ``device = "cuda"``, ``devices = 1``, recipe ``baseline``;
- ``two``: ``device = "cuda"``, ``devices = 2``, recipe ``shard.tensor_parallel`` (MLP
  chains and attention heads split over cuda:0 and cuda:1, NCCL).

Neither is compiled (``compile.inductor`` does not take a sharded program), so the two
rows differ by the split alone. Printed: each variant's prefill and per-token decode
latency, its floor (the bytes of weights one GPU reads per token over the copy
bandwidth: all of them on one GPU, the replicated part plus half the split part on two),
the sharded variant's equality check (max |difference| against the unsharded outputs and
its tolerance), whether both variants decode the same greedy tokens, and the cost of one
all-reduce of a token's hidden state (two per block per token).

The gate is loosened to a 50 % drop, as in ``bench_llm_daemon.py``: the daemon's
reference is computed on the CPU and random weights make the top logits nearly tie.

Run on the two-GPU machine:  python3 bench/bench_llm_tp.py
Check the script on a CPU:   python3 bench/bench_llm_tp.py --tiny   (a small Llama, gloo)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_llm import llama_7b_config  # noqa: E402
from common import kiln_folder, optimize, print_table  # noqa: E402

ALL_REDUCES = 200


def _all_reduce_rank(rank: int, port: int, backend: str, hidden: int, dtype: str, result) -> None:
    import torch
    import torch.distributed as dist

    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.ones(1, 1, hidden, dtype=getattr(torch, dtype), device=device)
    for _ in range(20):
        dist.all_reduce(tensor)
    if backend == "nccl":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(ALL_REDUCES):
        dist.all_reduce(tensor)
        if backend == "nccl":
            torch.cuda.synchronize()  # as in decoding: each step waits for its result
    if rank == 0:
        result.put((time.perf_counter() - started) / ALL_REDUCES * 1e6)
    dist.destroy_process_group()


def all_reduce_us(backend: str, hidden: int, dtype: str) -> float:
    """Microseconds per all-reduce of one token's hidden state between two ranks."""
    import multiprocessing

    from modelkiln.targets.sharded import _free_port

    context = multiprocessing.get_context("spawn")
    result, port = context.Queue(), _free_port()
    ranks = [context.Process(target=_all_reduce_rank, args=(r, port, backend, hidden, dtype, result))
             for r in range(2)]
    for process in ranks:
        process.start()
    value = result.get(timeout=300)
    for process in ranks:
        process.join(60)
    return value


def two_target_config(tiny: bool) -> Path:
    """A kiln folder with targets ``one`` (baseline, one device) and ``two`` (the shard step
    over two devices)."""
    device = "cpu" if tiny else "cuda"
    folder = kiln_folder(recipes=["baseline"], replacements={
        'runtimes = ["onnxruntime", "torch"]': 'runtimes = ["torch"]',
        "batch_sizes = [1, 8]": "batch_sizes = [1]",
        'objective = "latency_p50_ms"': 'objective = "decode_ms_per_token"',
        "max_quality_drop = 0.01": "max_quality_drop = 0.5"})
    text = (folder / "kiln.toml").read_text()
    one = text[text.index("[targets.cpu]"):text.index("[policy]")]
    one = one.replace("[targets.cpu]", "[targets.one]").replace('device = "cpu"', f'device = "{device}"')
    two = one.replace("[targets.one]", "[targets.two]").replace("devices = 1", "devices = 2")
    two = re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["shard.tensor_parallel"]', two)
    assert "devices = 2" in two and "shard.tensor_parallel" in two
    (folder / "kiln.toml").write_text(text.replace(text[text.index("[targets.cpu]"):text.index("[policy]")], one + two))
    return folder


def main():
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelkiln.config import load_config

    tiny = "--tiny" in sys.argv
    started = time.time()
    shape = (LlamaConfig(vocab_size=2000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
             if tiny else llama_7b_config())
    folder = two_target_config(tiny)
    config = load_config(folder / "kiln.toml")
    staged = folder / "staged" / "llama"
    torch.manual_seed(0)
    with torch.device("cpu" if tiny else "cuda"):
        model = LlamaForCausalLM(shape).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(staged), safe_serialization=True)
    del model
    prompts = np.random.default_rng(1).integers(0, shape.vocab_size, size=(4, 32)).astype(np.int64)
    np.savez(staged / "calibration.npz", inputs=prompts)
    print(f"checkpoint: {params / 1e9:.3f} B parameters, written in {time.time() - started:.0f} s; "
          f"disk free {shutil.disk_usage(folder).free / 1e9:.0f} GB", flush=True)

    t0 = time.time()
    variants, promoted = optimize(config, staged, "llama")
    daemon_s = time.time() - t0
    shutil.rmtree(staged, ignore_errors=True)

    if tiny:
        bandwidth, backend = None, "gloo"
    else:
        from bench_gpu import bandwidth_gb_s

        bandwidth, backend = bandwidth_gb_s(), "nccl"
    reduce_us = all_reduce_us(backend, shape.hidden_size, "bfloat16")
    rows, tokens = [], {}
    for v in variants:
        m = v.get("metrics") or {}
        decode = m.get("decode") or {}
        if not decode:
            rows.append([v["target"], v["variant"], v["status"], "", "", "", "", "", (v.get("reason") or "")[:80]])
            continue
        document = json.loads((Path(v["path"]) / "variant.json").read_text())
        record = v["lineage"][0]["record"] if v["lineage"] else {}
        per_gpu = record.get("parameters_per_rank", params)
        floor = f"{per_gpu * 2 / (bandwidth * 1e9) * 1000:.2f}" if bandwidth else ""
        check = document["metrics"]["checks"].get("shard_check")
        tokens[v["target"]] = decode["tokens"]
        rows.append([v["target"], v["variant"], v["status"], f"{decode['decode_ms_per_token']:.2f}", floor,
                     f"{decode['prefill_ms']:.2f}", f"{m['quality']:.4f}",
                     f"{check['max_abs_diff']:.3g} <= {check['tolerance']:.3g}" if check else "", ""])
    print_table(f"{'small Llama on the CPU (gloo)' if tiny else 'Llama-2-7B-shaped, bf16'}: one device against "
                f"two ({daemon_s:.0f} s in the daemon)" + (f"; copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""),
                rows, ["target", "variant", "status", "decode ms/token", "floor ms", "prefill ms",
                       "next-token top-1", "sharded check", "reason"])
    if len(tokens) == 2:
        same = sum(a == b for a, b in zip(tokens["one"], tokens["two"]))
        print(f"greedy tokens equal at {same} of {len(tokens['one'])} positions")
    layers = shape.num_hidden_layers
    print(f"all-reduce of one token's hidden state ({shape.hidden_size} bf16, {backend}): {reduce_us:.1f} us; "
          f"{2 * layers} per token = {2 * layers * reduce_us / 1000:.2f} ms/token")


if __name__ == "__main__":
    main()
