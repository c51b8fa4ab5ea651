"""Rows as plain dicts: what `--json` prints, what event hooks and the policy receive."""

from __future__ import annotations

import time
from datetime import datetime

from .models import Checkpoint, Job, Promotion, Variant, utcnow


def variant_label(variant: Variant) -> str:
    return f"{variant.runtime}:{variant.recipe or 'baseline'}"


def parse_variant_label(text: str, runtimes) -> tuple[str | None, str]:
    """What an operator typed for a variant, as ``variant_label`` writes it
    ("onnxruntime:quantize.int8_dynamic") or a recipe alone: (the runtime, or None where
    the text names none of ``runtimes``, and the recipe text, "" for the baseline)."""
    head, colon, rest = text.partition(":")
    runtime, recipe = (head, rest) if colon and head in runtimes else (None, text)
    return runtime, "" if recipe in ("", "baseline") else recipe


def metrics(variant: Variant) -> dict | None:
    if variant.status != "succeeded":
        return None
    batches = [
        {
            "batch_size": m.batch_size,
            "latency_p50_ms": m.latency_p50_ms,
            "latency_p95_ms": m.latency_p95_ms,
            "throughput_per_s": m.throughput_per_s,
            "peak_memory_bytes": m.peak_memory_bytes,
            "runs": m.runs,
        }
        for m in variant.measurements
    ]
    # The headline latency is the smallest batch measured (batch 1 by default).
    first = batches[0] if batches else {}
    return {
        "latency_p50_ms": first.get("latency_p50_ms"),
        "latency_p95_ms": first.get("latency_p95_ms"),
        "throughput_per_s": first.get("throughput_per_s"),
        "peak_memory_bytes": first.get("peak_memory_bytes"),
        "size_bytes": variant.size_bytes,
        "quality_metric": variant.quality_metric,
        "quality": variant.quality,
        "baseline_quality": variant.baseline_quality,
        "quality_delta": variant.quality_delta,
        "runoff": variant.runoff,
        "decode": variant.decode,
        "checks": variant.checks or {},
        "load": variant.load or [],
        "batches": batches,
    }


def variant_dict(variant: Variant) -> dict:
    checkpoint = variant.checkpoint
    out = {
        "id": variant.id,
        "variant": variant_label(variant),
        "model": checkpoint.model,
        "version": checkpoint.version,
        "checkpoint": checkpoint.content_hash[:16],
        "target": variant.target,
        "runtime": variant.runtime,
        "recipe": variant.recipe or "baseline",
        "status": variant.status,
        "lineage": variant.lineage or [],
        "path": variant.artifact_path,
        "file": variant.artifact_file,
        # What its job cost: seconds, and per phase the peak host memory and new disk bytes.
        "timings": variant.timings or {},
    }
    if variant.status == "succeeded":
        out["metrics"] = metrics(variant)
    # Why it failed or was skipped or cancelled, or why a measured one misses the gate.
    out["reason"] = variant.reason
    return out


def parent_recipe(recipe: str) -> str | None:
    """The recipe one step shorter: a variant's parent in its lineage (None for baseline)."""
    if not recipe:
        return None
    steps = recipe.split(" -> ")
    return " -> ".join(steps[:-1])


def with_parents(variants: list[dict]) -> list[dict]:
    """Add ``parent``: the label of the variant one step shorter, where it was built too."""
    labels = {(v["checkpoint"], v["target"], v["runtime"], v["recipe"]): v["variant"] for v in variants}
    for v in variants:
        recipe = "" if v["recipe"] == "baseline" else v["recipe"]
        parent = parent_recipe(recipe)
        key = (v["checkpoint"], v["target"], v["runtime"], parent or "baseline")
        v["parent"] = labels.get(key) if parent is not None else None
    return variants


def promotion_dict(promotion: Promotion, link: str) -> dict:
    variant = promotion.variant
    return {
        "id": promotion.id,
        "model": promotion.model,
        "target": promotion.target,
        "variant_id": promotion.variant_id,
        "variant": variant_label(variant),
        "version": variant.checkpoint.version,
        "recipe": variant.recipe or "baseline",
        "runtime": variant.runtime,
        "path": link,
        "artifact": variant.artifact_path,
        "file": variant.artifact_file,
        "metrics": metrics(variant),
        "promoted_at": promotion.promoted_at.isoformat() + "Z",
        "reason": promotion.reason,
    }


def job_dict(job: Job) -> dict:
    checkpoint = job.checkpoint
    return {
        "id": job.id,
        "kind": job.kind,
        "model": checkpoint.model,
        "version": checkpoint.version,
        "target": job.target,
        "variant": variant_label(job.variant) if job.variant is not None else None,
        "attempts": job.attempts,
        "reason": job.reason,
    }


def checkpoint_dict(checkpoint: Checkpoint) -> dict:
    out = {
        "model": checkpoint.model,
        "version": checkpoint.version,
        "status": checkpoint.status,
        "format": checkpoint.format,
        "content_hash": checkpoint.content_hash,
        "size_bytes": checkpoint.size_bytes,
        "source": checkpoint.source_uri,
        "ingested_at": checkpoint.created_at.isoformat() + "Z",
    }
    if checkpoint.reason:
        out["reason"] = checkpoint.reason
    # Which rows judge its variants and which its training steps learn from.
    split = (checkpoint.info or {}).get("data_split")
    if split:
        out["data_split"] = split
    return out


def running_job_dict(job: Job, now: datetime | None = None) -> dict:
    """A running job as `kiln status` shows it: what it is, what it reports doing, how
    long it has run and about how long it has left (what its step reports, else its
    estimate less the time so far)."""
    now = now or utcnow()
    elapsed = (now - job.started_at).total_seconds() if job.started_at else None
    report = job.progress or {}
    left = report.get("eta_seconds")
    if left is not None and report.get("at"):  # reported a moment ago
        left = max(0.0, left - max(0.0, time.time() - report["at"]))
    if left is None and job.estimate_seconds is not None and elapsed is not None:
        # Past its estimate: how long is not known (blank, not "0 s").
        left = job.estimate_seconds - elapsed if job.estimate_seconds > elapsed else None
    return {
        **job_dict(job),
        "host": job.lease_owner,
        "progress": job.progress,
        "elapsed_seconds": elapsed,
        "estimate_seconds": job.estimate_seconds,
        "left_seconds": left,
    }
