"""A daemon an operator can watch and steer: anytime promotion, cheap-first order, time
and memory budgets, progress, cancel, and a stop that stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelkiln.config import load_config
from modelkiln.store import queries
from modelkiln.store.db import open_store
from modelkiln.store.models import Job
from conftest import fast_config_text
from test_e2e import serve, wait_for

TESTS = Path(__file__).parent


def set_config(path: Path, recipes: list[str], *replacements: tuple[str, str]) -> None:
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", "recipes = [" + ", ".join(f'"{r}"' for r in recipes) + "]",
                  path.read_text())
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)


def kiln(path: Path, *args, env=None, check=True, timeout=300):
    out = subprocess.run([sys.executable, "-m", "modelkiln", *args, "--config", str(path)], capture_output=True,
                         text=True, env=env or {**os.environ, "PYTHONPATH": str(TESTS)}, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr
    return out


# -- anytime promotion, cheap first ----------------------------------------------------


@pytest.fixture
def ballasted_checkpoint(tmp_path_factory):
    from conftest import weights_folder
    from helpers import ballasted_mlp

    return weights_folder(tmp_path_factory, "ballasted", ballasted_mlp)


@pytest.mark.slow
def test_the_first_promotion_comes_after_the_cheapest_good_variant_and_a_better_one_supersedes_it(
        tmp_path, kiln_dir, ballasted_checkpoint):
    """The config lists the costly recipe first; the baseline still runs first (cheap
    first) and is promoted at once, before the costly job starts (anytime); the costly
    variant, much faster, then supersedes it. The history keeps both steps."""
    from test_reliability import install_entry_point

    site = tmp_path / "site"
    install_entry_point(site, "faults", "fault_steps")
    path = kiln_dir / "kiln.toml"
    set_config(path, ["fault.unballast", "baseline"],
               ('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    with path.open("a") as fh:
        fh.write('\n[architectures.ballasted]\nfactory = "helpers:ballasted_mlp"\ninput_shape = [16]\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(TESTS)])}
    kiln(path, "optimize", str(ballasted_checkpoint), "--model", "ballasted", "--version", "1", env=env)

    store = open_store(load_config(path))
    with store.session() as session:
        jobs = {j.variant.recipe: j for j in queries.jobs_of(session, 1) if j.kind == "variant"}
        history = queries.promotion_history(session, "ballasted")
        steps = [(p.variant.recipe, p.decision_key, p.reason, p.promoted_at) for p in history]
    store.dispose()
    assert jobs[""].started_at < jobs["fault.unballast"].started_at  # cheap first
    assert jobs[""].priority < jobs["fault.unballast"].priority
    assert [s[0] for s in steps] == ["", "fault.unballast"], steps
    assert [s[1] for s in steps] == ["auto:1:cpu:1", "auto:1:cpu:2"]
    first, second = steps
    assert "first variant to pass the gate" in first[2] and "1 variant job(s) still to end" in first[2]
    assert first[3] <= jobs["fault.unballast"].started_at  # promoted before the costly job began
    assert "lowest latency_p50_ms" in second[2]


# -- cancel, progress, recipes removed from the config ---------------------------------


def running_job(store, recipe_start: str):
    with store.session() as session:
        for job in queries.running_jobs(session):
            if job.variant is not None and job.variant.recipe.startswith(recipe_start) and job.progress \
                    and job.progress.get("activity"):
                return job.id
    return None


TRAIN_FOREVER = "prune.structured(recovery_steps=100000000, max_seconds=600.0)"


@pytest.mark.slow
def test_a_running_training_job_shows_its_progress_and_kiln_cancel_ends_it(kiln_dir, digits_checkpoint):
    from helpers import place

    path = kiln_dir / "kiln.toml"
    set_config(path, [TRAIN_FOREVER, "baseline"], ('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    daemon = serve(kiln_dir)
    store = open_store(load_config(path))
    try:
        wait_for(lambda: b"started:" in (kiln_dir / "serve.log").read_bytes(), 60, "the daemon to start", daemon)
        place(digits_checkpoint, kiln_dir / "models", "digits", "1")
        job_id = wait_for(lambda: running_job(store, "prune.structured"), 120, "the training job's progress", daemon)
        status = kiln(path, "status").stdout
        assert re.search(rf"(?m)^{job_id} +digits/1 +cpu +torch:prune\.structured.*recovery fine-tune \d+/100000000"
                         r" within 600 s, loss [\d.e+-]+ +\d+ s", status), status
        variants = kiln(path, "variants", "digits").stdout
        assert re.search(r"torch:prune\.structured\S* .* running \d+ s", variants), variants
        # The baseline ran first and is served already, while the training goes on.
        assert kiln(path, "promoted").stdout.count("torch:baseline") == 1

        out = kiln(path, "cancel", "digits", "1", "--recipe", f"torch:{TRAIN_FOREVER}").stdout  # as variants names it
        assert f"job {job_id}: digits/1 cpu torch:{TRAIN_FOREVER}" in out and "was running" in out
        wait_for(lambda: b"cancelled while running" in (kiln_dir / "serve.log").read_bytes(), 30,
                 "the daemon to stop the cancelled job", daemon)

        def done():
            with store.session() as session:
                return queries.checkpoint(session, 1).status == "done"
        wait_for(done, 30, "the checkpoint to close", daemon)
        with store.session() as session:
            job = queries.job(session, job_id)
            assert (job.state, job.lease_owner, job.reason) == ("cancelled", None, "cancelled by `kiln cancel`")
            assert job.variant.status == "cancelled"
        assert not (kiln_dir / "artifacts" / "work" / str(job_id)).exists()
        again = kiln(path, "cancel", "digits", check=False)
        assert again.returncode == 2 and "no pending or running job to cancel" in again.stderr
        assert "1 failed or cancelled variant job(s) will run again" in kiln(path, "retry", "digits").stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        store.dispose()


def test_recipes_removed_from_the_config_have_their_pending_jobs_cancelled_at_start(config, kiln_dir,
                                                                                      digits_checkpoint):
    from modelkiln.daemon.service import Daemon
    from modelkiln.plugins.api import FoundCheckpoint

    from helpers import run_until_done

    path = kiln_dir / "kiln.toml"
    set_config(path, ["baseline", "quantize.int8_dynamic", "quantize.bf16"],
               ('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    daemon = Daemon(load_config(path), watch=False, schedule=False)
    daemon.start()
    try:
        checkpoint_id = daemon.ingest_path(FoundCheckpoint("digits", "1", digits_checkpoint))
        def variant_running():
            daemon.run_once(0.05)
            with daemon.store.session() as session:
                return any(j.kind == "variant" for j in queries.running_jobs(session))
        wait_for(variant_running, 60, "the first variant job")
    finally:
        daemon.stop(0)  # the running job goes back to pending with the rest
    set_config(path, ["baseline"])
    daemon = Daemon(load_config(path), watch=False, schedule=False)
    daemon.start()
    try:
        checkpoint = run_until_done(daemon, checkpoint_id)
        with daemon.store.session() as session:
            jobs = {j.variant.recipe: (j.state, j.reason) for j in queries.jobs_of(session, checkpoint_id)
                    if j.variant is not None}
            served = [p.variant.recipe for p in queries.current_promotions(session)]
    finally:
        daemon.stop(5)
    assert checkpoint.status == "done" and served == [""]
    assert jobs[""] == ("succeeded", None)
    for recipe in ("quantize.int8_dynamic", "quantize.bf16"):
        assert jobs[recipe] == ("cancelled", f"cancelled: recipe '{recipe}' is no longer in targets.cpu.recipes")


def test_variant_jobs_not_started_within_the_checkpoint_budget_are_skipped_with_the_reason(
        kiln_dir, digits_checkpoint, monkeypatch):
    from datetime import timedelta

    import modelkiln.daemon.jobs as jobs
    from modelkiln.daemon.service import Daemon
    from modelkiln.plugins.api import FoundCheckpoint
    from modelkiln.store.models import utcnow

    from helpers import run_until_done

    path = kiln_dir / "kiln.toml"
    text = path.read_text().replace("budget_minutes = 60.0", "budget_minutes = 5.0")
    path.write_text(text)
    # The host's clock, as the lease sees it, ten minutes after the inspection.
    monkeypatch.setattr(jobs, "utcnow", lambda: utcnow() + timedelta(minutes=10))
    daemon = Daemon(load_config(path), watch=False, schedule=False)
    daemon.start()
    try:
        checkpoint = run_until_done(daemon, daemon.ingest_path(FoundCheckpoint("digits", "1", digits_checkpoint)))
        with daemon.store.session() as session:
            variants = queries.variants_of(session, checkpoint.id)
            promoted = queries.current_promotions(session)
    finally:
        daemon.stop(5)
    assert checkpoint.status == "done" and promoted == [] and len(variants) == 4
    for variant in variants:
        assert variant.status == "skipped"
        assert variant.reason.startswith("not started within the checkpoint's budget (policy.budget_minutes = 5,")


# -- budgets of the steps that train ---------------------------------------------------


def test_training_stops_at_its_time_budget_and_fits_its_batch_to_the_worker_memory():
    import numpy as np
    import torch

    from helpers import tiny_mlp
    from modelkiln.steps.training import distill, fit_batch_size, time_budget

    assert fit_batch_size(64, 2**20, 16) == 2  # 16 MiB: a quarter for activations, twice for backward
    assert fit_batch_size(64, 2**20, 0) == 64
    assert time_budget(30.0, 10**9) == 30.0
    assert time_budget(0.0, 22_000_000) == pytest.approx(71.0)  # a sentence encoder: about a minute
    assert time_budget(0.0, 7_000_000_000) == 900.0

    reports = []

    class Context:
        worker_memory_mb = 0

        def progress(self, activity, done, total, **figures):
            reports.append((activity, done, total, figures))

    torch.manual_seed(0)
    teacher, student = tiny_mlp(), tiny_mlp()
    inputs = {"x": np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)}
    started = time.monotonic()
    # No floor of steps: on a loaded host twenty steps alone can outlast a second.
    record = distill(student, teacher, inputs, 10**8, 1e-3, max_seconds=1.0, context=Context(), min_steps=0)
    assert time.monotonic() - started < 5
    assert record["stopped"] == f"time budget of 1 s reached after {record['steps']} of 100000000 steps"
    assert record["batch_size"] == 64 and record["steps"] == len(reports)
    activity, done, total, figures = reports[-1]
    assert (activity, done, total) == ("distillation", record["steps"], 10**8)
    assert figures["loss"] == record["loss"] and figures["eta_seconds"] <= 1.0


# -- stop means stop -------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_the_group_then_twice_to_the_daemon_stops_a_training_job_and_the_next_start_finishes_it(
        kiln_dir, trained_digits, tmp_path):
    """systemd's default KillMode signals the whole group; an impatient operator signals
    the daemon again. It stops at once, hands the job back without counting the attempt,
    and the next start runs the job to its end once (and promotes it once: it trained on
    train.npz, apart from the eval rows that judge it)."""
    from helpers import place
    from modelkiln.demo import digits_data, write_checkpoint

    (x_train, _), _ = digits_data()
    digits_checkpoint = tmp_path / "digits"
    write_checkpoint(*trained_digits, digits_checkpoint, train_inputs=x_train)

    path = kiln_dir / "kiln.toml"
    recipe = "prune.structured(recovery_steps=100000000, max_seconds=8)"
    set_config(path, [recipe], ('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    daemon = serve(kiln_dir, "--stop-timeout", "30", new_session=True)
    store = open_store(load_config(path))
    try:
        wait_for(lambda: b"started:" in (kiln_dir / "serve.log").read_bytes(), 60, "the daemon to start", daemon)
        place(digits_checkpoint, kiln_dir / "models", "digits", "1")
        job_id = wait_for(lambda: running_job(store, "prune.structured"), 120, "the training to begin", daemon)
        sent = time.monotonic()
        os.killpg(daemon.pid, signal.SIGTERM)
        time.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        took = time.monotonic() - sent
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
    log = (kiln_dir / "serve.log").read_text()
    assert took < 5.5, took  # not the 30 s stop timeout: the second signal ends the wait
    assert code in (0, 130), code
    assert "stopping on SIGTERM: 1 job(s) running" in log and "handed back" in log
    with store.session() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.lease_owner) == ("pending", 0, None)

    daemon = serve(kiln_dir)
    try:
        def done():
            with store.session() as session:
                return queries.checkpoint(session, 1).status == "done"
        wait_for(done, 120, "the job to run again to its end", daemon)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    with store.session() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts) == ("succeeded", 1)
        record = job.variant.lineage[0]["record"]
        assert record["recovery_stopped"].startswith("time budget of 8 s reached after ")
        assert len(queries.promotion_history(session, "digits")) == 1
    store.dispose()


def test_a_worker_has_a_memory_limit_by_default(monkeypatch):
    from modelkiln.daemon import executor

    monkeypatch.setattr(executor, "host_memory_bytes", lambda: 24 * 2**30)
    assert executor.worker_memory_limit_mb(0, 1) == 18 * 1024  # three quarters of the host's
    assert executor.worker_memory_limit_mb(0, 2) == 9 * 1024  # shared among the workers
    assert executor.worker_memory_limit_mb(4096, 2) == 4096  # what the config says


def test_hosts_with_different_targets_on_one_catalogue_each_get_their_targets_promoted(kiln_dir, tiny_checkpoint,
                                                                                       tmp_path):
    """Host A runs the cpu target only; host B, sharing the database and folders, runs cpu
    and edge. A checkpoint A inspected (and finished) gets edge variants when B starts; one
    A inspects while B runs gets them at B's next rescan; both are promoted on edge."""
    from helpers import run_until_done
    from modelkiln.config import load_config
    from modelkiln.daemon.service import Daemon
    from modelkiln.plugins.api import FoundCheckpoint
    from modelkiln.store import queries

    config_a = load_config(kiln_dir / "kiln.toml")
    text = (kiln_dir / "kiln.toml").read_text()
    cpu = text[text.index("[targets.cpu]"):text.index("[policy]")]
    edge = cpu.replace("[targets.cpu]", "[targets.edge]").replace('runtimes = ["onnxruntime", "torch"]',
                                                                   'runtimes = ["torch"]')
    (kiln_dir / "b.toml").write_text(text.replace(cpu, cpu + edge))
    config_b = load_config(kiln_dir / "b.toml")

    host_a = Daemon(config_a, watch=False, schedule=False)
    host_a.start()
    first = host_a.ingest_path(FoundCheckpoint("tiny", "1", tiny_checkpoint))
    assert run_until_done(host_a, first).status == "done"
    host_b = Daemon(config_b, watch=False, schedule=False)
    host_b.start()  # plans edge for version 1 and makes it ready again
    try:
        assert run_until_done(host_b, first).status == "done"
        import torch
        from safetensors.torch import save_file

        from helpers import tiny_mlp

        torch.manual_seed(1)
        (tmp_path / "v2").mkdir()
        save_file(tiny_mlp().state_dict(), str(tmp_path / "v2" / "model.safetensors"))
        second = host_a.ingest_path(FoundCheckpoint("tiny", "2", tmp_path / "v2"))
        assert run_until_done(host_a, second).status == "done"  # host A knows nothing of edge
        host_b.inbox.put(("rescan", None))
        host_b.run_once(0.05)
        assert run_until_done(host_b, second).status == "done"
    finally:
        host_b.stop(5)
        host_a.stop(5)
    with host_b.store.session() as session:
        served = {(p.target, p.variant.checkpoint.version) for p in queries.current_promotions(session)}
        variants = {(v.target, v.checkpoint.version) for v in queries.variants_of_model(session, "tiny")}
    assert {("cpu", "2"), ("edge", "2")} <= served, served
    assert {("edge", "1"), ("edge", "2")} <= variants
    assert (kiln_dir / "promoted" / "tiny" / "edge").is_symlink()


