"""Depth distillation of a 12-block transformer classifier trained in code.

A transformer encoder (12 pre-norm blocks, width 64, 4 heads, MLP 256) over sequences
of 16 token ids, trained on a learnable counting task (which of four marked token ids
occurs most often); `train.npz` holds unlabelled training inputs, `eval.npz` held-out
labelled ones. `distill.depth` keeps every second block, initialised from the teacher,
and trains the 6-block student on the teacher's soft targets. Teacher and student are
measured by the daemon on the `cpu` target (both runtimes, 2 threads), one run.
Run: .venv/bin/python bench/bench_distill.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import optimize, print_table, recipes_config

SEQ, VOCAB, CLASSES, WIDTH, DEPTH = 16, 32, 4, 64, 12
RECIPES = ["baseline", "distill.depth(steps=800, learning_rate=0.0005)"]


def transformer():
    import torch
    import torch.nn as nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.position = nn.Parameter(torch.zeros(1, SEQ, WIDTH))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(DEPTH)
            )
            self.norm = nn.LayerNorm(WIDTH)
            self.head = nn.Linear(WIDTH, CLASSES)

        def forward(self, ids):
            h = self.embed(ids) + self.position
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h).mean(1))

    return Classifier()


def task(rows: int, seed: int):
    """Label: which of the token ids 0..3 occurs most often (a tie goes to the lowest id)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(rows, SEQ)).astype(np.int64)
    counts = np.stack([(ids == c).sum(1) for c in range(CLASSES)], 1)
    return ids, counts.argmax(1).astype(np.int64)


def train(steps: int = 800):
    import torch

    torch.manual_seed(0)
    model = transformer()
    x, y = task(16384, seed=1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (64,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        optimizer.step()
        schedule.step()
    return model.eval(), x


def main():
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from modelkiln.config import load_config

    arch = f'\n[architectures.tokens]\nfactory = "bench_distill:transformer"\ninput_shape = [{SEQ}]\ninput_dtype = "int64"\n'
    folder = recipes_config(RECIPES, arch)
    config = load_config(folder / "kiln.toml")
    started = time.time()
    teacher, x_train = train()
    x_eval, y_eval = task(2048, seed=2)
    with torch.no_grad():
        accuracy = float((teacher(torch.from_numpy(x_eval)).argmax(1).numpy() == y_eval).mean())
    print(f"teacher trained in {time.time() - started:.0f} s, eval accuracy {accuracy:.4f}")
    staged = folder / "staged" / "tokens"
    staged.mkdir(parents=True)
    save_file(teacher.state_dict(), str(staged / "model.safetensors"))
    np.savez(staged / "eval.npz", inputs=x_eval, labels=y_eval)
    np.savez(staged / "train.npz", inputs=x_train)
    started = time.time()
    variants, promoted = optimize(config, staged, "tokens")
    rows = []
    for v in variants:
        base = next(b for b in variants if b["variant"] == f"{v['runtime']}:baseline")["metrics"]
        m = v.get("metrics")
        if not m:
            rows.append(["", v["variant"], v["status"], "", "", "", "", "", v.get("reason", "")[:60]])
            continue
        record = v["lineage"][0]["record"] if v["lineage"] else {}
        blocks = record.get("blocks_after", DEPTH)
        rows.append([
            "*" if v["id"] in promoted else "", v["variant"], blocks, f"{m['latency_p50_ms']:.3f}",
            f"{base['latency_p50_ms'] / m['latency_p50_ms']:.2f}x", f"{m['batches'][-1]['latency_p50_ms']:.3f}",
            f"{m['size_bytes'] / 2**20:.2f}", f"{m['quality']:.4f}", f"{m['quality'] / base['quality']:.2%}",
        ])
    print_table(
        f"{DEPTH}-block transformer classifier, seq {SEQ}, cpu target, 2 threads ({time.time() - started:.0f} s)",
        rows, ["", "variant", "blocks", "p50 ms b1", "vs teacher", "p50 ms b8", "MiB", "accuracy", "of teacher acc"],
    )


if __name__ == "__main__":
    main()
