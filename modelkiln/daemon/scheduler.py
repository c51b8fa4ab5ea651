"""Timed work on APScheduler 3.x: reconcile scans, lease expiry, clean-up, registry sync,
and the second look at a version folder once its quiet period is over.

Scheduled functions only post a message to the daemon's inbox; the service loop does
the work, so every database write happens on one thread. The one exception is the sync
of a remote registry (``daemon/sync.py``), which downloads and reads but never writes
the database: it runs on the scheduler's thread so that a long download never stalls
the loop's heartbeats. Jobs name module-level functions with the daemon's id as
argument, as APScheduler's job stores require.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from datetime import datetime

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

_INBOXES: dict[str, queue.Queue] = {}
_SYNCS: dict[str, Callable[[], object]] = {}


def post(daemon_id: str, message: str, payload=None) -> None:
    inbox = _INBOXES.get(daemon_id)
    if inbox is not None:
        inbox.put((message, payload))


def sync(daemon_id: str) -> None:
    work = _SYNCS.get(daemon_id)
    if work is not None:
        work()


class Scheduler:
    def __init__(self, daemon_id: str, inbox: queue.Queue, rescan_seconds: float, lease_seconds: float,
                 cleanup_seconds: float = 3600.0, sync=None, sync_seconds: float = 60.0):
        self.daemon_id = daemon_id
        self.inbox = inbox
        self.intervals = {
            "rescan": rescan_seconds,
            "expire_leases": max(1.0, lease_seconds / 2),
            "cleanup": cleanup_seconds,
        }
        self._sync = sync
        self.sync_seconds = sync_seconds
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        _INBOXES[self.daemon_id] = self.inbox
        scheduler = BackgroundScheduler(daemon=True)
        for message, seconds in self.intervals.items():
            scheduler.add_job(
                post, "interval", seconds=seconds, args=(self.daemon_id, message),
                id=f"{self.daemon_id}:{message}", replace_existing=True,
                # A late tick is merged with the next one: a scan is never worth running twice.
                coalesce=True, max_instances=1, misfire_grace_time=int(max(1, seconds)),
            )
        if self._sync is not None:
            _SYNCS[self.daemon_id] = self._sync
            # First run at once: a registry's versions are found at start-up, not a poll later.
            scheduler.add_job(
                sync, "interval", seconds=self.sync_seconds, args=(self.daemon_id,),
                id=f"{self.daemon_id}:sync", replace_existing=True, next_run_time=datetime.now(),
                coalesce=True, max_instances=1, misfire_grace_time=int(max(1, self.sync_seconds)),
            )
        scheduler.start()
        self._scheduler = scheduler

    def post_at(self, when: float, key: str, message: str, payload=None) -> None:
        """Post ``(message, payload)`` once at ``when`` (epoch seconds); a second call with
        the same ``key`` replaces the first."""
        if self._scheduler is None:
            return
        # No misfire limit: a late second look is still worth taking.
        self._scheduler.add_job(post, "date", run_date=datetime.fromtimestamp(when), args=(self.daemon_id, message,
                                payload), id=f"{self.daemon_id}:at:{key}", replace_existing=True,
                                misfire_grace_time=None)

    def cancel(self, key: str) -> None:
        """Forget what ``post_at`` planned under ``key``, if it has not run yet."""
        if self._scheduler is not None:
            try:
                self._scheduler.remove_job(f"{self.daemon_id}:at:{key}")
            except JobLookupError:
                pass

    @property
    def planned(self) -> int:
        """How many ``post_at`` messages are still to come."""
        if self._scheduler is None:
            return 0
        prefix = f"{self.daemon_id}:at:"
        return sum(1 for job in self._scheduler.get_jobs() if job.id.startswith(prefix))

    def sync_soon(self) -> None:
        """Run the registry sync now (after a promotion) instead of at its next tick."""
        if self._scheduler is not None and self._sync is not None:
            job = self._scheduler.get_job(f"{self.daemon_id}:sync")
            if job is not None:
                job.modify(next_run_time=datetime.now())

    @property
    def alive(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        _INBOXES.pop(self.daemon_id, None)
        _SYNCS.pop(self.daemon_id, None)
