"""/healthz, /metrics and log lines, in-process (the served daemon is in test_e2e.py)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from modelkiln.config import load_config
from modelkiln.daemon.logs import about, setup_logging
from modelkiln.daemon.service import Daemon
from modelkiln.errors import ConfigError
from test_e2e import http_get, scrape


def test_healthz_turns_unavailable_when_the_scheduler_dies(config):
    daemon = Daemon(config, preload=False)
    daemon.start()
    try:
        url = f"http://{daemon.http.address}"
        code, body = http_get(f"{url}/healthz")
        assert code == 200, body
        daemon.scheduler.stop()
        code, body = http_get(f"{url}/healthz")
        assert code == 503 and json.loads(body)["checks"]["scheduler"] == "not running"
        assert scrape(http_get(f"{url}/metrics")[1])["kiln_up", ()] == 0
    finally:
        daemon.stop(5)


def test_a_taken_port_is_a_config_error_that_names_the_key(config):
    first = Daemon(config, preload=False)
    first.start()
    try:
        config.http.address = first.http.address
        with pytest.raises(ConfigError, match="http.address"):
            Daemon(config, preload=False).start()
    finally:
        first.stop(5)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_name_model_version_target_and_job(fmt):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", fmt, stream)
        logging.getLogger("modelkiln.test").info("job %d ended", 7, extra=about("digits", "3", "cpu", 7))
        logging.getLogger("modelkiln.test").info("no context here")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    first, second = stream.getvalue().splitlines()
    if fmt == "text":
        assert first.endswith("job 7 ended [model=digits version=3 target=cpu job=7]")
        assert second.endswith("no context here")
    else:
        record = json.loads(first)
        assert (record["message"], record["model"], record["version"], record["target"], record["job"]) == (
            "job 7 ended", "digits", "3", "cpu", 7)
        assert "model" not in json.loads(second)


def test_unknown_log_format_and_bad_address_are_named(kiln_dir):
    path = kiln_dir / "kiln.toml"
    text = path.read_text()
    path.write_text(text.replace('format = "text"', 'format = "xml"'))
    with pytest.raises(ConfigError, match="'logging.format' must be one of text, json"):
        load_config(path)
    path.write_text(text.replace('address = "127.0.0.1:0"', 'address = "localhost"'))
    with pytest.raises(ConfigError, match="'http.address' must be host:port"):
        load_config(path)


def test_idle_connections_are_bounded_and_closed(config, monkeypatch):
    """Thousands of idle connections once held a thread each, forever."""
    import socket
    import threading
    import time

    import modelkiln.daemon.health as health

    monkeypatch.setattr(health._Handler, "timeout", 1.0)
    daemon = Daemon(config, preload=False)
    daemon.start()
    try:
        host, port = daemon.http.address.rsplit(":", 1)
        before = threading.active_count()
        idle = [socket.create_connection((host, int(port))) for _ in range(60)]
        time.sleep(0.5)
        assert threading.active_count() - before <= health.MOST_CONNECTIONS
        time.sleep(1.5)  # past the idle timeout: the server has closed every one
        for sock in idle:
            sock.settimeout(2)
            assert sock.recv(1) == b""
            sock.close()
        code, _ = http_get(f"http://{daemon.http.address}/healthz")
        assert code == 200
    finally:
        daemon.stop(5)


def test_status_shows_names_and_reasons_without_their_control_characters():
    from modelkiln.cli import table

    out = table([["m\x1b[2J", "reason\nfake row"]], ["model", "reason"])
    assert "\x1b" not in out and "\\x1b[2J" in out and "reason\\nfake row" in out
    assert len(out.splitlines()) == 3


def test_healthz_fails_when_the_database_file_is_deleted_under_the_daemon(config):
    daemon = Daemon(config, preload=False)
    daemon.start()
    try:
        url = f"http://{daemon.http.address}/healthz"
        assert http_get(url)[0] == 200
        (config.source.parent / "kiln.db").unlink()
        code, body = http_get(url)
        assert code == 503 and "was deleted while the daemon had it open" in json.loads(body)["checks"]["database"]
    finally:
        daemon.stop(5)


def test_systemd_hears_ready_watchdog_and_stopping(config, tmp_path, monkeypatch):
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping at least every second
    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving: registry ")
        daemon.run_once(0)
        assert listener.recv(4096) == b"WATCHDOG=1"
    finally:
        daemon.stop(0)
    assert listener.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    listener.close()


def test_healthz_says_starting_while_a_large_catalogue_is_recovered(config, monkeypatch):
    """The port answers from the moment it is bound: 503 "starting" during recovery,
    not a connection that hangs."""
    import threading

    recovering, finish = threading.Event(), threading.Event()
    original = Daemon._recover

    def slow_recover(self):
        recovering.set()
        finish.wait(30)
        original(self)

    monkeypatch.setattr(Daemon, "_recover", slow_recover)
    daemon = Daemon(config, preload=False)
    starter = threading.Thread(target=daemon.start)
    starter.start()
    try:
        assert recovering.wait(30)
        code, body = http_get(f"http://{daemon.http.address}/healthz")
        assert code == 503 and json.loads(body)["checks"] == {"loop": "starting"}
        assert scrape(http_get(f"http://{daemon.http.address}/metrics")[1])["kiln_up", ()] == 0
        finish.set()
        starter.join(60)
        assert http_get(f"http://{daemon.http.address}/healthz")[0] == 200
    finally:
        finish.set()
        starter.join(60)
        daemon.stop(5)


def test_job_counts_and_durations_are_kept_as_jobs_end_not_scanned_per_scrape():
    from modelkiln.daemon.metrics import JobStats

    stats = JobStats(bounds=(0.5, 1, 60, 3600))
    for seconds in (0.2, 0.7, 3.0, 45.0, 7200.0):
        stats.observe("variant", "succeeded", seconds)
    stats.observe("inspect", "failed", 2.0)
    assert stats.snapshot() == [("inspect", "failed", 1, 2.0, [0, 0, 1, 1]),
                                ("variant", "succeeded", 5, pytest.approx(7248.9), [1, 2, 4, 4])]


def test_metrics_parse_with_prometheus_client_with_their_types_and_bounded_labels(config, tiny_checkpoint):
    """Counters for totals, gauges for states, a histogram, per (model, target) series for
    what is served, build info and the standard process collector."""
    from prometheus_client.parser import text_string_to_metric_families

    from modelkiln.plugins.api import FoundCheckpoint
    from helpers import run_until_done

    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        checkpoint_id = daemon.ingest_path(FoundCheckpoint("tiny", "1", tiny_checkpoint))
        assert run_until_done(daemon, checkpoint_id).status == "done"
        body = http_get(f"http://{daemon.http.address}/metrics")[1]
    finally:
        daemon.stop(5)
    families = {f.name: f for f in text_string_to_metric_families(body)}
    types = {name: families[name].type for name in families if name.startswith("kiln_")}
    assert types == {
        "kiln_build_info": "gauge", "kiln_up": "gauge", "kiln_checkpoints_seen": "counter",
        "kiln_checkpoints": "gauge", "kiln_jobs": "gauge", "kiln_oldest_running_job_seconds": "gauge",
        "kiln_jobs_ended": "counter", "kiln_job_duration_seconds": "histogram", "kiln_promotions": "counter",
        "kiln_last_promotion_timestamp_seconds": "gauge", "kiln_promoted_latency_seconds": "gauge",
        "kiln_promoted_quality": "gauge", "kiln_queue_depth": "gauge", "kiln_workers_busy": "gauge",
        "kiln_workers": "gauge"}, types
    assert "process_cpu_seconds" in families and "python_info" in families
    samples = scrape(body)
    served = (("model", "tiny"), ("target", "cpu"))
    assert 0 < samples["kiln_promoted_latency_seconds", served] < 1
    assert 0.9 <= samples["kiln_promoted_quality", served] <= 1.01
    assert abs(samples["kiln_last_promotion_timestamp_seconds", served] - __import__("time").time()) < 600
    (info,) = families["kiln_build_info"].samples
    assert info.labels["version"] == "0.1.0" and info.labels["torch"] and info.value == 1
    # Labels are bounded: kinds, states, models, targets; never versions or job ids.
    labels = {key for f in families.values() if f.name.startswith("kiln_") for s in f.samples for key in s.labels}
    assert labels <= {"status", "kind", "state", "model", "target", "le", "version", "python", "torch",
                      "onnxruntime"}, labels
