"""Accuracy-aware int8 on a trained model with a planted activation outlier.

The wide digits MLP of bench_steps.py (64-2048-2048-10, compute-bound), with one input
channel scaled by 1000 and the first layer's weights for it divided by 1000: the same function in float, but the first layer's
input now has the outlier channel trained transformers are known for. Naive dynamic
int8 quantizes that input per tensor and loses the other channels; the tuned step tries
the other form whole first (per-channel weight scales on onnxruntime, SmoothQuant on
torch), then keeps the most sensitive layers in float; smoothing chained by hand
(SmoothQuant) moves the outlier into the weights so every layer stays int8. All against
the fp32 baseline, per runtime.
Run: .venv/bin/python bench/bench_tuning.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_steps import train
from common import optimize, print_table, recipes_config

RECIPES = ["baseline", "quantize.int8_dynamic(tune=False)", "quantize.int8_dynamic",
           "quantize.smooth -> quantize.int8_dynamic(tune=False)"]


def main():
    import numpy as np
    import torch

    from modelkiln.config import load_config
    from modelkiln.demo import write_checkpoint
    from modelkiln.policy import within_tolerance

    folder = recipes_config(RECIPES, '\n[architectures.digits]\nfactory = "bench_steps:wide_mlp"\ninput_shape = [64]\n')
    config = load_config(folder / "kiln.toml")
    model, _, x_eval, y_eval = train()
    channel = int(np.argmax(x_eval.std(0)))
    x_eval = x_eval.copy()
    x_eval[:, channel] *= 1000.0
    with torch.no_grad():
        model[0].weight[:, channel] /= 1000.0
    write_checkpoint(model, x_eval, y_eval, folder / "staged" / "digits")
    variants, _ = optimize(config, folder / "staged" / "digits", "digits")
    rows = []
    for v in variants:
        m = v["metrics"]
        base = next(b for b in variants if b["variant"] == f"{v['runtime']}:baseline")["metrics"]
        record = v["lineage"][-1]["record"] if v["lineage"] else {}
        rows.append([v["variant"], f"{m['latency_p50_ms']:.4f}", f"{base['latency_p50_ms'] / m['latency_p50_ms']:.2f}x",
                     f"{m['quality']:.4f}", "yes" if within_tolerance(v, config.policy) else "no",
                     record.get("form", ""), ", ".join(record.get("kept_in_float", [])) or ""])
    print_table("wide digits MLP with a planted outlier channel (x1000), batch 1, 2 threads", rows,
                ["variant", "p50 ms", "vs baseline", "accuracy", "passes gate", "tuned form", "kept in float"])


if __name__ == "__main__":
    main()
