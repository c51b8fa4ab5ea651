"""Choosing what to promote: constraints first, then the objective.

A candidate is a variant as ``kiln variants --json`` prints it. It is eligible when it
passes the gate (``targets.quality.gate_reason``: its quality at most ``max_quality_drop``
below its baseline's, and so is the drop's upper bound at ``confidence``; its worst sample
at most ``max_sample_drop``; for models with an attention mask, a sample's answer alone
and in a padded batch agreeing to ``min_batch_agreement``; the same on modelkiln's probe
set for text models; and where a step trained on the checkpoint's data, at least
``min_heldout_rows`` distinct rows it never saw judging it) and, on a target with a ``memory_mb`` budget, its weights
resident while serving fit that budget; among
eligible candidates the lowest objective wins (p50 latency at the configured batch size, or for
causal language models the per-token decode latency at the configured decode batch, or the
prefill latency), ties going to the
smaller artifact. The baseline competes like any other variant.

Variants are measured one after another, each in its own process, and a shared or
virtual host drifts between those moments (BENCHMARKS.md, "Figures behind the code").
So when several eligible candidates are within ``runoff_margin`` of the
best, the daemon times them again side by side, interleaved in one process (a run-off),
and the run-off's figures decide between them.
"""

from __future__ import annotations

from .config import DECODE_OBJECTIVES, LOAD_OBJECTIVE, PolicyConfig
from .targets.quality import EPSILON, GateLimits, bound_at, gate_reason

# Contenders timed together at most: each is loaded into the run-off's one process.
RUNOFF_MOST = 3
# A measurement whose p95 is this many times its p50 was taken while the host was busy.
NOISY_SPREAD = 3.0


def gate_verdict(candidate: dict, policy: PolicyConfig) -> str | None:
    """Why the candidate misses the gate under ``policy`` (None: it passes): judged here
    from its recorded figures, so a changed policy applies to variants measured before,
    and the reason stored with a measurement is only what the gate said then."""
    metrics = candidate.get("metrics") or {}
    quality, baseline = metrics.get("quality"), metrics.get("baseline_quality")
    if quality is None or baseline is None:
        return "not measured: no quality figure"
    return gate_reason(quality, baseline, metrics.get("quality_metric") or "quality", metrics.get("checks"),
                       GateLimits.of(policy), lineage=candidate.get("lineage"))


def within_tolerance(candidate: dict, policy: PolicyConfig) -> bool:
    """Whether the candidate passes the gate under ``policy`` (``gate_verdict``)."""
    return gate_verdict(candidate, policy) is None


def judged_on(candidate: dict, policy: PolicyConfig) -> str:
    """What the gate judged a measured candidate on, in the words `kiln variants` and the
    report show: the rows (for a variant that trained, how many it never saw and how many
    it trained on), the drop's upper bound at the policy's confidence, and the probe
    set's score ("64 unseen, trained on 36 others, drop <= 0.31% (95%); probes 0.9990")."""
    checks = (candidate.get("metrics") or {}).get("checks") or {}
    parts = []
    trained = [entry["data"] for entry in candidate.get("lineage") or [] if entry.get("data")]
    if trained:
        data = trained[-1]
        parts.append(f"{data.get('quality_rows', 0)} samples, all trained on" if data.get("trained_on_samples")
                     else f"{data['heldout_rows']} unseen, trained on {data['training_rows']} others")
    elif checks.get("samples"):
        parts.append(f"{checks['samples']} samples")
    found = bound_at(checks.get("quality_drop_bounds"), policy.confidence) if policy.confidence > 0 else None
    if found is not None:
        parts[-1:] = [", ".join(parts[-1:] + [f"drop <= {max(found[1], 0.0):.2%} ({found[0]:.0%})"])]
    if checks.get("probe_error"):
        parts.append("probes fail")
    elif checks.get("probe_quality") is not None:
        worst = checks.get("probe_min_cosine")
        parts.append(f"probes {checks['probe_quality']:.4f}" + (f", worst {worst:.4f}" if worst is not None else ""))
    return "; ".join(parts)


