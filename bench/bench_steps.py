"""Built-in steps on a classifier wide enough that compute dominates.

An MLP 64 -> 2048 -> 2048 -> 10 trained on scikit-learn's digits (train.npz holds the
training inputs for recovery fine-tunes), optimized once on a `cpu` target with both
runtimes, 2 threads; every variant measured in its own process.
Run: .venv/bin/python bench/bench_steps.py [RECIPE ...] (every recipe below without one)
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import optimize, print_table, recipes_config

WIDTH = 2048
RECIPES = [
    "baseline",
    "quantize.int8_dynamic",
    "quantize.int8_static",
    "quantize.bf16",
    "quantize.weight_only",
    "quantize.weight_only(bits=8)",
    "prune.structured",
    "prune.structured -> quantize.int8_dynamic",
    "prune.structured -> quantize.int8_static",
    "quantize.ternary",
    "quantize.binary",
]


def wide_mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def train(epochs: int = 8):
    import torch

    from modelkiln.demo import digits_data, fit_classifier

    torch.manual_seed(0)
    (x_train, y_train), (x_eval, y_eval) = digits_data()
    return fit_classifier(wide_mlp(), x_train, y_train, epochs), x_train, x_eval, y_eval


def main():
    from modelkiln.config import load_config
    from modelkiln.demo import write_checkpoint

    recipes = sys.argv[1:] or RECIPES
    folder = recipes_config(recipes, '\n[architectures.wide]\nfactory = "bench_steps:wide_mlp"\ninput_shape = [64]\n')
    config = load_config(folder / "kiln.toml")
    model, x_train, x_eval, y_eval = train()
    checkpoint_dir = folder / "staged" / "wide"
    write_checkpoint(model, x_eval, y_eval, checkpoint_dir, train_inputs=x_train)
    started = time.time()
    variants, promoted = optimize(config, checkpoint_dir, "wide")
    reference = next(v for v in variants if v["variant"] == "torch:baseline")["metrics"]
    batch = config.targets["cpu"].batch_sizes[-1]
    rows = []
    for v in variants:
        m = v.get("metrics")
        if not m:
            rows.append(["", v["variant"], v["status"], "", "", "", "", "", "", v.get("reason", "")[:60]])
            continue
        b1 = m["batches"][0]["latency_p50_ms"]
        b8 = m["batches"][-1]
        rows.append([
            "*" if v["id"] in promoted else "", v["variant"], v["status"], f"{b1:.3f}",
            f"{reference['latency_p50_ms'] / b1:.2f}x", f"{b8['latency_p50_ms']:.3f}",
            f"{m['size_bytes'] / 2**20:.2f}", f"{m['quality']:.4f}",
            f"{m['quality'] / reference['quality']:.2%}", (v.get("reason") or "")[:60],
        ])
    print_table(
        f"wide MLP 64-{WIDTH}-{WIDTH}-10 on digits, cpu target, 2 threads ({time.time() - started:.0f} s)",
        rows, ["", "variant", "status", "p50 ms b1", "vs torch fp32", f"p50 ms b{batch}",
               "MiB", "accuracy", "of fp32 acc", "reason"],
    )


if __name__ == "__main__":
    main()
