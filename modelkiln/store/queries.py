"""Reads of the catalogue: callers pass a session; nothing here writes (see ``units.py``)."""

from __future__ import annotations

from sqlalchemy import and_, func, select, text
from sqlalchemy.orm import Session, selectinload

from .models import Checkpoint, Host, Job, Measurement, Pin, Promotion, Variant
from .states import TERMINAL_JOB_STATES


def ping(session: Session) -> None:
    """Raises when the database does not answer."""
    session.execute(text("SELECT 1"))


# The daemon asks for rows by the ids it holds (a job's checkpoint, a variant's job): one
# that is missing is a broken catalogue, and get_one raises NoResultFound saying so.
def checkpoint(session: Session, checkpoint_id: int) -> Checkpoint:
    return session.get_one(Checkpoint, checkpoint_id)


def job(session: Session, job_id: int) -> Job:
    return session.get_one(Job, job_id)


def job_if_any(session: Session, job_id: int) -> Job | None:
    """A job by an id read from outside the catalogue (a staging folder's name)."""
    return session.get(Job, job_id)


def variant(session: Session, variant_id: int) -> Variant:
    return session.get_one(Variant, variant_id)


def variant_of(session: Session, job: Job) -> Variant:
    """The variant a variant job builds (an inspection or a run-off builds none)."""
    if job.variant_id is None:
        raise ValueError(f"job {job.id} ({job.kind}) builds no variant")
    return variant(session, job.variant_id)


def _count(session: Session, query) -> int:
    return session.execute(query).scalar_one()


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


def checkpoints_with_status(session: Session, status: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.status == status).order_by(Checkpoint.id)))


def _in_round(key: str, checkpoint: Checkpoint) -> str:
    """``key`` of the checkpoint's current retry round (round 0 keeps the plain key)."""
    return f"{key}:retry{checkpoint.retries}" if checkpoint.retries else key


def decision_key(session: Session, checkpoint: Checkpoint, target: str) -> str:
    """The key of the next promotion of one checkpoint on one target: ``auto:<checkpoint>:
    <target>:<n>``, n counting its promotions there (a checkpoint may be promoted several
    times as better variants are measured). Two daemons deciding the same step compute
    the same key, and the catalogue keeps only one."""
    prefix = f"auto:{checkpoint.id}:{target}:"
    made = _count(session, select(func.count()).select_from(Promotion).where(Promotion.decision_key.startswith(prefix)))
    return f"{prefix}{made + 1}"


def promotions_of(session: Session, checkpoint_id: int) -> list[Promotion]:
    return list(session.scalars(select(Promotion).where(Promotion.checkpoint_id == checkpoint_id)
                                .order_by(Promotion.id)))


# -- jobs -----------------------------------------------------------------------------


def job_by_key(session: Session, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.key == key))


def runoff_key(checkpoint: Checkpoint, target: str) -> str:
    """The run-off job of one checkpoint on one target (at most one per retry round)."""
    return _in_round(f"runoff:{checkpoint.id}:{target}", checkpoint)


def running_owners(session: Session) -> list[str]:
    return list(session.scalars(select(Job.lease_owner).where(Job.state == "running").distinct()))


def recent_checkpoints(session: Session, newest: int) -> list[Checkpoint]:
    """The ``newest`` checkpoints and every one not finished (ingested, ready), oldest first."""
    recent = select(Checkpoint.id).order_by(Checkpoint.id.desc()).limit(newest).scalar_subquery()
    return list(session.scalars(select(Checkpoint).where(
        (Checkpoint.id.in_(recent)) | Checkpoint.status.in_(("ingested", "ready"))).order_by(Checkpoint.id)))


def checkpoint_total(session: Session) -> int:
    return _count(session, select(func.count()).select_from(Checkpoint))


def served_pairs(session: Session) -> int:
    """How many (model, target) pairs have a promotion."""
    pairs = select(Promotion.model, Promotion.target).distinct().subquery()
    return _count(session, select(func.count()).select_from(pairs))


