"""Log lines operators can filter: plain text by default, one JSON object per line on request.

Code that logs about a model passes ``extra=about(model=..., version=..., target=...,
job=...)``; both formats then name them on the line (text as ``key=value`` pairs after
the message), so ``grep model=digits`` or a log pipeline's field filter finds every line
about one model, version, target or job.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FIELDS = ("model", "version", "target", "job")


def about(model=None, version=None, target=None, job=None) -> dict:
    """The ``extra`` argument of a log call about a model, version, target or job."""
    values = {"model": model, "version": version, "target": target, "job": job}
    return {"kiln": {k: v for k, v in values.items() if v is not None}}


def _context(record: logging.LogRecord) -> dict:
    return getattr(record, "kiln", None) or {}


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if not context:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the first line
        pairs = " ".join(f"{k}={context[k]}" for k in FIELDS if k in context)
        return f"{head} [{pairs}]{sep}{tail}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str = "text", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # APScheduler logs every tick at INFO; the daemon logs what matters itself.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # Alembic says which plugins and dialect it set up at every start: only a migration
    # actually applied ("Running upgrade ...") is news.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.migration").setLevel(logging.INFO)
    logging.getLogger("alembic.runtime.migration").addFilter(_only_upgrades)


def _only_upgrades(record: logging.LogRecord) -> bool:
    return record.levelno > logging.INFO or record.getMessage().startswith("Running upgrade")


def about_job(session, job) -> dict:
    """``about`` for a log line about ``job``: its checkpoint's model and version, its
    target and its id."""
    from ..store import queries

    checkpoint = queries.checkpoint(session, job.checkpoint_id)
    return about(checkpoint.model, checkpoint.version, job.target, job.id)


def job_label(session, job) -> str:
    """A job as log lines name it: its kind, and the variant it builds."""
    from ..store import queries, views

    if job.variant_id is None:
        return job.kind
    return f"{job.kind} {views.variant_label(queries.variant(session, job.variant_id))}"
