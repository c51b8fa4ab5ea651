import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from modelkiln.errors import StoreError
from modelkiln.store.db import current_revision, head_revision, make_engine, open_store, upgrade
from modelkiln.store.models import Base


def test_models_and_migrations_describe_the_same_schema(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_sqlite_runs_in_wal_mode_with_foreign_keys(config):
    store = open_store(config)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == config.store.busy_timeout_ms


def test_an_empty_database_is_upgraded_automatically(config):
    store = open_store(config)
    assert current_revision(store.engine) == head_revision()


def test_an_older_database_is_refused_then_upgraded_with_data_intact(config):
    engine = make_engine(config.store_url)
    upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO checkpoints (model, version, registry, source_uri, content_hash, size_bytes, "
            "fingerprint, status, snapshot_path, created_at) VALUES "
            "('m', '1', 'directory', 'file:///x', 'abc', 1, 'f', 'done', '/x', '2026-01-01')"
        )
    engine.dispose()
    with pytest.raises(StoreError) as err:
        open_store(config)
    assert "kiln db upgrade" in str(err.value) and "0001" in str(err.value)
    store = open_store(config, allow_upgrade=True)
    assert current_revision(store.engine) == head_revision()
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT model FROM checkpoints").scalar() == "m"


def test_a_newer_database_is_refused_and_left_untouched(config):
    store = open_store(config)
    store.dispose()
    path = config.store_url.split("///", 1)[1]
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match="newer modelkiln"):
        open_store(config, allow_upgrade=True)
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == ("9999",)


def test_a_foreign_database_is_refused(config):
    path = config.store_url.split("///", 1)[1]
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE other (x)")
    with pytest.raises(StoreError, match="no modelkiln schema"):
        open_store(config)


def _open_and_count(url, results):
    from sqlalchemy import inspect as sa_inspect

    from modelkiln.store.db import Store, ensure_schema

    try:
        store = Store(url)
        ensure_schema(store.engine, allow_upgrade=False)
        results.put(len(sa_inspect(store.engine).get_table_names()))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put(repr(exc))


def open_at_once(url: str, processes: int = 4) -> list:
    """What each of several processes opening ``url`` at the same moment found: its table
    count, or the error it met."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    started = [context.Process(target=_open_and_count, args=(url, results)) for _ in range(processes)]
    for p in started:
        p.start()
    for p in started:
        p.join(60)
    return [results.get(timeout=5) for _ in started]


def test_processes_opening_a_new_database_at_once_all_succeed(config):
    outcomes = open_at_once(config.store_url)
    assert all(isinstance(o, int) and o >= 6 for o in outcomes), outcomes


KILL_MID_MIGRATION = """
import os, signal, sys
from alembic.operations import Operations
from modelkiln.config import load_config
from modelkiln.store.db import open_store

created = []
original = Operations.create_table
def create_table(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    created.append(args[0])
    if len(created) == 3:  # three tables written, two to go: the process dies here
        os.kill(os.getpid(), signal.SIGKILL)
    return result
Operations.create_table = create_table
open_store(load_config(sys.argv[1]))
"""


def test_a_process_killed_mid_migration_leaves_no_half_schema(config):
    """Found by the SIGKILL campaign: the first start, killed while creating the schema,
    left tables without a revision, and every restart refused the file."""
    import signal
    import subprocess
    import sys

    from sqlalchemy import inspect

    from modelkiln.store.db import current_revision, head_revision

    out = subprocess.run([sys.executable, "-c", KILL_MID_MIGRATION, str(config.source)], capture_output=True)
    assert out.returncode == -signal.SIGKILL, out.stderr.decode()[-2000:]
    store = open_store(config)  # the next start migrates from scratch
    try:
        assert current_revision(store.engine) == head_revision()
        assert {"checkpoints", "variants", "jobs", "promotions", "measurements"} <= set(
            inspect(store.engine).get_table_names())
    finally:
        store.dispose()
