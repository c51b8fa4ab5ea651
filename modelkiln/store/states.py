"""The states a checkpoint, a variant and a job go through, and the sets code asks about.

The columns hold the values as plain strings (``Checkpoint.status``, ``Variant.status``,
``Job.state``); the enums are ``str`` subclasses, so a member compares equal to what a
row holds and can be written to one.

    checkpoint  ingested -> ready -> done; or rejected / duplicate / failed / cancelled
    variant     pending -> succeeded / failed / skipped / cancelled
    job         pending -> running -> succeeded / failed / skipped / cancelled
"""

from __future__ import annotations

from enum import Enum


class CheckpointStatus(str, Enum):
    INGESTED = "ingested"
    READY = "ready"
    DONE = "done"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    CANCELLED = "cancelled"


class VariantStatus(str, Enum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class JobState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


# A job in one of these states has ended: nothing runs it again unless `kiln retry` sends
# it back. Plain strings, as SQL's IN compares them with the column.
TERMINAL_JOB_STATES: tuple[str, ...] = tuple(s.value for s in (JobState.SUCCEEDED, JobState.FAILED,
                                                                JobState.SKIPPED, JobState.CANCELLED))
OPEN_JOB_STATES: tuple[str, ...] = (JobState.PENDING.value, JobState.RUNNING.value)

# What a worker phase may report that ends its job there, before the job's later phases:
# a failure, a step that does not apply (skipped), a checkpoint that cannot be read
# safely (rejected). The job's state follows from it (see daemon/outcomes.py).
PHASE_ENDS_JOB: frozenset[str] = frozenset({"failed", "skipped", "rejected"})
