"""Fixtures of the sweep controller tests: a migrated SQLite database, the broker recorded."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory
from shared.migrate import upgrade
from tests.api.conftest import RecordingPublisher


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per session; each test gets a copy."""
    path = tmp_path_factory.mktemp("sweeps-template") / "mnistq.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def factory(tmp_path: Path, migrated_template: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a fresh migrated database."""
    path = tmp_path / "mnistq.db"
    shutil.copyfile(migrated_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def publisher() -> RecordingPublisher:
    """The recorded broker."""
    return RecordingPublisher()
