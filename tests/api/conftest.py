"""Fixtures of the API tests: an app on a migrated temporary database, the broker recorded."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from api.db import ENGINE_KEY, SESSIONS_KEY
from shared.artifacts import artifact_kind, describe
from shared.auth import create_user
from shared.celery_app import BrokerUnavailable
from shared.config import Settings
from shared.db import make_engine
from shared.migrate import upgrade
from shared.models import Artifact, Job, Metric
from shared.store import LocalStore

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class RecordingPublisher:
    """The broker seam: remembers (job_id, queue) calls, or fails as a down broker would."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    down: bool = False

    def __call__(self, job_id: str, queue: str) -> None:
        if self.down:
            raise BrokerUnavailable("Error 111 connecting to broker. Connection refused.")
        self.calls.append((job_id, queue))


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per session; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "mnistq.db"
    upgrade(f"sqlite:///{path}")
    return path


def sqlite_copy(tmp_path: Path, template: Path) -> str:
    """The URL of a copy of the migrated template in ``tmp_path``."""
    path = tmp_path / "mnistq.db"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def database_url(tmp_path: Path, migrated_sqlite: Path) -> str:
    """A fresh migrated SQLite database for one test."""
    return sqlite_copy(tmp_path, migrated_sqlite)


@pytest.fixture(scope="session")
def migrated_postgres(postgres_database: Callable[[], str]) -> str:
    """A PostgreSQL database migrated once per session; tests empty it before use."""
    url = postgres_database()
    upgrade(url)
    return url


def empty_tables(database_url: str) -> None:
    """Delete every row, keeping the schema."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            tables = "dashboard_session, artifact, metric, job, api_token, user_account, worker"
            conn.execute(text(f"TRUNCATE {tables}"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request: pytest.FixtureRequest, tmp_path: Path, migrated_sqlite: Path) -> str:
    """A fresh migrated database of each backend in turn."""
    if request.param == "sqlite":
        return sqlite_copy(tmp_path, migrated_sqlite)
    url: str = request.getfixturevalue("migrated_postgres")
    empty_tables(url)
    return url


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for a test: its own folders, the given database."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "var_dir": tmp_path / "var",
        "artifact_dir": tmp_path / "artifacts",
        "broker_url": "filesystem://",
        "page_size": 50,
    }
    return Settings(**(values | overrides))


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings of the test app."""
    return make_settings(tmp_path, database_url)


@pytest.fixture
def publisher() -> RecordingPublisher:
    """The recorded broker."""
    return RecordingPublisher()


@pytest.fixture
def app(settings: Settings, publisher: RecordingPublisher) -> Iterator[Flask]:
    """The API on the test database."""
    app = create_app(settings, publish=publisher)
    app.config["TESTING"] = True
    yield app
    app.extensions[ENGINE_KEY].dispose()


@pytest.fixture
def sessions(app: Flask) -> sessionmaker[Session]:
    """The app's session factory, for arranging rows directly."""
    factory: sessionmaker[Session] = app.extensions[SESSIONS_KEY]
    return factory


@dataclass(frozen=True)
class Caller:
    """A user of the test database with one live token."""

    id: int
    name: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header of this caller."""
        return {"Authorization": f"Bearer {self.token}"}


def add_user(sessions: sessionmaker[Session], name: str, *, admin: bool = False) -> Caller:
    """Create a user with a token, as `mnistq users create` does."""
    with sessions() as session:
        user, issued = create_user(session, name, admin=admin)
        return Caller(user.id, user.name, issued.secret)


def client_as(app: Flask, caller: Caller | None) -> FlaskClient:
    """A test client that sends ``caller``'s token with every request (none: no token)."""
    client = app.test_client()
    if caller is not None:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {caller.token}"
    return client


@pytest.fixture
def admin(sessions: sessionmaker[Session]) -> Caller:
    """An admin: sees every job, including those from before authentication."""
    return add_user(sessions, "root", admin=True)


@pytest.fixture
def alice(sessions: sessionmaker[Session]) -> Caller:
    """An ordinary user."""
    return add_user(sessions, "alice")


@pytest.fixture
def bob(sessions: sessionmaker[Session]) -> Caller:
    """Another ordinary user."""
    return add_user(sessions, "bob")


@pytest.fixture
def client(app: Flask, admin: Caller) -> FlaskClient:
    """A test client of the app, calling as the admin."""
    return client_as(app, admin)


@pytest.fixture
def anonymous(app: Flask) -> FlaskClient:
    """A test client that sends no token."""
    return client_as(app, None)


@pytest.fixture
def store(settings: Settings) -> LocalStore:
    """The artifact store the app serves from (the local folder of the embedded default)."""
    return LocalStore(settings.artifact_dir)


def insert_job(sessions: sessionmaker[Session], **values: Any) -> str:
    """Insert a job row as a worker would have left it; return its id."""
    row: dict[str, Any] = {"hyperparameters": {"n_epochs": 3, "model": "tutorial_cnn"}}
    job = Job(**(row | values))
    with sessions() as session, session.begin():
        session.add(job)
    return job.id


def insert_metrics(
    sessions: sessionmaker[Session], job_id: str, rows: list[dict[str, Any]]
) -> None:
    """Insert metric rows for ``job_id``."""
    with sessions() as session, session.begin():
        session.add_all(Metric(job_id=job_id, **row) for row in rows)


def add_artifact(
    sessions: sessionmaker[Session], store: LocalStore, job_id: str, name: str, data: bytes
) -> Artifact:
    """Upload an artifact file and record its row, as the worker does."""
    scratch = store.root.parent / "scratch" / job_id / name
    scratch.parent.mkdir(parents=True, exist_ok=True)
    scratch.write_bytes(data)
    size, sha = describe(scratch)
    store.put(job_id, name, scratch, sha256=sha)
    artifact = Artifact(job_id=job_id, name=name, kind=artifact_kind(name), size=size, sha256=sha)
    with sessions() as session, session.begin():
        session.add(artifact)
    return artifact


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh PostgreSQL databases with random names, all dropped at the end."""
    created: list[str] = []

    def create() -> str:
        name = f"mnistq_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    yield create
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
