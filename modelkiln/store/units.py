"""Units of work: every write to the catalogue. Each public function is one transaction
and commits it (or rolls it back when another daemon on the same database got there
first), so a reader of this file sees every way the catalogue changes."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import CursorResult, case, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import Checkpoint, Host, Job, Measurement, Pin, Promotion, Variant, utcnow
from .queries import open_jobs_for

# -- checkpoints ----------------------------------------------------------------------


def record_checkpoint(session: Session, **fields) -> int | None:
    """A new checkpoint (``Checkpoint`` columns as keywords), with its inspect job when
    its status is "ingested". None when another daemon recorded it first."""
    checkpoint = Checkpoint(**fields)
    session.add(checkpoint)
    try:
        session.flush()
        if checkpoint.status == "ingested":
            _add_job(session, "inspect", checkpoint.id, None, None)
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return checkpoint.id


def remember_fingerprint(session: Session, checkpoint: Checkpoint, fingerprint: str) -> None:
    """Touched but not changed: keep the new stat signature so it is not hashed again."""
    checkpoint.fingerprint = fingerprint
    session.commit()


def record_inspection(session: Session, job: Job, checkpoint: Checkpoint, status: str, *, format: str | None = None,
                      info: dict | None = None, reason: str | None = None, plan=()) -> None:
    """An inspect job's result: "ready" (with its format, its info and its ``plan``, a
    ``Planned`` per variant to build: target, runtime, recipe, estimate and priority),
    "rejected" or "failed"."""
    checkpoint.status = status
    if status == "ready":
        checkpoint.format = format
        checkpoint.info = info
        _add_variants(session, checkpoint.id, plan)
    else:
        checkpoint.reason = reason
    _finish(job, "failed" if status == "failed" else "succeeded", reason if status == "failed" else None)
    session.commit()


def add_variants(session: Session, checkpoint_id: int, plan) -> int:
    """A variant and its job for each planned (target, runtime, recipe) not planned yet.
    Another host planning the same at the same moment wins: 0 is returned then."""
    try:
        added = _add_variants(session, checkpoint_id, plan)
        session.commit()
    except IntegrityError:
        session.rollback()
        return 0
    return added


def reopen(session: Session, checkpoint: Checkpoint) -> None:
    """A done checkpoint given new variant jobs (a target or recipe added, on this host or
    another sharing the catalogue) is ready again: its promotions are decided as they end."""
    if checkpoint.status == "done":
        checkpoint.status = "ready"
        session.commit()


def close_if_done(session: Session, checkpoint: Checkpoint) -> bool:
    """A ready checkpoint with no open job is done; returns whether it is."""
    if checkpoint.status == "ready" and not open_jobs_for(session, checkpoint.id):
        checkpoint.status = "done"
        session.commit()
    return checkpoint.status == "done"


def retry_checkpoints(session: Session, model: str, version: str | None = None) -> list[tuple[Checkpoint, int]]:
    """Send ``model``'s checkpoints (one version or all) back for a cause outside their
    content (a config fixed since, a disk freed, a host overloaded) or after a `kiln
    cancel`: rejected, failed or cancelled ones are inspected again; one whose inspection
    succeeded has its failed and cancelled variant jobs run again, and the targets they are on decide their promotion again once they end.
    Returns each checkpoint with the number of variant jobs sent back (0: re-inspected)."""
    query = select(Checkpoint).where(Checkpoint.model == model,
                                     Checkpoint.status.in_(("rejected", "failed", "cancelled")))
    if version is not None:
        query = query.where(Checkpoint.version == version)
    retried = []
    for checkpoint in session.scalars(query):
        job = session.scalars(select(Job).where(Job.key == f"inspect:{checkpoint.id}")).first()
        if job is None:  # rejected at ingest, before any job: give it its first
            job = _add_job(session, "inspect", checkpoint.id, None, None)
        _reopen(job)
        checkpoint.status, checkpoint.reason = "ingested", None
        retried.append((checkpoint, 0))
    failed_jobs = (select(Job, Variant).join(Variant, Job.variant_id == Variant.id)
             .join(Checkpoint, Job.checkpoint_id == Checkpoint.id)
             .where(Checkpoint.model == model, Checkpoint.status.in_(("ready", "done")),
                    Job.kind == "variant", Job.state.in_(("failed", "cancelled"))))
    if version is not None:
        failed_jobs = failed_jobs.where(Checkpoint.version == version)
    failed: dict[int, int] = {}
    for job, variant in session.execute(failed_jobs):
        _reopen(job)
        variant.status, variant.reason, variant.finished_at = "pending", None, None
        failed[job.checkpoint_id] = failed.get(job.checkpoint_id, 0) + 1
    for checkpoint_id, count in failed.items():
        checkpoint = session.get_one(Checkpoint, checkpoint_id)
        checkpoint.status = "ready"
        checkpoint.retries += 1
        retried.append((checkpoint, count))
    session.commit()
    return retried


# -- jobs -----------------------------------------------------------------------------


def queue_job(session: Session, kind: str, checkpoint_id: int, target: str | None, key: str) -> None:
    """A job under a key of its own (e.g. a run-off); nothing when one has that key."""
    _add_job(session, kind, checkpoint_id, None, target, key=key)
    try:
        session.commit()
    except IntegrityError:  # another daemon queued it first
        session.rollback()


def database_now(session: Session) -> datetime:
    """The time leases are stamped and judged by: the database server's clock where hosts
    share one (PostgreSQL), so a host whose clock runs ahead cannot expire its peers'
    leases early; the host's own for a SQLite file, which one host holds."""
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar_one()
    return utcnow()


