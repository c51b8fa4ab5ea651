"""Promises under faults: SIGKILL at seeded moments (a short campaign; bench/bench_sigkill.py
runs fifty seeds), and third-party steps that raise, hang, exhaust memory, kill
themselves or exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chaos import run_campaign
from modelkiln.config import load_config
from modelkiln.store import queries
from modelkiln.store.db import open_store

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_moments_loses_nothing_and_promotes_once(tmp_path, seed):
    result = run_campaign(tmp_path, seed)
    assert result["problems"] == [], result
    assert len(result["kills_at_s"]) == 3 and result["reader_looks"] > 100


FAULTS = {
    "fault.raise": "RuntimeError: a plugin bug",
    "fault.hang": "timed out",
    "fault.hoard": "out of memory",
    "fault.kill": "killed by signal SIGKILL",
    "fault.exit": "SystemExit",
}


def install_entry_point(site: Path, name: str, module: str) -> None:
    """What pip leaves behind for a package with one `modelkiln` entry point."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[modelkiln]\n{name} = {module}\n")


def test_faulty_third_party_steps_fail_their_own_job_only(tmp_path, kiln_dir, tiny_checkpoint):
    site = tmp_path / "site"
    install_entry_point(site, "faults", "fault_steps")
    path = kiln_dir / "kiln.toml"
    recipes = ", ".join(f'"{r}"' for r in ["baseline", *FAULTS, "fault.litter"])
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", f"recipes = [{recipes}]", path.read_text())
    for old, new in (('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'),
                     ("job_timeout_seconds = 1800.0", "job_timeout_seconds = 8.0"),
                     ("max_attempts = 3", "max_attempts = 1"), ("memory_limit_mb = 0", "memory_limit_mb = 1024")):
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent)])}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run([sys.executable, "-m", "modelkiln", "optimize", str(tiny_checkpoint), "--model", "tiny",
                          "--version", "1", "--config", str(path)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=cwd)
    assert out.returncode == 0, out.stderr
    # A step that writes into its working directory writes into its job's scratch folder.
    assert list(cwd.iterdir()) == []
    store = open_store(load_config(path))
    with store.session() as session:
        variants = {v.recipe or "baseline": (v.status, v.reason) for v in queries.variants_of_model(session, "tiny")}
        promoted = [p.variant.recipe or "baseline" for p in queries.current_promotions(session)]
    store.dispose()
    assert variants["baseline"] == variants["fault.litter"] == ("succeeded", None)
    assert promoted in (["baseline"], ["fault.litter"])  # the same model either way
    for recipe, reason in FAULTS.items():
        status, recorded = variants[recipe]
        assert status == "failed" and reason in recorded, (recipe, recorded)


def test_a_retry_runs_failed_variant_jobs_again_and_decides_the_promotion_again(tmp_path, kiln_dir,
                                                                                  tiny_checkpoint):
    """A variant failed for a cause outside the checkpoint (its disk full); once that is
    fixed, `kiln retry` runs that job again and the target decides again: the retried
    variant, faster than the one served, is promoted."""
    site = tmp_path / "site"
    install_entry_point(site, "faults", "fault_steps")
    path = kiln_dir / "kiln.toml"
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["fault.heavy", "fault.flaky"]', path.read_text())
    for old, new in (('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'),
                     ("max_attempts = 3", "max_attempts = 1")):
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    marker = tmp_path / "disk-full"
    marker.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent)]),
           "KILN_TEST_FAULT_MARKER": str(marker)}

    def kiln(*args):
        out = subprocess.run([sys.executable, "-m", "modelkiln", *args, "--config", str(path)],
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def state():
        store = open_store(load_config(path))
        with store.session() as session:
            variants = {v.recipe: v.status for v in queries.variants_of_model(session, "tiny")}
            served = [p.variant.recipe for p in queries.current_promotions(session)]
            decisions = [p.decision_key.split(":", 2)[-1] for p in queries.promotion_history(session, "tiny")]
        store.dispose()
        return variants, served, decisions

    kiln("optimize", str(tiny_checkpoint), "--model", "tiny", "--version", "1")
    assert state() == ({"fault.heavy": "succeeded", "fault.flaky": "failed"}, ["fault.heavy"], ["cpu:1"])
    marker.unlink()  # the disk freed
    assert "1 failed or cancelled variant job(s) will run again" in kiln("retry", "tiny", "1")
    kiln("optimize", str(tiny_checkpoint), "--model", "tiny", "--version", "1")
    assert state() == ({"fault.heavy": "succeeded", "fault.flaky": "succeeded"}, ["fault.flaky"],
                       ["cpu:1", "cpu:2"])
    out = subprocess.run([sys.executable, "-m", "modelkiln", "retry", "tiny", "--config", str(path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "no failed or cancelled variant job" in out.stderr  # nothing left to retry


def test_a_database_locked_past_the_busy_timeout_is_waited_out(kiln_dir, digits_checkpoint):
    """Another process holds SQLite's write lock for 4 s, 8x the busy timeout: the loop
    logs, backs off and retries; the checkpoint is still promoted once."""
    import sqlite3

    from helpers import place
    from test_e2e import serve, wait_for

    path = kiln_dir / "kiln.toml"
    path.write_text(path.read_text().replace("busy_timeout_ms = 30000", "busy_timeout_ms = 500"))
    daemon = serve(kiln_dir)
    try:
        wait_for(lambda: b"started:" in (kiln_dir / "serve.log").read_bytes(), 60, "the daemon to start", daemon)
        locker = sqlite3.connect(kiln_dir / "kiln.db", timeout=30, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        place(digits_checkpoint, kiln_dir / "models", "digits", "1")
        time.sleep(4)
        assert daemon.poll() is None
        locker.execute("COMMIT")
        locker.close()
        wait_for((kiln_dir / "promoted" / "digits" / "cpu").is_symlink, 180, "the promotion", daemon)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    log = (kiln_dir / "serve.log").read_text()
    assert "database is locked" in log and "retrying" in log
    store = open_store(load_config(path))
    with store.session() as session:
        assert len(queries.current_promotions(session)) == 1
    store.dispose()


def test_two_daemons_on_one_database_and_folder_run_each_job_once(kiln_dir, digits_checkpoint, tiny_checkpoint):
    from sqlalchemy import select

    from helpers import place
    from modelkiln.store.models import Job, Promotion
    from test_e2e import serve, wait_for

    first, second = serve(kiln_dir), serve(kiln_dir)
    try:
        wait_for(lambda: (kiln_dir / "serve.log").read_bytes().count(b"started:") == 2, 90, "both daemons", first)
        place(digits_checkpoint, kiln_dir / "models", "digits", "1")
        place(tiny_checkpoint, kiln_dir / "models", "tiny", "1")
        check = open_store(load_config(kiln_dir / "kiln.toml"))

        def all_done():  # promotion is anytime: the links come before the last jobs end
            with check.session() as session:
                return [c.status for c in queries.checkpoints(session)] == ["done", "done"]
        wait_for(all_done, 240, "both checkpoints done", second)
        check.dispose()
        for model in ("digits", "tiny"):
            assert (kiln_dir / "promoted" / model / "cpu").is_symlink()
    finally:
        for daemon in (first, second):
            daemon.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0 and second.wait(30) == 0
    store = open_store(load_config(kiln_dir / "kiln.toml"))
    with store.session() as session:
        jobs = list(session.scalars(select(Job)))
        promotions = list(session.scalars(select(Promotion)))
        owners = {j.lease_owner for j in jobs}
    store.dispose()
    assert len(jobs) == 2 * (1 + 4) and all(j.state == "succeeded" and j.attempts == 1 for j in jobs)
    # Each step of each checkpoint's history once, whichever daemon decided it.
    steps = [p.decision_key for p in promotions]
    assert len(steps) == len(set(steps)) and {p.checkpoint_id for p in promotions} == {1, 2}
    assert owners == {None}  # leases are released when a job ends


def test_thousands_of_versions_without_events_are_found_by_one_scan_once(config):
    """The watcher off (as if every event were lost): one reconcile scan records all of
    them, a second records nothing new."""
    from modelkiln.daemon.service import Daemon
    from modelkiln.store.models import Checkpoint
    from sqlalchemy import func, select

    registry = config.registry_path
    past = time.time() - 60
    for i in range(2000):
        version = registry / f"m{i % 20}" / str(i)
        version.mkdir(parents=True)
        (version / "notes.txt").write_text(f"no model in version {i}")  # rejected at ingest: no job
        os.utime(version / "notes.txt", (past, past))
        os.utime(version, (past, past))
    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        started = time.monotonic()
        daemon.reconcile()
        first_scan = time.monotonic() - started
        daemon.reconcile()
        with daemon.store.session() as session:
            count = session.scalar(select(func.count()).select_from(Checkpoint))
            distinct = session.scalar(select(func.count(func.distinct(Checkpoint.model + "/" + Checkpoint.version))))
    finally:
        daemon.stop(5)
    assert count == distinct == 2000
    assert first_scan < config.registry.rescan_seconds  # within one interval (60 s)


def _namespace_with_tmpfs() -> list[str] | None:
    """A command prefix giving a private mount namespace in which tmpfs can be mounted:
    an unprivileged user namespace where allowed, else plain root."""
    import shutil as sh

    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        if sh.which(prefix[0]) is None:
            return None
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt || "
                                "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_a_full_disk_fails_the_job_cleanly_and_leaves_the_served_variant(tmp_path, kiln_dir, digits_checkpoint):
    import json
    import shutil

    prefix = _namespace_with_tmpfs()
    if prefix is None:
        pytest.skip("no way to mount a small tmpfs here (needs unshare with user or mount namespaces)")
    v2 = shutil.copytree(digits_checkpoint, tmp_path / "v2")
    (v2 / "note.txt").write_text("same weights, new content: a new checkpoint")
    artifacts = kiln_dir / "artifacts"
    artifacts.mkdir()
    driver = Path(__file__).parent / "diskfull_driver.py"
    script = (f"mount -t tmpfs -o size=16m tmpfs {artifacts} && exec {sys.executable} {driver} "
              f"{kiln_dir / 'kiln.toml'} {digits_checkpoint} {v2}")
    out = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["first"] == "done"
    failed = [v for v in result["variants"] if v[0] == "2" and v[3] == "failed"]
    reasons = " ".join(v[4] or "" for v in failed) + " " + (result["second_reason"] or "")
    assert failed or result["second"] == "failed", result
    assert "No space left on device" in reasons, result
    # The served variant is untouched and complete; nothing half-written is left behind.
    assert result["link_after"] == result["link_before"] and result["link_complete"]
    assert [p for p in result["promotions"] if p[0] != 1] == []
    assert result["staging_left"] == [] and result["incoming_left"] == []
    assert all(p.endswith("worker.log") for p in result["work_left"]), result["work_left"]


def test_sigterm_stops_within_the_timeout_and_hands_a_long_job_back(kiln_dir, digits_checkpoint):
    from helpers import place
    from test_e2e import running_variant_job, serve, wait_for

    from modelkiln.store.models import Job

    path = kiln_dir / "kiln.toml"
    text = path.read_text().replace("min_seconds = 0.0", "min_seconds = 30.0").replace(
        "max_seconds = 0.2", "max_seconds = 60.0")
    path.write_text(text)
    daemon = serve(kiln_dir, "--stop-timeout", "2")
    store = open_store(load_config(path))
    try:
        wait_for(lambda: b"started:" in (kiln_dir / "serve.log").read_bytes(), 60, "the daemon to start", daemon)
        place(digits_checkpoint, kiln_dir / "models", "digits", "1")
        job = wait_for(lambda: running_variant_job(store), 120, "a running variant job", daemon)
        time.sleep(1)  # well inside its 30 s of measuring
        sent = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        took = time.monotonic() - sent
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert took < 2 + 5, took  # the timeout, plus shutting the workers and the store
    with store.session() as session:
        again = session.get(Job, job.id)
        assert again.state == "pending" and again.lease_owner is None
        assert "stopped before it finished" in again.reason
    store.dispose()


def test_jobs_on_a_hugging_face_model_leave_no_semaphore_behind(config, tmp_path):
    """A worker ends with os._exit; anything it registered with multiprocessing's resource
    tracker (tqdm's lock, from transformers' progress bars, was one) stayed in /dev/shm
    until the daemon exited: one per job, for as long as the daemon ran."""
    from transformers import BertConfig, BertModel

    from helpers import optimize_once

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this host")
    config.targets["cpu"].runtimes = ["torch"]
    folder = tmp_path / "bert"
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         vocab_size=100)).save_pretrained(str(folder))

    def semaphores():
        return {p.name for p in shm.glob("sem.mp-*")}

    before = semaphores()
    checkpoint = optimize_once(config, folder, "bert")
    assert checkpoint.status == "done", checkpoint.reason
    assert semaphores() - before == set()
