"""The built-in ``webhook`` plugin: a JSON event per promotion and per failed job, POSTed
to the configured URLs, for the automation that reacts to what modelkiln does.

Configured in ``[plugins.settings.webhook]``::

    urls = ["https://ci.example.com/hooks/kiln"]
    events = ["promoted", "job_failed"]   # the default: both
    secret = ""            # when set: X-Kiln-Signature: t=<unix time>,v1=<HMAC-SHA256 of "<t>.<body>">
    timeout_seconds = 5.0
    retries = 5            # after the first try, with exponential back-off
    backoff_seconds = 1.0

Events are queued by the hooks and delivered by one background thread, so a slow or
unreachable receiver never holds up the service loop. A delivery is retried on a
connection error, a timeout, 429 or 5xx; another 4xx is the receiver refusing it and is
logged, not retried. A redirect is never followed (it would send the event and its
signature to another address, and urllib would turn the POST into a GET without its
body): it is logged as a misconfigured URL, and the event stays in the outbox until a
start finds the URL fixed.

The signature (Stripe's scheme) covers a timestamp and the body, so a receiver can
refuse replays: it computes HMAC-SHA256 over ``"<t>.<raw body>"`` with the shared
secret, compares it with ``v1`` in constant time, and rejects ``t`` older than a few
minutes. Without a secret nothing is signed, and the daemon says so at start. Every event carries an ``id`` (also in ``X-Kiln-Delivery``) that
stays the same across retries and restarts, so a receiver can drop duplicates.

Each event is written to an outbox folder (``<artifacts>/.webhook-outbox/``, one JSON
file per event) before it is queued, and removed once every URL has had it or given its
final answer. So an event that a stop did not flush, or that a killed daemon (SIGKILL,
power loss) never sent, is sent by the next daemon on that folder when it starts, in
the order the events happened; a receiver may then see an event twice (same ``id``),
never miss one. An event whose retries all fail is dropped, with an error in the log:
a receiver that is down for good does not build up a backlog.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..files import write_whole
from ..plugins import hookimpl

log = logging.getLogger(__name__)

EVENTS = ("promoted", "job_failed")
FLUSH_SECONDS = 10.0
OUTBOX = ".webhook-outbox"


@dataclass
class Settings:
    urls: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=lambda: list(EVENTS))
    secret: str = ""
    timeout_seconds: float = 5.0
    retries: int = 5
    backoff_seconds: float = 1.0


def parse_settings(table: dict, source) -> Settings:
    from ..config import plugin_settings
    from ..errors import ConfigError

    settings = plugin_settings(Settings, table, "webhook", source)  # keys and types
    where = f"{source}: [plugins.settings.webhook]"
    if not all(u.startswith(("http://", "https://")) for u in settings.urls):
        raise ConfigError(f"{where}: 'urls' must be a list of http:// or https:// URLs")
    unknown = [e for e in settings.events if e not in EVENTS]
    if unknown:
        raise ConfigError(f"{where}: 'events' may name {', '.join(EVENTS)}; got {unknown}")
    for key in ("retries", "timeout_seconds", "backoff_seconds"):
        if getattr(settings, key) < 0:
            raise ConfigError(f"{where}: {key!r} must be >= 0")
    return settings


class Outbox:
    """Events on disk until delivered: one file each, named so that names sort in the
    order the events were put."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, body: dict, data: bytes) -> Path:
        path = self.folder / f"{time.time_ns():020d}-{body['id']}.json"
        write_whole(path, data)
        return path

    def pending(self) -> list[tuple[Path, dict, bytes]]:
        """Events left by an earlier daemon, oldest first; unreadable ones are set aside."""
        found = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                data = path.read_bytes()
                found.append((path, json.loads(data), data))
            except (OSError, ValueError) as exc:
                log.error("webhook: cannot read the queued event %s (%s); renamed to %s.bad", path, exc, path.name)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".bad"))
        return found

    @staticmethod
    def done(path: Path) -> None:
        path.unlink(missing_ok=True)


