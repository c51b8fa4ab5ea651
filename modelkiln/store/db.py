"""Engine set-up and schema revisions.

SQLite is opened in WAL mode with a busy timeout and foreign keys on, so the daemon,
its CLI readers and a second daemon can share the file. The schema is owned by the
Alembic migrations shipped in ``modelkiln/migrations``: an empty database is upgraded
automatically, an older one only by ``kiln db upgrade`` (the daemon refuses it), and a
newer one is refused by everything.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StoreError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# What a write raises while the database is locked past its busy timeout or unreachable:
# a moment's trouble, worth retrying soon (the rest of the code never names SQLAlchemy).
DatabaseBusy = OperationalError


def make_engine(url: str, busy_timeout_ms: int = 30000, transactional_ddl: bool = False) -> Engine:
    """``transactional_ddl``: for migrations. Python's sqlite3 only opens a transaction
    before INSERT/UPDATE/DELETE, so each CREATE TABLE would commit on its own and a
    process killed mid-migration would leave half a schema. This engine turns the
    driver's own handling off and begins every transaction itself (SQLAlchemy's recipe
    for pysqlite), so a migration is one transaction: all of it or none of it."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            # WAL + NORMAL is durable across process crashes (only an OS crash can
            # lose the last transactions), at a fraction of FULL's fsyncs.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
            if transactional_ddl:
                dbapi_connection.isolation_level = None

        if transactional_ddl:
            @event.listens_for(engine, "begin")
            def _begin(connection):
                connection.exec_driver_sql("BEGIN IMMEDIATE")  # the writer's lock up front

        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(engine: Engine):
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg = alembic_config(create_engine("sqlite://"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None  # the package ships its migrations: there is always a head
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    if engine.url.get_backend_name() == "sqlite":
        # Its own engine: the driver settings differ (see make_engine); migrators are
        # serialised by _migration_lock, so the default busy timeout is plenty.
        migrator = make_engine(engine.url.render_as_string(hide_password=False), transactional_ddl=True)
        try:
            command.upgrade(alembic_config(migrator), revision)
        finally:
            migrator.dispose()
        return
    command.upgrade(alembic_config(engine), revision)


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(create_engine("sqlite://")))
    return {rev.revision for rev in script.walk_revisions()}


# pg_advisory_lock's key for schema checks and upgrades: any constant no other code uses.
_MIGRATION_LOCK_KEY = 0x6B696C6E6D696772  # "kilnmigr"


@contextmanager
def _migration_lock(engine: Engine):
    """Serialise schema checks and upgrades between processes sharing a database.

    Whoever finds the revision is not head takes this lock and looks again; the migrator
    holds it until it is done. A SQLite file: a lock file beside it (SQLite DDL is not
    transactional through pysqlite, so a process that looked while another migrated would
    see half a schema). PostgreSQL: a session-level advisory lock (its DDL is
    transactional, but two hosts creating the same tables at once would both try, and
    one fail on a unique violation).
    """
    if engine.url.get_backend_name() == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        return
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_schema(engine: Engine, *, allow_upgrade: bool, config_hint: str = "") -> None:
    """Bring an empty database to head; refuse an old one unless ``allow_upgrade``."""
    head = head_revision()
    if current_revision(engine) == head:
        return
    with _migration_lock(engine):
        _ensure_schema_locked(engine, head, allow_upgrade, config_hint)


def _ensure_schema_locked(engine: Engine, head: str, allow_upgrade: bool, config_hint: str) -> None:
    current = current_revision(engine)
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        tables = set(inspect(engine).get_table_names())
        if tables:
            raise StoreError(
                f"{where}: the database has tables ({', '.join(sorted(tables))}) but no "
                "modelkiln schema revision; point store.url at a new file or a modelkiln database"
            )
        upgrade(engine)
        return
    if current not in _known_revisions():
        raise StoreError(
            f"{where}: the database is at schema revision {current}, written by a newer "
            "modelkiln; upgrade modelkiln on this host (the database is left untouched)"
        )
    if not allow_upgrade:
        raise StoreError(
            f"{where}: the database is at schema revision {current}, this modelkiln needs "
            f"{head}. Back up the database file, then run `kiln db upgrade{config_hint}`."
        )
    upgrade(engine)


class Store:
    """The engine plus a session factory; the only object the rest of the code holds."""

    def __init__(self, url: str, busy_timeout_ms: int = 30000):
        self.engine = make_engine(url, busy_timeout_ms)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # A SQLite file's identity when opened: deleted or replaced under a running daemon,
        # its connections go on writing to the unlinked inode and nobody else sees it.
        self._path = self.engine.url.database if url.startswith("sqlite") else None
        self._identity = None

    def remember_file(self) -> None:
        """Note which file the path names now (after the first connection created it)."""
        self._identity = self._file_identity()

    def _file_identity(self):
        if not self._path or self._path == ":memory:":
            return None
        try:
            stat = Path(self._path).stat()
        except OSError:
            return None
        return (stat.st_dev, stat.st_ino)

    def file_problem(self) -> str | None:
        """Why the SQLite file this store opened is no longer the one at its path, or None."""
        if self._identity is None:
            return None
        now = self._file_identity()
        if now is None:
            return f"{self._path} was deleted while the daemon had it open; restart the daemon"
        if now != self._identity:
            return f"{self._path} was replaced while the daemon had it open; restart the daemon"
        return None

    def session(self) -> Session:
        return self._sessions()

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(config, *, allow_upgrade: bool = False) -> Store:
    store = Store(config.store_url, config.store.busy_timeout_ms)
    # Paths under the artifacts folder are stored relative to it (models.StoredPath).
    # An attribute of our own on SQLAlchemy's dialect: StoredPath reads it where it binds.
    store.engine.dialect.kiln_artifacts_root = str(config.artifacts_path)  # type: ignore[attr-defined]
    hint = f" --config {config.source}" if config.source else ""
    try:
        ensure_schema(store.engine, allow_upgrade=allow_upgrade, config_hint=hint)
    except OperationalError as exc:
        store.dispose()
        cause = str(exc.orig if exc.orig is not None else exc).strip().splitlines()[0]
        raise StoreError(f"{config.store_shown}: cannot open the database ({cause}); check store.url in "
                         f"{config.source or 'the config'} and that the database server runs and accepts it") from None
    store.remember_file()
    return store
