"""Queries over the catalogue. Callers pass a session and own the transaction."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from .models import Checkpoint, Job, Measurement, Promotion, Variant, utcnow

TERMINAL_JOB_STATES = ("succeeded", "failed", "skipped")


# -- checkpoints ----------------------------------------------------------------------


def latest_checkpoint(session: Session, model: str, version: str) -> Checkpoint | None:
    return session.scalars(
        select(Checkpoint)
        .where(Checkpoint.model == model, Checkpoint.version == version)
        .order_by(Checkpoint.id.desc())
        .limit(1)
    ).first()


def checkpoint_by_key(session: Session, model: str, version: str, content_hash: str) -> Checkpoint | None:
    return session.scalars(
        select(Checkpoint).where(
            Checkpoint.model == model, Checkpoint.version == version, Checkpoint.content_hash == content_hash
        )
    ).first()


def same_content(session: Session, model: str, content_hash: str) -> Checkpoint | None:
    """An earlier checkpoint of this model with identical content that was not rejected."""
    return session.scalars(
        select(Checkpoint)
        .where(
            Checkpoint.model == model,
            Checkpoint.content_hash == content_hash,
            Checkpoint.status.not_in(("rejected", "duplicate")),
        )
        .order_by(Checkpoint.id)
        .limit(1)
    ).first()


def checkpoints(session: Session, model: str | None = None) -> list[Checkpoint]:
    query = select(Checkpoint).order_by(Checkpoint.id)
    if model is not None:
        query = query.where(Checkpoint.model == model)
    return list(session.scalars(query))


def retry_checkpoints(session: Session, model: str, version: str | None = None) -> list[tuple[Checkpoint, int]]:
    """Send ``model``'s checkpoints (one version or all) back for a cause outside their
    content (a config fixed since, a disk freed, a host overloaded): rejected or failed
    ones are inspected again; one whose inspection succeeded has its failed variant jobs
    run again, and the targets they are on decide their promotion again once they end.
    Returns each checkpoint with the number of variant jobs sent back (0: re-inspected)."""
    query = select(Checkpoint).where(Checkpoint.model == model, Checkpoint.status.in_(("rejected", "failed")))
    if version is not None:
        query = query.where(Checkpoint.version == version)
    retried = []
    for checkpoint in session.scalars(query):
        job = session.scalars(select(Job).where(Job.key == f"inspect:{checkpoint.id}")).first()
        if job is None:  # rejected at ingest, before any job: give it its first
            job = add_job(session, "inspect", checkpoint.id, None, None)
        _reopen(job)
        checkpoint.status, checkpoint.reason = "ingested", None
        retried.append((checkpoint, 0))
    query = (select(Job, Variant).join(Variant, Job.variant_id == Variant.id)
             .join(Checkpoint, Job.checkpoint_id == Checkpoint.id)
             .where(Checkpoint.model == model, Checkpoint.status.in_(("ready", "done")),
                    Job.kind == "variant", Job.state == "failed"))
    if version is not None:
        query = query.where(Checkpoint.version == version)
    failed: dict[int, int] = {}
    for job, variant in session.execute(query):
        _reopen(job)
        variant.status, variant.reason, variant.finished_at = "pending", None, None
        failed[job.checkpoint_id] = failed.get(job.checkpoint_id, 0) + 1
    for checkpoint_id, count in failed.items():
        checkpoint = session.get(Checkpoint, checkpoint_id)
        checkpoint.status = "ready"
        checkpoint.retries += 1
        retried.append((checkpoint, count))
    session.commit()
    return retried


def _reopen(job: Job) -> None:
    job.state, job.attempts, job.reason = "pending", 0, None
    job.lease_owner = job.lease_expires_at = job.finished_at = None


def _in_round(key: str, checkpoint: Checkpoint) -> str:
    """``key`` of the checkpoint's current retry round (round 0 keeps the plain key)."""
    return f"{key}:retry{checkpoint.retries}" if checkpoint.retries else key


def decision_key(checkpoint: Checkpoint, target: str) -> str:
    """The promotion decision of one checkpoint on one target: one per retry round."""
    return _in_round(f"auto:{checkpoint.id}:{target}", checkpoint)


# -- jobs -----------------------------------------------------------------------------


def add_job(session: Session, kind: str, checkpoint_id: int, variant_id: int | None, target: str | None,
            key: str | None = None) -> Job:
    key = key or f"{kind}:{variant_id if variant_id is not None else checkpoint_id}"
    job = Job(key=key, kind=kind, checkpoint_id=checkpoint_id, variant_id=variant_id, target=target, state="pending")
    session.add(job)
    return job


def job_by_key(session: Session, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.key == key))


def runoff_key(checkpoint: Checkpoint, target: str) -> str:
    """The run-off job of one checkpoint on one target (at most one per retry round)."""
    return _in_round(f"runoff:{checkpoint.id}:{target}", checkpoint)


def lease_jobs(
    session: Session, owner: str, targets: list[str], limit: int, lease_seconds: float, now: datetime | None = None
) -> list[Job]:
    """Take up to ``limit`` pending jobs this host can run.

    Each job is claimed by a compare-and-set UPDATE, so two daemons on one database never
    run the same job; on PostgreSQL the candidate scan skips rows another host has locked.
    """
    now = now or utcnow()
    runnable = or_(Job.target.is_(None), Job.target.in_(targets)) if targets else Job.target.is_(None)
    query = select(Job.id).where(Job.state == "pending", runnable).order_by(Job.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    claimed = []
    for job_id in session.scalars(query).all():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "pending")
            .values(
                state="running", lease_owner=owner, attempts=Job.attempts + 1, started_at=now,
                heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds),
            )
        )
        if result.rowcount == 1:
            claimed.append(job_id)
    session.commit()
    if not claimed:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(claimed)).order_by(Job.id)))


