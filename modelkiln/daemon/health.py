"""The service's face to operators: ``/healthz`` and Prometheus ``/metrics`` over HTTP.

A standard-library HTTP server on its own threads. It only reads: the daemon's status
snapshot (``status.py``), taken for each request, and the database through its own
sessions (the figures are the catalogue's, so they survive restarts and agree between two
daemons on one database).

/healthz   200 while the daemon is serving: the database answers, the scheduler's and the
           watcher's threads are alive (where this daemon runs them) and it is not
           stopping; 503 otherwise. The body names every check either way.
/metrics   Prometheus text exposition (``metrics.py``).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .metrics import CONTENT_TYPE, metrics_text, registry_for
from .status import health

log = logging.getLogger(__name__)


# A connection that sends nothing for this long is closed; at most this many are served
# at once (each has a thread), the rest are refused until one ends.
IDLE_SECONDS = 10.0
MOST_CONNECTIONS = 16


class _Handler(BaseHTTPRequestHandler):
    snapshot = None  # set on the subclass made per server: takes the daemon's status
    metrics = None  # the daemon's collector registry, likewise
    timeout = IDLE_SECONDS  # the socket's: an idle or slow client gives its thread back

    def do_GET(self):  # the standard library's name
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                ready, checks = health(self.snapshot())
                body = json.dumps({"status": "ok" if ready else "unavailable", "checks": checks}).encode()
                self._reply(200 if ready else 503, "application/json", body)
            elif path == "/metrics":
                self._reply(200, CONTENT_TYPE, metrics_text(self.metrics))
            else:
                self._reply(404, "text/plain", b"not found: try /healthz or /metrics\n")
        except Exception as exc:  # a scrape must never take a thread of the daemon down
            log.exception("HTTP %s failed", path)
            self._reply(500, "text/plain", f"error: {exc}\n".encode())

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # scrapes every 15 s are not news
        # http.server hands over a format and its arguments apart: joined so, they stay lazy.
        log.debug("http: " + format, *args)  # noqa: G003


class _BoundedServer(ThreadingHTTPServer):
    """Threads per connection, but no more than MOST_CONNECTIONS at once: a client that
    opens thousands of idle connections cannot make the daemon start thousands of threads."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MOST_CONNECTIONS)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: closed at once; a scraper retries
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    def __init__(self, status, address: str, source=None):
        """:param status: takes the daemon's ``Status`` snapshot (``Daemon.status``).
        :param source: the config file, which errors name."""
        host, _, port = address.rpartition(":")
        handler = type("Handler", (_Handler,), {"snapshot": staticmethod(status), "metrics": registry_for(status)})
        try:
            self._server = _BoundedServer((host.strip("[]"), int(port)), handler)
        except OSError as exc:
            from ..errors import ConfigError

            raise ConfigError(f"{source}: cannot listen on http.address {address!r} ({exc}); "
                              "choose a free port, or \"\" to turn /healthz and /metrics off") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-http", daemon=True)

    @property
    def address(self) -> str:
        # The socket's own name: typeshed's server_address also admits a Unix socket's path.
        host, port = self._server.socket.getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("serving /healthz and /metrics on http://%s", self.address)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