def job_counts(session: Session, kind: str | None = None) -> dict[str, int]:
    """Jobs by state; of one ``kind`` ("inspect", "variant") where given."""
    query = select(Job.state, func.count()).group_by(Job.state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return {state: count for state, count in session.execute(query).all()}


def running_jobs(session: Session) -> list[Job]:
    """Every running job, oldest lease first, with its checkpoint and variant."""
    return list(session.scalars(
        select(Job).where(Job.state == "running")
        .options(selectinload(Job.checkpoint), selectinload(Job.variant))
        .order_by(Job.started_at, Job.id)
    ))


def oldest_running_start(session: Session):
    """When the longest-running job started (None: none runs), by the state index."""
    return session.scalar(select(func.min(Job.started_at)).where(Job.state == "running"))


def running_of_variants(session: Session, variant_ids: list[int]) -> dict[int, Job]:
    """The running job of each of these variants that has one."""
    if not variant_ids:
        return {}
    jobs = session.scalars(select(Job).where(Job.state == "running", Job.variant_id.in_(variant_ids)))
    return {job.variant_id: job for job in jobs if job.variant_id is not None}


def cancelled_among(session: Session, job_ids: list[int]) -> list[int]:
    """Which of these (running here) jobs an operator has cancelled since."""
    if not job_ids:
        return []
    return list(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.state == "cancelled")))


def open_jobs_to_cancel(session: Session, model: str, version: str | None = None, recipe: str | None = None,
                        target: str | None = None) -> list[Job]:
    """Pending and running jobs of ``model`` (one version, one recipe, one target, or all)."""
    query = (select(Job).join(Checkpoint, Job.checkpoint_id == Checkpoint.id)
             .outerjoin(Variant, Job.variant_id == Variant.id)
             .where(Checkpoint.model == model, Job.state.in_(("pending", "running")))
             .options(selectinload(Job.checkpoint), selectinload(Job.variant)).order_by(Job.id))
    if version is not None:
        query = query.where(Checkpoint.version == version)
    if recipe is not None:  # variant jobs of that recipe only
        query = query.where(Variant.recipe == ("" if recipe == "baseline" else recipe))
    if target is not None:
        query = query.where(Job.target == target)
    return list(session.scalars(query))


def pending_variant_jobs(session: Session, checkpoint_id: int) -> list[Job]:
    return list(session.scalars(
        select(Job).where(Job.checkpoint_id == checkpoint_id, Job.kind == "variant", Job.state == "pending")
        .options(selectinload(Job.variant)).order_by(Job.id)))


def ready_since(session: Session, checkpoint_id: int):
    """When the checkpoint's inspection ended (its budget counts from then), or None."""
    return session.scalar(select(Job.finished_at).where(Job.key == f"inspect:{checkpoint_id}"))


def recipe_history(session: Session, model: str, target: str, runtime: str, recipe: str,
                   before_checkpoint: int) -> tuple[Variant, float] | None:
    """The newest ended variant of the same recipe on an earlier checkpoint of ``model``,
    with the seconds its job took: what planning expects of the recipe next time."""
    row = session.execute(
        select(Variant, Job.started_at, Job.finished_at)
        .join(Checkpoint, Variant.checkpoint_id == Checkpoint.id)
        .join(Job, Job.variant_id == Variant.id)
        .where(Checkpoint.model == model, Checkpoint.id < before_checkpoint, Variant.target == target,
               Variant.runtime == runtime, Variant.recipe == recipe,
               Job.state.in_(("succeeded", "failed", "skipped")),
               Job.started_at.is_not(None), Job.finished_at.is_not(None))
        .options(selectinload(Variant.measurements))
        .order_by(Checkpoint.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    variant, started, finished = row
    assert started is not None and finished is not None  # the query keeps only jobs with both
    return variant, max(0.0, (finished - started).total_seconds())


def best_objective(session: Session, checkpoint_id: int, target: str, batch_size: int) -> float | None:
    """The lowest p50 latency measured at ``batch_size`` among a checkpoint's baselines on
    ``target``: what a recipe's gain is counted against."""
    return session.scalar(
        select(func.min(Measurement.latency_p50_ms))
        .join(Variant, Measurement.variant_id == Variant.id)
        .where(Variant.checkpoint_id == checkpoint_id, Variant.target == target, Variant.recipe == "",
               Variant.status == "succeeded", Measurement.batch_size == batch_size)
    )


def jobs_of(session: Session, checkpoint_id: int) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.checkpoint_id == checkpoint_id).order_by(Job.id)))