def renew_leases(session: Session, owner: str, job_ids: list[int], lease_seconds: float) -> None:
    if not job_ids:
        return
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.lease_owner == owner, Job.state == "running")
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
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
                attempts=func.max(Job.attempts - 1, 0))
    )
    session.commit()


def requeue_jobs(session: Session, condition, max_attempts: int, reason: str) -> int:
    """Running jobs matching ``condition`` go back to pending, or fail after too many tries."""
    jobs = list(session.scalars(select(Job).where(Job.state == "running", condition)))
    for job in jobs:
        job.lease_owner = None
        job.lease_expires_at = None
        if job.attempts >= max_attempts:
            job.state = "failed"
            job.reason = f"{reason}; gave up after {job.attempts} attempts"
            job.finished_at = utcnow()
        else:
            job.state = "pending"
            job.reason = reason
    session.commit()
    return len(jobs)


def expired_condition(now: datetime | None = None):
    return Job.lease_expires_at < (now or utcnow())


def owned_by(owners: list[str]):
    return Job.lease_owner.in_(owners)


def running_owners(session: Session) -> list[str]:
    return list(session.scalars(select(Job.lease_owner).where(Job.state == "running").distinct()))


def finish_job(session: Session, job: Job, state: str, reason: str | None = None) -> None:
    job.state = state
    job.reason = reason
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None


def job_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: count for state, count in rows}


def variant_jobs_open(session: Session, checkpoint_id: int, target: str) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Job)
        .join(Variant, Job.variant_id == Variant.id)
        .where(
            Job.checkpoint_id == checkpoint_id,
            Variant.target == target,
            Job.state.not_in(TERMINAL_JOB_STATES),
        )
    )


def open_jobs_for(session: Session, checkpoint_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(Job).where(
            Job.checkpoint_id == checkpoint_id, Job.state.not_in(TERMINAL_JOB_STATES)
        )
    )


# -- variants -------------------------------------------------------------------------


def get_or_add_variant(session: Session, checkpoint_id: int, target: str, runtime: str, recipe: str) -> tuple[Variant, bool]:
    variant = session.scalars(
        select(Variant).where(
            Variant.checkpoint_id == checkpoint_id, Variant.target == target,
            Variant.runtime == runtime, Variant.recipe == recipe,
        )
    ).first()
    if variant is not None:
        return variant, False
    variant = Variant(checkpoint_id=checkpoint_id, target=target, runtime=runtime, recipe=recipe, status="pending")
    session.add(variant)
    session.flush()
    return variant, True


def replace_measurements(session: Session, variant: Variant, rows: list[dict]) -> None:
    for old in list(variant.measurements):
        session.delete(old)
    session.flush()
    for row in rows:
        session.add(Measurement(
            variant_id=variant.id, batch_size=row["batch_size"], latency_p50_ms=row["latency_p50_ms"],
            latency_p95_ms=row["latency_p95_ms"], throughput_per_s=row["throughput_per_s"],
            peak_memory_bytes=row["peak_memory_bytes"], runs=row["runs"],
        ))


def variants_of(session: Session, checkpoint_id: int, target: str | None = None) -> list[Variant]:
    query = (
        select(Variant)
        .where(Variant.checkpoint_id == checkpoint_id)
        .options(selectinload(Variant.measurements), selectinload(Variant.checkpoint))
        .order_by(Variant.id)
    )
    if target is not None:
        query = query.where(Variant.target == target)
    return list(session.scalars(query))


def variants_of_model(session: Session, model: str) -> list[Variant]:
    return list(session.scalars(
        select(Variant)
        .join(Checkpoint)
        .where(Checkpoint.model == model)
        .options(selectinload(Variant.measurements), selectinload(Variant.checkpoint))
        .order_by(Variant.id)
    ))


# -- promotions -----------------------------------------------------------------------


def promotion_by_key(session: Session, decision_key: str) -> Promotion | None:
    return session.scalars(select(Promotion).where(Promotion.decision_key == decision_key)).first()


def current_promotions(session: Session) -> list[Promotion]:
    """The newest promotion of every (model, target)."""
    newest = (
        select(Promotion.model, Promotion.target, func.max(Promotion.id).label("id"))
        .group_by(Promotion.model, Promotion.target)
        .subquery()
    )
    return list(session.scalars(
        select(Promotion)
        .join(newest, and_(Promotion.id == newest.c.id))
        .options(
            selectinload(Promotion.variant).selectinload(Variant.measurements),
            selectinload(Promotion.variant).selectinload(Variant.checkpoint),
        )
        .order_by(Promotion.model, Promotion.target)
    ))


def current_promotion(session: Session, model: str, target: str) -> Promotion | None:
    return session.scalars(
        select(Promotion)
        .where(Promotion.model == model, Promotion.target == target)
        .order_by(Promotion.id.desc())
        .limit(1)
    ).first()


def promotion_history(session: Session, model: str) -> list[Promotion]:
    return list(session.scalars(
        select(Promotion).where(Promotion.model == model).order_by(Promotion.id)
    ))