def lease_jobs(
    session: Session, owner: str, targets: list[str], limit: int, lease_seconds: float, now: datetime | None = None
) -> list[Job]:
    """Take up to ``limit`` pending jobs this host can run.

    Each job is claimed by a compare-and-set UPDATE, so two daemons on one database never
    run the same job; on PostgreSQL the candidate scan skips rows another host has locked.
    """
    now = now or database_now(session)
    runnable = or_(Job.target.is_(None), Job.target.in_(targets)) if targets else Job.target.is_(None)
    # Cheapest expected work first (inspections and run-offs have priority 0), then oldest.
    query = select(Job.id).where(Job.state == "pending", runnable).order_by(Job.priority, Job.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    claimed = []
    for job_id in session.scalars(query).all():
        result = cast(CursorResult, session.execute(  # an UPDATE's result: it has rowcount
            update(Job)
            .where(Job.id == job_id, Job.state == "pending")
            .values(
                state="running", lease_owner=owner, attempts=Job.attempts + 1, started_at=now,
                heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds),
            )
        ))
        if result.rowcount == 1:
            claimed.append(job_id)
    session.commit()
    if not claimed:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(claimed)).order_by(Job.priority, Job.id)))


def renew_leases(session: Session, owner: str, job_ids: list[int], lease_seconds: float,
                 progress: dict[int, dict] | None = None) -> None:
    """Extend the leases of these running jobs, with what each reports doing (``progress``)."""
    if not job_ids:
        return
    now = database_now(session)
    progress = progress or {}
    still = [job_id for job_id in job_ids if job_id not in progress]
    if still:
        session.execute(
            update(Job)
            .where(Job.id.in_(still), Job.lease_owner == owner, Job.state == "running")
            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
        )
    for job_id, report in progress.items():
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds), progress=report)
        )
    session.commit()


def release_jobs(session: Session, owner: str, job_ids: list[int], reason: str) -> None:
    """Return jobs this daemon holds to pending (graceful stop); the attempt is not counted."""
    if not job_ids:
        return
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.lease_owner == owner, Job.state == "running")
        .values(state="pending", lease_owner=None, lease_expires_at=None, reason=reason,
                # Not counted: the attempt was this daemon's stop, not the job's fault.
                attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0))
    )
    session.commit()


def requeue_expired(session: Session, max_attempts: int, reason: str, now: datetime | None = None) -> int:
    """Running jobs whose lease ran out go back to pending, or fail after too many tries."""
    return _requeue(session, Job.lease_expires_at < (now or database_now(session)), max_attempts, reason)


def requeue_owned(session: Session, owners: list[str], max_attempts: int, reason: str) -> int:
    """Running jobs of these (dead) lease owners go back to pending, or fail."""
    return _requeue(session, Job.lease_owner.in_(owners), max_attempts, reason)


