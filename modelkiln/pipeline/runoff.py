"""The run-off phase: the closest candidates of one checkpoint on one target, timed side
by side in one process.

Each variant was measured in its own process, at its own moment, and a shared or
virtual host's speed drifts between those moments by more than the gap between close
candidates. Here every contender is loaded as serving code would load it, then each is
timed for ``measure.min_runs`` runs in turn, round after round, the order reversed every
other round, so whatever the host does meets every contender alike. Each contender's
figure is the median over rounds of its per-round median (and p95).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import LOAD_OBJECTIVE
from ..targets import harness
from ..targets.load import load_curve
from .context import plugins_for_spec, reference
from .phases import LOAD_WARMUP_RUNS
from .samples import request_batch

ROUNDS = 6
# Under load: rounds of every level per contender, and the seconds of each level a round
# at most (measure.max_seconds, if shorter; a fifth of a second at least).
LOAD_ROUNDS = 3
LOAD_ROUND_SECONDS = 1.0


def run_off(spec: dict) -> dict:
    if spec.get("objective") == LOAD_OBJECTIVE:
        return _load_run_off(spec)
    plugins = plugins_for_spec(spec)
    inspected, _, samples = reference(spec)
    settings = spec["measure"]
    # The requests the measurement timed: at the samples' median length, if they vary.
    inputs = request_batch(inspected["inputs"], samples, spec["batch_size"],
                           (inspected.get("lengths") or {}).get("median"))
    timers = {}
    for key, run in _loaded(spec, plugins).items():
        timer = harness.timer_for(run)  # as the measurement times it
        timer(inputs, warmup_runs=settings["warmup_runs"], min_runs=1, stability=0.0, max_seconds=0.0)
        timers[key] = timer
    p50s: dict[int, list[float]] = {key: [] for key in timers}
    p95s: dict[int, list[float]] = {key: [] for key in timers}
    order = list(timers)
    for round_ in range(ROUNDS):
        for key in order if round_ % 2 == 0 else reversed(order):
            # One window of min_runs runs (max_seconds 0 stops after the first window).
            timing = timers[key](inputs, warmup_runs=0, min_runs=settings["min_runs"], stability=0.0,
                                 max_seconds=0.0)
            p50s[key].append(timing["latency_p50_ms"])
            p95s[key].append(timing["latency_p95_ms"])
    return {
        "status": "measured",
        "rounds": ROUNDS,
        "batch_size": spec["batch_size"],
        "contenders": {str(key): {"latency_p50_ms": float(np.median(p50s[key])),
                                  "latency_p95_ms": float(np.median(p95s[key]))} for key in timers},
    }


def _loaded(spec: dict, plugins) -> dict:
    """Every contender's artifact loaded as serving code would load it, by variant id."""
    target = spec["target"]
    return {c["id"]: plugins.runtimes[c["runtime"]].load(Path(c["path"]), c["file"], target["device"],
                                                         target["threads"]) for c in spec["contenders"]}


def _load_run_off(spec: dict) -> dict:
    """For the load objective: every contender measured under each level of concurrent
    clients in turn, round after round (a second a level), the order reversed every
    other round; per level the median over rounds of answers per second and of p95 (the
    policy reads its objective from these levels, ``policy.runoff_value``)."""
    plugins = plugins_for_spec(spec)
    inspected, _, samples = reference(spec)
    target, settings = spec["target"], spec["measure"]
    request = request_batch(inspected["inputs"], samples, 1, (inspected.get("lengths") or {}).get("median"))
    levels = list(target["concurrency"])
    seconds = max(0.2, min(LOAD_ROUND_SECONDS, settings["max_seconds"]))
    runs = _loaded(spec, plugins)
    for run in runs.values():
        load_curve(run, request, [], 0.0, max(settings["warmup_runs"], LOAD_WARMUP_RUNS))
    figures: dict = {key: {level: [] for level in levels} for key in runs}
    order = list(runs)
    for round_ in range(LOAD_ROUNDS):
        for key in order if round_ % 2 == 0 else reversed(order):
            for row in load_curve(runs[key], request, levels, seconds, 0):
                figures[key][row["concurrency"]].append(row)
    contenders = {}
    for key, by_level in figures.items():
        contenders[str(key)] = {"load": [
            {"concurrency": level,
             "throughput_per_s": float(np.median([r["throughput_per_s"] for r in rows])),
             "latency_p50_ms": float(np.median([r["latency_p50_ms"] for r in rows])),
             "latency_p95_ms": float(np.median([r["latency_p95_ms"] for r in rows])),
             "requests": int(sum(r["requests"] for r in rows))} for level, rows in by_level.items()]}
    return {"status": "measured", "rounds": LOAD_ROUNDS, "batch_size": 1, "contenders": contenders}
