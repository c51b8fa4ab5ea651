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
import time
import warnings

import numpy as np


DECODE_FILE = "decode.pt2"
# serving.json's key for where a program's weights come from (``derived.py``).
PROGRAM_WEIGHTS = "program_weights"
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


def save_decoder(module, path, strip=None) -> dict | None:
    """Export and save the decoding program of the causal LM inside ``module`` to
    ``path``; what serving needs to know of it (vocabulary, cache length, fused Linear
    calls), ``{"error": ...}`` when it cannot be exported (the forward program still
    serves), or None when ``module`` holds no causal LM. ``strip(program, prefix)``, if
    given, takes out of the program the weights stored beside it (``derived.py``) and
    says where they come from. A failed write raises, as any other part of the
    artifact's would."""
    import torch

    lm = find_causal_lm(module)
    if lm is None:
        return None
    try:
        program, fused = export_decoder(lm)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    # transformers' exportable wrapper holds the model as ``model``.
    sources = strip(program, "model.") if strip is not None else {}
    torch.export.save(program, str(path))
    entry = {"vocab_size": int(lm.config.vocab_size), "max_cache_len": PROMPT_TOKENS + NEW_TOKENS,
             "fused_linears": fused}
    if sources:
        entry[PROGRAM_WEIGHTS] = sources
    return entry


def time_decoding(program, vocab_size: int, device: str, rounds: int = ROUNDS) -> dict:
    """Prefill of the seeded prompt, then greedy decoding of NEW_TOKENS, ``rounds`` times
    after one warm-up round; medians, and the tokens generated (the same every round).

    Decoding runs as a serving loop should: each next token is chosen on the device and
    fed back without the host waiting for it, so the host queues step n+1 while the
    device computes step n, and a step costs the device's time, not the device's plus the
    host's dispatch. Events recorded between the steps time each one on the device's own
    clock; the tokens are read once the round ends.
    """
    import torch

    prompt = torch.from_numpy(prompt_ids(vocab_size)).to(device)
    prefill_positions = torch.arange(PROMPT_TOKENS, device=device)
    positions = torch.arange(PROMPT_TOKENS, PROMPT_TOKENS + NEW_TOKENS, device=device)
    prefills, steps, tokens = [], [], []
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            marks = _Marks(device)
            marks.mark()
            logits = program(input_ids=prompt, cache_position=prefill_positions)
            marks.mark()
            generated = []
            for step in range(NEW_TOKENS):
                token = logits[:, -1:].argmax(-1)
                generated.append(token)
                logits = program(input_ids=token, cache_position=positions[step:step + 1])
                marks.mark()
            times = marks.elapsed()
            if round_ == 0:
                continue  # warm-up: first calls of each shape compile or allocate
            prefills.append(times[0])
            steps.extend(times[1:])
            tokens = torch.cat(generated, 1)[0].tolist()
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "prefill_ms": float(np.median(prefills)),
        "decode_ms_per_token": float(np.median(steps)),
        "decode_p95_ms": float(np.percentile(steps, 95)),
        "tokens": tokens,
    }


class _Marks:
    """Points in time along a stream of device work: CUDA events recorded without waiting
    on a GPU, the wall clock on the CPU (where each call returns when its work is done)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.points = []

    def mark(self) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter_ns())

    def elapsed(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.cuda:
            self.points[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        return [(b - a) / 1e6 for a, b in zip(self.points, self.points[1:])]


def greedy_tokens(program, prompt, new_tokens: int, device: str) -> list[int]:
    """The ``new_tokens`` tokens greedy decoding of ``prompt`` (a 1-D sequence of ids)
    produces with a decoding program, starting a new sequence at cache position 0."""
    import torch

    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=device).reshape(1, -1)
    length = ids.shape[1]
    positions = torch.arange(length + new_tokens, device=device)
    generated = []
    with torch.inference_mode():
        logits = program(input_ids=ids, cache_position=positions[:length])
        for step in range(new_tokens):
            token = logits[:, -1:].argmax(-1)
            generated.append(token)
            if step + 1 < new_tokens:
                logits = program(input_ids=token, cache_position=positions[length + step:length + step + 1])
    return torch.cat(generated, 1)[0].tolist()
