"""Timed work on APScheduler 3.x: reconcile scans, lease expiry, clean-up.

Scheduled functions only post a message to the daemon's inbox; the service loop does
the work, so every database write happens on one thread. Jobs name module-level
functions with the daemon's id as argument, as APScheduler's job stores require.
"""

from __future__ import annotations

import queue

from apscheduler.schedulers.background import BackgroundScheduler

_INBOXES: dict[str, queue.Queue] = {}


def post(daemon_id: str, message: str) -> None:
    inbox = _INBOXES.get(daemon_id)
    if inbox is not None:
        inbox.put((message, None))


class Scheduler:
    def __init__(self, daemon_id: str, inbox: queue.Queue, rescan_seconds: float, lease_seconds: float,
                 cleanup_seconds: float = 3600.0):
        self.daemon_id = daemon_id
        self.inbox = inbox
        self.intervals = {
            "rescan": rescan_seconds,
            "expire_leases": max(1.0, lease_seconds / 2),
            "cleanup": cleanup_seconds,
        }
        self._scheduler = None

    def start(self) -> None:
        _INBOXES[self.daemon_id] = self.inbox
        self._scheduler = BackgroundScheduler(daemon=True)
        for message, seconds in self.intervals.items():
            self._scheduler.add_job(
                post, "interval", seconds=seconds, args=(self.daemon_id, message),
                id=f"{self.daemon_id}:{message}", replace_existing=True,
                # A late tick is merged with the next one: a scan is never worth running twice.
                coalesce=True, max_instances=1, misfire_grace_time=int(max(1, seconds)),
            )
        self._scheduler.start()

    @property
    def alive(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        _INBOXES.pop(self.daemon_id, None)
