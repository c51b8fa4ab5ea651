"""Ingest: decide that a version folder is complete, snapshot it, hash it, record it.

The snapshot is a copy under ``artifacts/`` and the hash is computed on that copy, so
what is recorded is exactly what every job later reads: a folder that changes after (or
while) it is snapshotted becomes a new checkpoint, never a mix of two. If the source changes
during the copy, the copy is discarded and the version is looked at again later.

The filesystem facts are gathered first (a cheap look, then the copy, the hash and the
format: ``prepare``, which the service runs on a thread of its own, since a big
checkpoint takes minutes), and the catalogue is written once, at the end, on the
service loop (``record``).

``Intake`` is the daemon's side of it: versions the watcher, the rescan or the command
line found go to the ingest thread and come back through the inbox to be recorded; one
that is not quiet yet is looked at again when its quiet period ends; one that cannot be
ingested is logged once until its reason changes.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, replace

from ..errors import NotIngestedYet
from ..plugins.api import FoundCheckpoint
from ..registry.directory import content_hash, copy_files, observe
from ..registry.formats import detect_format, no_format_reason
from ..sizes import printable
from ..store import queries, units
from ..store.db import DatabaseBusy
from .layout import Layout
from .logs import about
from .scheduler import Scheduler

log = logging.getLogger(__name__)

# A version whose record met a busy database is tried again this soon, not at the rescan.
BUSY_RETRY_SECONDS = 1.0


@dataclass
class IngestResult:
    # "ingested" (a new checkpoint), "unchanged", "wait" (not complete yet; see retry_at), "gone"
    outcome: str
    checkpoint_id: int | None = None
    retry_at: float | None = None


@dataclass
class Prepared:
    """A version copied and hashed, waiting to be recorded."""

    found: FoundCheckpoint
    seen: object  # registry.directory.Observation
    digest: str
    snapshot: object
    fmt: object


class Background:
    """One daemon thread that runs slow ingest work (scans, copies, hashes) in the order it
    is given, off the service loop, and posts each outcome to the loop's inbox as
    ``(kind, (key, value, error))``. A key already waiting or running is not queued again:
    a burst of file events makes one copy, not one per event. A daemon thread: a stop
    never waits for a copy, whose half-made folder the next start's clean-up removes."""

    def __init__(self, inbox) -> None:
        self.inbox = inbox
        self.tasks: queue.Queue = queue.Queue()
        self.pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kiln-ingest", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, kind: str, key: str, fn, *args) -> bool:
        with self._lock:
            if key in self.pending:
                return False
            self.pending.add(key)
        self.tasks.put((kind, key, fn, args))
        return True

    def done(self, key: str) -> None:
        with self._lock:
            self.pending.discard(key)

    def stop(self) -> None:
        self.tasks.put(None)

    def _run(self) -> None:
        while True:
            item = self.tasks.get()
            if item is None:
                return
            kind, key, fn, args = item
            try:
                value, error = fn(*args), None
            except Exception as exc:  # reported on the loop, naming the folder
                value, error = None, exc
            self.inbox.put((kind, (key, value, error)))