def _recorded(candidate: dict, key: str):
    """What the last step that recorded ``key`` in the variant's lineage said, or None."""
    for step in reversed(candidate.get("lineage") or []):
        value = (step.get("record") or {}).get(key)
        if value is not None:
            return value
    return None


def resident_weights_mib(candidate: dict) -> float | None:
    """The weights a variant holds at once while serving, MiB: what a step that streams
    them recorded (``resident_weights_mib``), else the whole artifact's size."""
    resident = _recorded(candidate, "resident_weights_mib")
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


def objective_value(candidate: dict, policy: PolicyConfig) -> float | None:
    """The candidate's figure for the policy's objective, lower being better (None when
    it has none). For ``throughput_at_p95_ms`` that is milliseconds per answer at the
    best load level whose p95 keeps ``p95_limit_ms``: 1000 / its requests per second."""
    metrics = candidate.get("metrics") or {}
    if policy.objective == "decode_ms_per_token":
        return decode_step_ms(metrics.get("decode") or {}, policy)
    if policy.objective in DECODE_OBJECTIVES:
        return (metrics.get("decode") or {}).get(policy.objective)
    if policy.objective == LOAD_OBJECTIVE:
        best = best_load_level(candidate, policy)
        return None if best is None else 1000.0 / best["throughput_per_s"]
    for row in metrics.get("batches", []):
        if row["batch_size"] == policy.objective_batch_size:
            return row.get(policy.objective)
    return None


def decode_step_ms(decode: dict, policy: PolicyConfig) -> float | None:
    """Milliseconds per decoding step with ``objective_batch_size`` sequences at once
    (at a fixed batch, the fewer the more tokens per second), or None where not measured
    or where its p95 exceeds ``p95_limit_ms``: what each user of a full server waits for
    a token must stay within the bound."""
    batch = policy.objective_batch_size
    row = decode if batch == 1 else next(
        (r for r in decode.get("batches") or [] if r["batch_size"] == batch), {})
    step, p95 = row.get("decode_ms_per_token"), row.get("decode_p95_ms")
    if step is None or (policy.p95_limit_ms and (p95 is None or p95 > policy.p95_limit_ms)):
        return None
    return step


def objective_words(policy: PolicyConfig) -> str:
    """What the policy picks by, as a promotion's reason says it."""
    if policy.objective == LOAD_OBJECTIVE:
        bound = f" with p95 within {policy.p95_limit_ms:g} ms" if policy.p95_limit_ms else ""
        return f"most requests per second under concurrent clients{bound}"
    if policy.objective == "decode_ms_per_token":
        bound = f" with p95 within {policy.p95_limit_ms:g} ms" if policy.p95_limit_ms else ""
        return f"lowest decode_ms_per_token with {policy.objective_batch_size} sequences at once{bound}"
    if policy.objective in DECODE_OBJECTIVES:
        return f"lowest {policy.objective}"
    return f"lowest {policy.objective} at batch {policy.objective_batch_size}"


def best_load_level(candidate: dict, policy: PolicyConfig) -> dict | None:
    """The load level with the most requests per second whose p95 keeps
    ``policy.p95_limit_ms`` (any, when that is 0), or None."""
    levels = [row for row in (candidate.get("metrics") or {}).get("load") or []
              if row.get("throughput_per_s") and (not policy.p95_limit_ms or (
                  row.get("latency_p95_ms") is not None and row["latency_p95_ms"] <= policy.p95_limit_ms))]
    return max(levels, key=lambda row: row["throughput_per_s"], default=None)


def noisy(candidate: dict, policy: PolicyConfig) -> bool:
    """Whether the candidate's figures at the policy's batch size spread as a busy host's do."""
    for row in (candidate.get("metrics") or {}).get("batches", []):
        if row["batch_size"] == policy.objective_batch_size:
            p50, p95 = row.get("latency_p50_ms"), row.get("latency_p95_ms")
            return bool(p50 and p95 and p95 > NOISY_SPREAD * p50)
    return False


def _eligible(candidates: list[dict], policy: PolicyConfig) -> list[dict]:
    return [
        c for c in candidates
        if c.get("within_tolerance") and c.get("fits_memory", True) and objective_value(c, policy) is not None
    ]


