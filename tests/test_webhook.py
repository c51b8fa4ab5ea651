"""The built-in webhook plugin against a real HTTP receiver on loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import optimize_once
from modelkiln.config import load_config
from modelkiln.errors import ConfigError


class Receiver:
    """Records every POST; answers 503 to the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0):
        self.requests: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                code = 503 if len(receiver.requests) <= receiver.fail_first else 204
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def with_webhook(kiln_dir, settings: str):
    path = kiln_dir / "kiln.toml"
    path.write_text(path.read_text() + f"\n[plugins.settings.webhook]\n{settings}\n")
    return load_config(path)


def test_promotion_and_failed_job_events_are_posted_signed_and_retried(kiln_dir, tiny_checkpoint):
    receiver = Receiver(fail_first=2)
    try:
        config = with_webhook(kiln_dir, f'urls = ["{receiver.url}"]\nsecret = "s3cret"\nbackoff_seconds = 0.05')
        assert optimize_once(config, tiny_checkpoint, "tiny").status == "done"
        config.workers.max_attempts = 1
        config.architectures["tiny"].factory = "helpers:exiting_factory"
        (tiny_checkpoint / "note.txt").write_text("new content, new checkpoint")
        assert optimize_once(config, tiny_checkpoint, "tiny", "2").status == "failed"
    finally:
        receiver.close()
    # Two 503s, then the promotion arrives once (same delivery id on every try).
    deliveries = [headers["X-Kiln-Delivery"] for headers, _ in receiver.requests]
    assert len(set(deliveries[:3])) == 1
    events = receiver.events()[2:]
    # Anytime promotion: one event per promotion step (one or more), then the failure.
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "job_failed" and kinds[:-1] and set(kinds[:-1]) == {"promoted"}, kinds
    promoted, failed = events[-2], events[-1]
    assert promoted["promotion"]["model"] == "tiny" and promoted["promotion"]["target"] == "cpu"
    assert promoted["promotion"]["metrics"]["latency_p50_ms"] > 0
    assert (failed["job"]["kind"], failed["job"]["model"], failed["job"]["version"]) == ("inspect", "tiny", "2")
    assert "SystemExit" in failed["job"]["reason"]
    for headers, body in receiver.requests:
        # Stripe's scheme: the HMAC covers the timestamp and the body, so a replay is seen.
        stamp, signature = (part.split("=", 1)[1] for part in headers["X-Kiln-Signature"].split(","))
        assert abs(int(stamp) - time.time()) < 600
        assert signature == hmac.new(b"s3cret", stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["Content-Type"] == "application/json"
    assert list((config.artifacts_path / ".webhook-outbox").iterdir()) == []  # all delivered


KILLED_SENDER = """
import sys, time
from pathlib import Path
from modelkiln.events.webhook import Outbox, Sender, Settings
# Nothing listens on port 9: the first try fails, the retry waits far longer than the test.
sender = Sender(Settings(urls=["http://127.0.0.1:9/hook"], retries=1, backoff_seconds=600.0),
                Outbox(Path(sys.argv[1])))
sender.put("promoted", {"promotion": {"model": "m", "version": "1"}})
sender.put("job_failed", {"job": {"id": 7}})
print("queued", flush=True)
time.sleep(600)
"""


def test_events_a_killed_daemon_never_sent_are_sent_by_the_next_one_in_order(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from modelkiln.events.webhook import Outbox, Sender, Settings

    folder = tmp_path / ".webhook-outbox"
    child = subprocess.Popen([sys.executable, "-c", KILLED_SENDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "queued"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    left = sorted(p.name for p in folder.iterdir())
    assert len(left) == 2 and all(name.endswith(".json") for name in left)

    receiver = Receiver()
    try:
        sender = Sender(Settings(urls=[receiver.url], backoff_seconds=0.01), Outbox(folder))
        sender.close()
    finally:
        receiver.close()
    events = receiver.events()
    assert [e["event"] for e in events] == ["promoted", "job_failed"]  # in the order they happened
    assert [f"{e['id']}.json" for e in events] == [name.partition("-")[2] for name in left]  # same ids
    assert events[0]["promotion"] == {"model": "m", "version": "1"}
    assert list(folder.iterdir()) == []


def test_an_unreachable_receiver_never_stops_the_daemon(kiln_dir, tiny_checkpoint):
    # Nothing listens on port 9 (discard) on loopback: every try is refused.
    config = with_webhook(kiln_dir, 'urls = ["http://127.0.0.1:9/hook"]\nretries = 1\nbackoff_seconds = 0.01')
    assert optimize_once(config, tiny_checkpoint, "tiny").status == "done"


def test_bad_webhook_settings_refuse_the_start_and_name_the_key(kiln_dir, tiny_checkpoint):
    config = with_webhook(kiln_dir, 'urls = ["ftp://example.com"]')
    with pytest.raises(ConfigError, match=r"\[plugins.settings.webhook\]: 'urls' must be"):
        optimize_once(config, tiny_checkpoint, "tiny")
    config.plugins.settings["webhook"] = {"url": "http://x"}
    with pytest.raises(ConfigError, match="unknown key 'plugins.settings.webhook.url'"):
        optimize_once(config, tiny_checkpoint, "tiny")
    config.plugins.settings["webhook"] = {"urls": ["http://x"], "retries": "5"}
    with pytest.raises(ConfigError, match="'plugins.settings.webhook.retries' must be int, got str"):
        optimize_once(config, tiny_checkpoint, "tiny")


def test_a_redirect_is_never_followed_and_the_event_stays_in_the_outbox(tmp_path, caplog):
    from modelkiln.events.webhook import Outbox, Sender, Settings

    landed = Receiver()

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(302)
            self.send_header("Location", landed.url)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = tmp_path / ".webhook-outbox"
    try:
        sender = Sender(Settings(urls=[f"http://127.0.0.1:{server.server_address[1]}/hook"], secret="s",
                                 backoff_seconds=0.01), Outbox(folder))
        sender.put("promoted", {"promotion": {"model": "m", "version": "1"}})
        sender.close()
    finally:
        server.shutdown()
        server.server_close()
        landed.close()
    assert landed.requests == []  # neither the body nor the signature went to the other host
    assert len(list(folder.iterdir())) == 1
    assert any("redirect (HTTP 302" in r.getMessage() and "never followed" in r.getMessage() for r in caplog.records)