def test_the_catalogue_and_links_hold_when_the_shared_folder_is_mounted_elsewhere(tmp_path, tiny_checkpoint):
    """Paths in the catalogue are relative to the artifacts folder and promoted links are
    relative: the whole folder moved (another host's mount point) still resolves."""
    import shutil

    from sqlalchemy import text

    from helpers import optimize_once
    from modelkiln.config import load_config, write_default_config
    from modelkiln.daemon.service import Daemon
    from modelkiln.store import queries, views
    from modelkiln.store.db import open_store

    here = tmp_path / "host-a" / "shared"
    here.mkdir(parents=True)
    write_default_config(here, fast_config_text())
    text_ = (here / "kiln.toml").read_text().replace('address = "127.0.0.1:9464"', 'address = ""')
    text_ = re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["baseline"]', text_)
    (here / "kiln.toml").write_text(text_)
    assert optimize_once(load_config(here / "kiln.toml"), tiny_checkpoint, "tiny").status == "done"
    link = here / "promoted" / "tiny" / "cpu"
    assert not os.path.isabs(os.readlink(link))

    there = tmp_path / "host-b" / "mnt" / "kiln"
    there.parent.mkdir(parents=True)
    shutil.move(str(here), str(there))
    config = load_config(there / "kiln.toml")
    store = open_store(config)
    with store.session() as session:
        stored = session.execute(text("SELECT artifact_path FROM variants")).scalars().all()
        variants = [views.variant_dict(v) for v in queries.variants_of_model(session, "tiny")]
        (served,) = queries.current_promotions(session)
        snapshot = queries.checkpoint(session, served.checkpoint_id).snapshot_path
    store.dispose()
    assert stored and not any(os.path.isabs(path) for path in stored), stored
    assert all(v["path"].startswith(str(there / "artifacts")) and (Path(v["path"]) / "variant.json").is_file()
               for v in variants)
    assert Path(snapshot).is_dir() and snapshot.startswith(str(there))
    moved = there / "promoted" / "tiny" / "cpu"
    assert str(moved.resolve()) == served.variant.artifact_path
    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()  # nothing to fix: the links already point at the right folders
    try:
        with daemon.store.session() as session:
            assert daemon.promoter.sync_links(session) == 0
    finally:
        daemon.stop(5)