def runoff_contenders(candidates: list[dict], policy: PolicyConfig, memory_mb: int = 0) -> list[dict]:
    """The eligible candidates close enough to the best that a run-off decides between
    them (within ``runoff_margin``, best first), and those whose figures are ``noisy``
    however far off (after the close ones); at most RUNOFF_MOST, and on a target with a
    ``memory_mb`` budget as many as fit it together, since they are loaded together;
    none when fewer than two. Not for the decode objectives (a causal LM's variants each
    hold two whole programs on the device, timed with its own events), nor for
    tensor-parallel variants (one process group per process). For the load objective the
    run-off measures the contenders under load, in turns."""
    if policy.runoff_margin <= 0 or policy.objective in DECODE_OBJECTIVES:
        return []
    scored = sorted(
        ((value, c) for c in _eligible(candidates, policy)
         if (_recorded(c, "ranks") or 1) == 1 and (value := objective_value(c, policy)) is not None),
        key=lambda pair: pair[0],
    )
    if len(scored) < 2:
        return []
    ranked = [c for _, c in scored]
    best = scored[0][0]
    close = [c for value, c in scored if value <= best * (1 + policy.runoff_margin)]
    close = (close + [c for c in ranked if noisy(c, policy) and c not in close])[:RUNOFF_MOST]
    if memory_mb > 0:
        weights = [resident_weights_mib(c) or 0.0 for c in close]
        close = [c for i, c in enumerate(close) if sum(weights[:i + 1]) <= memory_mb]
    return close if len(close) > 1 else []


def runoff_value(candidate: dict, policy: PolicyConfig) -> float | None:
    """The candidate's objective as its run-off timed it, if it ran in one (for the load
    objective, from the levels the run-off measured)."""
    runoff = (candidate.get("metrics") or {}).get("runoff") or {}
    if policy.objective == LOAD_OBJECTIVE:
        return objective_value({"metrics": {"load": runoff.get("load")}}, policy) if runoff.get("load") else None
    return runoff.get(policy.objective)


def choose(candidates: list[dict], policy: PolicyConfig) -> dict | None:
    eligible = _eligible(candidates, policy)
    if not eligible:
        return None
    best = min(eligible, key=lambda c: (objective_value(c, policy), c["metrics"].get("size_bytes") or 0))
    raced = [c for c in eligible if runoff_value(c, policy) is not None]
    if len(raced) > 1 and any(c is best for c in raced):
        # The run-off's contenders were the best and those closest to it; its side-by-side
        # figures rank them where the separate measurements could not.
        return min(raced, key=lambda c: (runoff_value(c, policy), c["metrics"].get("size_bytes") or 0))
    return best


def objective_and_quality(candidates: list[dict], policy: PolicyConfig) -> list[tuple[float, float, dict]]:
    """(objective, quality, candidate) of each candidate that has both figures."""
    points = []
    for c in candidates:
        cost, quality = objective_value(c, policy), (c.get("metrics") or {}).get("quality")
        if cost is not None and quality is not None:
            points.append((cost, quality, c))
    return points


def pareto_front(candidates: list[dict], policy: PolicyConfig) -> list[dict]:
    """Candidates no other beats on both the objective (lower) and quality (higher),
    sorted by the objective: the trade-offs worth looking at, whatever the tolerance."""
    front: list[tuple[float, float, dict]] = []
    for cost, quality, candidate in sorted(objective_and_quality(candidates, policy), key=lambda p: (p[0], -p[1])):
        if not front or quality > front[-1][1] + EPSILON:
            front.append((cost, quality, candidate))
    return [c for _, _, c in front]


def budget_spent(policy: PolicyConfig, inspected_at, now) -> str | None:
    """Why a checkpoint's variant job may not start any more: its checkpoint was inspected
    more than ``budget_minutes`` before ``now`` (naive UTC datetimes, as the catalogue keeps
    them). None while within the budget, with no budget, or before any inspection."""
    from datetime import timedelta

    budget = policy.budget_minutes
    if budget <= 0 or inspected_at is None or now - inspected_at < timedelta(minutes=budget):
        return None
    return (f"not started within the checkpoint's budget (policy.budget_minutes = {budget:g}, counted from "
            f"its inspection at {inspected_at:%Y-%m-%d %H:%M:%S} UTC)")
