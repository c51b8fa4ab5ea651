"""The catalogue on a real PostgreSQL server (``postgres.py``): the schema and its
migrations, portable queries, 64-bit byte counts, migrations raced by several hosts, the
database's clock for leases, passwords kept out of messages, and daemons sharing it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from helpers import use_store
from modelkiln.store import units
from modelkiln.store.db import current_revision, head_revision, make_engine, open_store, upgrade
from modelkiln.store.models import Base, Checkpoint, Job
from test_store import open_at_once


def test_migrations_build_the_models_schema_with_64_bit_byte_counts(postgres_url):
    engine = make_engine(postgres_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    columns = {(table, c["name"]): str(c["type"]) for table in ("checkpoints", "variants", "measurements")
               for c in inspect(engine).get_columns(table)}
    assert columns["checkpoints", "size_bytes"] == columns["variants", "size_bytes"] == "BIGINT"
    assert columns["measurements", "peak_memory_bytes"] == "BIGINT"
    engine.dispose()


def test_hosts_migrating_an_empty_database_at_once_all_succeed(postgres_url):
    outcomes = open_at_once(postgres_url)  # one migrates under the advisory lock, three wait
    assert all(isinstance(o, int) and o >= 6 for o in outcomes), outcomes


def test_a_checkpoint_over_2_gib_is_recorded_and_leases_follow_the_database_clock(kiln_dir, postgres_url):
    config = use_store(kiln_dir, postgres_url)
    store = open_store(config)
    size = 2_200_000_000  # over a 32-bit integer's range
    with store.session() as session:
        checkpoint = Checkpoint(model="big", version="1", registry_kind="directory", source_uri="/x",
                                content_hash="h" * 64, size_bytes=size, fingerprint="f", status="ingested",
                                snapshot_path="/x")
        session.add(checkpoint)
        session.flush()
        session.add(Job(key=f"inspect:{checkpoint.id}", kind="inspect", checkpoint_id=checkpoint.id, state="pending"))
        session.commit()
    with store.session() as session:
        assert session.scalar(select(Checkpoint.size_bytes)) == size
        server_now = session.execute(text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar_one()
        (job,) = units.lease_jobs(session, "host-a", ["cpu"], 5, 60.0)
        # Stamped by the server, whatever this host's clock says.
        assert abs((job.heartbeat_at - server_now).total_seconds()) < 5
        assert job.state == "running" and job.attempts == 1
        # A graceful stop hands it back without counting the attempt (a portable CASE).
        units.release_jobs(session, "host-a", [job.id], "stopping")
    with store.session() as session:
        job = session.get(Job, job.id)
        assert (job.state, job.attempts, job.lease_owner) == ("pending", 0, None)
    store.dispose()


def test_the_database_password_is_never_printed(kiln_dir, postgres_server):
    url = postgres_server.new_database().replace("postgresql+psycopg://kiln@", "postgresql+psycopg://kiln:s3cret@")
    config = use_store(kiln_dir, url)
    assert config.store_shown == url.replace(":s3cret@", ":***@")
    done = subprocess.run([sys.executable, "-m", "modelkiln", "db", "upgrade", "--config", str(kiln_dir / "kiln.toml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout + done.stderr and ":***@" in done.stdout
    done = subprocess.run([sys.executable, "-m", "modelkiln", "variants", "nothing", "--config",
                           str(kiln_dir / "kiln.toml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "s3cret" not in done.stdout + done.stderr, done.stderr


@pytest.mark.slow
def test_two_daemons_on_one_postgresql_catalogue_run_each_job_once(kiln_dir, postgres_url, digits_checkpoint,
                                                                   tiny_checkpoint):
    from helpers import place
    from modelkiln.store import queries
    from modelkiln.store.models import Promotion
    from test_e2e import serve, wait_for

    config = use_store(kiln_dir, postgres_url)
    first, second = serve(kiln_dir), serve(kiln_dir)
    try:
        wait_for(lambda: (kiln_dir / "serve.log").read_bytes().count(b"started:") == 2, 90, "both daemons", first)
        place(digits_checkpoint, kiln_dir / "models", "digits", "1")
        place(tiny_checkpoint, kiln_dir / "models", "tiny", "1")
        check = open_store(config)

        def all_done():
            with check.session() as session:
                return [c.status for c in queries.checkpoints(session)] == ["done", "done"]
        wait_for(all_done, 240, "both checkpoints done", second)
        check.dispose()
    finally:
        for daemon in (first, second):
            daemon.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0 and second.wait(30) == 0
    store = open_store(config)
    with store.session() as session:
        jobs = list(session.scalars(select(Job)))
        promotions = list(session.scalars(select(Promotion)))
        checkpoints = set(session.scalars(select(Checkpoint.id)))
    store.dispose()
    assert len(jobs) == 2 * (1 + 4) and all(j.state == "succeeded" and j.attempts == 1 for j in jobs)
    steps = [p.decision_key for p in promotions]
    # (PostgreSQL's sequences skip the ids of inserts that lost a race: no ids assumed.)
    assert len(steps) == len(set(steps)) and {p.checkpoint_id for p in promotions} == checkpoints
    assert len(checkpoints) == 2 and {j.lease_owner for j in jobs} == {None}
    for model in ("digits", "tiny"):
        assert (kiln_dir / "promoted" / model / "cpu").is_symlink()


@pytest.mark.slow
def test_sigkill_of_either_of_two_daemons_on_postgresql_loses_nothing_and_promotes_once(tmp_path, postgres_url):
    from chaos import run_campaign

    result = run_campaign(tmp_path, 3, store_url=postgres_url, daemons=2)
    assert result["problems"] == [], result
    assert len(result["kills_at_s"]) == 3 and result["reader_looks"] > 100

