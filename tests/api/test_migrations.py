"""The migrations build exactly the tables the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from shared.db import make_engine
from shared.migrate import upgrade
from shared.models import Base


def _schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_on_fresh_sqlite_matches_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    assert _tables(url) >= set(Base.metadata.tables)  # every model's table, the newest too
    assert _schema_diff(url) == []


def test_upgrade_twice_is_a_no_op(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    upgrade(url)
    upgrade(url)
    assert _schema_diff(url) == []


def test_upgrade_on_fresh_postgresql_matches_models(
    postgres_database: Callable[[], str],
) -> None:
    url = postgres_database()
    upgrade(url)
    assert _tables(url) >= set(Base.metadata.tables)  # every model's table, the newest too
    assert _schema_diff(url) == []


def test_upgrading_a_database_with_jobs_keeps_every_row(tmp_path: Path) -> None:
    """0002 adds job.owner_id without rebuilding job, which would cascade-delete children."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO job (id, status, hyperparameters, device_requested, queue, "
                    "priority, attempt, cancel_requested, epoch, n_epochs, step, "
                    "steps_per_epoch, samples_seen, total_samples, created_at) VALUES "
                    "('j1', 'succeeded', '{}', 'cpu', 'cpu', 0, 0, 0, 1, 1, 1, 1, 1, 1, "
                    "'2026-01-01')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO metric (job_id, kind, epoch, step, samples_seen, loss, seconds)"
                    " VALUES ('j1', 'test', 1, 1, 1, 0.5, 1.0)"
                )
            )
        upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM metric")).scalar() == 1
            owner = conn.execute(text("SELECT owner_id FROM job WHERE id = 'j1'")).scalar()
            assert owner is None
    finally:
        engine.dispose()
