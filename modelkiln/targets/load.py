"""Measurement under load: closed-loop clients against one loaded artifact.

A host serves several requests at once. For each level of ``targets.<name>.concurrency``,
that many client threads each send a request, wait for its answer and send the next, for
a fixed time, against the one loaded artifact in this process (as a server's worker
threads call one session or module): the answers per second and each answer's latency
say what the variant gives under that load. onnxruntime's sessions and torch modules
release the GIL while they compute, so the clients overlap where the runtime lets them;
what one request's threads (``targets.<name>.threads``) take from the others shows too.
"""

from __future__ import annotations

import threading
import time

import numpy as np


def load_curve(run, request: dict, levels: list[int], seconds: float, warmup_runs: int = 2) -> list[dict]:
    """Per level: ``concurrency``, ``throughput_per_s``, ``latency_p50_ms``,
    ``latency_p95_ms``, ``requests`` (answers counted)."""
    for _ in range(warmup_runs):
        run(request)
    return [_level(run, request, clients, seconds) for clients in levels]


def _level(run, request: dict, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    finished: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client():
        mine, last = [], 0.0
        start.wait()
        try:
            while True:
                began = time.perf_counter()
                if began >= deadline[0]:
                    break
                run(request)
                last = time.perf_counter()
                mine.append(last - began)
        except BaseException as exc:  # re-raised below, on the measuring thread
            errors.append(exc)
        with lock:
            latencies.extend(mine)
            finished.append(last)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    # Until the last answer: requests begun before the deadline are waited for.
    elapsed = max(max(finished, default=began) - began, 1e-9)
    ms = np.asarray(latencies) * 1000.0
    return {
        "concurrency": clients,
        "throughput_per_s": len(latencies) / elapsed,
        "latency_p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "latency_p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
        "requests": len(latencies),
    }