class Sender:
    """One thread that delivers queued events in order, each to every URL."""

    def __init__(self, settings: Settings, outbox: Outbox | None = None):
        self.settings = settings
        self.outbox = outbox
        self.queue: queue.Queue = queue.Queue()
        if outbox is not None:
            left = outbox.pending()
            if left:
                log.info("webhook: %d event(s) left by an earlier daemon; sending them first", len(left))
            for item in left:
                self.queue.put(item)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-webhook", daemon=True)
        self._thread.start()

    def put(self, event: str, payload: dict) -> None:
        if event in self.settings.events and self.settings.urls:
            body = {"event": event, "id": uuid.uuid4().hex,
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
            data = json.dumps(body, default=str).encode()
            path = self.outbox.add(body, data) if self.outbox is not None else None
            self.queue.put((path, body, data))

    def close(self, timeout: float = FLUSH_SECONDS) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop."""
        self.queue.put(None)
        self._thread.join(timeout)
        self._stopping.set()
        self._thread.join(1.0)
        left = self.queue.qsize()
        if left:
            where = f"; kept in {self.outbox.folder} for the next start" if self.outbox is not None else ""
            log.warning("webhook: %d event(s) not delivered before the daemon stopped%s", left, where)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            path, body, data = item
            kept = False
            for url in self.settings.urls:
                kept |= self._deliver(url, body, data) is None
            if self._stopping.is_set():
                return  # cut short by the stop: the event stays in the outbox
            if path is not None and not kept:
                Outbox.done(path)

    def _headers(self, body: dict, data: bytes) -> dict:
        headers = {"Content-Type": "application/json", "User-Agent": "modelkiln-webhook",
                   "X-Kiln-Event": body["event"], "X-Kiln-Delivery": body["id"]}
        if self.settings.secret:  # signed at each try: the timestamp says when it was sent
            stamp = str(int(time.time()))
            digest = hmac.new(self.settings.secret.encode(), stamp.encode() + b"." + data, hashlib.sha256).hexdigest()
            headers["X-Kiln-Signature"] = f"t={stamp},v1={digest}"
        return headers

    def _deliver(self, url: str, body: dict, data: bytes) -> bool | None:
        """True: delivered; False: refused or given up on; None: redirected (kept)."""
        for attempt in range(self.settings.retries + 1):
            try:
                request = urllib.request.Request(url, data=data, headers=self._headers(body, data), method="POST")
                with _OPENER.open(request, timeout=self.settings.timeout_seconds):
                    return True
            except urllib.error.HTTPError as exc:
                if 300 <= exc.code < 400:
                    log.error("webhook: %s answered the %s event with a redirect (HTTP %d to %s), which is never "
                              "followed; set the final URL in [plugins.settings.webhook] urls. The event stays in "
                              "the outbox for the next start", url, body["event"], exc.code,
                              exc.headers.get("Location", "?"))
                    return None
                if exc.code != 429 and exc.code < 500:
                    log.error("webhook: %s refused the %s event (HTTP %d); not retried", url, body["event"], exc.code)
                    return False
                problem = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:  # refused, reset, timed out, bad host
                problem = str(exc)
            if attempt == self.settings.retries:
                log.error("webhook: giving up on %s for the %s event after %d tries (%s)",
                          url, body["event"], attempt + 1, problem)
                return False
            delay = self.settings.backoff_seconds * 2 ** attempt
            log.warning("webhook: %s failed (%s); retrying in %.1f s", url, problem, delay)
            if self._stopping.wait(delay):
                return False
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx code


_OPENER = urllib.request.build_opener(_NoRedirects)

_sender: Sender | None = None


@hookimpl
def kiln_daemon_started(config):
    global _sender
    settings = parse_settings(config.plugins.settings.get("webhook", {}), config.source)
    if _sender is not None:
        _sender.close(0)
    _sender = Sender(settings, Outbox(config.artifacts_path / OUTBOX)) if settings.urls else None
    if settings.urls and not settings.secret:
        log.warning("webhook: no secret in [plugins.settings.webhook]: events go out unsigned, so receivers "
                    "cannot tell them from forged ones; set secret")


@hookimpl
def kiln_variant_promoted(promotion):
    if _sender is not None:
        _sender.put("promoted", {"promotion": promotion})


@hookimpl
def kiln_job_failed(job):
    if _sender is not None:
        _sender.put("job_failed", {"job": job})


@hookimpl
def kiln_daemon_stopping():
    global _sender
    if _sender is not None:
        _sender.close()
        _sender = None

