"""What the quality gate does on a language model that has learnt something.

No pretrained causal LM ships offline, so one is trained here: a byte-level BPE tokenizer
(2048 tokens) and a small Llama-style model (4 blocks, hidden 256, grouped-query
attention) on the Python standard library's own sources, until its perplexity on
held-out stdlib files is far below uniform (2048). It is saved as a Hugging Face folder
with its tokenizer and ``eval.jsonl`` (held-out text: files the training never saw) and
goes through ``kiln optimize``'s path with the weight-only and int8 recipes on the
``cpu`` target (both runtimes, batch 1), or with ``--device cuda`` on a ``cuda`` target
(torch, where int8 weight-only is not offered and int4 runs PyTorch's tinygemm kernel).
The table gives each variant's next-token
agreement and KL, its perplexity on the held-out text beside the original's, and the
quality the gate compares at the default 1 % drop (with text: the perplexity ratio).

Run: .venv/bin/python bench/bench_llm_quality.py [--steps 600] [--device cpu] [--recipes R ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import kiln_folder, optimize, print_table

RECIPES = ["baseline", "quantize.weight_only(bits=8)", "quantize.weight_only", "quantize.int8_dynamic",
           "quantize.bf16"]
WINDOW = 128


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The standard library's top-level modules, sorted: every 10th held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    return [p for i, p in enumerate(files) if i % 10], [p for i, p in enumerate(files) if i % 10 == 0]


def main():
    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from modelkiln.config import load_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--device", default="cpu", help="where to train and the target's device (cuda on the GPU machine)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help="the target's recipes")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    train_files, held_out = stdlib_files()
    train_text = [p.read_text(errors="replace") for p in train_files]

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(train_text, trainers.BpeTrainer(vocab_size=2048, special_tokens=["</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")
    stream = np.asarray([t for text in train_text for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    windows = torch.from_numpy(stream[: len(stream) // WINDOW * WINDOW].reshape(-1, WINDOW))

    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps)
    started = time.time()
    for step in range(args.steps):
        batch = windows[torch.randint(0, len(windows), (16,))].to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: training loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    model = model.cpu().eval()

    held_text = [p.read_text(errors="replace") for p in held_out]
    held = np.asarray([t for text in held_text for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    held = torch.from_numpy(held[: len(held) // WINDOW * WINDOW].reshape(-1, WINDOW))[:64]
    with torch.inference_mode():
        held_ppl = float(torch.exp(model(input_ids=held, labels=held).loss))
    print(f"held-out perplexity {held_ppl:.1f} (uniform: 2048)")

    replacements = {"batch_sizes = [1, 8]": "batch_sizes = [1]"}
    if args.device != "cpu":
        replacements.update({'device = "cpu"': f'device = "{args.device}"',
                             'runtimes = ["onnxruntime", "torch"]': 'runtimes = ["torch"]'})
    folder = kiln_folder(recipes=args.recipes, replacements=replacements)
    staged = folder / "staged" / "lm"
    model.save_pretrained(str(staged), safe_serialization=True)
    tokenizer.save_pretrained(str(staged))
    # Held-out text as the model's eval data, in paragraphs: about 64 windows of tokens.
    paragraphs = [para for text in held_text for para in text.split("\n\n") if len(para.split()) > 8]
    (staged / "eval.jsonl").write_text("\n".join(json.dumps({"text": para}) for para in paragraphs[:150]) + "\n")
    # Training text as calibration data, for steps that calibrate or recover on it.
    seen = [para for text in train_text for para in text.split("\n\n") if len(para.split()) > 8]
    (staged / "calibration.jsonl").write_text("\n".join(json.dumps({"text": para}) for para in seen[:256]) + "\n")

    started = time.time()
    variants, promoted = optimize(load_config(folder / "kiln.toml"), staged, "lm")
    elapsed = time.time() - started
    rows = []
    for v in variants:
        m = v.get("metrics")
        if not m:
            rows.append(["", v["variant"], v["status"], "", "", "", "", "", "", (v.get("reason") or "")[:60]])
            continue
        checks = json.loads((Path(v["path"]) / "variant.json").read_text())["metrics"]["checks"]
        decode = m.get("decode") or {}
        serving = Path(v["path"]) / "serving.json"
        if not decode and serving.exists():
            print(f"{v['variant']}: no decoding figures; serving.json's decode entry: "
                  f"{json.loads(serving.read_text()).get('decode')}")
        rows.append(["*" if v["id"] in promoted else "", v["variant"], v["status"],
                     f"{decode.get('decode_ms_per_token', float('nan')):.2f}", f"{m['size_bytes'] / 2**20:.1f}",
                     f"{checks['next_token_top1']:.4f}", f"{checks['next_token_kl']:.4f}",
                     f"{checks['perplexity']:.2f} ({checks['perplexity'] / checks['baseline_perplexity'] - 1:+.2%})",
                     f"{m['quality_metric']} {m['quality']:.4f}",
                     "passes" if 1 - m["quality"] <= 0.01 else "gate not met"])
    print_table(f"a trained small Llama (held-out perplexity {held_ppl:.1f}), {args.device} target, batch 1 "
                f"({elapsed:.0f} s in the daemon)", rows,
                ["", "variant", "status", "decode ms/token", "MiB", "next-token top-1", "KL", "perplexity (vs original)",
                 "quality (the gate's)", "1 % gate"])


if __name__ == "__main__":
    main()
