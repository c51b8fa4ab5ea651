"""A 2-rank tensor-parallel variant on the CPU, beside the unsharded model.

Two models built in code (random weights: the check is equality, not accuracy): a wide
MLP 64-4096-4096-10 and a 12-block transformer encoder (width 512, MLP 2048, sequence
128). One `cpu` target with `devices = 2`: the baseline is the unsharded torch.export
program on the target's 2 threads, the shard variant is 2 rank processes of 1 thread each
over gloo. The equality check is the one every load of the variant runs: the sharded
output on the check rows against the unsharded model's. One run.
Run: .venv/bin/python bench/bench_shard.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import optimize, print_table, recipes_config

SEQ, VOCAB, WIDTH, DEPTH = 128, 1000, 512, 12


def wide_mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


def encoder():
    import torch
    import torch.nn as nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(WIDTH, 8, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(DEPTH)
            )

        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = block(h)
            return h

    torch.manual_seed(0)
    return Encoder()


MODELS = {
    "wide": ("wide_mlp", "[64]", "float32"),
    "encoder": ("encoder", f"[{SEQ}]", "int64"),
}


def main():
    import torch
    from safetensors.torch import save_file

    from modelkiln.config import load_config

    rows = []
    for model, (factory, shape, dtype) in MODELS.items():
        arch = f'\n[architectures.{model}]\nfactory = "bench_shard:{factory}"\ninput_shape = {shape}\ninput_dtype = "{dtype}"\n'
        folder = recipes_config(["baseline", "shard.tensor_parallel"], arch)
        text = (folder / "kiln.toml").read_text().replace("devices = 1", "devices = 2").replace(
            'runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]')
        (folder / "kiln.toml").write_text(text)
        config = load_config(folder / "kiln.toml")
        torch.manual_seed(0)
        staged = folder / "staged" / model
        staged.mkdir(parents=True)
        save_file(globals()[factory]().state_dict(), str(staged / "model.safetensors"))
        started = time.time()
        variants, _ = optimize(config, staged, model)
        by_name = {v["variant"]: v for v in variants}
        base, shard = by_name["torch:baseline"], by_name["torch:shard.tensor_parallel"]
        if shard["status"] != "succeeded":
            rows.append([model, "", "", "", "", "", "", shard["status"] + ": " + (shard.get("reason") or "")[:80]])
            continue
        check = json.loads((Path(shard["path"]) / "variant.json").read_text())["metrics"]["checks"]["shard_check"]
        record = shard["lineage"][0]["record"]
        b, s = base["metrics"]["batches"], shard["metrics"]["batches"]
        rows.append([
            model, len(record["splits"]),
            f"{record['parameters_per_rank'] / (record['split_parameters'] + record['replicated_parameters']):.0%}",
            f"{b[0]['latency_p50_ms']:.2f} / {s[0]['latency_p50_ms']:.2f}",
            f"{b[-1]['latency_p50_ms']:.2f} / {s[-1]['latency_p50_ms']:.2f}",
            f"{b[0]['latency_p50_ms'] / s[0]['latency_p50_ms']:.2f}x",
            f"{check['max_abs_diff']:.2e} (tol {check['tolerance']:.1e})",
            f"{time.time() - started:.0f} s",
        ])
    print_table("2-rank tensor parallel on cpu (gloo), unsharded / sharded, 2 threads in all", rows,
                ["model", "splits", "params per rank", "p50 ms b1", "p50 ms b8", "speed-up b1",
                 "max |diff| on check rows", "run"])


if __name__ == "__main__":
    main()
