"""Alembic environment: the database URL comes from the Config object, never os.environ."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import pool

from shared.db import make_engine
from shared.models import Base

config = context.config
target_metadata = Base.metadata


def _database_url() -> str:
    """The URL shared.migrate put on the Config, or sqlalchemy.url from an ini file."""
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: call shared.migrate.upgrade(database_url)")
    return str(url)


def _configure(**kwargs: Any) -> None:
    # Batch mode lets later revisions ALTER tables on SQLite, which has little ALTER TABLE.
    context.configure(target_metadata=target_metadata, render_as_batch=True, **kwargs)


def run_offline() -> None:
    """Emit SQL for the URL without connecting."""
    _configure(url=_database_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Connect and apply the migrations in one transaction."""
    engine = make_engine(_database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