def end_job(session: Session, job: Job, state: str, reason: str | None = None) -> None:
    """A job ends as ``state`` with ``reason`` and gives its lease back. A variant it was
    building and that is still pending ends with it, as ``state`` too: it has no artifact
    (a measured variant is recorded by ``record_variant``; one cancelled already keeps
    its record)."""
    _finish(job, state, reason)
    if job.variant is not None and job.variant.status == "pending":
        job.variant.status, job.variant.reason, job.variant.finished_at = state, reason, utcnow()
    session.commit()


def cancel_jobs(session: Session, jobs: list[Job], reason: str) -> list[Job]:
    """End pending and running jobs as "cancelled" (never retried by themselves; `kiln
    retry` sends them back). A running job keeps its lease owner, whose daemon sees the
    state, stops the worker and lets the checkpoint move on. A cancelled inspection
    cancels its checkpoint. Returns the jobs it ended."""
    ended = []
    for job in jobs:
        if job.state not in ("pending", "running"):
            continue
        job.state, job.reason, job.finished_at = "cancelled", reason, utcnow()
        job.lease_expires_at = None  # the owner (if running) stays: its daemon sees the state and stops it
        if job.variant is not None:
            job.variant.status, job.variant.reason, job.variant.finished_at = "cancelled", reason, utcnow()
        if job.kind == "inspect":
            job.checkpoint.status, job.checkpoint.reason = "cancelled", reason
        ended.append(job)
    session.commit()
    return ended


def skip_jobs(session: Session, jobs: list[Job], reason: str) -> None:
    """End pending variant jobs as "skipped" with ``reason`` (e.g. past the checkpoint's budget)."""
    for job in jobs:
        if job.state != "pending":
            continue
        _finish(job, "skipped", reason)
        if job.variant is not None:
            job.variant.status, job.variant.reason, job.variant.finished_at = "skipped", reason, utcnow()
    session.commit()


# -- variants -------------------------------------------------------------------------


def record_variant(session: Session, job: Job, variant: Variant, artifact_path: str, document: dict) -> None:
    """A built and measured variant, from its ``variant.json`` ``document``."""
    metrics = document["metrics"]
    variant.status = "succeeded"
    # Measured, but shown with why it cannot be promoted where the gate says so, and why
    # its timing ended early where it did.
    variant.reason = "; ".join(filter(None, (metrics.get("gate"), metrics.get("ended_early")))) or None
    variant.artifact_path = artifact_path
    variant.artifact_file = document["file"]
    variant.size_bytes = metrics["size_bytes"]
    variant.quality_metric = metrics["quality_metric"]
    variant.quality = metrics["quality"]
    variant.baseline_quality = metrics["baseline_quality"]
    variant.quality_delta = metrics["quality_delta"]
    variant.lineage = document["lineage"]
    variant.timings = document["timings"]
    variant.decode = metrics.get("decode")
    variant.checks = metrics.get("checks")
    variant.load = metrics.get("load")
    variant.finished_at = utcnow()
    for old in list(variant.measurements):
        session.delete(old)
    session.flush()
    for row in metrics["batches"]:
        session.add(Measurement(
            variant_id=variant.id, batch_size=row["batch_size"], latency_p50_ms=row["latency_p50_ms"],
            latency_p95_ms=row["latency_p95_ms"], throughput_per_s=row["throughput_per_s"],
            peak_memory_bytes=row["peak_memory_bytes"], runs=row["runs"],
        ))
    _finish(job, "succeeded")
    session.commit()


def record_runoff(session: Session, job: Job, figures: dict[int, dict]) -> None:
    """A run-off's figures, kept on each contender's variant (``Variant.runoff``)."""
    for variant_id, values in figures.items():
        session.get_one(Variant, variant_id).runoff = values
    _finish(job, "succeeded")
    session.commit()


# -- promotions -----------------------------------------------------------------------


def record_promotion(session: Session, *, model: str, target: str, variant_id: int, checkpoint_id: int,
                     decision_key: str, reason: str) -> Promotion | None:
    """The promotion of one decision; None when another daemon decided first."""
    promotion = Promotion(model=model, target=target, variant_id=variant_id, checkpoint_id=checkpoint_id,
                          decision_key=decision_key, reason=reason)
    session.add(promotion)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return promotion


