"""What the running daemon is, in one snapshot: ``/healthz`` and ``/metrics`` read this
and never the daemon's attributes, so what they report is taken at one moment and the
daemon's insides can change without them.

``Daemon.status()`` takes it, on the HTTP thread that serves a request; the catalogue's
figures are read through ``store`` by the reader (they survive restarts and agree between
two daemons on one database).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..store import queries
from ..store.db import Store

# Below this much free space where artifacts go, snapshots and variants fail: say so.
LOW_DISK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Status:
    started: bool
    stopping: bool
    # The catalogue and where artifacts go; None before the start.
    store: Store | None = None
    artifacts: Path | None = None
    ingest_alive: bool = False
    # A registry polled from elsewhere (MLflow): its last poll's problem, None if it went well.
    polls_registry: bool = False
    registry_problem: str | None = None
    # None: this daemon does not run one (schedule=False; a registry not worth watching).
    scheduler_alive: bool | None = None
    watcher_alive: bool | None = None
    versions_waiting: int = 0
    unread_events: int = 0
    workers_busy: int = 0
    workers: int = 0
    objective_batch_size: int = 1
    # metrics.JobStats: the jobs this daemon saw end, and the histogram's bounds.
    jobs_ended: tuple = ()
    duration_bounds: tuple = ()


def health(status: Status) -> tuple[bool, dict[str, str]]:
    """Whether the daemon is serving, and every check by name ("ok", or what is wrong)."""
    if not status.started:
        # Answered from the first moment the port is open: recovery of a large catalogue
        # takes seconds, and a probe must hear "not yet", not hang.
        return False, {"loop": "stopping" if status.stopping else "starting"}
    checks: dict[str, str] = {}
    store = status.store
    assert store is not None  # a started daemon has opened its catalogue
    try:
        with store.session() as session:
            queries.ping(session)
        problem = store.file_problem()
        checks["database"] = f"failing: {problem}" if problem else "ok"
    except Exception as exc:
        checks["database"] = f"failing: {exc}"
    checks["loop"] = "ok" if not status.stopping else "stopping"
    checks["disk"] = disk_check(status.artifacts)
    checks["ingest"] = "ok" if status.ingest_alive else "not running"
    if status.polls_registry:
        checks["registry"] = "ok" if status.registry_problem is None else f"failing: {status.registry_problem}"
    if status.scheduler_alive is not None:
        checks["scheduler"] = "ok" if status.scheduler_alive else "not running"
    if status.watcher_alive is not None:
        checks["watcher"] = "ok" if status.watcher_alive else "not running"
    return all(v == "ok" for v in checks.values()), checks


def disk_check(folder) -> str:
    """"ok", or how little space is left where checkpoints are copied and variants built."""
    try:
        stat = os.statvfs(folder)
    except (OSError, TypeError) as exc:
        return f"failing: {exc}"
    free = stat.f_bavail * stat.f_frsize
    if free < LOW_DISK_BYTES:
        return f"low: {free // 2**20} MiB free in {folder}; ingests and jobs fail until space is freed"
    return "ok"
