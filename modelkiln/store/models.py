"""SQLAlchemy models: the catalogue of checkpoints, jobs, variants, measurements, promotions.

Keys carry the idempotency promises of the design: a checkpoint is unique per
(model, version, content hash), a variant per (checkpoint, target, runtime, recipe),
a job by its ``key``, and an automatic promotion by its ``decision_key``. Inserting the
same thing twice therefore fails loudly instead of doing the work twice.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# 64-bit byte counts: PostgreSQL's BIGINT; SQLite's INTEGER is 64-bit already (0008).
Bytes = BigInteger().with_variant(Integer(), "sqlite")


class StoredPath(TypeDecorator):
    """A path under the artifacts folder, stored relative to it: hosts sharing a catalogue
    may mount the shared folder at different places. Written relative when it lies under
    the root the store was opened with (``engine.dialect.kiln_artifacts_root``, set by
    ``db.open_store``), read back joined to that host's root; a path outside the root, or
    a store opened without one, passes unchanged (rows written before this was stored
    relative stay absolute and still resolve on the host that wrote them)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        root = getattr(dialect, "kiln_artifacts_root", None)
        if value is None or root is None or not os.path.isabs(value):
            return value
        relative = os.path.relpath(value, root)
        return value if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative

    def process_result_value(self, value, dialect):
        root = getattr(dialect, "kiln_artifacts_root", None)
        if value is None or root is None or os.path.isabs(value):
            return value
        return os.path.join(root, value)


class Base(DeclarativeBase):
    pass


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("model", "version", "content_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(128))
    # "registry" is reserved on declarative classes, hence the attribute name.
    registry_kind: Mapped[str] = mapped_column("registry", String(32))
    source_uri: Mapped[str] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(String(32))
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Bytes)
    # Cheap stat signature of the source folder: a rescan compares it before hashing.
    fingerprint: Mapped[str] = mapped_column(String(64))
    # ingested -> ready -> done, or rejected / duplicate / failed / cancelled (states.py)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    snapshot_path: Mapped[str] = mapped_column(StoredPath)
    info: Mapped[dict | None] = mapped_column(JSON)
    # How many times `kiln retry` sent failed variant jobs back: each round may decide
    # the promotion on a target again (its decision and run-off keys carry the round).
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    variants: Mapped[list[Variant]] = relationship(back_populates="checkpoint")


class Variant(Base):
    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("checkpoint_id", "target", "runtime", "recipe"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    target: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(32))
    # Canonical recipe text; "" is the baseline.
    recipe: Mapped[str] = mapped_column(Text)
    # pending -> succeeded / failed / skipped / cancelled
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    artifact_path: Mapped[str | None] = mapped_column(StoredPath)
    artifact_file: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(Bytes)
    quality_metric: Mapped[str | None] = mapped_column(String(32))
    quality: Mapped[float | None] = mapped_column(Float)
    baseline_quality: Mapped[float | None] = mapped_column(Float)
    quality_delta: Mapped[float | None] = mapped_column(Float)
    # Steps with their parameters and what each recorded (lineage).
    lineage: Mapped[list | None] = mapped_column(JSON)
    # What the job cost (variant.json's timings): seconds spent loading/converting, inside
    # plugin steps, and measuring; and under "build" and "measure" that phase's
    # peak_host_bytes (its process's peak resident memory) and new_disk_bytes (the most
    # it had newly written under the artifacts root, shared weight files not counted).
    timings: Mapped[dict | None] = mapped_column(JSON)
    # A causal language model's prefill and per-token decode latency (batch 1, static
    # KV cache), or None: see targets/decoding.py.
    decode: Mapped[dict | None] = mapped_column(JSON)
    # Its latency timed in one process, interleaved with the variants that were within
    # policy.runoff_margin of the best (see pipeline/runoff.py), or None.
    runoff: Mapped[dict | None] = mapped_column(JSON)
    # What the measurement checked beside the quality (variant.json's metrics.checks):
    # the worst sample, padded against alone, a runtime's own checks at load.
    checks: Mapped[dict | None] = mapped_column(JSON)
    # Throughput and p50/p95 per level of concurrent clients, where the target asks.
    load: Mapped[list | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    checkpoint: Mapped[Checkpoint] = relationship(back_populates="variants")
    measurements: Mapped[list[Measurement]] = relationship(
        back_populates="variant", order_by="Measurement.batch_size"
    )


class Measurement(Base):
    __tablename__ = "measurements"
    __table_args__ = (UniqueConstraint("variant_id", "batch_size"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"), index=True)
    batch_size: Mapped[int] = mapped_column(Integer)
    latency_p50_ms: Mapped[float] = mapped_column(Float)
    latency_p95_ms: Mapped[float] = mapped_column(Float)
    throughput_per_s: Mapped[float] = mapped_column(Float)
    peak_memory_bytes: Mapped[int] = mapped_column(Bytes)
    runs: Mapped[int] = mapped_column(Integer)

    variant: Mapped[Variant] = relationship(back_populates="measurements")


class Job(Base):
    __tablename__ = "jobs"
    # Leasing scans pending jobs by target on every tick.
    __table_args__ = (Index("ix_jobs_state_target", "state", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # "inspect:<checkpoint id>" or "variant:<variant id>": inserting twice is refused.
    key: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id"))
    # The target whose hardware must be present to run it; None runs anywhere.
    target: Mapped[str | None] = mapped_column(String(64))
    # pending -> running -> succeeded / failed / skipped / cancelled
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Leased lowest first: the expected seconds it takes over what it is expected to
    # gain, so exports and post-training quantization run before anything that trains
    # (see daemon/estimates.py). Inspections and run-offs are 0.
    priority: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # What the job is expected to take, seconds (from the catalogue's earlier times for
    # the same recipe, else from the model's size and the steps' costs).
    estimate_seconds: Mapped[float | None] = mapped_column(Float)
    # What a running job reports doing: phase, step, "k of n", loss; refreshed with its lease.
    progress: Mapped[dict | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    checkpoint: Mapped[Checkpoint] = relationship()
    variant: Mapped[Variant | None] = relationship()


class Promotion(Base):
    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(String(64))
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id"))
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    # "auto:<checkpoint>:<target>:<n>" for the policy's n-th promotion of a checkpoint
    # there (each step once, whichever daemon decides it); "manual:<id>" for one made by
    # hand (`kiln promote`, `kiln rollback`).
    decision_key: Mapped[str] = mapped_column(String(128), unique=True)
    reason: Mapped[str] = mapped_column(Text)
    promoted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)

    variant: Mapped[Variant] = relationship()


class Pin(Base):
    """A (model, target) whose served variant only a person changes: automatic promotions
    stop there until it is unpinned."""

    __tablename__ = "pins"
    __table_args__ = (UniqueConstraint("model", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(String(64))
    # Who pinned it and why, as the history shows it.
    reason: Mapped[str] = mapped_column(Text)
    pinned_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Host(Base):
    """A host running a daemon on this catalogue, the target table it runs with, and when
    it last said so: hosts sharing a catalogue must define a shared target alike."""

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    targets: Mapped[dict] = mapped_column(JSON)
    seen_at: Mapped[datetime] = mapped_column(DateTime)
