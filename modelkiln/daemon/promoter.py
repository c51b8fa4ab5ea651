"""Promotion: record the policy's choice, then swap the served link atomically.

The database is the truth and the link follows it: the promotion row is committed
first, then ``promoted/<model>/<target>`` is replaced by a rename of a fresh symlink. A
crash between the two is repaired at the next start by ``sync_links``.

Promotion is anytime: each measured variant may be promoted at once (see ``consider``),
so the first promotion comes after the fastest good recipe, not the slowest, and the
history keeps every step. Deciding again is harmless: a choice already served is not
promoted twice, and the decision key ``auto:<checkpoint>:<target>:<n>`` (the n-th
promotion of that checkpoint there) lets two daemons record each step once.

The promoter owns the run-off. When the closest candidates are within
``policy.runoff_margin`` of the best, the decision waits for a run-off job: the promoter
queues it, tells the planner what it runs (the worker's side is
``modelkiln.pipeline.runoff``: the contenders loaded in one process, timed in turn) and
records its figures on each contender's variant, where the policy reads them. A run-off
that fails leaves the decision to the separate measurements.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from dataclasses import asdict

from .. import policy as builtin_policy
from ..plugins.api import version_order
from ..plugins.manager import first_result, notify
from ..store import queries, units, views
from ..store.models import Checkpoint, Job, Promotion
from ..store.states import TERMINAL_JOB_STATES
from .executor import Outcome, Phase
from .logs import about
from .planner import target_spec

log = logging.getLogger(__name__)


def swap_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically, by a relative path: hosts that mount the
    shared folder elsewhere follow the same link to the same variant."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)  # rename(2): readers see the old link or the new, never none


def link_target(link: Path) -> Path:
    """Where a promoted link points, as an absolute path (the link itself is relative)."""
    return Path(os.path.normpath(os.path.join(link.parent, os.readlink(link))))


def _newer(served: Checkpoint, checkpoint: Checkpoint) -> bool:
    """Whether ``served`` is a later version of the model than ``checkpoint`` (or the same
    version's later content): an older version taken late never replaces it."""
    if served.id == checkpoint.id:
        return False
    if served.version == checkpoint.version:
        return served.id > checkpoint.id
    return version_order(served.version) > version_order(checkpoint.version)


def candidates_for(session, config, checkpoint_id: int, target: str) -> list[dict]:
    """The succeeded variants of a checkpoint on a target, as the policy sees them."""
    target_config = config.targets.get(target)
    memory_mb = target_config.memory_mb if target_config is not None else 0
    candidates = []
    for variant in queries.variants_of(session, checkpoint_id, target):
        if variant.status != "succeeded":
            continue
        candidate = views.variant_dict(variant)
        candidate["within_tolerance"] = builtin_policy.within_tolerance(candidate, config.policy)
        candidate["fits_memory"] = builtin_policy.fits_memory(candidate, memory_mb)
        candidates.append(candidate)
    return candidates


class Promoter:
    def __init__(self, config, manager, promoted_root: Path):
        self.config = config
        self.manager = manager
        self.root = promoted_root

    def link(self, model: str, target: str) -> Path:
        return self.root / model / target

    def consider(self, session, checkpoint: Checkpoint, target: str, by: str | None = None) -> Promotion | None:
        """Promote for (checkpoint's model, target) what the policy now chooses.

        Anytime: while variant jobs are still open, the policy's choice among the variants
        measured so far is promoted at once if nothing is served, or if it beats the served
        variant on the objective: by any amount when that one is an older checkpoint's, by
        more than the run-off margin when it is this checkpoint's (a closer call waits for
        the end). Once every variant job has ended the decision is final: a run-off times
        the closest candidates side by side where the margin calls for one, and the choice
        is promoted unless it is the one served.

        ``by``: an operator's action that asked for the decision (`kiln unpin`), recorded
        in the reason and announced like a promotion made by hand."""
        current = queries.current_promotion(session, checkpoint.model, target)
        open_jobs = queries.variant_jobs_open(session, checkpoint.id, target)
        pinned = queries.pin(session, checkpoint.model, target)
        if pinned is not None:
            if not open_jobs:
                log.info("%s/%s: %s is pinned on %s (%s); nothing promoted automatically; `kiln unpin %s %s` hands "
                         "it back to the policy", checkpoint.model, checkpoint.version, checkpoint.model, target,
                         pinned.reason, checkpoint.model, target,
                         extra=about(checkpoint.model, checkpoint.version, target))
            return None
        if current is not None and _newer(current.variant.checkpoint, checkpoint):
            if not open_jobs:
                log.info("%s/%s: a later version (%s) is already promoted on %s; not promoting", checkpoint.model,
                         checkpoint.version, current.variant.checkpoint.version, target,
                         extra=about(checkpoint.model, checkpoint.version, target))
            return None
        target_config = self.config.targets.get(target)
        memory_mb = target_config.memory_mb if target_config is not None else 0
        candidates = candidates_for(session, self.config, checkpoint.id, target)
        if not open_jobs and self._runoff_pending(session, checkpoint, target, candidates, memory_mb):
            return None
        chosen, how, by_plugin = self._choose(candidates, memory_mb)
        if chosen is None:
            if not open_jobs and (current is None or current.checkpoint_id != checkpoint.id):
                log.warning("%s/%s: no variant on %s meets the policy; nothing promoted",
                            checkpoint.model, checkpoint.version, target,
                            extra=about(checkpoint.model, checkpoint.version, target))
            return None
        if current is not None and current.variant_id == chosen["id"]:
            if not open_jobs and "run-off" in how:
                log.info("%s/%s on %s: the run-off confirms %s", checkpoint.model, checkpoint.version, target,
                         chosen["variant"], extra=about(checkpoint.model, checkpoint.version, target))
            return None
        if open_jobs:
            # A policy plugin sees the candidates measured so far and owns the choice.
            why = ("its choice among the variants measured so far" if by_plugin
                   else self._early_reason(chosen, current, checkpoint, candidates))
            if why is None:
                return None
            how = f"{why}; {open_jobs} variant job(s) still to end ({how})"
        key = queries.decision_key(session, checkpoint, target)
        if by is not None:
            key, how = f"manual:{uuid.uuid4().hex}", f"{by}: {how}"
        promotion = units.record_promotion(session, model=checkpoint.model, target=target, variant_id=chosen["id"],
                                           checkpoint_id=checkpoint.id, decision_key=key, reason=how)
        if promotion is None:  # another daemon decided first
            return None
        self.publish(promotion)
        log.info("promoted %s/%s on %s: %s (%s)", checkpoint.model, checkpoint.version, target, chosen["variant"], how,
                 extra=about(checkpoint.model, checkpoint.version, target))
        notify(self.manager, "kiln_variant_promoted", promotion=self.describe(promotion))
        return promotion

    def _choose(self, candidates: list[dict], memory_mb: int) -> tuple[dict | None, str, bool]:
        """The policy's choice among ``candidates`` (a plugin's, else the built-in), why,
        and whether a plugin made it."""
        plugin, chosen = first_result(self.manager, "kiln_choose_variant", candidates=candidates,
                                      policy=self.config.policy)
        how = f"policy of plugin {plugin}"
        if chosen is not None and not any(chosen is c or chosen == c for c in candidates):
            log.error("plugin %s: kiln_choose_variant returned something that is not one of the "
                      "candidates; the built-in policy decides", plugin)
            chosen = None
        by_plugin = chosen is not None
        if chosen is None:
            chosen = builtin_policy.choose(candidates, self.config.policy)
            how = (f"{builtin_policy.objective_words(self.config.policy)} "
                   f"within {self.config.policy.max_quality_drop:.2%} of baseline quality"
                   + (f", weights resident within memory_mb {memory_mb}" if memory_mb > 0 else ""))
            raced = sum(1 for c in candidates if builtin_policy.runoff_value(c, self.config.policy) is not None)
            if chosen is not None and builtin_policy.runoff_value(chosen, self.config.policy) is not None:
                how += f", by a run-off of {raced} variants timed side by side"
        return chosen, how, by_plugin

    def _early_reason(self, chosen: dict, current: Promotion | None, checkpoint: Checkpoint,
                      candidates: list[dict]) -> str | None:
        """Why ``chosen`` is promoted before the checkpoint's last variant ends, or None
        when it waits for the final decision: it beats what is served on the objective
        (by more than the run-off margin against a variant of the same checkpoint: a
        closer call is the run-off's to make)."""
        policy = self.config.policy
        value = builtin_policy.objective_value(chosen, policy)
        if current is None:
            return "the first variant to pass the gate"
        served = next((c for c in candidates if c["id"] == current.variant_id), None)
        if served is None:  # served from an earlier checkpoint
            served = views.variant_dict(current.variant)
            margin = 0.0
        else:
            margin = policy.runoff_margin
        was = builtin_policy.objective_value(served, policy)
        if value is None or was is None or was <= value * (1 + margin):
            return None
        if policy.objective == builtin_policy.LOAD_OBJECTIVE:
            return f"{1000 / value:.1f} requests/s beats the served {served['variant']} ({1000 / was:.1f})"
        return f"{policy.objective} {value:.3f} beats the served {served['variant']} ({was:.3f})"

    def _runoff_pending(self, session, checkpoint: Checkpoint, target: str, candidates: list[dict],
                        memory_mb: int) -> bool:
        """Whether the decision waits for a run-off: one is still open, or the closest
        candidates call for one that has not run yet (it is queued here)."""
        key = queries.runoff_key(checkpoint, target)
        job = queries.job_by_key(session, key)
        if job is not None:
            return job.state not in TERMINAL_JOB_STATES
        contenders = builtin_policy.runoff_contenders(candidates, self.config.policy, memory_mb)
        if not contenders:
            return False
        units.queue_job(session, "runoff", checkpoint.id, target, key)
        log.info("%s/%s on %s: %d variants within %.0f%% of the best; timing them side by side before promoting",
                 checkpoint.model, checkpoint.version, target, len(contenders),
                 100 * self.config.policy.runoff_margin, extra=about(checkpoint.model, checkpoint.version, target))
        return True

    def runoff_phases(self, session, job: Job, spec: dict) -> list[Phase] | None:
        """The run-off of the candidates now closest to the best (None: no longer any)."""
        assert job.target is not None  # a run-off is held on one target
        contenders = builtin_policy.runoff_contenders(
            candidates_for(session, self.config, job.checkpoint_id, job.target), self.config.policy,
            self.config.targets[job.target].memory_mb)
        if not contenders:
            return None
        spec.update(
            target=target_spec(self.config, job.target),
            measure=asdict(self.config.measure),
            batch_size=self.config.policy.objective_batch_size,
            threads=self.config.targets[job.target].threads,
            contenders=[{k: c[k] for k in ("id", "variant", "runtime", "path", "file")} for c in contenders],
            # What the run-off times: one request at a time, or under load for the load objective.
            objective=self.config.policy.objective,
            p95_limit_ms=self.config.policy.p95_limit_ms,
        )
        return [Phase("runoff", spec)]

    @staticmethod
    def record_runoff(session, job: Job, outcome: Outcome | None) -> None:
        if outcome is None:
            units.end_job(session, job, "skipped", "no variants close enough to the best any more")
            return
        if outcome.status != "measured":
            # The separate measurements decide then; the log and the job say why.
            units.end_job(session, job, "failed", outcome.reason)
            return
        result = outcome.results[-1]
        rivals = sorted(int(i) for i in result["contenders"])
        units.record_runoff(session, job, {
            int(variant_id): {**figures, "batch_size": result["batch_size"], "rounds": result["rounds"],
                              "rivals": [i for i in rivals if i != int(variant_id)], "job": job.id}
            for variant_id, figures in result["contenders"].items()
        })

    def promote_by_hand(self, session, variant, reason: str) -> Promotion:
        """Serve ``variant`` on its target now, pinned there (`kiln promote`, `kiln
        rollback`): recorded in the history with ``reason``, then the link swapped."""
        checkpoint = variant.checkpoint
        promotion = units.record_manual_promotion(
            session, model=checkpoint.model, target=variant.target, variant_id=variant.id,
            checkpoint_id=checkpoint.id, reason=reason, pin_reason=reason)
        self.publish(promotion)
        log.info("promoted %s/%s on %s by hand: %s (%s)", checkpoint.model, checkpoint.version, variant.target,
                 views.variant_label(variant), reason, extra=about(checkpoint.model, checkpoint.version, variant.target))
        return promotion

    def describe(self, promotion: Promotion) -> dict:
        return views.promotion_dict(promotion, str(self.link(promotion.model, promotion.target)))

    def publish(self, promotion: Promotion) -> None:
        swap_link(self.link(promotion.model, promotion.target), _folder(promotion))

    def sync_links(self, session) -> int:
        """Make every promoted link point where the newest promotion says; returns fixes."""
        fixed = 0
        for promotion in queries.current_promotions(session):
            link = self.link(promotion.model, promotion.target)
            want = _folder(promotion)
            if not link.is_symlink() or link_target(link) != Path(os.path.normpath(want)):
                self.publish(promotion)
                fixed += 1
        return fixed


def _folder(promotion: Promotion) -> Path:
    """The promoted variant's folder: only a built variant, which has one, is promoted."""
    assert promotion.variant.artifact_path is not None
    return Path(promotion.variant.artifact_path)