def checkpoint_counts(session: Session) -> dict[str, int]:
    """Checkpoints by status."""
    return dict(session.execute(select(Checkpoint.status, func.count()).group_by(Checkpoint.status)).all())


def hosts_seen_since(session: Session, since) -> list:
    """The hosts that said they run on this catalogue since ``since`` (the database's clock)."""
    return list(session.scalars(select(Host).where(Host.seen_at >= since).order_by(Host.name)))


def open_job_counts(session: Session) -> list[tuple[str, str, int]]:
    """(kind, state, count) of the pending and running jobs (the state index finds them)."""
    return [(kind, state, count) for kind, state, count in session.execute(
        select(Job.kind, Job.state, func.count()).where(Job.state.in_(("pending", "running")))
        .group_by(Job.kind, Job.state)).all()]


def variant_jobs_open(session: Session, checkpoint_id: int, target: str) -> int:
    return _count(session, 
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
    return _count(session, 
        select(func.count()).select_from(Job).where(
            Job.checkpoint_id == checkpoint_id, Job.state.not_in(TERMINAL_JOB_STATES)
        )
    )


# -- variants -------------------------------------------------------------------------


def planned_by_checkpoint(session: Session, statuses: tuple[str, ...], targets: list[str]) -> dict[int, set]:
    """For every checkpoint of these statuses: the (target, runtime, recipe) of its
    variants on ``targets`` (an empty set where it has none), in one query."""
    found: dict[int, set] = {cid: set() for cid in session.scalars(
        select(Checkpoint.id).where(Checkpoint.status.in_(statuses)))}
    rows = session.execute(
        select(Variant.checkpoint_id, Variant.target, Variant.runtime, Variant.recipe)
        .join(Checkpoint, Checkpoint.id == Variant.checkpoint_id)
        .where(Checkpoint.status.in_(statuses), Variant.target.in_(targets)))
    for checkpoint_id, target, runtime, recipe in rows:
        found.setdefault(checkpoint_id, set()).add((target, runtime, recipe))
    return found


def planned_variants(session: Session, checkpoint_id: int) -> set[tuple[str, str, str]]:
    """(target, runtime, recipe) of every variant a checkpoint has."""
    return set(session.execute(select(Variant.target, Variant.runtime, Variant.recipe)
                               .where(Variant.checkpoint_id == checkpoint_id)).tuples())


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


def promotion_counts(session: Session) -> dict[tuple[str, str], int]:
    """Promotion steps recorded, by (model, target)."""
    rows = session.execute(select(Promotion.model, Promotion.target, func.count())
                           .group_by(Promotion.model, Promotion.target)).all()
    return {(model, target): count for model, target, count in rows}


def promotion_history(session: Session, model: str) -> list[Promotion]:
    return list(session.scalars(
        select(Promotion).where(Promotion.model == model).order_by(Promotion.id)
    ))


def pin(session: Session, model: str, target: str) -> Pin | None:
    return session.scalars(select(Pin).where(Pin.model == model, Pin.target == target)).first()


def pins(session: Session) -> list[Pin]:
    return list(session.scalars(select(Pin).order_by(Pin.model, Pin.target)))


def promotions_after(session: Session, promotion_id: int) -> list[Promotion]:
    """Promotions recorded after ``promotion_id`` (by any daemon, or by hand)."""
    return list(session.scalars(select(Promotion).where(Promotion.id > promotion_id).order_by(Promotion.id)))


def last_promotion_id(session: Session) -> int:
    return session.scalar(select(func.max(Promotion.id))) or 0


def promotion_history_of(session: Session, model: str, target: str) -> list[Promotion]:
    return list(session.scalars(select(Promotion).where(Promotion.model == model, Promotion.target == target)
                                .order_by(Promotion.id)))
