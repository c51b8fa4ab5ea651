"""Where things live under the artifacts root. One place, so every component agrees.

    artifacts/<model>/<hash16>/checkpoint/            the content-addressed snapshot
    artifacts/<model>/<hash16>/reference/             inspect results: reference outputs
    artifacts/<model>/<hash16>/<target>/<variant>/    a finished variant (+ variant.json)
    artifacts/<model>/<hash16>/<target>/.tmp-*        a variant being built (same filesystem,
                                                      so the final rename is atomic)
    artifacts/.work/job-<id>/                         a job's scratch space and worker log
    artifacts/.incoming/                              snapshots being copied and hashed
    artifacts/.blobs/<sha256>                         weight files stored once: variants'
                                                      identical shards are hard links to
                                                      one of these (targets/blobs.py)

Every path under the root is made here, and so is every clean-up of one: a folder that is
named in one place is removed by the same rules wherever a job ends. A blob goes when
no variant links it any more: its link count is one (the store's own), checked whenever
a folder is removed here and when the daemon starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..plugins.recipes import slug

VARIANT_FILE = "variant.json"
WORKER_LOG = "worker.log"


class Layout:
    def __init__(self, artifacts: Path):
        self.root = artifacts

    def checkpoint_root(self, model: str, content_hash: str) -> Path:
        return self.root / model / content_hash[:16]

    def snapshot(self, model: str, content_hash: str) -> Path:
        return self.checkpoint_root(model, content_hash) / "checkpoint"

    def reference(self, model: str, content_hash: str) -> Path:
        return self.checkpoint_root(model, content_hash) / "reference"

    def variant_name(self, runtime: str, recipe: str) -> str:
        return f"{runtime}--{slug(recipe)}"

    def variant(self, model: str, content_hash: str, target: str, runtime: str, recipe: str) -> Path:
        return self.checkpoint_root(model, content_hash) / target / self.variant_name(runtime, recipe)

    def variant_of(self, checkpoint, variant) -> Path:
        """``variant``'s final folder (catalogue rows: a ``Checkpoint`` and its ``Variant``)."""
        return self.variant(checkpoint.model, checkpoint.content_hash, variant.target, variant.runtime, variant.recipe)

    def staging(self, final: Path, job_id: int) -> Path:
        return final.parent / f".tmp-{final.name}-job{job_id}"

    @staticmethod
    def staging_job(staging: Path) -> int | None:
        """The job id a staging folder belongs to, or None if it is not one of ours."""
        _, _, tail = staging.name.rpartition("-job")
        return int(tail) if tail.isdigit() else None

    def job_work(self, job_id: int) -> Path:
        return self.root / ".work" / f"job-{job_id}"

    @property
    def incoming(self) -> Path:
        return self.root / ".incoming"

    @property
    def blobs(self) -> Path:
        """The blob store: under the root, so that the variant folders beside it can link it."""
        return self.root / ".blobs"

    # -- clean-up -----------------------------------------------------------------------

    def remove(self, folder: Path) -> None:
        """``folder`` and everything in it; then the blobs it was the last user of."""
        shutil.rmtree(folder, ignore_errors=True)
        self.drop_unused_blobs()

    def drop_unused_blobs(self) -> int:
        """Remove every blob that no variant (nor staging folder) links any more; return
        how many bytes that freed. A worker linking one at this moment either gets its link
        first (the content stays in its folder) or finds it gone and writes the file."""
        freed = 0
        if not self.blobs.is_dir():
            return freed
        for blob in self.blobs.iterdir():
            try:
                stat = blob.lstat()
            except FileNotFoundError:
                continue
            if stat.st_nlink <= 1:
                blob.unlink(missing_ok=True)
                freed += stat.st_size
        return freed

    def drop_job_work(self, job_id: int, *, keep_log: bool = False) -> None:
        """A job's scratch space, once the job ended. ``keep_log``: a failed job keeps only
        its worker log, which says what happened; its exports and half-written files go,
        so a failure on a full disk frees what it took."""
        work = self.job_work(job_id)
        if not keep_log:
            shutil.rmtree(work, ignore_errors=True)
            return
        if work.is_dir():
            for entry in work.iterdir():
                if entry.name != WORKER_LOG:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)

    def stagings(self):
        """Every variant staging folder under the root, of any job."""
        return self.root.glob("*/*/*/.tmp-*")

    def drop_stale_incoming(self, older_than: float) -> None:
        """Snapshot copies last touched before ``older_than`` (a time.time()): left by a
        killed daemon. A younger one may be another daemon's copy in progress."""
        if self.incoming.is_dir():
            for copy in self.incoming.iterdir():
                if copy.stat().st_mtime < older_than:
                    shutil.rmtree(copy, ignore_errors=True)
