"""Where things live under the artifacts root. One place, so every component agrees.

    artifacts/<model>/<hash16>/checkpoint/            the content-addressed snapshot
    artifacts/<model>/<hash16>/reference/             inspect results: reference outputs
    artifacts/<model>/<hash16>/<target>/<variant>/    a finished variant (+ variant.json)
    artifacts/<model>/<hash16>/<target>/.tmp-*        a variant being built (same filesystem,
                                                      so the final rename is atomic)
    artifacts/.work/job-<id>/                         a job's scratch space and worker log
    artifacts/.incoming/                              snapshots being copied and hashed
"""

from __future__ import annotations

from pathlib import Path

from ..plugins.recipes import slug

VARIANT_FILE = "variant.json"


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
