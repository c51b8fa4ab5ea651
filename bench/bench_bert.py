"""A BERT-base-sized encoder: the promoted variant against PyTorch fp32 eager.

A Hugging Face folder holding `BertModel(BertConfig())` (110 M parameters, random
init), with `calibration.npz` of token ids at sequence 128 (all real tokens: attention mask of
ones) so the daemon measures that length. `kiln optimize`'s path runs the recipes below on the `cpu` target (both
runtimes, 2 threads, batch 1). Then, in this process, the promoted artifact (loaded
as serving code would) and the eager fp32 model take turns in interleaved rounds on the
same inputs, so that both see the same machine; the ratio is of their medians. The
cosine is of the promoted variant's outputs to the eager model's on 16 sequences.
Run: .venv/bin/python bench/bench_bert.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import encoder_rows, interleaved, optimize, print_table, recipes_config

SEQ = 128
RECIPES = [
    "baseline",
    "quantize.int8_dynamic",
    "quantize.int8_dynamic(per_channel=True)",
    "quantize.int8_static",
]
ROUNDS, RUNS = 7, 8


def main():
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from modelkiln.config import load_config
    from modelkiln.plugins.manager import load_plugins

    torch.manual_seed(0)
    torch.set_num_threads(2)
    folder = recipes_config(RECIPES, "")
    text = (folder / "kiln.toml").read_text().replace("batch_sizes = [1, 8]", "batch_sizes = [1]")
    (folder / "kiln.toml").write_text(text)
    config = load_config(folder / "kiln.toml")
    staged = folder / "staged" / "bert"
    BertModel(BertConfig()).save_pretrained(str(staged), safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30522, size=(64, SEQ)).astype(np.int64)
    np.savez(staged / "calibration.npz", **encoder_rows(ids))

    started = time.time()
    variants, promoted = optimize(config, staged, "bert")
    elapsed = time.time() - started
    best = next(v for v in variants if v["id"] in promoted)

    eager_model = BertModel.from_pretrained(str(staged)).eval()

    def eager(inputs):
        with torch.inference_mode():
            ids_t = torch.from_numpy(inputs["input_ids"])
            return eager_model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).last_hidden_state.numpy()

    runtime = load_plugins().runtimes[best["runtime"]]
    served = runtime.load(Path(best["path"]), best["file"], "cpu", 2)
    one = encoder_rows(ids[:1])
    medians = interleaved({"eager": lambda: eager(one), "promoted": lambda: served(one)}, "cpu", ROUNDS, RUNS)
    check = encoder_rows(ids[:16])
    a, b = eager(check).ravel(), np.asarray(served(check)).ravel()
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    rows = []
    for v in variants:
        m = v.get("metrics")
        if not m:
            rows.append(["", v["variant"], v["status"], "", "", "", "", v.get("reason", "")[:60]])
            continue
        rows.append(["*" if v["id"] in promoted else "", v["variant"], v["status"],
                     f"{m['latency_p50_ms']:.1f}", f"{m['runoff']['latency_p50_ms']:.1f}" if m.get("runoff") else "",
                     f"{m['size_bytes'] / 2**20:.1f}", f"{m['quality']:.4f}", ""])
    print_table(f"BERT-base, seq {SEQ}, batch 1, cpu target, 2 threads: the daemon's measurements "
                f"({elapsed:.0f} s)", rows, ["", "variant", "status", "p50 ms", "run-off p50", "MiB", "cosine",
                                             "reason"])
    print_table(f"promoted vs PyTorch fp32 eager, interleaved ({ROUNDS} rounds of {RUNS} runs each)", [[
        best["variant"], f"{medians['eager']:.1f}", f"{medians['promoted']:.1f}",
        f"{medians['eager'] / medians['promoted']:.2f}x", f"{cosine:.4f}",
    ]], ["promoted", "eager fp32 ms", "promoted ms", "speed-up", "cosine to eager"])


if __name__ == "__main__":
    main()
