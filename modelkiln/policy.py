"""Choosing what to promote: constraints first, then the objective.

A candidate is a variant as ``kiln variants --json`` prints it. It is eligible when its
quality is at most ``max_quality_drop`` (relative) below its baseline and, on a target
with a ``memory_mb`` budget, its weights resident while serving fit that budget; among
eligible candidates the lowest objective wins (p50 latency at the configured batch size, or for
causal language models the per-token decode or prefill latency), ties going to the
smaller artifact. The baseline competes like any other variant.
"""

from __future__ import annotations

from .config import PolicyConfig
from .targets.quality import relative_drop

# Float noise in a score must not turn an identical model into a rejected one.
_EPSILON = 1e-9


def within_tolerance(candidate: dict, policy: PolicyConfig) -> bool:
    metrics = candidate.get("metrics") or {}
    quality, baseline = metrics.get("quality"), metrics.get("baseline_quality")
    if quality is None or baseline is None:
        return False
    return relative_drop(quality, baseline) <= policy.max_quality_drop + _EPSILON


def resident_weights_mib(candidate: dict) -> float | None:
    """The weights a variant holds at once while serving, MiB: what a step that streams
    them recorded (``resident_weights_mib``), else the whole artifact's size."""
    for step in reversed(candidate.get("lineage") or []):
        resident = (step.get("record") or {}).get("resident_weights_mib")
        if resident is not None:
            return float(resident)
    size = (candidate.get("metrics") or {}).get("size_bytes")
    return None if size is None else size / 2**20


def fits_memory(candidate: dict, memory_mb: int) -> bool:
    """Whether the variant serves within the target's ``memory_mb`` (0: no budget)."""
    if memory_mb <= 0:
        return True
    resident = resident_weights_mib(candidate)
    return resident is not None and resident <= memory_mb


# Objectives read from the decode figures of causal language models (batch 1).
DECODE_OBJECTIVES = ("decode_ms_per_token", "prefill_ms")
OBJECTIVES = ("latency_p50_ms", "latency_p95_ms", *DECODE_OBJECTIVES)


def objective_value(candidate: dict, policy: PolicyConfig) -> float | None:
    metrics = candidate.get("metrics") or {}
    if policy.objective in DECODE_OBJECTIVES:
        return (metrics.get("decode") or {}).get(policy.objective)
    for row in metrics.get("batches", []):
        if row["batch_size"] == policy.objective_batch_size:
            return row.get(policy.objective)
    return None


def choose(candidates: list[dict], policy: PolicyConfig) -> dict | None:
    eligible = [
        c for c in candidates
        if c.get("within_tolerance") and c.get("fits_memory", True) and objective_value(c, policy) is not None
    ]
    if not eligible:
        return None
    return min(eligible, key=lambda c: (objective_value(c, policy), c["metrics"].get("size_bytes") or 0))


def pareto_front(candidates: list[dict], policy: PolicyConfig) -> list[dict]:
    """Candidates no other beats on both the objective (lower) and quality (higher),
    sorted by the objective: the trade-offs worth looking at, whatever the tolerance."""
    points = [
        (objective_value(c, policy), (c.get("metrics") or {}).get("quality"), c) for c in candidates
    ]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    front = []
    for cost, quality, candidate in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or quality > front[-1][1] + _EPSILON:
            front.append((cost, quality, candidate))
    return [c for _, _, c in front]
