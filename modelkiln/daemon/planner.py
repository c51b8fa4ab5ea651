"""Planning: the variants a checkpoint gets, and the phases each job runs in a worker.

An ``inspect`` job loads a checkpoint and records its reference outputs; when it is
ready, one ``variant`` job per (target, runtime, recipe) is planned. A ``variant`` job
builds the artifact into a staging folder and measures it there (``outcomes.py`` then
writes ``variant.json`` and renames the folder into place). A ``runoff`` job's phases
come from the promoter, which owns the run-off (it is told ``base_spec``); the planner
knows nothing of promotion.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from ..plugins.recipes import parse_recipe
from ..store import queries
from ..store.models import Checkpoint, Job
from ..targets.quality import GateLimits
from .estimates import Planned, plan_entry
from .executor import Phase
from .layout import VARIANT_FILE, Layout


def target_spec(config, name: str) -> dict:
    """A target as a worker's phase needs it (a variant's build and measurement, a run-off)."""
    target = config.targets[name]
    return {"name": name, "device": target.device, "threads": target.threads, "devices": target.devices,
            "memory_mb": target.memory_mb, "batch_sizes": list(target.batch_sizes),
            "concurrency": list(target.concurrency), "decode_batch_sizes": list(target.decode_batch_sizes),
            "prefill_tokens": list(target.prefill_tokens)}


class Planner:
    def __init__(self, config, plugins, layout: Layout):
        self.config = config
        self.plugins = plugins
        self.layout = layout
        self._wanted: set[tuple[str, str, str]] | None = None

    def wanted(self) -> set[tuple[str, str, str]]:
        """(target, runtime, canonical recipe) of every variant the config asks for."""
        if self._wanted is None:
            self._wanted = self._parse_wanted()
        return self._wanted

    def _parse_wanted(self) -> set[tuple[str, str, str]]:
        return {
            (target_name, runtime, parse_recipe(text, self.plugins.steps, f"targets.{target_name}.recipes").text)
            for target_name, target in self.config.targets.items()
            for runtime in target.runtimes
            for text in target.recipes
        }

    def plan(self, session, checkpoint: Checkpoint, only_missing: bool = False, planned: set | None = None
             ) -> list[Planned]:
        """Every variant the config asks for (``only_missing``: that the checkpoint does not
        have yet; ``planned``: what it has, when the caller looked already), with what it
        is expected to cost and gain."""
        wanted = self.wanted()
        if only_missing:
            wanted = wanted - (planned if planned is not None else queries.planned_variants(session, checkpoint.id))
        batch_size = self.config.policy.objective_batch_size
        return [
            plan_entry(session, checkpoint, target, runtime, recipe, self.plugins.steps, batch_size)
            for target, runtime, recipe in sorted(wanted)
        ]

    def unwanted_reason(self, variant) -> str | None:
        """Why a planned variant is no longer wanted by this host's config (None: it is).
        Only for targets this host configures: another host's targets are its own."""
        target = self.config.targets.get(variant.target)
        if target is None or (variant.target, variant.runtime, variant.recipe) in self.wanted():
            return None
        if variant.runtime not in target.runtimes:
            return f"runtime {variant.runtime} is no longer in targets.{variant.target}.runtimes"
        return f"recipe {variant.recipe or 'baseline'!r} is no longer in targets.{variant.target}.recipes"

    def base_spec(self, checkpoint: Checkpoint) -> dict:
        """What every phase of a job on ``checkpoint`` is told."""
        arch = self.config.architectures.get(checkpoint.model)
        return {
            "model": checkpoint.model,
            "checkpoint_dir": checkpoint.snapshot_path,
            # Detected once, at ingest: the worker loads it with the same format.
            "format": checkpoint.format,
            "architecture": asdict(arch) if arch else None,
            "enabled": list(self.config.plugins.enabled),
            "disabled": list(self.config.plugins.disabled),
            "reference_dir": str(self.layout.reference(checkpoint.model, checkpoint.content_hash)),
        }

    def phases(self, session, job: Job) -> list[Phase] | None:
        """The phases of an inspect or variant job, or None when the variant exists on
        disk already."""
        checkpoint = queries.checkpoint(session, job.checkpoint_id)
        spec = self.base_spec(checkpoint)
        if job.kind == "inspect":
            threads = max(1, (os.cpu_count() or 1) // self.config.workers.count)
            spec.update(work_dir=spec["reference_dir"], sample_count=self.config.measure.sample_count,
                        threads=threads)
            return [Phase("inspect", spec)]
        variant = queries.variant_of(session, job)
        final = self.layout.variant_of(checkpoint, variant)
        if (final / VARIANT_FILE).exists():
            return None
        staging = self.layout.staging(final, job.id)
        self.layout.remove(staging)  # a half-built one of an earlier attempt
        spec.update(
            work_dir=str(self.layout.job_work(job.id) / "steps"),
            out_dir=str(staging),
            # On the staging folder's filesystem, so its links survive the rename into place.
            blob_dir=str(self.layout.blobs),
            runtime=variant.runtime,
            recipe=variant.recipe,
            target=target_spec(self.config, variant.target),
            measure=asdict(self.config.measure),
            gate=asdict(GateLimits.of(self.config.policy)),
            threads=self.config.targets[variant.target].threads,
            rivals=self.rivals(session, checkpoint, variant),
        )
        return [Phase("build", spec), Phase("measure", spec)]

    def rivals(self, session, checkpoint: Checkpoint, variant) -> dict | None:
        """The p50 at the policy's batch size of what ``variant`` must beat to be served:
        the baseline of its runtime on this checkpoint and, where one is served, the
        served variant. The measurement ends early when it is clearly slower than all of
        them (``harness.slower_than``). None for a baseline, before that baseline is
        measured, where the policy does not pick by a latency at one batch size, and with
        ``measure.give_up_margin`` 0."""
        batch_size = self.config.policy.objective_batch_size
        margin = self.config.measure.give_up_margin
        if (not variant.recipe or margin <= 0 or self.config.policy.objective not in ("latency_p50_ms", "latency_p95_ms")
                or batch_size not in self.config.targets[variant.target].batch_sizes):
            return None

        def p50(candidate) -> float | None:
            if candidate is None or candidate.status != "succeeded":
                return None
            return next((m.latency_p50_ms for m in candidate.measurements if m.batch_size == batch_size), None)

        baseline = next((v for v in queries.variants_of(session, checkpoint.id, variant.target)
                         if v.runtime == variant.runtime and not v.recipe), None)
        if baseline is None or p50(baseline) is None:
            return None
        promotion = queries.current_promotion(session, checkpoint.model, variant.target)
        served = promotion.variant if promotion is not None else None
        found = {}
        if served is not None and p50(served) is not None and served.id != variant.id:
            name = f"{served.runtime}:{served.recipe or 'baseline'}"
            found[f"the served variant ({name})" if served.id != baseline.id else f"the served baseline ({name})"] = \
                p50(served)
        if served is None or served.id != baseline.id:
            found["the baseline"] = p50(baseline)
        return {"batch_size": batch_size, "p50_ms": found, "margin": margin}
