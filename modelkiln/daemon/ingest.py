"""Ingest: decide that a version folder is complete, snapshot it, hash it, record it.

The snapshot is a copy under ``artifacts/`` and the hash is computed on that copy, so
what is recorded is exactly what every job later reads: a folder that changes after (or
while) it is taken becomes a new checkpoint, never a mix of two. If the source changes
during the copy, the copy is discarded and the version is looked at again later.

The filesystem facts are gathered first (a cheap look, then the copy, the hash and the
format), and the catalogue is written once, at the end.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass

from ..errors import NotTakenYet
from ..plugins.api import Candidate
from ..registry.directory import content_hash, copy_files, observe
from ..registry.formats import detect_format, no_format_reason
from ..store import queries, units
from .layout import Layout
from .logs import about

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    # "taken" (a new checkpoint), "unchanged", "wait" (not complete yet; see retry_at), "gone"
    outcome: str
    checkpoint_id: int | None = None
    retry_at: float | None = None


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

    def ingest(self, candidate: Candidate) -> IngestResult:
        """Take ``candidate`` if it is new and complete: renamed into place
        (``candidate.complete``), or quiet for ``quiet_seconds``."""
        try:
            seen = observe(candidate.path)
        except FileNotFoundError:
            return IngestResult("gone")
        with self.store.session() as session:
            latest = queries.latest_checkpoint(session, candidate.model, candidate.version)
            if latest is not None and latest.fingerprint == seen.fingerprint:
                return IngestResult("unchanged", latest.id)
        now = self.clock()
        if not candidate.complete and now - seen.newest_mtime < self.quiet_seconds:
            return IngestResult("wait", retry_at=seen.newest_mtime + self.quiet_seconds)
        too_big = self._too_big(seen.size_bytes)
        if too_big is not None:  # refused before a byte is copied; looked at again at each rescan
            raise NotTakenYet(f"{candidate.path}: {too_big}")
        staging = self.layout.incoming / f"{candidate.model}-{uuid.uuid4().hex[:12]}"
        try:
            copy_files(candidate.path, seen.files, staging)
            after = observe(candidate.path)
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
        snapshot = self.layout.snapshot(candidate.model, digest)
        if snapshot.exists():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(snapshot)
        fmt = detect_format(self.formats, list(seen.files))
        return self._record(candidate, seen, digest, snapshot, fmt)

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
                    "is taken once space is freed")
        return None

    def _record(self, candidate: Candidate, seen, digest: str, snapshot, fmt) -> IngestResult:
        with self.store.session() as session:
            existing = queries.checkpoint_by_key(session, candidate.model, candidate.version, digest)
            if existing is not None:
                units.remember_fingerprint(session, existing, seen.fingerprint)
                return IngestResult("unchanged", existing.id)
            status, reason = "ingested", None
            if seen.problems:
                status, reason = "rejected", f"{candidate.path}: " + "; ".join(seen.problems)
            elif not seen.files:
                status, reason = "rejected", f"{candidate.path}: the version folder holds no files"
            elif fmt is None:
                status, reason = "rejected", no_format_reason(candidate.path, seen.files)
            else:
                twin = queries.same_content(session, candidate.model, digest)
                if twin is not None:
                    status = "duplicate"
                    reason = f"same content as {twin.model}/{twin.version}, which is processed already"
            checkpoint_id = units.record_checkpoint(
                session, model=candidate.model, version=candidate.version, registry_kind=self.registry_kind,
                source_uri=candidate.uri, format=fmt.name if fmt else None, content_hash=digest,
                size_bytes=seen.size_bytes, fingerprint=seen.fingerprint, status=status, reason=reason,
                snapshot_path=str(snapshot),
            )
        if checkpoint_id is None:  # another daemon on the same database recorded it first
            return IngestResult("unchanged")
        log.info("checkpoint %s/%s %s (%s, %s)", candidate.model, candidate.version, status,
                 fmt.name if fmt else "no format", digest[:16], extra=about(candidate.model, candidate.version))
        return IngestResult("taken", checkpoint_id)
