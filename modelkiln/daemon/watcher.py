"""File-system events as hints. The handler filters and enqueues; it never raises.

watchdog drops events when the kernel queue overflows and reports a folder before it is
filled, so nothing here is trusted: an event only makes the daemon look sooner, and the
periodic reconcile scan remains the source of truth.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
from dataclasses import replace

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, registry, inbox: queue.Queue):
        self.registry = registry
        self.inbox = inbox

    def on_any_event(self, event):
        try:
            if event.event_type in ("opened", "closed_no_write", "deleted"):
                return
            path = getattr(event, "dest_path", "") or event.src_path
            moved_folder = event.event_type == "moved" and event.is_directory
            for candidate in self.registry.locate(os.fsdecode(path)):
                # The version folder itself (or its model folder) renamed into place is
                # complete now; anything else means "something changed in there".
                complete = moved_folder and os.path.abspath(os.fsdecode(path)) in (
                    str(candidate.path), str(candidate.path.parent)
                )
                self.inbox.put(("hint", replace(candidate, complete=complete)))
        except Exception:  # an exception here would stop watchdog's observer thread
            log.exception("ignoring a file-system event that could not be handled")


class Watcher:
    def __init__(self, registry, inbox: queue.Queue):
        self.registry = registry
        self.inbox = inbox
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        self.registry.path.mkdir(parents=True, exist_ok=True)
        # watchdog walks the tree with os.walk, which recurses once per level on this
        # Python: a folder nested a thousand deep exhausted the default limit (1000) and
        # killed its threads. A path longer than PATH_MAX (4096 bytes) ends any walk, so
        # no folder is deeper than about 2,050 levels to it; 10,000 covers that.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
        observer = Observer()
        observer.schedule(_Handler(self.registry, self.inbox), str(self.registry.path), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    @property
    def alive(self) -> bool:
        """The observer and every emitter thread running: an emitter that died (watchdog's
        walk of a folder nested a thousand deep raised RecursionError in it) leaves the
        observer up but deaf."""
        observer = self._observer
        return observer is not None and observer.is_alive() and all(e.is_alive() for e in observer.emitters)

    def restart(self) -> None:
        self.stop(1.0)
        self.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._observer is not None:
            self._observer.stop()
            if self._observer.is_alive():
                self._observer.join(timeout)
            self._observer = None
