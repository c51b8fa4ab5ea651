"""Decoding at a server's batch sizes: bf16 against FP8 and int4 weights, per step and per token.

A server decodes many sequences at once. At batch 1 a decoding step reads every weight
once and int4 reads a quarter of bf16's bytes; with 32 sequences the step does 32 times
the arithmetic on the same bytes, and a kernel that unpacks its weights per call can
fall behind. This bench measures it with the code the torch runtime runs for a causal
LM's variant (``targets/decoding.py``): for each batch size a decoding program with a
static KV cache of its own (``decode_b<N>.pt2``), sibling Linears fused, compiled as
``compile.inductor`` serves it; bf16 weights, then each variant's step on the same
weights (``--variants``): ``quantize.fp8`` (W8A8), ``quantize.fp8_weight_only`` and
``quantize.weight_only(bits=4, block_size=128)`` (int4); plus prefill at 512 and 2,048
tokens. Each row gives the variant's time over bf16's (under 1: faster).

Llama-2-7B's layer shapes, ``--layers`` of them (8 by default, to fit one call of the
GPU machine; per-step times scale with the layer count, the ratios hardly), random
weights created on the GPU.

Run on the GPU machine: python3 bench/bench_llm_batches.py [--layers 8] [--batches 1 8 32]
    [--variants fp8 fp8_weight_only int4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_llm import llama_7b_config
from common import print_table


def main():
    import torch
    from transformers import LlamaForCausalLM

    from modelkiln.plugins.api import TORCH, ModelHandle, StepContext
    from modelkiln.steps import fp8
    from modelkiln.steps.weight_only import WeightOnly
    from modelkiln.targets.compiled import compile_loaded, serving_entry
    from modelkiln.targets.decoding import PROMPT_TOKENS, export_decoder, time_decoding

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--variants", nargs="+", default=["fp8", "fp8_weight_only", "int4"])
    args = parser.parse_args()
    config = llama_7b_config()
    config.num_hidden_layers = args.layers
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    def fresh():
        torch.manual_seed(0)  # the same weights for every variant
        with torch.device("cuda"):
            return LlamaForCausalLM(config).eval().to(torch.bfloat16)

    model = fresh()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.layers} Llama-2-7B-shaped layers: {params / 1e9:.2f} B parameters", flush=True)

    def compiled(model, **shape):
        with torch.no_grad():
            program, _ = export_decoder(model, **shape)
        return compile_loaded(program.module(), serving_entry("reduce-overhead"))

    def measure(name: str, model) -> dict:
        """Batch-1 figures with each larger batch and the prefill lengths, one program at a
        time (each holds its fused weights: they would not all fit at once)."""
        t0 = time.time()
        single = compiled(model)
        rows = {}
        for batch in args.batches:
            if batch == 1:
                continue
            figures = time_decoding(single, config.vocab_size, "cuda", batched={batch: compiled(model, batch_size=batch)})
            rows.update({row["batch_size"]: row for row in figures["batches"]})
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        longest = max(args.prefill)
        figures = time_decoding(single, config.vocab_size, "cuda",
                                prefill=(compiled(model, max_cache_len=longest + 1), args.prefill))
        rows.setdefault(1, {"batch_size": 1, "decode_ms_per_token": figures["decode_ms_per_token"],
                            "tokens_per_s": 1000.0 / figures["decode_ms_per_token"]})
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
        del single
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        return {"batches": rows, "prefill": {row["tokens"]: row for row in figures["prefill"]}}

    def converted(variant: str):
        context = StepContext(Path("/tmp"), "gpu", "torch", "cuda", 1, {})
        handle = ModelHandle(TORCH, fresh(), [])
        with torch.no_grad():
            if variant == "int4":
                WeightOnly().apply(handle, {"bits": 4, "block_size": 128, "method": "rtn"}, context)
            else:
                fp8.convert(handle, context, activations=variant == "fp8")
        return handle.obj

    results = {"bf16": measure("bf16", model)}
    del model
    for variant in args.variants:
        results[variant] = measure(variant, converted(variant))
        torch.cuda.empty_cache()
    bf16 = results["bf16"]
    rows = []
    for batch in sorted(bf16["batches"]):
        base = bf16["batches"][batch]["decode_ms_per_token"]
        rows.append([f"decode, batch {batch}", f"{base:.3f}"] + [
            f"{results[v]['batches'][batch]['decode_ms_per_token']:.3f} "
            f"({results[v]['batches'][batch]['decode_ms_per_token'] / base:.2f}x)" for v in args.variants])
    for tokens in sorted(bf16["prefill"]):
        base = bf16["prefill"][tokens]["prefill_ms"]
        rows.append([f"prefill {tokens}", f"{base:.2f}"] + [
            f"{results[v]['prefill'][tokens]['prefill_ms']:.2f} ({results[v]['prefill'][tokens]['prefill_ms'] / base:.2f}x)"
            for v in args.variants])
    print_table(f"{args.layers} Llama-2-7B-shaped layers ({params / 1e9:.2f} B, random weights), "
                f"{PROMPT_TOKENS}-token prompts, programs compiled as compile.inductor serves them; "
                "ms per decoding step (per prefill), the variant's time over bf16's in brackets",
                rows, ["", "bf16", *args.variants])


if __name__ == "__main__":
    main()
