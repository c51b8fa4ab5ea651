"""2:4 sparsity against dense bf16 on the GPU: the 7B shape's blocks at a prefill.

A Llama-architecture model with Llama-2-7B's widths (hidden 4096, MLP 11008, 32 heads;
one block, random init, a 1,024-token vocabulary so that the blocks are what is timed)
goes through ``kiln optimize``'s path on a ``cuda`` target (torch, batch 1, one
2,048-token sequence) with dense bf16 compiled at load and the same with
``prune.sparse24`` first (no recovery: random weights have nothing to recover). The
daemon measures and gates both; then both promoted-or-not artifacts, loaded as the
runtime loads them, take turns in interleaved rounds timed with CUDA events (ratio of
medians), and their last hidden states are compared with the fp32 original's.

Run on the GPU machine: python3 bench/bench_sparse24.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import encoder_rows, interleaved, kiln_folder, optimize, print_table

SEQUENCE, ROWS = 2048, 4
DENSE = "quantize.bf16 -> compile.inductor"
SPARSE = "prune.sparse24(recovery_steps=0) -> quantize.bf16 -> compile.inductor"
ROUNDS, RUNS = 7, 10


def main():
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaModel

    from modelkiln.config import load_config
    from modelkiln.plugins.manager import load_plugins

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    folder = kiln_folder(recipes=["baseline", DENSE, SPARSE], replacements={
        'device = "cpu"': 'device = "cuda"', 'runtimes = ["onnxruntime", "torch"]': 'runtimes = ["torch"]',
        "batch_sizes = [1, 8]": "batch_sizes = [1]"})
    staged = folder / "staged" / "llama7b-1"
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    LlamaModel(config).save_pretrained(str(staged), safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 1024, size=(ROWS, SEQUENCE)).astype(np.int64)
    rows = encoder_rows(ids)
    np.savez(staged / "calibration.npz", input_ids=rows["input_ids"], attention_mask=rows["attention_mask"])
    started = time.time()
    variants, promoted = optimize(load_config(folder / "kiln.toml"), staged, "llama7b-1")
    elapsed = time.time() - started

    runtime = load_plugins().runtimes["torch"]
    by_recipe = {v["recipe"]: v for v in variants}
    feed = {"input_ids": ids[:1], "attention_mask": rows["attention_mask"][:1]}
    original = LlamaModel.from_pretrained(str(staged)).eval().cuda()
    with torch.inference_mode():
        expected = original(**{k: torch.from_numpy(v).cuda() for k, v in feed.items()}).last_hidden_state.float()
    del original
    torch.cuda.empty_cache()
    served, fidelity = {}, {}
    for recipe in (DENSE, SPARSE):
        v = by_recipe[recipe]
        if v["status"] != "succeeded":
            continue
        served[recipe] = runtime.load(Path(v["path"]), v["file"], "cuda", 2)
        got = torch.from_numpy(served[recipe](feed)).cuda()
        fidelity[recipe] = (float(torch.nn.functional.cosine_similarity(got, expected, dim=-1).mean()),
                            float((got - expected).norm() / expected.norm()))
    tensors = [torch.from_numpy(v).cuda() for v in feed.values()]

    def call(serving):
        def run():
            with torch.inference_mode():
                serving.module(*tensors)
        return run

    medians = interleaved({r: call(s) for r, s in served.items()}, "cuda", ROUNDS, RUNS) if served else {}
    table = []
    for v in variants:
        m = v.get("metrics") or {}
        record = {k: val for step in v["lineage"] for k, val in (step.get("record") or {}).items()}
        cos, rel = fidelity.get(v["recipe"], (None, None))
        table.append(["*" if v["id"] in promoted else "", v["recipe"], v["status"],
                      f"{m['latency_p50_ms']:.3f}" if m else "", f"{m['quality']:.4f}" if m else "",
                      f"{medians[v['recipe']]:.3f}" if v["recipe"] in medians else "",
                      f"{medians[DENSE] / medians[v['recipe']]:.2f}x" if DENSE in medians and v["recipe"] in medians
                      else "", f"{cos:.4f} / {rel:.4f}" if cos is not None else "",
                      f"{record['sparse_layers']} layers 2:4, {len(record.get('dense_layers', {}))} dense"
                      if "sparse_layers" in record else "", (v.get("reason") or "")[:70]])
    print_table(f"Llama-2-7B widths, 1 block, random init, one {SEQUENCE}-token sequence, cuda target "
                f"({elapsed:.0f} s in the daemon); interleaved: {ROUNDS} rounds of {RUNS}, CUDA events", table,
                ["", "recipe", "status", "p50 ms (daemon)", "quality (gate's)", "ms (interleaved)", "vs dense bf16",
                 "cosine / rel. error vs fp32", "layers", "reason"])


if __name__ == "__main__":
    main()
