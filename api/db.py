"""The database engine of the app and one session per request, closed at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, current_app, g, has_request_context, request
from sqlalchemy import Connection, Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory

ENGINE_KEY = "mnistq.engine"
SESSIONS_KEY = "mnistq.sessions"
READS_KEY = "mnistq.reads"
READ_METHODS = frozenset({"GET", "HEAD"})
CONNECT_TIMEOUT_SECONDS = 5


def _engine_options(database_url: str, pool_size: int) -> dict[str, Any]:
    if make_url(database_url).get_backend_name() != "postgresql":
        return {}
    return {
        # A database that does not answer should cost a request seconds, not minutes.
        "connect_args": {"connect_timeout": CONNECT_TIMEOUT_SECONDS},
        # Every request a gevent worker serves at once holds a connection. Past the pool's
        # size a burst opens connections (a server process each) and closes them when it
        # is over; SQLAlchemy's 5 kept are fewer than 16 clients on 2 workers use.
        "pool_size": pool_size,
        "max_overflow": pool_size,
        # A connection back from a request a moment ago is used without a ping's round trip.
        "ping_idle_only": True,
    }


def init_app(app: Flask, database_url: str, pool_size: int) -> None:
    """Give ``app`` an engine (``pool_size`` kept PostgreSQL connections) and a session factory
    and close sessions after each request."""
    engine = make_engine(database_url, **_engine_options(database_url, pool_size))
    app.extensions[ENGINE_KEY] = engine
    app.extensions[SESSIONS_KEY] = make_session_factory(engine)
    # Reads run without a transaction: no BEGIN before them and no ROLLBACK after, two of a
    # GET's round trips. Each statement sees the latest commit, which is all a read needs.
    app.extensions[READS_KEY] = engine.execution_options(isolation_level="AUTOCOMMIT")
    app.teardown_appcontext(close_session)


def get_engine() -> Engine:
    """The current app's engine."""
    engine: Engine = current_app.extensions[ENGINE_KEY]
    return engine


@contextmanager
def read_connection() -> Iterator[Connection]:
    """A connection for a few reads without the ORM: the request session's if it has one
    (a request holds one connection at a time), else a pooled one, without a transaction,
    for the block."""
    if "db_session" in g:
        yield g.db_session.connection()
        return
    with current_app.extensions[READS_KEY].connect() as connection:
        yield connection


def session_factory() -> sessionmaker[Session]:
    """The current app's session factory, for work in transactions of its own."""
    factory: sessionmaker[Session] = current_app.extensions[SESSIONS_KEY]
    return factory


def get_session() -> Session:
    """The session of the current request, opened on first use."""
    if "db_session" not in g:
        factory = session_factory()
        reads = has_request_context() and request.method in READ_METHODS
        g.db_session = factory(bind=current_app.extensions[READS_KEY]) if reads else factory()
    session: Session = g.db_session
    return session


def close_session(_exc: BaseException | None = None) -> None:
    """Close the request's session; anything not committed is rolled back."""
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        session.close()