def record_manual_promotion(session: Session, *, model: str, target: str, variant_id: int, checkpoint_id: int,
                            reason: str, pin_reason: str) -> Promotion:
    """A promotion made by hand, and the pin that keeps it served."""
    promotion = Promotion(model=model, target=target, variant_id=variant_id, checkpoint_id=checkpoint_id,
                          decision_key=f"manual:{uuid.uuid4().hex}", reason=reason)
    session.add(promotion)
    _pin(session, model, target, pin_reason)
    session.commit()
    return promotion


def pin(session: Session, model: str, target: str, reason: str) -> None:
    """Keep (model, target) on what it serves: automatic promotions stop there."""
    _pin(session, model, target, reason)
    session.commit()


def unpin(session: Session, model: str, target: str) -> bool:
    """Hand (model, target) back to the policy; False when it was not pinned."""
    pinned = session.scalars(select(Pin).where(Pin.model == model, Pin.target == target)).first()
    if pinned is None:
        return False
    session.delete(pinned)
    session.commit()
    return True


# -- helpers, inside a caller's transaction ---------------------------------------------


def _pin(session: Session, model: str, target: str, reason: str) -> None:
    pinned = session.scalars(select(Pin).where(Pin.model == model, Pin.target == target)).first()
    if pinned is None:
        session.add(Pin(model=model, target=target, reason=reason))
    else:
        pinned.reason, pinned.pinned_at = reason, utcnow()


def _add_job(session: Session, kind: str, checkpoint_id: int, variant_id: int | None, target: str | None,
             key: str | None = None) -> Job:
    key = key or f"{kind}:{variant_id if variant_id is not None else checkpoint_id}"
    job = Job(key=key, kind=kind, checkpoint_id=checkpoint_id, variant_id=variant_id, target=target, state="pending")
    session.add(job)
    return job


def _add_variants(session: Session, checkpoint_id: int, plan) -> int:
    existing = set(session.execute(
        select(Variant.target, Variant.runtime, Variant.recipe).where(Variant.checkpoint_id == checkpoint_id)
    ).tuples())
    added = 0
    for planned in plan:
        key = (planned.target, planned.runtime, planned.recipe)
        if key in existing:
            continue
        existing.add(key)
        variant = Variant(checkpoint_id=checkpoint_id, target=planned.target, runtime=planned.runtime,
                          recipe=planned.recipe, status="pending")
        session.add(variant)
        session.flush()
        job = _add_job(session, "variant", checkpoint_id, variant.id, planned.target)
        job.priority, job.estimate_seconds = planned.priority, planned.estimate_seconds
        if planned.skip_reason:  # settled by planning: no worker runs it
            variant.status, variant.reason, variant.finished_at = "skipped", planned.skip_reason, utcnow()
            _finish(job, "skipped", planned.skip_reason)
        added += 1
    return added


def _finish(job: Job, state: str, reason: str | None = None) -> None:
    job.state = state
    job.reason = reason
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None


def _reopen(job: Job) -> None:
    job.state, job.attempts, job.reason = "pending", 0, None
    job.lease_owner = job.lease_expires_at = job.finished_at = None


def _requeue(session: Session, condition, max_attempts: int, reason: str) -> int:
    jobs = list(session.scalars(select(Job).where(Job.state == "running", condition)))
    for job in jobs:
        job.lease_owner = None
        job.lease_expires_at = None
        if job.attempts >= max_attempts:
            job.state = "failed"
            job.reason = f"{reason}; gave up after {job.attempts} attempts"
            job.finished_at = utcnow()
            # What the job was for fails with it, so that `kiln retry` can send it back.
            if job.kind == "inspect" and job.checkpoint.status == "ingested":
                job.checkpoint.status, job.checkpoint.reason = "failed", job.reason
            if job.variant is not None and job.variant.status == "pending":
                job.variant.status, job.variant.reason, job.variant.finished_at = "failed", job.reason, utcnow()
        else:
            job.state = "pending"
            job.reason = reason
    session.commit()
    return len(jobs)


def record_host(session: Session, name: str, targets: dict) -> None:
    """Say (again) that host ``name`` runs on this catalogue with ``targets``."""
    now = database_now(session)
    host = session.scalars(select(Host).where(Host.name == name)).first()
    if host is None:
        session.add(Host(name=name, targets=targets, seen_at=now))
    else:
        host.targets, host.seen_at = targets, now
    try:
        session.commit()
    except IntegrityError:  # the same host's other daemon recorded it at this moment
        session.rollback()
