"""GPU figures, for the lent GPU machine: one call runs the GPU tests and this table.

1. The memory bandwidth the GPU gives here: a device-to-device copy of 2 GiB, bytes
   read plus written over the time between CUDA events (the floor of any
   weight-reading workload is its bytes over this).
2. A BERT-base-sized encoder (random init) at batch 32, sequence 128, on a `cuda`
   target (torch runtime): the daemon builds and measures baseline, bf16, fp16 and both
   compiled at load (`compile.inductor`, CUDA graphs) and promotes the fastest within the
   quality gate; then the promoted artifact, PyTorch
   fp32 eager and bf16 eager under `torch.compile` (the peer) take turns in interleaved
   rounds timed with CUDA events.
Run on the GPU machine: python3 bench/bench_gpu.py   (after `pytest tests/test_gpu.py`)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_bert import SEQ
from common import encoder_rows, interleaved, kiln_folder, optimize, print_table

BATCH = 32
ROUNDS, RUNS = 5, 10


def bandwidth_gb_s() -> float:
    import torch

    source = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del source, target
    torch.cuda.empty_cache()
    return 2 * 2 * 2**30 / seconds / 1e9


def main():
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from modelkiln.config import load_config
    from modelkiln.plugins.manager import load_plugins

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bandwidth = bandwidth_gb_s()

    torch.manual_seed(0)
    folder = kiln_folder(recipes=["baseline", "quantize.bf16", "quantize.fp16", "quantize.bf16 -> compile.inductor",
                                  "quantize.fp16 -> compile.inductor"], replacements={
        'device = "cpu"': 'device = "cuda"', 'runtimes = ["onnxruntime", "torch"]': 'runtimes = ["torch"]',
        "batch_sizes = [1, 8]": f"batch_sizes = [{BATCH}]",
        "objective_batch_size = 1": f"objective_batch_size = {BATCH}"})
    config = load_config(folder / "kiln.toml")
    staged = folder / "staged" / "bert"
    BertModel(BertConfig()).save_pretrained(str(staged), safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 30522, size=(64, SEQ)).astype(np.int64)
    np.savez(staged / "calibration.npz", **encoder_rows(ids))
    started = time.time()
    variants, promoted = optimize(config, staged, "bert")
    elapsed = time.time() - started
    best = next(v for v in variants if v["id"] in promoted)

    served = load_plugins().runtimes["torch"].load(Path(best["path"]), best["file"], "cuda", 2)
    batch = torch.from_numpy(ids[:BATCH]).cuda()
    mask = torch.ones_like(batch)

    def promoted_call():
        with torch.inference_mode():
            served.module(batch, mask, torch.zeros_like(batch))

    alone = interleaved({"promoted": promoted_call}, "cuda", ROUNDS, RUNS)["promoted"]
    eager = BertModel.from_pretrained(str(staged)).eval().cuda()
    half = BertModel.from_pretrained(str(staged), torch_dtype=torch.float16).eval().cuda()
    peer = torch.compile(BertModel.from_pretrained(str(staged), torch_dtype=torch.bfloat16).eval().cuda())

    def run(module):
        def call():
            with torch.inference_mode():
                module(input_ids=batch, attention_mask=mask)
        return call

    medians = interleaved({"fp32 eager": run(eager), "fp16 eager": run(half),
                                "bf16 torch.compile (peer)": run(peer), "promoted": promoted_call}, "cuda", ROUNDS, RUNS)
    medians["promoted, timed before the others were loaded"] = alone
    rows = [[v["variant"], v["status"], f"{v['metrics']['latency_p50_ms']:.2f}" if v.get("metrics") else "",
             f"{v['metrics']['quality']:.4f}" if v.get("metrics") else v.get("reason", "")[:60],
             "*" if v["id"] in promoted else ""] for v in variants]
    print_table(f"the daemon's cuda target, BERT-base batch {BATCH} seq {SEQ} ({elapsed:.0f} s)", rows,
                ["variant", "status", "p50 ms", "cosine", "promoted"])
    base = medians["fp32 eager"]
    print_table(f"interleaved, CUDA events, {ROUNDS} rounds of {RUNS}; copy bandwidth {bandwidth:.0f} GB/s", [
        [name, f"{ms:.2f}", f"{BATCH * 1000 / ms:.0f}", f"{base / ms:.2f}x"] for name, ms in medians.items()
    ], ["", "ms per batch", "sequences/s", "vs fp32 eager"])


if __name__ == "__main__":
    main()
