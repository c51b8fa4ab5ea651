"""Causal language models measured as their users judge them: prefill and per-token decode.

A plain forward pass over a whole sequence says little about a language model in
service: what users wait for is the prompt's prefill, then one decoding step per new
token, each reading the whole KV cache. So for a Hugging Face causal LM the torch runtime
saves, beside the forward program, ``decode.pt2``: a ``torch.export`` program of the model
with a static KV cache held in its buffers (transformers' exportable static-cache
wrapper), taking ``(input_ids, cache_position)`` for any number of new positions. The
measurement then runs a seeded random prompt of ``PROMPT_TOKENS`` through it (prefill)
and decodes ``NEW_TOKENS`` greedily, one position per call, timing each.

A new sequence simply starts again at cache position 0: the static cache's attention
mask hides whatever a previous sequence left beyond the current position.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from .harness import stopwatch

DECODE_FILE = "decode.pt2"
PROMPT_TOKENS = 32
NEW_TOKENS = 32
ROUNDS = 3


def find_causal_lm(module):
    """The Hugging Face model inside ``module`` that can generate, or None."""
    if "transformers" not in sys.modules:  # nothing built from transformers can be inside
        return None
    from transformers import PreTrainedModel

    for sub in module.modules():
        if isinstance(sub, PreTrainedModel) and sub.can_generate():
            return sub
    return None


def prompt_ids(vocab_size: int, tokens: int = PROMPT_TOKENS, seed: int = 0) -> np.ndarray:
    """The measured prompt: seeded, so a test can replay it through ``generate``."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(1, tokens)).astype(np.int64)


def export_decoder(model, max_cache_len: int = PROMPT_TOKENS + NEW_TOKENS, fuse: bool = True):
    """A ``torch.export`` program of causal LM ``model`` with a static KV cache of
    ``max_cache_len`` positions, batch 1, any number of new positions per call, with its
    sibling Linear layers fused (``fusion.py``) unless ``fuse`` is false; and how many
    Linear calls the fusion removed."""
    import torch
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    from .fusion import fused_program

    model.generation_config.cache_implementation = "static"
    device = next(model.parameters()).device
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_cache_len, device=device)
    positions = torch.export.Dim("positions", min=1, max=max_cache_len - 1)
    inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
              "cache_position": torch.arange(2, device=device)}
    shapes = {"input_ids": {1: positions}, "cache_position": {0: positions}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = wrapper.export(**inputs, dynamic_shapes=shapes, strict=False)
        if not fuse:
            return program, 0
        return fused_program(program, (), inputs, lambda module: shapes)


def save_decoder(module, path) -> dict | None:
    """Export and save the decoding program of the causal LM inside ``module`` to
    ``path``; what serving needs to know of it (vocabulary, cache length, fused Linear
    calls), ``{"error": ...}`` when it cannot be exported (the forward program still
    serves), or None when ``module`` holds no causal LM. A failed write raises, as any
    other part of the artifact's would."""
    import torch

    lm = find_causal_lm(module)
    if lm is None:
        return None
    try:
        program, fused = export_decoder(lm)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    torch.export.save(program, str(path))
    return {"vocab_size": int(lm.config.vocab_size), "max_cache_len": PROMPT_TOKENS + NEW_TOKENS,
            "fused_linears": fused}


def time_decoding(program, vocab_size: int, device: str, rounds: int = ROUNDS) -> dict:
    """Prefill of the seeded prompt, then greedy decoding of NEW_TOKENS, ``rounds`` times
    after one warm-up round; medians, and the tokens generated (the same every round)."""
    import torch

    prompt = torch.from_numpy(prompt_ids(vocab_size)).to(device)
    start, stop = stopwatch(device)
    prefills, steps, tokens = [], [], []
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            start()
            logits = program(input_ids=prompt, cache_position=torch.arange(PROMPT_TOKENS, device=device))
            prefill = stop()
            generated, step_times = [], []
            for position in range(PROMPT_TOKENS, PROMPT_TOKENS + NEW_TOKENS):
                token = logits[:, -1:].argmax(-1)
                generated.append(int(token))
                start()
                logits = program(input_ids=token, cache_position=torch.tensor([position], device=device))
                step_times.append(stop())
            if round_ == 0:
                continue  # warm-up: first calls of each shape compile or allocate
            prefills.append(prefill)
            steps.extend(step_times)
            tokens = generated
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "prefill_ms": float(np.median(prefills)),
        "decode_ms_per_token": float(np.median(steps)),
        "decode_p95_ms": float(np.percentile(steps, 95)),
        "tokens": tokens,
    }
