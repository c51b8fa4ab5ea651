"""Reads of the catalogue: callers pass a session; nothing here writes (see ``units.py``)."""

from __future__ import annotations

from sqlalchemy import and_, func, select, text
from sqlalchemy.orm import Session, selectinload

from .models import Checkpoint, Job, Promotion, Variant

TERMINAL_JOB_STATES = ("succeeded", "failed", "skipped")


def ping(session: Session) -> None:
    """Raises when the database does not answer."""
    session.execute(text("SELECT 1"))


def checkpoint(session: Session, checkpoint_id: int) -> Checkpoint | None:
    return session.get(Checkpoint, checkpoint_id)


def job(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def variant(session: Session, variant_id: int) -> Variant | None:
    return session.get(Variant, variant_id)


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


def _in_round(key: str, checkpoint: Checkpoint) -> str:
    """``key`` of the checkpoint's current retry round (round 0 keeps the plain key)."""
    return f"{key}:retry{checkpoint.retries}" if checkpoint.retries else key


def decision_key(checkpoint: Checkpoint, target: str) -> str:
    """The promotion decision of one checkpoint on one target: one per retry round."""
    return _in_round(f"auto:{checkpoint.id}:{target}", checkpoint)


# -- jobs -----------------------------------------------------------------------------


def job_by_key(session: Session, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.key == key))


def runoff_key(checkpoint: Checkpoint, target: str) -> str:
    """The run-off job of one checkpoint on one target (at most one per retry round)."""
    return _in_round(f"runoff:{checkpoint.id}:{target}", checkpoint)


def running_owners(session: Session) -> list[str]:
    return list(session.scalars(select(Job.lease_owner).where(Job.state == "running").distinct()))


def job_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: count for state, count in rows}


def jobs_of(session: Session, checkpoint_id: int) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.checkpoint_id == checkpoint_id).order_by(Job.id)))


def checkpoint_counts(session: Session) -> dict[str, int]:
    """Checkpoints by status."""
    return dict(session.execute(select(Checkpoint.status, func.count()).group_by(Checkpoint.status)).all())


def job_counts_by_kind(session: Session) -> list[tuple[str, str, int]]:
    """(kind, state, count) of every job kind and state there is."""
    return [tuple(row) for row in session.execute(
        select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()]


def job_durations(session: Session) -> list[tuple[str, str, float]]:
    """(kind, state, seconds from lease to result) of every ended job."""
    rows = session.execute(
        select(Job.kind, Job.state, Job.started_at, Job.finished_at)
        .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
    ).all()
    return [(kind, state, max(0.0, (finished - started).total_seconds())) for kind, state, started, finished in rows]


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


def promotion_counts(session: Session) -> dict[str, int]:
    """Promotions recorded, by target."""
    return dict(session.execute(select(Promotion.target, func.count()).group_by(Promotion.target)).all())


def promotion_history(session: Session, model: str) -> list[Promotion]:
    return list(session.scalars(
        select(Promotion).where(Promotion.model == model).order_by(Promotion.id)
    ))
