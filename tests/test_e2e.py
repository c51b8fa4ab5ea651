"""The daemon as users run it: `kiln serve` in its own process, checkpoints renamed into
the watched folder, SIGTERM and SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import place
from sqlalchemy import select

from modelkiln.store.db import open_store
from modelkiln.store.models import Job, Promotion, Variant
from modelkiln.store.states import TERMINAL_JOB_STATES

pytestmark = pytest.mark.slow


def serve(kiln_dir, *args, new_session=False):
    env = {**os.environ, "KILN_CONFIG": str(kiln_dir / "kiln.toml"), "PYTHONPATH": os.path.dirname(__file__)}
    log = open(kiln_dir / "serve.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "modelkiln", "serve", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=new_session)


def running_variant_job(store):
    with store.session() as session:
        return session.scalars(select(Job).where(Job.kind == "variant", Job.state == "running")).first()


def slower_measurements(kiln_dir):
    """Long enough that a job is reliably caught running: every batch size timed for at
    least a second (a job caught at its last moment once ended before the kill on CI)."""
    text = (kiln_dir / "kiln.toml").read_text().replace("max_seconds = 0.2", "max_seconds = 2.0").replace(
        "min_seconds = 0.0", "min_seconds = 1.0")
    (kiln_dir / "kiln.toml").write_text(text)


def wait_for(predicate, timeout, what, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"kiln serve exited with {process.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kiln(kiln_dir, *args):
    out = subprocess.run([sys.executable, "-m", "modelkiln", *args, "--config", str(kiln_dir / "kiln.toml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def http_get(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(body: str) -> dict:
    """/metrics read by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def test_renamed_checkpoint_ends_up_promoted(kiln_dir, digits_checkpoint):
    """...and the operator sees it: JSON log lines naming the model, /healthz, /metrics."""
    from test_mlflow import _free_port

    port = _free_port()
    text = (kiln_dir / "kiln.toml").read_text().replace('format = "text"', 'format = "json"')
    (kiln_dir / "kiln.toml").write_text(text.replace('address = "127.0.0.1:0"', f'address = "127.0.0.1:{port}"'))
    daemon = serve(kiln_dir)
    try:
        config_db = kiln_dir / "kiln.db"
        wait_for(config_db.exists, 60, "the database", daemon)
        place(digits_checkpoint, kiln_dir / "models", "digits", "1")
        link = kiln_dir / "promoted" / "digits" / "cpu"
        wait_for(link.is_symlink, 180, "the promoted link", daemon)
        # Promotion is anytime: the link comes with the first good variant; the rest follow.
        wait_for(lambda: json.loads(kiln(kiln_dir, "status", "--json"))["checkpoints"][0]["status"] == "done", 180,
                 "every variant job to end", daemon)
        (entry,) = json.loads(kiln(kiln_dir, "promoted", "--json"))
        for key in ("model", "target", "variant", "recipe", "path", "metrics"):
            assert key in entry
        metrics = entry["metrics"]
        for key in ("latency_p50_ms", "size_bytes", "quality", "quality_delta"):
            assert metrics[key] is not None
        assert (metrics["baseline_quality"] - metrics["quality"]) / metrics["baseline_quality"] <= 0.01
        assert (link / "variant.json").is_file()
        status = json.loads(kiln(kiln_dir, "status", "--json"))
        assert status["checkpoints"][0]["model"] == "digits"

        code, body = http_get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and json.loads(body)["checks"] == {
            "database": "ok", "loop": "ok", "disk": "ok", "ingest": "ok", "scheduler": "ok", "watcher": "ok"}
        code, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        samples = scrape(body)
        assert samples["kiln_checkpoints_seen_total", ()] == 1
        # One promotion per better variant measured, of the four.
        assert 1 <= samples["kiln_promotions_total", (("model", "digits"), ("target", "cpu"))] <= 4
        assert samples["kiln_jobs_ended_total", (("kind", "variant"), ("state", "succeeded"))] == 4
        assert samples["kiln_job_duration_seconds_count", (("kind", "variant"), ("state", "succeeded"))] == 4
        assert samples["kiln_queue_depth", ()] == 0 and samples["kiln_up", ()] == 1
        assert 0 < samples["kiln_promoted_latency_seconds", (("model", "digits"), ("target", "cpu"))] < 1
        assert http_get(f"http://127.0.0.1:{port}/nothing")[0] == 404
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    records = [json.loads(line) for line in (kiln_dir / "serve.log").read_text().splitlines() if line.startswith("{")]
    assert records and len(records) == len((kiln_dir / "serve.log").read_text().splitlines())
    ended = [r for r in records if r["message"].startswith("job") and "ended" in r["message"] and "target" in r]
    assert len(ended) == 4 and all(r["model"] == "digits" and r["version"] == "1" and r["target"] == "cpu"
                                   and isinstance(r["job"], int) for r in ended)
    assert any(r["message"].startswith("promoted digits/1 on cpu") and r["target"] == "cpu" for r in records)


