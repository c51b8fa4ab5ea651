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


# A measurement ends early when its runs are over ``margin`` times its rivals' p50, by
# Wald's sequential probability ratio test on "a run is slower than that": H0, at most
# half the runs are (its median is within the margin), against H1, 95 % are; H0 is
# wrongly rejected at most 0.1 % of the time, H1 missed at most 1 %. Eleven slower runs
# in a row reject H0; two faster ones early on accept it, and the test stops watching.
_SPRT_H0, _SPRT_H1, _SPRT_ALPHA, _SPRT_BETA = 0.5, 0.95, 0.001, 0.01
# ... and not before its runs add up to this many ms: a tiny model has little time to
# save, and a slowdown of the host that lasts this long is rarer than one that lasts a
# few milliseconds.
_GIVE_UP_AFTER_MS = 250.0


def slower_than(rivals: dict[str, float], margin: float):
    """``give_up(times) -> reason or None`` for ``time_calls``: a reason once the runs so far
    show, by a sequential test, that the median is over ``margin`` times every rival's
    p50 (``rivals``: what it is compared with -> its p50 ms); None until then, and for
    good once the test accepts that it is not."""
    import math

    bar = margin * max(rivals.values())
    up, down = math.log(_SPRT_H1 / _SPRT_H0), math.log((1 - _SPRT_H1) / (1 - _SPRT_H0))
    reject, accept = math.log((1 - _SPRT_BETA) / _SPRT_ALPHA), math.log(_SPRT_BETA / (1 - _SPRT_ALPHA))
    llr, seen, spent, done = 0.0, 0, 0.0, False  # the test's state across calls

    def stop(times: list[float]) -> str | None:
        nonlocal llr, seen, spent, done
        for t in times[seen:]:  # one decision per run, as Wald's test takes them
            if done:
                return None
            seen += 1
            spent += t
            llr += up if t > bar else down
            done = llr <= accept
            if llr >= reject and spent >= _GIVE_UP_AFTER_MS:
                break
        if llr >= reject and spent >= _GIVE_UP_AFTER_MS:
            times = times[:seen]
            median = float(np.median(times))
            slower = ", ".join(f"{median / p50:.1f}x slower than {name} ({p50:.4g} ms)" for name, p50 in rivals.items())
            return (f"ended early: {slower} after {len(times)} runs (p50 {median:.4g} ms; a sequential test "
                    f"found its runs over {margin:g}x every rival's p50)")
        return None

    return stop


def timer_for(run):
    """How to time a loaded artifact: its own ``time_runs`` where the runtime gives one (a
    GPU's events, and its memory), else ``time_runs`` over the wall clock."""
    return getattr(run, "time_runs", None) or (lambda inputs, **settings: time_runs(run, inputs, **settings))


def time_calls(call, device: str, *, warmup_runs: int, min_runs: int, stability: float, max_seconds: float,
               min_seconds: float = 0.0, give_up=None) -> dict:
    """Latency of ``call()`` on ``device``. On a GPU (inputs already there) it is timed
    between CUDA events and the peak of GPU memory allocated while it ran is recorded;
    each run is waited for before the next starts: at batch 1 a caller waits for its
    answer, so queued work must not hide in the next run's time. ``give_up(times)`` (e.g.
    :func:`slower_than`) may end the timing after any run with a reason, which the result
    keeps as ``ended_early``."""
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
                      min_seconds=min_seconds, give_up=give_up)
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


def _windows(once, *, min_runs: int, stability: float, max_seconds: float, min_seconds: float,
             give_up=None) -> dict:
    started = time.perf_counter()
    times: list[float] = []
    previous = None
    ended = None
    while ended is None:
        for _ in range(min_runs):
            times.append(once())
            ended = give_up(times) if give_up is not None else None
            if ended is not None:
                break
        median = float(np.median(times))
        elapsed = time.perf_counter() - started
        stable = previous is not None and abs(median - previous) <= stability * previous
        if (stable and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
        previous = median
    p50, p95 = np.percentile(np.asarray(times, dtype=np.float64), [50, 95])
    result = {"latency_p50_ms": float(p50), "latency_p95_ms": float(p95), "runs": len(times)}
    if ended is not None:
        result["ended_early"] = ended
    return result


def run_chunked(run, arrays: dict, chunk: int = 64) -> np.ndarray:
    """``run`` over every row of ``arrays`` (name -> array, batch first), ``chunk`` rows at a
    time, outputs concatenated: bounded memory whatever the number of rows."""
    total = len(next(iter(arrays.values())))
    return np.concatenate([
        np.asarray(run({k: np.ascontiguousarray(v[start:start + chunk]) for k, v in arrays.items()}))
        for start in range(0, total, chunk)
    ])


def environment(device: str, threads: int) -> dict:
    """Where and with what a variant was measured: the figures only mean something
    beside it (the hosts a catalogue is measured on differ: AVX2 only, VNNI, AMX)."""
    import platform
    import socket
    import sys

    from .host import cpu_model_and_flags, host_probe, package_version

    cpu, flags = cpu_model_and_flags()
    found: dict = {"host": socket.gethostname(), "cpu": cpu, "cpu_flags": flags, "cpus": os.cpu_count(),
             "device": device, "threads": threads, "python": platform.python_version()}
    if device.startswith("cuda") and "torch" in sys.modules:
        found["gpu"] = sys.modules["torch"].cuda.get_device_name(device)
    for package in ("modelkiln", "torch", "onnxruntime", "transformers"):
        if version := package_version(package):
            found[package] = version
    # What the host probe found: the int8 form the quantizers write here and why, and how
    # fast torch runs 16-bit products here.
    found["probe"] = {key: value for key, value in host_probe().items() if key in ("probe_version", "int8", "half")}
    return found
