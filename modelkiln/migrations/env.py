"""Alembic environment: runs against the engine modelkiln hands over, or the configured URL."""

from alembic import context
from sqlalchemy import create_engine

from modelkiln.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url", ""))
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things; batch mode copies the table instead.
            render_as_batch=True,
            # One transaction for the whole upgrade (store/db.py makes SQLite honour it):
            # a process killed mid-migration leaves the previous revision, not half a schema.
            transactional_ddl=True,
            compare_type=True,
        )
        context.run_migrations()


run_migrations_online()
