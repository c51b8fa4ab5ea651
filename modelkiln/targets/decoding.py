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

A server decodes many sequences at once, and a variant that wins at batch 1 can lose at
the batch sizes a server runs (int4 kernels that dequantize per call, say). So decoding
is also measured at the target's ``decode_batch_sizes``: one program per batch size
(``decode_b8.pt2``, ...), each sequence with its own rows of the KV cache; and prefill at
its ``prefill_tokens`` (long prompts, batch 1) through ``prefill.pt2``, whose cache holds
the longest. The programs hold no weights of their own (``derived.py``): loaded, they
share the variant's one copy.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np


DECODE_FILE = "decode.pt2"
PREFILL_FILE = "prefill.pt2"
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


def prompt_ids(vocab_size: int, tokens: int = PROMPT_TOKENS, seed: int = 0, batch: int = 1) -> np.ndarray:
    """The measured prompts, ``batch`` rows: seeded, so a test can replay them through
    ``generate`` (the first row is the same whatever ``batch``)."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, tokens)).astype(np.int64)


def decoder_file(batch_size: int) -> str:
    """The decoding program of ``batch_size`` sequences at once."""
    return DECODE_FILE if batch_size == 1 else f"decode_b{batch_size}.pt2"


def export_decoder(model, max_cache_len: int = PROMPT_TOKENS + NEW_TOKENS, fuse: bool = True, batch_size: int = 1):
    """A ``torch.export`` program of causal LM ``model`` with a static KV cache of
    ``max_cache_len`` positions for ``batch_size`` sequences, any number of new positions
    per call, with its sibling Linear layers fused (``fusion.py``) unless ``fuse`` is
    false; and how many Linear calls the fusion removed."""
    import torch
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    from .fusion import fused_program

    model.generation_config.cache_implementation = "static"
    device = next(model.parameters()).device
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=batch_size, max_cache_len=max_cache_len,
                                                    device=device)
    positions = torch.export.Dim("positions", min=1, max=max_cache_len - 1)
    inputs = {"input_ids": torch.zeros(batch_size, 2, dtype=torch.long, device=device),
              "cache_position": torch.arange(2, device=device)}
    shapes = {"input_ids": {1: positions}, "cache_position": {0: positions}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = wrapper.export(**inputs, dynamic_shapes=shapes, strict=False)
        if not fuse:
            return program, 0
        return fused_program(program, (), inputs, lambda module: shapes)


def prefill_lengths(lm, wanted) -> list[int]:
    """The prompt lengths prefill is measured at: ``wanted`` (the target's
    ``prefill_tokens``), each at most the model's context."""
    context = int(getattr(lm.config, "max_position_embeddings", 0) or 0)
    return sorted({min(int(tokens), context) if context else int(tokens) for tokens in wanted})


