"""A Llama-2-7B-shaped decoder on one GPU: per-token decode latency against the floor.

For the lent GPU machine, one call (about 6 minutes on an H100). The model (6.74 B
parameters, random weights, created on the GPU) is decoded greedily at batch 1 after a
32-token prompt, in one run:

- transformers' own ``generate``: fp32 eager, bf16 eager, and bf16 with a static cache
  and its built-in compile (the peer users would get from transformers alone);
- modelkiln's decoding path, the code the torch runtime runs for a causal LM's variant
  (``targets/decoding.py``): the bf16 model exported with a static KV cache, first with
  its Linear layers as they are (run as exported, then compiled at load with CUDA
  graphs), then as the runtime saves ``decode.pt2`` now, sibling Linears fused
  (``targets/fusion.py``), compiled as ``quantize.bf16 -> compile.inductor`` serves it;
  then the same after the cuda path of ``quantize.weight_only``: int4 weights
  (PyTorch's tinygemm kernel, block 128); timed per token with CUDA events.

The floor is the bytes of the weights read once per token over the copy bandwidth
measured in the same run. Quality of the int4 variant: the quality gate's metric,
teacher-forced next-token top-1 agreement with bf16 on 4 seeded 64-token prompts, and
the mean KL divergence.

Not yet through the daemon: a dropped 7B checkpoint would have its forward program and
decode program saved per variant (27 GB each in fp32), which the machine's 64 GB disk
does not hold; see BENCHMARKS.md.
Run on the GPU machine: python3 bench/bench_llm.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import bandwidth_gb_s
from common import print_table

NEW = 32
ROUNDS = 3


def llama_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def generate_per_token(model, prompt, **kwargs) -> tuple[float, list[int]]:
    """Median over rounds of (time to generate NEW tokens - time to generate 1) / (NEW - 1)."""
    import torch

    def timed(new):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None, **kwargs)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000, out[0, prompt.shape[1]:].tolist()

    timed(NEW)  # warm-up (and compilation, for the static cache)
    timed(1)
    per_token, tokens = [], []
    for _ in range(ROUNDS):
        full, tokens = timed(NEW)
        first, _ = timed(1)
        per_token.append((full - first) / (NEW - 1))
    per_token.sort()
    return per_token[len(per_token) // 2], tokens


def main():
    import torch
    from transformers import LlamaForCausalLM

    from modelkiln.targets.compiled import compile_loaded, serving_entry
    from modelkiln.targets.decoding import PROMPT_TOKENS, export_decoder, prompt_ids, time_decoding

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    bandwidth = bandwidth_gb_s()
    config = llama_7b_config()
    torch.manual_seed(0)
    started = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f} B parameters on the GPU in {time.time() - started:.0f} s; "
          f"copy bandwidth {bandwidth:.0f} GB/s", flush=True)
    prompt = torch.from_numpy(prompt_ids(config.vocab_size)).cuda()
    assert prompt.shape[1] == PROMPT_TOKENS
    rows = []

    def add(name, ms, bytes_per_param, tokens, reference):
        floor = params * bytes_per_param / (bandwidth * 1e9) * 1000
        agree = "" if reference is None else f"{sum(a == b for a, b in zip(tokens, reference)) / NEW:.2f}"
        rows.append([name, f"{ms:.2f}", f"{floor:.2f}", f"{ms / floor:.2f}x", agree])
        print(f"  {name}: {ms:.2f} ms/token (floor {floor:.2f})", flush=True)

    # no_grad, not inference_mode: the export below must not meet inference tensors.
    with torch.no_grad():
        ms, _ = generate_per_token(model, prompt)
        add("transformers generate, fp32 eager", ms, 4, [], None)
        fp32_ms = ms
        model.to(torch.bfloat16)
        torch.cuda.empty_cache()
        ms, reference = generate_per_token(model, prompt)
        add("transformers generate, bf16 eager", ms, 2, reference, None)
        t0 = time.time()
        ms, tokens = generate_per_token(model, prompt, cache_implementation="static")
        add(f"transformers generate, bf16 static cache + compile (peer; {time.time() - t0:.0f} s)", ms, 2,
            tokens, reference)
        torch._dynamo.reset()

    t0 = time.time()
    program, _ = export_decoder(model, fuse=False)
    exported = time.time() - t0
    decode = time_decoding(program.module(), config.vocab_size, "cuda")
    add(f"decode program, bf16, as exported, Linears unfused (export {exported:.0f} s)",
        decode["decode_ms_per_token"], 2, decode["tokens"], reference)
    t0 = time.time()
    compiled = compile_loaded(program.module(), serving_entry("reduce-overhead"))
    decode = time_decoding(compiled, config.vocab_size, "cuda")
    add(f"decode program, bf16, Linears unfused -> compile.inductor ({time.time() - t0:.0f} s)",
        decode["decode_ms_per_token"], 2, decode["tokens"], reference)
    del compiled, program
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    # What the torch runtime saves now: sibling Linears fused (targets/fusion.py).
    t0 = time.time()
    with torch.no_grad():
        program, fused = export_decoder(model)
    exported = time.time() - t0
    t0 = time.time()
    compiled = compile_loaded(program.module(), serving_entry("reduce-overhead"))
    decode = time_decoding(compiled, config.vocab_size, "cuda")
    add(f"modelkiln decode.pt2 ({fused} Linears fused; export {exported:.0f} s), bf16 -> compile.inductor "
        f"({time.time() - t0:.0f} s)", decode["decode_ms_per_token"], 2, decode["tokens"], reference)
    prefill = decode["prefill_ms"]
    bf16_ms = decode["decode_ms_per_token"]

    # Weight-only int4: the cuda path of quantize.weight_only on the same bf16
    # weights, then the same export and compile.
    import numpy as np

    from modelkiln.plugins.api import TORCH, ModelHandle, StepContext
    from modelkiln.steps.weight_only import WeightOnly
    from modelkiln.targets.quality import NEXT_TOKEN_TOP1, next_token_kl, score

    del compiled, program
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    prompts = torch.from_numpy(np.random.default_rng(1).integers(0, config.vocab_size, (4, 64))).cuda()
    with torch.no_grad():
        bf16_logits = model(prompts).logits.float().cpu().numpy()
    quality = {}
    # int8 is not offered on cuda (no fused dequantizing kernel: weight_only.py says why).
    for bits, block, bytes_per_param in ((4, 128, 0.5 + 4 / 128),):
        context = StepContext(Path("/tmp"), "gpu", "torch", "cuda", 1, {})
        with torch.no_grad():
            WeightOnly().apply(ModelHandle(TORCH, model, []), {"bits": bits, "block_size": block}, context)
            logits = model(prompts).logits.float().cpu().numpy()
        quality[bits] = (score(NEXT_TOKEN_TOP1, logits, bf16_logits, None), next_token_kl(logits, bf16_logits))
        t0 = time.time()
        with torch.no_grad():
            program, _ = export_decoder(model)
        compiled = compile_loaded(program.module(), serving_entry("reduce-overhead"))
        decode = time_decoding(compiled, config.vocab_size, "cuda")
        add(f"modelkiln decode.pt2, bf16 -> weight_only(bits={bits}, block_size={block}) -> compile.inductor "
            f"({time.time() - t0:.0f} s)", decode["decode_ms_per_token"], bytes_per_param, decode["tokens"], reference)
        del compiled, program
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    print_table(f"Llama-2-7B-shaped decoder ({params / 1e9:.2f} B, random weights), batch 1, {PROMPT_TOKENS}-token "
                f"prompt, {NEW} greedy tokens; copy bandwidth {bandwidth:.0f} GB/s; fp32 eager generate "
                f"{fp32_ms:.2f} ms/token (int4 floor: 0.5 byte + a bf16 scale and zero per 128 weights)", rows,
                ["", "ms/token", "floor ms", "vs floor", "tokens = bf16 eager"])
    for bits, (top1, kl) in quality.items():
        print(f"int{bits} weights: next-token top-1 agreement with bf16 {top1:.4f} (teacher-forced, 4 x 64 "
              f"positions), mean KL {kl:.5f} nats")
    print(f"bf16 fused + compile.inductor: {bf16_ms:.2f} ms/token = {fp32_ms / bf16_ms:.2f}x faster than fp32 eager; "
          f"bf16 prefill {prefill:.2f} ms; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
