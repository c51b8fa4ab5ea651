"""Recording what a job's phases produced: the worker's results become catalogue rows
(through the store's units of work) and, for a variant, its final folder.

A variant's ``variant.json`` is written into the staging folder, which is then renamed
into place: a final variant folder is always complete. If that folder exists already (a
job repeated after a crash), it is recorded as it stands.
"""

from __future__ import annotations

import json

from ..plugins.api import InputSpec
from ..store import queries, units
from ..store.models import Checkpoint, Job
from ..targets.quality import relative_drop
from .executor import Outcome
from .layout import VARIANT_FILE, Layout


class Outcomes:
    def __init__(self, layout: Layout, planner, promoter):
        self.layout = layout
        self.planner = planner
        self.promoter = promoter

    def record(self, session, job: Job, outcome: Outcome | None) -> Checkpoint:
        """Record an ended job (``outcome`` None: its result exists already)."""
        checkpoint = queries.checkpoint(session, job.checkpoint_id)
        if job.kind == "inspect":
            assert outcome is not None  # an inspection always runs: its result is never on disk before
            self._record_inspect(session, job, checkpoint, outcome)
        elif job.kind == "runoff":
            self.promoter.record_runoff(session, job, outcome)
        else:
            self._record_variant(session, job, checkpoint, outcome)
        return checkpoint

    def _record_inspect(self, session, job: Job, checkpoint: Checkpoint, outcome: Outcome) -> None:
        if outcome.status == "ready":
            # A ready checkpoint is recorded with its plan, in one transaction.
            result = outcome.results[-1]
            info = {k: result.get(k) for k in ("inputs", "outputs", "lengths", "sample_source", "data_split",
                                               "quality_metric", "baseline_quality", "samples", "info")}
            units.record_inspection(session, job, checkpoint, "ready", format=result["format"], info=info,
                                    plan=self.planner.plan(session, checkpoint))
        else:
            units.record_inspection(session, job, checkpoint, "rejected" if outcome.status == "rejected" else "failed",
                                    reason=in_source_terms(outcome.reason, checkpoint))

    def _record_variant(self, session, job: Job, checkpoint: Checkpoint, outcome: Outcome | None) -> None:
        variant = queries.variant_of(session, job)
        final = self.layout.variant_of(checkpoint, variant)
        staging = self.layout.staging(final, job.id)
        if outcome is not None and outcome.status != "measured":
            self.layout.remove(staging)
            units.end_job(session, job, "skipped" if outcome.status == "skipped" else "failed", outcome.reason)
            return
        if outcome is not None:
            built, measured = outcome.results
            document = variant_document(checkpoint, variant, built, measured)
            (staging / VARIANT_FILE).write_text(json.dumps(document, indent=2))
            if final.exists():
                self.layout.remove(staging)  # a repeated job lost the race
            else:
                staging.rename(final)
        document = json.loads((final / VARIANT_FILE).read_text())
        units.record_variant(session, job, variant, str(final), document)


def in_source_terms(reason: str | None, checkpoint: Checkpoint) -> str | None:
    """``reason`` naming the files where the user put them, not the snapshot the worker
    read: the version folder for a local registry, the version's URI otherwise."""
    if not reason:
        return reason
    source = checkpoint.source_uri
    if source.startswith("file://"):
        from urllib.parse import unquote, urlparse

        source = unquote(urlparse(source).path)
    return reason.replace(checkpoint.snapshot_path, source.rstrip("/"))


def variant_document(checkpoint, variant, built: dict, measured: dict) -> dict:
    """``variant.json``: enough for serving code and for rebuilding the catalogue row."""
    baseline = measured["baseline_quality"]
    return {
        "model": checkpoint.model,
        "version": checkpoint.version,
        "checkpoint": {"content_hash": checkpoint.content_hash, "source": checkpoint.source_uri,
                       "format": checkpoint.format},
        "target": variant.target,
        "runtime": variant.runtime,
        "file": built["file"],
        "recipe": variant.recipe or "baseline",
        "lineage": built["lineage"],
        # What serving code passes and gets back: names, types, and shapes with a name
        # for every dimension that varies between requests.
        "inputs": [{"name": spec.name, "dtype": spec.dtype, "shape": spec.symbolic_shape()}
                   for spec in map(InputSpec.from_dict, checkpoint.info["inputs"])],
        "outputs": checkpoint.info.get("outputs") or [],
        # Files beside the model that serving code reads (a tokenizer, the model's config).
        "serving_files": built.get("serving_files", []),
        # A causal LM's weights as LLM servers load them: the format, its quantization and
        # the servers that read it, or why there is no such form.
        "weights": built.get("weights"),
        "metrics": {
            "quality_metric": measured["quality_metric"],
            "quality": measured["quality"],
            "baseline_quality": baseline,
            "quality_delta": measured["quality"] - baseline,
            "relative_quality_drop": relative_drop(measured["quality"], baseline),
            "size_bytes": measured["size_bytes"],
            "batches": measured["measurements"],
            "checks": measured.get("checks", {}),
            # Why it misses the quality gate (None: it passes).
            "gate": measured.get("gate"),
            # Why its timing ended after the first runs (clearly slower than the served
            # variant and the baseline), None when it was timed in full.
            "ended_early": measured.get("ended_early"),
            "decode": measured.get("decode"),
            # Throughput and p50/p95 per level of concurrent clients (targets.<name>.concurrency).
            "load": measured.get("load"),
            # For models that take sequences: the lengths timed, and the figures at the longest.
            "sequence": measured.get("sequence"),
        },
        # Where and with what it was measured: host, CPU and its features, GPU, versions.
        "measured_on": measured.get("environment"),
        # What the job cost: seconds per part, and per phase the most its process held in
        # memory at once (resident) and the most bytes it had newly written under the
        # artifacts root (a shard linked from another variant's content counts nothing).
        "timings": {**built["timings"], **measured["timings"],
                    **{phase: {"peak_host_bytes": result.get("peak_host_bytes"),
                               "new_disk_bytes": result.get("new_disk_bytes")}
                       for phase, result in (("build", built), ("measure", measured))}},
    }