class Ingestor:
    def __init__(self, store, layout: Layout, formats, quiet_seconds: float, registry_kind: str = "directory",
                 clock=time.time, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self.store = store
        self.layout = layout
        self.formats = formats
        self.quiet_seconds = quiet_seconds
        self.registry_kind = registry_kind
        self.clock = clock

    def ingest(self, found: FoundCheckpoint) -> IngestResult:
        """Take ``found`` if it is new and complete: renamed into place
        (``found.complete``), or quiet for ``quiet_seconds``."""
        prepared = self.prepare(found)
        return self.record(prepared) if isinstance(prepared, Prepared) else prepared

    def prepare(self, found: FoundCheckpoint) -> Prepared | IngestResult:
        """Everything but the catalogue write: look, copy, hash, detect the format. Slow
        for a big checkpoint (minutes for tens of GB), so the service runs it on its
        ingest thread; it only reads the catalogue."""
        try:
            seen = observe(found.path)
        except FileNotFoundError:
            return IngestResult("gone")
        with self.store.session() as session:
            latest = queries.latest_checkpoint(session, found.model, found.version)
            if latest is not None and latest.fingerprint == seen.fingerprint:
                return IngestResult("unchanged", latest.id)
        now = self.clock()
        if not found.complete and now - seen.newest_mtime < self.quiet_seconds:
            return IngestResult("wait", retry_at=seen.newest_mtime + self.quiet_seconds)
        too_big = self._too_big(seen.size_bytes)
        if too_big is not None:  # refused before a byte is copied; looked at again at each rescan
            raise NotIngestedYet(f"{found.path}: {too_big}")
        staging = self.layout.incoming / f"{found.model}-{uuid.uuid4().hex[:12]}"
        try:
            copy_files(found.path, seen.files, staging)
            after = observe(found.path)
        except FileNotFoundError:
            shutil.rmtree(staging, ignore_errors=True)
            return IngestResult("wait", retry_at=now + self.quiet_seconds)
        except BaseException:  # a full disk, say: the partial copy goes, the next look starts over
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if after.fingerprint != seen.fingerprint:
            # Written to while we copied: the copy may be a mix; look again once quiet.
            shutil.rmtree(staging, ignore_errors=True)
            return IngestResult("wait", retry_at=self.clock() + self.quiet_seconds)
        try:
            digest = content_hash(staging, seen.files)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        snapshot = self.layout.snapshot(found.model, digest)
        if snapshot.exists():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(snapshot)
        fmt = detect_format(self.formats, list(seen.files))
        return Prepared(found, seen, digest, snapshot, fmt)

    def record(self, prepared: Prepared) -> IngestResult:
        """The catalogue write of a prepared version (on the service loop's thread)."""
        return self._record(prepared.found, prepared.seen, prepared.digest, prepared.snapshot, prepared.fmt)

    def _too_big(self, size: int) -> str | None:
        """Why a folder of ``size`` bytes is not copied, or None."""
        if self.max_bytes and size > self.max_bytes:
            return (f"holds {size / 2**30:.1f} GiB (sparse files counted in full), over registry.max_checkpoint_gb "
                    f"({self.max_bytes / 2**30:g} GiB); raise it if the checkpoint is real")
        try:
            free = shutil.disk_usage(self.layout.root).free
        except OSError:
            return None
        if size > free:
            return (f"holds {size / 2**30:.1f} GiB, more than is free where artifacts go ({self.layout.root}); it "
                    "is ingested once space is freed")
        return None

    def _record(self, found: FoundCheckpoint, seen, digest: str, snapshot, fmt) -> IngestResult:
        with self.store.session() as session:
            existing = queries.checkpoint_by_key(session, found.model, found.version, digest)
            if existing is not None:
                units.remember_fingerprint(session, existing, seen.fingerprint)
                return IngestResult("unchanged", existing.id)
            status, reason = "ingested", None
            if seen.problems:
                status, reason = "rejected", f"{found.path}: " + "; ".join(seen.problems)
            elif not seen.files:
                status, reason = "rejected", f"{found.path}: the version folder holds no files"
            elif fmt is None:
                status, reason = "rejected", no_format_reason(found.path, seen.files)
            else:
                twin = queries.same_content(session, found.model, digest)
                if twin is not None:
                    status = "duplicate"
                    reason = f"same content as {twin.model}/{twin.version}, which is processed already"
            checkpoint_id = units.record_checkpoint(
                session, model=found.model, version=found.version, registry_kind=self.registry_kind,
                source_uri=found.uri, format=fmt.name if fmt else None, content_hash=digest,
                size_bytes=seen.size_bytes, fingerprint=seen.fingerprint, status=status, reason=reason,
                snapshot_path=str(snapshot),
            )
        if checkpoint_id is None:  # another daemon on the same database recorded it first
            return IngestResult("unchanged")
        log.info("checkpoint %s/%s %s (%s, %s)%s", found.model, found.version, status,
                 fmt.name if fmt else "no format", digest[:16], f": {reason}" if reason else "",
                 extra=about(found.model, found.version))
        return IngestResult("ingested", checkpoint_id)


class Intake:
    """What the daemon's loop does with the versions registries offer (see the module's
    docstring). Everything here runs on the loop's thread but ``_prepare``."""

    def __init__(self, ingestor: Ingestor, background: Background, registry, wall_clock=time.time):
        self.ingestor = ingestor
        self.background = background
        self.registry = registry
        self.wall_clock = wall_clock
        # Where quiet periods and retries are posted; None where the daemon runs no scheduler.
        self.scheduler: Scheduler | None = None
        # version folder -> why it could not be ingested (logged once until it changes)
        self._failed: dict[str, str] = {}

    def ingest_now(self, found: FoundCheckpoint) -> int | None:
        """Ingest ``found`` on this thread; its checkpoint's id, if it was ingested."""
        try:
            result = self.ingestor.ingest(found)
        except Exception as exc:  # one bad folder must not stop the scan or the batch
            self._not_ingested(found, exc)
            return None
        return self._ingested(found, result)

    def ingest_later(self, found: FoundCheckpoint) -> None:
        """Copy and hash ``found`` on the ingest thread; ``prepared`` records it."""
        self.background.submit("prepared", str(found.path), self._prepare, found)

    def scanned(self, key: str, versions, error) -> None:
        """The registry's versions, listed on the ingest thread."""
        self.background.done(key)
        if error is not None:
            log.error("the %s registry's scan failed: %s", self.registry.kind, error)
        for found in versions or ():
            self.ingest_later(found)

    def _prepare(self, found: FoundCheckpoint):
        """On the ingest thread: the version folder and what preparing it gave (or raised)."""
        try:
            return found, self.ingestor.prepare(found)
        except Exception as exc:  # reported on the loop, naming the folder
            return found, exc

    def prepared(self, key: str, value, error: Exception | None) -> None:
        """A version copied and hashed on the ingest thread: recorded here."""
        self.background.done(key)
        if error is not None:  # not from the ingest itself (that comes back in value): a bug
            log.error("ingesting %s failed: %s", printable(key), error)
            return
        found, prepared = value
        try:
            if isinstance(prepared, Exception):
                raise prepared
            result = self.ingestor.record(prepared) if isinstance(prepared, Prepared) else prepared
        except DatabaseBusy as exc:  # the database busy or away for a moment: soon, not at the rescan
            log.warning("cannot record %s yet (%s); retrying in %.0f s", printable(key), str(exc).splitlines()[0],
                        BUSY_RETRY_SECONDS, extra=about(found.model, found.version))
            if self.scheduler is not None:
                self.scheduler.post_at(self.wall_clock() + BUSY_RETRY_SECONDS,
                                       f"quiet:{found.model}/{found.version}", "hint", found)
            return
        except Exception as exc:  # as in ingest_now
            self._not_ingested(found, exc)
            return
        self._ingested(found, result)

    def _not_ingested(self, found: FoundCheckpoint, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, (OSError, NotIngestedYet)) else f"{type(exc).__name__}: {exc}"
        if self._failed.get(str(found.path)) == message:  # once, not at every rescan
            return
        self._failed[str(found.path)] = message
        if isinstance(exc, NotIngestedYet):  # its message names the folder and what to do
            log.warning("not ingested yet: %s", printable(message), extra=about(found.model, found.version))
            return
        log.error("cannot ingest %s: %s; it is looked at again at each rescan", printable(str(found.path)),
                  message, extra=about(found.model, found.version))

    def _ingested(self, found: FoundCheckpoint, result: IngestResult) -> int | None:
        self._failed.pop(str(found.path), None)
        key = f"quiet:{found.model}/{found.version}"
        if self.scheduler is not None:
            if result.outcome == "wait":  # a second look once its quiet period is over
                assert result.retry_at is not None  # a "wait" always says until when
                self.scheduler.post_at(result.retry_at, key, "hint", replace(found, complete=False))
            else:
                self.scheduler.cancel(key)
        if result.outcome in ("ingested", "unchanged"):
            try:
                self.registry.release(found)
            except OSError as exc:  # the copy stays; the next scan tries again
                log.warning("cannot release %s: %s", found.path, exc,
                            extra=about(found.model, found.version))
        return result.checkpoint_id
