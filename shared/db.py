"""The SQLAlchemy engine and session factory, built from settings, never at import time."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, NullPool

logger = logging.getLogger(__name__)

# How long a fork waits for this process's SQLite connections to close: they are open for
# one short transaction each.
FORK_WAIT_SECONDS = 30.0
# A pooled PostgreSQL connection idle this long is pinged before it is used again.
PING_AFTER_IDLE_SECONDS = 1.0


class SqliteConnections:
    """The open SQLite connections of fork-safe engines in this process, and a gate for fork.

    SQLite keeps per-process state for each open database file (its POSIX locks, the WAL
    index it maps) and mutexes around it. A child forked while the parent has a connection
    open inherits that state without the locks it stands for, or a mutex another thread
    held: its own new connection may then wait for ever. A process that forks (the worker
    forking pool children) therefore opens SQLite only through engines made with
    ``fork_safe=True``, which connect per use, and forks inside ``none_open()``.
    """

    def __init__(self) -> None:
        self._reset()
        # The gate's lock may have been held by another thread at the fork: start afresh.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._open = 0
        self._forking = False

    @property
    def count(self) -> int:
        """How many are open now."""
        return self._open

    def opening(self) -> None:
        """Count a connection about to open; waits while a fork is under way."""
        with self._changed:
            self._changed.wait_for(lambda: not self._forking)
            self._open += 1

    def closed(self) -> None:
        """Count a connection closed."""
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    @contextmanager
    def none_open(self, timeout: float = FORK_WAIT_SECONDS) -> Iterator[None]:
        """Wait until no connection is open and keep new ones waiting while this lasts; after
        ``timeout`` it goes ahead anyway, warning (a connection left open is a bug)."""
        with self._changed:
            self._forking = True
            if not self._changed.wait_for(lambda: self._open == 0, timeout):
                logger.warning("forking with %d SQLite connection(s) still open", self._open)
        try:
            yield
        finally:
            with self._changed:
                self._forking = False
                self._changed.notify_all()


SQLITE_CONNECTIONS = SqliteConnections()


class _CountedConnection(sqlite3.Connection):
    """A SQLite connection counted in ``SQLITE_CONNECTIONS`` from before it opens until it
    has closed (or been collected unclosed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._counted = False
        SQLITE_CONNECTIONS.opening()
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            SQLITE_CONNECTIONS.closed()
            raise
        self._counted = True

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._uncount()

    def __del__(self) -> None:  # collected unclosed: close (and uncount) it now
        with suppress(sqlite3.Error):
            self.close()

    def _uncount(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            SQLITE_CONNECTIONS.closed()


def make_engine(
    database_url: str, *, fork_safe: bool = False, ping_idle_only: bool = False, **kwargs: Any
) -> Engine:
    """An engine for ``database_url``; SQLite gets WAL and a busy timeout for API + worker,
    and with ``fork_safe`` a connection per use, counted in ``SQLITE_CONNECTIONS``. Pooled
    server connections are pinged before each use, or with ``ping_idle_only`` only after
    ``PING_AFTER_IDLE_SECONDS`` unused (the API's, whose requests are each a query or two)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        if not ping_idle_only:
            return create_engine(url, pool_pre_ping=True, **kwargs)
        engine = create_engine(url, **kwargs)
        _ping_after_idle(engine)
        return engine
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    connect_args: dict[str, Any] = {"timeout": 30}
    if fork_safe:
        kwargs["poolclass"] = NullPool  # closed when given back: none stays open idle
        connect_args["factory"] = _CountedConnection
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets the API read while a worker writes; foreign keys are off by default.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


def _ping_after_idle(engine: Engine) -> None:
    """Ping a pooled connection before use when it sat idle ``PING_AFTER_IDLE_SECONDS``.

    A server that restarted or a connection it dropped while idle is found by the ping and
    replaced before the caller sees it, as ``pool_pre_ping`` does; but a connection given
    back a moment ago is used at once, without the ping's round trip: on a busy API that
    round trip was a second query for every request. A connection that breaks while the
    pool is busy fails the one request that holds it (a 503), and SQLAlchemy then replaces
    every connection older than the failure.
    """

    @event.listens_for(engine, "checkin")
    def _given_back(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _taken(dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return  # new, or back a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            # The pool drops this connection and checks out another (a fresh one if need be).
            raise DisconnectionError(f"a pooled connection was dead: {exc}") from exc


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are returned as JSON)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One short unit of work: commit on success, roll back on error, always close."""
    with factory() as session, session.begin():
        yield session