def test_a_host_defining_a_shared_target_otherwise_is_refused_with_what_differs(kiln_dir):
    """The catalogue records each host's target table; a daemon whose `cpu` differs from a
    live peer's is refused, naming the peer and the keys; a peer gone quiet binds nobody."""
    from datetime import timedelta

    from modelkiln.daemon.service import Daemon
    from modelkiln.errors import ConfigError
    from modelkiln.store import units
    from modelkiln.store.models import Host

    config = load_config(kiln_dir / "kiln.toml")
    store = open_store(config)
    with store.session() as session:
        first = Daemon(config, watch=False, schedule=False, preload=False)
        first.start()
        first.stop(5)
        (recorded,) = session.query(Host).all()
        ours = dict(recorded.targets["cpu"])
        session.add(Host(name="gpu-host-7", targets={"cpu": {**ours, "threads": 8, "batch_sizes": [1]}},
                         seen_at=units.database_now(session)))
        session.commit()
    with pytest.raises(ConfigError, match=r"targets.cpu is defined otherwise by host gpu-host-7.*"
                                          r"batch_sizes = \[1, 4\] here, \[1\] there; threads = 2 here, 8 there"):
        Daemon(config, watch=False, schedule=False, preload=False).start()
    with store.session() as session:  # the peer stopped long ago: no longer binding
        peer = session.query(Host).filter_by(name="gpu-host-7").one()
        peer.seen_at -= timedelta(hours=2)
        session.commit()
    later = Daemon(config, watch=False, schedule=False, preload=False)
    later.start()
    later.stop(5)
    # A live peer of an older version, whose table lacks a key this version added, is
    # alike where that key has its default.
    with store.session() as session:
        older = {key: value for key, value in ours.items() if key != "concurrency"}
        session.add(Host(name="older-host", targets={"cpu": older}, seen_at=units.database_now(session)))
        session.commit()
    alike = Daemon(config, watch=False, schedule=False, preload=False)
    alike.start()
    alike.stop(5)
    with store.session() as session:
        session.query(Host).filter_by(name="older-host").one().seen_at -= timedelta(hours=2)
        session.commit()
    # Two daemons of one machine with different config files are two hosts to each other.
    other = kiln_dir / "other.toml"
    other.write_text((kiln_dir / "kiln.toml").read_text().replace("threads = 2", "threads = 1", 1))
    with pytest.raises(ConfigError, match=r"defined otherwise by host .*:.*kiln.toml \(machine:config\).*"
                                          r"threads = 1 here, 2 there"):
        Daemon(load_config(other), watch=False, schedule=False, preload=False).start()
    store.dispose()
