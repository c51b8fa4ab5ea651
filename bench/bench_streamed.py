"""A model over the target's memory budget: shard.size_capped against the whole model.

A Llama-style causal LM (hidden 1024, 12 layers, vocabulary 32000, untied head: 0.22 B
parameters, 880 MB of fp32 weights) saved as a Hugging Face folder, run through the daemon's path on
a cpu target with ``memory_mb = 256`` (torch runtime, recipes baseline,
``shard.size_capped`` and ``quantize.bf16 -> shard.size_capped``). Then each artifact is loaded in a fresh process, as serving code
would, and run on one 128-token sequence: the process's peak resident memory (VmHWM,
and the anonymous part at the end), the weights resident at once (the streamed variant
counts them), and the median latency of 5 runs after one warm-up, 2 threads.
Run: .venv/bin/python bench/bench_streamed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import kiln_folder, optimize, print_table

BUDGET_MB = 256

PROBE = r"""
import json, statistics, sys, time
from pathlib import Path
import numpy as np
from modelkiln.plugins.manager import load_plugins
path, file = Path(sys.argv[1]), sys.argv[2]
served = load_plugins().runtimes["torch"].load(path, file, "cpu", 2)
ids = {"input_ids": np.random.default_rng(0).integers(0, 32000, (1, 128))}
served(ids)
times = []
for _ in range(5):
    t = time.perf_counter(); served(ids); times.append(time.perf_counter() - t)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
kib = lambda key: int(status[key].split()[0])
print(json.dumps({"ms": statistics.median(times) * 1000, "hwm_mib": kib("VmHWM") / 1024,
                  "anon_mib": kib("RssAnon") / 1024,
                  "resident_weights_mib": getattr(served.module, "peak_bytes", 0) / 2**20}))
"""


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelkiln.config import load_config

    folder = kiln_folder(recipes=["baseline", "shard.size_capped", "quantize.bf16 -> shard.size_capped"], replacements={
        'runtimes = ["onnxruntime", "torch"]': 'runtimes = ["torch"]', "memory_mb = 0": f"memory_mb = {BUDGET_MB}",
        "batch_sizes = [1, 8]": "batch_sizes = [1]"})
    config = load_config(folder / "kiln.toml")
    staged = folder / "staged" / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                                 num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                 max_position_embeddings=256)).save_pretrained(str(staged), safe_serialization=True)
    started = time.time()
    variants, promoted = optimize(config, staged, "llama")
    elapsed = time.time() - started
    rows = []
    for v in variants:
        if v["status"] != "succeeded":
            rows.append([v["variant"], v["status"], "", "", "", "", "", v.get("reason", "")[:50]])
            continue
        out = subprocess.run([sys.executable, "-c", PROBE, v["path"], v["file"]], capture_output=True, text=True,
                             check=True)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        m = v["metrics"]
        files = sorted(os.listdir(v["path"]))
        shards = [f for f in files if f.endswith(".safetensors")]
        rows.append([("* " if v["id"] in promoted else "") + v["variant"], v["status"],
                     f"{m['size_bytes'] / 2**20:.0f}", str(len(shards)) if shards else v["file"],
                     f"{probe['resident_weights_mib']:.1f}" if probe["resident_weights_mib"] else "all",
                     f"{probe['hwm_mib']:.0f} / {probe['anon_mib']:.0f}", f"{probe['ms']:.1f}", ""])
    print_table(f"Llama-style 0.22 B (880 MB fp32), cpu target with memory_mb = {BUDGET_MB}, seq 128, batch 1, "
                f"2 threads (daemon's part {elapsed:.0f} s)", rows,
                ["variant", "status", "MiB on disk", "shards", "weights resident MiB", "peak RSS / anon MiB",
                 "ms", "reason"])


if __name__ == "__main__":
    main()
