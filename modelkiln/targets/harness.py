"""The latency harness: warm-up, then runs in windows until the median is stable.

Runs are timed one by one (``perf_counter_ns``; CUDA events on a GPU) so p95 sees real
outliers. Windows of
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


def time_runs(run, inputs, **settings) -> dict:
    """Wall-clock latency of ``run(inputs)``, each run timed on its own."""
    return time_calls(lambda: run(inputs), "cpu", **settings)


def timer_for(run):
    """How to time a loaded artifact: its own ``time_runs`` where the runtime gives one (a
    GPU's events, and its memory), else ``time_runs`` over the wall clock."""
    return getattr(run, "time_runs", None) or (lambda inputs, **settings: time_runs(run, inputs, **settings))


def time_calls(call, device: str, *, warmup_runs: int, min_runs: int, stability: float, max_seconds: float,
               min_seconds: float = 0.0) -> dict:
    """Latency of ``call()`` on ``device``. On a GPU (inputs already there) it is timed
    between CUDA events and the peak of GPU memory allocated while it ran is recorded;
    each run is waited for before the next starts: at batch 1 a caller waits for its
    answer, so queued work must not hide in the next run's time."""
    start, stop = stopwatch(device)

    def once() -> float:
        start()
        call()
        return stop()

    for _ in range(warmup_runs):
        call()
    on_gpu = device.startswith("cuda")
    if on_gpu:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = _windows(once, min_runs=min_runs, stability=stability, max_seconds=max_seconds,
                      min_seconds=min_seconds)
    if on_gpu:
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def stopwatch(device: str):
    """``(start, stop)``: ``stop()`` returns the milliseconds since ``start()``. On a GPU
    the time is between CUDA events and the work is waited for."""
    if device.startswith("cuda"):
        import torch

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def stop() -> float:
            end.record()
            end.synchronize()
            return begin.elapsed_time(end)

        return begin.record, stop
    marks = [0]

    def start() -> None:
        marks[0] = time.perf_counter_ns()

    return start, lambda: (time.perf_counter_ns() - marks[0]) / 1e6


def _windows(once, *, min_runs: int, stability: float, max_seconds: float, min_seconds: float) -> dict:
    started = time.perf_counter()
    times: list[float] = []
    previous = None
    while True:
        times.extend(once() for _ in range(min_runs))
        median = float(np.median(times))
        elapsed = time.perf_counter() - started
        stable = previous is not None and abs(median - previous) <= stability * previous
        if (stable and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
        previous = median
    p50, p95 = np.percentile(np.asarray(times, dtype=np.float64), [50, 95])
    return {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95), "runs": len(times)}


def run_chunked(run, arrays: dict, chunk: int = 64) -> np.ndarray:
    """``run`` over every row of ``arrays`` (name -> array, batch first), ``chunk`` rows at a
    time, outputs concatenated: bounded memory whatever the number of rows."""
    total = len(next(iter(arrays.values())))
    return np.concatenate([
        np.asarray(run({k: np.ascontiguousarray(v[start:start + chunk]) for k, v in arrays.items()}))
        for start in range(0, total, chunk)
    ])


def package_version(package: str) -> str:
    """The installed version of ``package``, or "" where it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def environment(device: str, threads: int) -> dict:
    """Where and with what a variant was measured: the figures only mean something
    beside it (the hosts a catalogue is measured on differ: AVX2 only, VNNI, AMX)."""
    import platform
    import socket
    import sys

    from .host import cpu_model_and_flags, host_probe

    cpu, flags = cpu_model_and_flags()
    found = {"host": socket.gethostname(), "cpu": cpu, "cpu_flags": flags, "cpus": os.cpu_count(),
             "device": device, "threads": threads, "python": platform.python_version()}
    if device.startswith("cuda") and "torch" in sys.modules:
        found["gpu"] = sys.modules["torch"].cuda.get_device_name(device)
    for package in ("modelkiln", "torch", "onnxruntime", "transformers"):
        if version := package_version(package):
            found[package] = version
    # What the host probe found: the int8 form the quantizers write here, and why.
    found["probe"] = {key: value for key, value in host_probe().items() if key in ("probe_version", "int8")}
    return found
