"""The latency harness: warm-up, then runs in windows until the median is stable.

Runs are timed one by one with ``perf_counter_ns`` so p95 sees real outliers. Windows of
``min_runs`` runs are added until at least ``min_seconds`` of runs exist and the median
moved by less than ``stability`` (relative) over the last window, or ``max_seconds`` is
spent. The time floor matters for fast models: forty runs of a 50 µs model are two
milliseconds of samples, and their p95 is noise.
"""

from __future__ import annotations

import os
import resource
import time

import numpy as np


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_runs(run, inputs, *, warmup_runs: int, min_runs: int, stability: float, max_seconds: float,
              min_seconds: float = 0.0) -> dict:
    for _ in range(warmup_runs):
        run(inputs)
    started = time.perf_counter()
    times: list[int] = []
    previous = None
    while True:
        for _ in range(min_runs):
            start = time.perf_counter_ns()
            run(inputs)
            times.append(time.perf_counter_ns() - start)
        median = float(np.median(times))
        elapsed = time.perf_counter() - started
        stable = previous is not None and abs(median - previous) <= stability * previous
        if (stable and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
        previous = median
    p50, p95 = np.percentile(np.asarray(times, dtype=np.float64) / 1e6, [50, 95])
    return {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95), "runs": len(times)}


def run_chunked(run, arrays: dict, chunk: int = 64) -> np.ndarray:
    """``run`` over every row of ``arrays`` (name -> array, batch first), ``chunk`` rows at a
    time, outputs concatenated: bounded memory whatever the number of rows."""
    total = len(next(iter(arrays.values())))
    return np.concatenate([
        np.asarray(run({k: np.ascontiguousarray(v[start:start + chunk]) for k, v in arrays.items()}))
        for start in range(0, total, chunk)
    ])


def batch_of(samples: dict, batch_size: int) -> dict:
    """The first ``batch_size`` rows of every input, repeating rows when there are fewer."""
    out = {}
    for name, array in samples.items():
        reps = -(-batch_size // len(array))
        out[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch_size])
    return out
