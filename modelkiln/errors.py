"""Errors a user can meet. Each says what happened, to which file, and what to do."""


class KilnError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ConfigError(KilnError):
    """The configuration file is missing, malformed, or has an unknown key or a wrong type."""


class StoreError(KilnError):
    """The database cannot be used as it is (wrong schema revision, unreachable)."""


class CheckpointRejected(KilnError):
    """A checkpoint cannot be read safely; it is recorded as rejected and never retried
    until its content changes."""


class StepNotApplicable(KilnError):
    """A step does not apply to this model or target: the job is recorded as skipped."""


class NotIngestedYet(KilnError):
    """A version folder cannot be ingested now (too big to copy, say): logged once, looked
    at again at each rescan, ingested once the cause is gone."""