def test_sigkill_mid_job_then_restart_finishes_once(kiln_dir, digits_checkpoint):
    slower_measurements(kiln_dir)
    daemon = serve(kiln_dir)
    from modelkiln.config import load_config

    config = load_config(kiln_dir / "kiln.toml")
    wait_for((kiln_dir / "kiln.db").exists, 60, "the database", daemon)
    store = open_store(config)

    place(digits_checkpoint, kiln_dir / "models", "digits", "1")
    wait_for(lambda: running_variant_job(store), 120, "a running variant job", daemon)
    workers = children_of(daemon.pid)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(10)
    # Worker processes die with the daemon: none goes on writing behind a restart.
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
                             for p in workers), 10, "orphaned workers to exit")

    restarted = serve(kiln_dir)
    try:
        link = kiln_dir / "promoted" / "digits" / "cpu"
        wait_for(link.is_symlink, 180, "the promoted link after restart", restarted)
        with store.session() as session:
            def settled():
                session.expire_all()
                return all(j.state in TERMINAL_JOB_STATES for j in session.scalars(select(Job)))
            wait_for(settled, 60, "all jobs to end", restarted)
            variants = list(session.scalars(select(Variant)))
            assert len(variants) == 4 and all(v.status == "succeeded" for v in variants)
            # Anytime promotion: each step of the history once, none repeating the one before.
            history = list(session.scalars(select(Promotion).order_by(Promotion.id)))
            assert [p.decision_key for p in history] == [f"auto:1:cpu:{n}" for n in range(1, len(history) + 1)]
            assert all(a.variant_id != b.variant_id for a, b in zip(history, history[1:]))
            jobs = list(session.scalars(select(Job)))
            assert all(j.state == "succeeded" for j in jobs)
            assert max(j.attempts for j in jobs) == 2  # the killed job ran once more, not more
        artifacts = kiln_dir / "artifacts" / "digits"
        finals = [p for p in artifacts.glob("*/cpu/*") if not p.name.startswith(".")]
        assert len(finals) == 4 and all((p / "variant.json").is_file() for p in finals)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(30) == 0


def test_sigterm_to_the_whole_group_lets_the_running_job_finish(kiln_dir, digits_checkpoint):
    """systemd's default KillMode sends SIGTERM to every process of the service."""
    slower_measurements(kiln_dir)
    daemon = serve(kiln_dir, "--stop-timeout", "60", new_session=True)
    from modelkiln.config import load_config

    wait_for(lambda: b"started:" in (kiln_dir / "serve.log").read_bytes(), 60, "the daemon to start", daemon)
    store = open_store(load_config(kiln_dir / "kiln.toml"))

    place(digits_checkpoint, kiln_dir / "models", "digits", "1")
    job = wait_for(lambda: running_variant_job(store), 120, "a running variant job", daemon)
    os.killpg(daemon.pid, signal.SIGTERM)
    assert daemon.wait(90) == 0
    with store.session() as session:
        states = {j.id: (j.state, j.reason) for j in session.scalars(select(Job))}
    assert states[job.id][0] == "succeeded", states[job.id]
    assert not [s for s in states.values() if s[0] == "failed"], states
