"""Real services for integration tests: a redis-server of our own, fresh PostgreSQL databases."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory
from shared.migrate import upgrade
from shared.models import Artifact, Job, JobEvent, Metric, Sweep, Worker

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests (repeated fault trials) run only when asked for: ``pytest -m soak``."""
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on ``port``; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"nothing listens on port {port} after {timeout}s")


class RedisServer:
    """A redis-server process this test session owns, so tests may stop and restart it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) it on the same port, without persistence."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (scripts/services installs it)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port)

    def stop(self) -> None:
        """Stop it (SIGTERM, then wait)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free port for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def make_pg_database() -> Iterator[Callable[[], str]]:
    """Create fresh, migrated PostgreSQL databases with random names; drop them at the end."""
    created: list[str] = []

    def make() -> str:
        name = f"mnistq_test_{secrets.token_hex(6)}"
        try:
            _admin(f'CREATE DATABASE "{name}"')
        except psycopg.OperationalError as exc:
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {exc}")
        created.append(name)
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        upgrade(url)
        return url

    yield make
    for name in created:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(make_pg_database: Callable[[], str]) -> str:
    """The session's PostgreSQL database for worker-process tests."""
    return make_pg_database()


def clear_tables(factory: sessionmaker[Session]) -> None:
    """Delete every row, children first."""
    with factory() as session, session.begin():
        for table in (JobEvent, Metric, Artifact, Job, Sweep, Worker):
            session.execute(delete(table))


def engine_and_factory(url: str) -> tuple[Engine, sessionmaker[Session]]:
    """An engine and its session factory, as the processes build them."""
    engine = make_engine(url)
    return engine, make_session_factory(engine)


@pytest.fixture(scope="module")
def pg_module_url(make_pg_database: Callable[[], str]) -> str:
    """A database of the test module's own: queries over every row see only its rows."""
    return make_pg_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated, empty database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("pg_module_url")
    engine, session_factory = engine_and_factory(url)
    clear_tables(session_factory)
    yield session_factory
    engine.dispose()
