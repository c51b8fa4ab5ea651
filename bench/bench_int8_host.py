"""onnxruntime int8 in the form the host probe picks, against onnxruntime fp32, on a
BERT-base-sized encoder.

`BertModel(BertConfig())` (110 M parameters, random init, eager attention as the daemon
exports it) is exported to ONNX once; `quantize_per_row` writes what
`quantize.int8_dynamic` builds (one activation scale per token, the host's weight form),
and onnxruntime's own `quantize_dynamic` the per-tensor form (with `reduce_range` where
the probe says U8S8 saturates) for comparison. In one process, 2 threads, batch 1, the
three take turns at 77 and then 128 tokens (`interleaved`: rounds of runs in turn, the
median of each), so that every form sees the same machine; ratios are of those medians.

``--cpu-time`` times the same forms again by the process's CPU time per call, with
onnxruntime's threads blocking rather than spinning while they wait: on a host other
work shares, the wall clock at 2 threads loses part of what the arithmetic saves at every
parallel section, and this figure less so.

Beside the speed: the cosine of each form's output to fp32's at 128 tokens, and "padded
== alone", the worst cosine of a sentence's real tokens in a padded batch of 8 (lengths
16 to 128, padding masked) against the same sentence alone.

Run: .venv/bin/python bench/bench_int8_host.py [--rounds N] [--runs N] [--cpu-time]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved, print_table

LENGTHS = (77, 128)
THREADS = 2
VOCAB = 30522


def export_bert(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig()
    config._attn_implementation = "eager"  # the daemon's export: onnxruntime runs it faster
    model = BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, VOCAB, (2, 16))
    path = folder / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={name: {0: "batch", 1: "tokens"}
                                        for name in ("input_ids", "attention_mask", "last_hidden_state")})
    return path


def session(path: Path, spinning: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cpu_time_medians(calls: dict, rounds: int, runs: int) -> dict:
    """Median CPU ms of the process per call, the calls taking turns as ``interleaved``'s do."""
    import time

    import numpy as np

    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(runs):
                start = time.process_time()
                call()
                times[name].append((time.process_time() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def padded_vs_alone(run, rng) -> float:
    """The worst cosine, over 8 sentences of 16 to 128 tokens, of a sentence's real tokens
    in one padded batch against the same sentence alone."""
    import numpy as np

    lengths = np.linspace(16, 128, 8).astype(int)
    ids = np.zeros((len(lengths), lengths.max()), np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1000, VOCAB, length)
        mask[row, :length] = 1
    batched = run(ids, mask)
    return min(cosine(batched[row, :length], run(ids[row:row + 1, :length], mask[row:row + 1, :length])[0])
               for row, length in enumerate(lengths))


def main():
    import numpy as np
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from modelkiln.steps.per_row import quantize_per_row
    from modelkiln.targets.host import SEVEN_BIT_WEIGHTS, describe, host_probe

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--cpu-time", action="store_true", help="also time by the process's CPU time per call")
    args = parser.parse_args()

    probe = host_probe()
    form = probe["int8"]["form"]
    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-int8-"))
    fp32 = export_bert(folder)
    per_row = folder / "per_row.onnx"
    quantize_per_row(fp32, per_row, form=form)
    per_tensor = folder / "per_tensor.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32), str(per_tensor), weight_type=QuantType.QInt8,
                         reduce_range=form == SEVEN_BIT_WEIGHTS)
    forms = {"onnxruntime fp32": fp32, f"per-row int8 ({form}, quantize.int8_dynamic)": per_row,
             f"per-tensor int8 (quantize_dynamic{', reduce_range' if form == SEVEN_BIT_WEIGHTS else ''})": per_tensor}
    sessions = {name: session(path) for name, path in forms.items()}

    def runner(name):
        return lambda ids, mask: sessions[name].run(None, {"input_ids": ids, "attention_mask": mask})[0]

    rng = np.random.default_rng(0)
    medians = {}
    for length in LENGTHS:
        ids = rng.integers(1000, VOCAB, (1, length)).astype(np.int64)
        mask = np.ones_like(ids)
        calls = {name: (lambda name=name, ids=ids, mask=mask: runner(name)(ids, mask)) for name in forms}
        medians[length] = interleaved(calls, "cpu", args.rounds, args.runs)
    ids = rng.integers(1000, VOCAB, (4, 128)).astype(np.int64)
    reference = runner("onnxruntime fp32")(ids, np.ones_like(ids))
    rows = []
    base = "onnxruntime fp32"
    for name in forms:
        out = runner(name)(ids, np.ones_like(ids))
        rows.append([name, *(f"{medians[n][name]:.1f}" for n in LENGTHS),
                     *(f"{medians[n][base] / medians[n][name]:.2f}x" for n in LENGTHS),
                     f"{cosine(out, reference):.4f}", f"{padded_vs_alone(runner(name), np.random.default_rng(1)):.4f}"])
    print(f"host: {describe(probe)}; {os.cpu_count()} CPUs, {THREADS} threads, batch 1; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print_table(f"BERT-base (random weights), onnxruntime, {args.rounds} interleaved rounds of {args.runs} runs",
                rows, ["form", *(f"p50 ms @{n}" for n in LENGTHS), *(f"vs fp32 @{n}" for n in LENGTHS),
                       "cosine to fp32", "padded == alone (min cosine)"])
    if args.cpu_time:
        blocking = {name: session(path, spinning=False) for name, path in forms.items()}
        cpu = {}
        for length in LENGTHS:
            ids = rng.integers(1000, VOCAB, (1, length)).astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            calls = {name: (lambda s=s, feed=feed: s.run(None, feed)) for name, s in blocking.items()}
            cpu[length] = cpu_time_medians(calls, args.rounds, args.runs)
        print_table("The same, by CPU time per call (threads block instead of spinning)",
                    [[name, *(f"{cpu[n][name]:.1f}" for n in LENGTHS),
                      *(f"{cpu[n][base] / cpu[n][name]:.2f}x" for n in LENGTHS)] for name in forms],
                    ["form", *(f"CPU ms @{n}" for n in LENGTHS), *(f"vs fp32 @{n}" for n in LENGTHS)])


if __name__ == "__main__":
    main()