def save_decoders(module, directory, strip=None, batch_sizes=(1,), prefill_tokens=()) -> dict | None:
    """Export and save into ``directory`` the decoding programs of the causal LM inside
    ``module``: batch 1 (``decode.pt2``), each other of ``batch_sizes``, and the prefill
    program for ``prefill_tokens``; what serving needs to know of them (vocabulary,
    cache lengths, fused Linear calls, files), ``{"error": ...}`` when the batch-1
    program cannot be exported (the forward program still serves), or None when
    ``module`` holds no causal LM. A larger batch or the prefill program that fails to
    export records its own error and the rest stands. ``strip(program, prefix)``, if
    given, takes out of a program the weights stored beside it (``derived.py``) and says
    where they come from. A failed write raises, as any other part of the artifact's would."""
    lm = find_causal_lm(module)
    if lm is None:
        return None

    def saved(file: str, **shape) -> tuple[dict, int]:
        """The program's entry (its file, where its weights come from) and how many
        Linear calls its fusion removed."""
        import torch

        program, fused = export_decoder(lm, **shape)
        # transformers' exportable wrapper holds the model as ``model``.
        sources = strip(program, "model.") if strip is not None else {}
        torch.export.save(program, str(Path(directory) / file))
        return {"file": file, **({PROGRAM_WEIGHTS: sources} if sources else {})}, fused

    try:
        single, fused = saved(DECODE_FILE)
    except Exception as exc:
        return {"error": _error(exc)}
    entry = {"vocab_size": int(lm.config.vocab_size), "max_cache_len": PROMPT_TOKENS + NEW_TOKENS, **single,
             "fused_linears": fused}
    batches = {}
    for batch in sorted({int(b) for b in batch_sizes} - {1}):
        try:
            batches[str(batch)] = saved(decoder_file(batch), batch_size=batch)[0]
        except Exception as exc:
            batches[str(batch)] = {"error": _error(exc)}
    if batches:
        entry["batches"] = batches
    lengths = prefill_lengths(lm, prefill_tokens)
    if lengths:
        cache = lengths[-1] + 1
        try:
            entry["prefill"] = {"tokens": lengths, "max_cache_len": cache,
                                **saved(PREFILL_FILE, max_cache_len=cache)[0]}
        except Exception as exc:
            entry["prefill"] = {"tokens": lengths, "error": _error(exc)}
    return entry


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def time_decoding(program, vocab_size: int, device: str, rounds: int = ROUNDS, batched: dict | None = None,
                  prefill=None) -> dict:
    """Prefill of the seeded prompt, then greedy decoding of NEW_TOKENS, ``rounds`` times
    after one warm-up round; medians, and the tokens generated (the same every round).
    ``batched`` (batch size -> program) decodes that many sequences at once the same way;
    ``prefill`` (program, prompt lengths) times prefill of longer prompts.

    Decoding runs as a serving loop should: each next token is chosen on the device and
    fed back without the host waiting for it, so the host queues step n+1 while the
    device computes step n, and a step costs the device's time, not the device's plus the
    host's dispatch. Events recorded between the steps time each one on the device's own
    clock; the tokens are read once the round ends.
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    prefills, steps, tokens = _decode_rounds(program, vocab_size, device, rounds, 1)
    single = _batch_row(1, steps)
    figures = {
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "prefill_ms": float(np.median(prefills)),
        "decode_ms_per_token": single["decode_ms_per_token"],
        "decode_p95_ms": single["decode_p95_ms"],
        "tokens": tokens,
    }
    if batched:
        rows = [single]
        for batch, batch_program in sorted(batched.items()):
            rows.append(_batch_row(batch, _decode_rounds(batch_program, vocab_size, device, rounds, batch)[1]))
        figures["batches"] = rows
    if prefill is not None:
        figures["prefill"] = [_prefill_row(prefill[0], vocab_size, device, rounds, tokens)
                              for tokens in prefill[1]]
    if device.startswith("cuda"):
        # Everything loaded for the variant, with the KV caches of its largest batch.
        figures["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return figures


def _batch_row(batch: int, steps: list) -> dict:
    step = float(np.median(steps))
    return {"batch_size": batch, "decode_ms_per_token": step, "decode_p95_ms": float(np.percentile(steps, 95)),
            "tokens_per_s": batch * 1000.0 / step}


def _decode_rounds(program, vocab_size: int, device: str, rounds: int, batch: int):
    """Prefill times, per-step times and the first sequence's tokens of ``rounds`` rounds
    (after a warm-up round: first calls of each shape compile or allocate)."""
    import torch

    prompt = torch.from_numpy(prompt_ids(vocab_size, batch=batch)).to(device)
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
                continue
            prefills.append(times[0])
            steps.extend(times[1:])
            tokens = torch.cat(generated, 1)[0].tolist()
    return prefills, steps, tokens


def _prefill_row(program, vocab_size: int, device: str, rounds: int, length: int) -> dict:
    """Prefill of a seeded prompt of ``length`` tokens, batch 1: the median of ``rounds``."""
    import torch

    prompt = torch.from_numpy(prompt_ids(vocab_size, tokens=length, seed=1)).to(device)
    positions = torch.arange(length, device=device)
    times = []
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            marks = _Marks(device)
            marks.mark()
            program(input_ids=prompt, cache_position=positions)
            marks.mark()
            if round_:
                times.extend(marks.elapsed())
    ms = float(np.median(times))
    return {"tokens": length, "prefill_ms": ms, "tokens_per_s": length * 1000.0 / ms}


def summary(decode: dict) -> str:
    """The decoding figures beyond batch 1, as a listing shows them:
    "8: 950 tok/s, 32: 3100 tok/s; prefill 512: 12.1 ms"."""
    parts = [", ".join(f"{row['batch_size']}: {row['tokens_per_s']:.0f} tok/s"
                       for row in decode.get("batches") or [] if row["batch_size"] != 1)]
    parts.append(", ".join(f"prefill {row['tokens']}: {row['prefill_ms']:.1f} ms" for row in decode.get("prefill") or []))
    return "; ".join(part for part in parts if part)


class _Marks:
    """Points in time along a stream of device work: CUDA events recorded without waiting
    on a GPU, the wall clock on the CPU (where each call returns when its work is done)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.points: list = []  # CUDA events on a GPU, perf_counter_ns() on the CPU

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
