"""What a job means: the phases it runs, and how its outcome is recorded.

An ``inspect`` job loads a checkpoint and records its reference outputs; on success the
planner adds one ``variant`` job per (target, runtime, recipe). A ``variant`` job builds
the artifact into a staging folder, measures it there, writes ``variant.json`` and only
then renames the folder into place: a final variant folder is always complete. If that
folder already exists (a job repeated after a crash), it is recorded as it stands. A
``runoff`` job times a target's closest candidates side by side in one process and
records each one's figures on its variant (``Variant.runoff``), for the promoter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from .. import policy as builtin_policy
from ..plugins.recipes import parse_recipe
from ..store import queries
from ..store.models import Checkpoint, Job, Variant, utcnow
from ..targets.quality import relative_drop
from .executor import Outcome, Phase
from .layout import VARIANT_FILE, Layout
from .promoter import candidates_for

log = logging.getLogger(__name__)


class JobBook:
    """Turns jobs into phases and outcomes into catalogue rows. Runs in the daemon."""

    def __init__(self, config, plugins, layout: Layout):
        self.config = config
        self.plugins = plugins
        self.layout = layout

    # -- planning ---------------------------------------------------------------------

    def plan(self, session, checkpoint: Checkpoint) -> int:
        """Add a variant and a job for every (target, runtime, recipe); idempotent."""
        added = 0
        for target_name, target in self.config.targets.items():
            for runtime in target.runtimes:
                for text in target.recipes:
                    recipe = parse_recipe(text, self.plugins.steps, f"targets.{target_name}.recipes")
                    variant, created = queries.get_or_add_variant(
                        session, checkpoint.id, target_name, runtime, recipe.text
                    )
                    if created:
                        queries.add_job(session, "variant", checkpoint.id, variant.id, target_name)
                        added += 1
        return added

    # -- phases -------------------------------------------------------------------------

    def _base_spec(self, checkpoint: Checkpoint) -> dict:
        arch = self.config.architectures.get(checkpoint.model)
        return {
            "model": checkpoint.model,
            "checkpoint_dir": checkpoint.snapshot_path,
            "architecture": asdict(arch) if arch else None,
            "enabled": list(self.config.plugins.enabled),
            "disabled": list(self.config.plugins.disabled),
        }

    def phases(self, session, job: Job) -> list[Phase] | None:
        """The phases to run, or None when the job's result already exists on disk."""
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        spec = self._base_spec(checkpoint)
        reference = self.layout.reference(checkpoint.model, checkpoint.content_hash)
        if job.kind == "inspect":
            threads = max(1, (os.cpu_count() or 1) // self.config.workers.count)
            spec.update(work_dir=str(reference), sample_count=self.config.measure.sample_count, threads=threads)
            return [Phase("inspect", spec)]
        if job.kind == "runoff":
            return self._runoff_phases(session, job, spec, reference)
        variant = session.get(Variant, job.variant_id)
        final = self.layout.variant(checkpoint.model, checkpoint.content_hash, variant.target,
                                    variant.runtime, variant.recipe)
        if (final / VARIANT_FILE).exists():
            return None
        target = self.config.targets[variant.target]
        staging = self.layout.staging(final, job.id)
        shutil.rmtree(staging, ignore_errors=True)
        spec.update(
            reference_dir=str(reference),
            work_dir=str(self.layout.job_work(job.id) / "steps"),
            out_dir=str(staging),
            runtime=variant.runtime,
            recipe=variant.recipe,
            target=self._target_spec(variant.target),
            measure=asdict(self.config.measure),
            max_quality_drop=self.config.policy.max_quality_drop,
            threads=target.threads,
        )
        return [Phase("build", spec), Phase("measure", spec)]

    def _target_spec(self, name: str) -> dict:
        target = self.config.targets[name]
        return {"name": name, "device": target.device, "threads": target.threads, "devices": target.devices,
                "memory_mb": target.memory_mb, "batch_sizes": list(target.batch_sizes)}

    def _runoff_phases(self, session, job: Job, spec: dict, reference: Path) -> list[Phase] | None:
        """The run-off of the candidates now closest to the best (None: no longer any)."""
        contenders = builtin_policy.runoff_contenders(
            candidates_for(session, self.config, job.checkpoint_id, job.target), self.config.policy,
            self.config.targets[job.target].memory_mb)
        if not contenders:
            return None
        spec.update(
            reference_dir=str(reference),
            target=self._target_spec(job.target),
            measure=asdict(self.config.measure),
            batch_size=self.config.policy.objective_batch_size,
            threads=self.config.targets[job.target].threads,
            contenders=[{k: c[k] for k in ("id", "variant", "runtime", "path", "file")} for c in contenders],
        )
        return [Phase("runoff", spec)]

    # -- outcomes ---------------------------------------------------------------------

    def record(self, session, job: Job, outcome: Outcome | None) -> Checkpoint:
        """Record an ended job (``outcome`` None: its variant folder already exists)."""
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        if job.kind == "inspect":
            self._record_inspect(session, job, checkpoint, outcome)
        elif job.kind == "runoff":
            self._record_runoff(session, job, outcome)
        else:
            self._record_variant(session, job, checkpoint, outcome)
        return checkpoint

    @staticmethod
    def _record_runoff(session, job, outcome: Outcome | None) -> None:
        if outcome is None:
            queries.finish_job(session, job, "skipped", "no variants close enough to the best any more")
            return
        if outcome.status != "measured":
            # The separate measurements decide then; the log and the job say why.
            queries.finish_job(session, job, "failed", outcome.reason)
            return
        result = outcome.results[-1]
        rivals = sorted(int(i) for i in result["contenders"])
        for variant_id, figures in result["contenders"].items():
            variant = session.get(Variant, int(variant_id))
            variant.runoff = {**figures, "batch_size": result["batch_size"], "rounds": result["rounds"],
                              "rivals": [i for i in rivals if i != int(variant_id)], "job": job.id}
        queries.finish_job(session, job, "succeeded")

    def _record_inspect(self, session, job, checkpoint, outcome: Outcome) -> None:
        result = outcome.results[-1] if outcome.results else {}
        if outcome.status == "ready":
            checkpoint.status = "ready"
            checkpoint.format = result["format"]
            checkpoint.info = {k: result[k] for k in ("inputs", "quality_metric", "baseline_quality", "samples", "info")}
            queries.finish_job(session, job, "succeeded")
            self.plan(session, checkpoint)
        elif outcome.status == "rejected":
            checkpoint.status = "rejected"
            checkpoint.reason = outcome.reason
            queries.finish_job(session, job, "succeeded")
        else:
            checkpoint.status = "failed"
            checkpoint.reason = outcome.reason
            queries.finish_job(session, job, "failed", outcome.reason)

    def _record_variant(self, session, job, checkpoint, outcome: Outcome | None) -> None:
        variant = session.get(Variant, job.variant_id)
        final = self.layout.variant(checkpoint.model, checkpoint.content_hash, variant.target,
                                    variant.runtime, variant.recipe)
        staging = self.layout.staging(final, job.id)
        if outcome is not None and outcome.status != "measured":
            shutil.rmtree(staging, ignore_errors=True)
            variant.status = "skipped" if outcome.status == "skipped" else "failed"
            variant.reason = outcome.reason
            variant.finished_at = utcnow()
            queries.finish_job(session, job, variant.status, outcome.reason)
            return
        if outcome is not None:
            built, measured = outcome.results
            document = self._variant_document(checkpoint, variant, built, measured)
            (staging / VARIANT_FILE).write_text(json.dumps(document, indent=2))
            if final.exists():
                shutil.rmtree(staging, ignore_errors=True)  # a repeated job lost the race
            else:
                staging.rename(final)
        document = json.loads((final / VARIANT_FILE).read_text())
        self._apply_document(session, variant, final, document)
        queries.finish_job(session, job, "succeeded")

    def _variant_document(self, checkpoint, variant, built, measured) -> dict:
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
            "inputs": checkpoint.info["inputs"],
            "metrics": {
                "quality_metric": measured["quality_metric"],
                "quality": measured["quality"],
                "baseline_quality": baseline,
                "quality_delta": measured["quality"] - baseline,
                "relative_quality_drop": relative_drop(measured["quality"], baseline),
                "size_bytes": measured["size_bytes"],
                "batches": measured["measurements"],
                "checks": measured.get("checks", {}),
                "decode": measured.get("decode"),
            },
            "timings": {**built["timings"], **measured["timings"]},
        }

    @staticmethod
    def _apply_document(session, variant: Variant, final: Path, document: dict) -> None:
        metrics = document["metrics"]
        variant.status = "succeeded"
        variant.reason = None
        variant.artifact_path = str(final)
        variant.artifact_file = document["file"]
        variant.size_bytes = metrics["size_bytes"]
        variant.quality_metric = metrics["quality_metric"]
        variant.quality = metrics["quality"]
        variant.baseline_quality = metrics["baseline_quality"]
        variant.quality_delta = metrics["quality_delta"]
        variant.lineage = document["lineage"]
        variant.timings = document["timings"]
        variant.decode = metrics.get("decode")
        variant.finished_at = utcnow()
        queries.replace_measurements(session, variant, metrics["batches"])
