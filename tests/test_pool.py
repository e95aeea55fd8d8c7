"""A job process's warm-up gate: its job is claimed only once the warm-up is over, and its
arrival cuts the warm-up short; and children forked while threads use SQLite."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.db import SQLITE_CONNECTIONS, make_engine
from worker.pool import BlockingPool, wait_until_warm, warm_up_in_background


def test_a_task_waits_for_the_warm_up_to_end() -> None:
    release = threading.Event()

    def slow(_job_waiting: Callable[[], bool]) -> None:
        release.wait(10)

    warm_up_in_background(slow)
    assert not wait_until_warm(0.05)  # still warming: a task would wait here
    release.set()
    assert wait_until_warm(5)


def test_a_failed_warm_up_is_logged_and_lets_the_task_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(_job_waiting: Callable[[], bool]) -> None:
        raise OSError("no MNIST here")

    warm_up_in_background(broken)
    assert wait_until_warm(5)
    assert "warming up this job process failed" in caplog.text


def test_a_waiting_task_cuts_the_warm_up_short(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.pool")
    seen: list[bool] = []
    stopped = threading.Event()

    def optional_work(job_waiting: Callable[[], bool]) -> None:
        seen.append(job_waiting())
        deadline = time.monotonic() + 10
        while not job_waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        if job_waiting():
            stopped.set()

    warm_up_in_background(optional_work)
    time.sleep(0.1)
    started = time.monotonic()
    assert wait_until_warm(5)
    assert time.monotonic() - started < 2  # not the 10 s the work would have taken
    assert seen == [False] and stopped.is_set()
    assert "its job arrived after" in caplog.text


def test_a_warm_up_with_no_task_waiting_runs_to_its_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.pool")
    done = threading.Event()

    def work(job_waiting: Callable[[], bool]) -> None:
        time.sleep(0.05)
        if not job_waiting():
            done.set()

    warm_up_in_background(work)
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while "warmed up in" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)  # no task yet: asking now would cut it short
    assert "warmed up in" in caplog.text
    assert wait_until_warm(5)


def _insert_one(path: str) -> int:
    """In a pool child: one write through a fresh engine of its own; its pid."""
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO t (x) VALUES (1)"))
    finally:
        engine.dispose()
    return os.getpid()


def test_children_forked_while_threads_write_to_sqlite_all_write_too(tmp_path: Path) -> None:
    path = tmp_path / "forks.db"
    before = SQLITE_CONNECTIONS.count
    engine = make_engine(f"sqlite:///{path}", fork_safe=True)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    stop = threading.Event()

    def write_until_stopped() -> None:  # the registry and the reaper of a worker, say
        while not stop.is_set():
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO t (x) VALUES (0)"))

    writers = [threading.Thread(target=write_until_stopped) for _ in range(2)]
    for writer in writers:
        writer.start()
    # The embedded worker's pool: a fresh child for every task, forked from a pool thread.
    pool = BlockingPool(processes=2, maxtasksperchild=1)
    try:
        results = [pool.apply_async(_insert_one, (str(path),)) for _ in range(24)]
        pids = {result.get(timeout=60) for result in results}
    finally:
        stop.set()
        for writer in writers:
            writer.join()
        pool.terminate()
    assert len(pids) == 24
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM t WHERE x = 1")).scalar() == 24
    assert SQLITE_CONNECTIONS.count == before  # none stays open between uses


def test_a_fork_waits_for_open_sqlite_connections_and_holds_new_ones_back(
    tmp_path: Path,
) -> None:
    before = SQLITE_CONNECTIONS.count
    engine = make_engine(f"sqlite:///{tmp_path / 'gate.db'}", fork_safe=True)
    held = engine.connect()
    held.execute(text("SELECT 1"))
    gate_closed, fork_over = threading.Event(), threading.Event()

    def fork() -> None:
        with SQLITE_CONNECTIONS.none_open():
            gate_closed.set()
            time.sleep(0.3)
        fork_over.set()

    forker = threading.Thread(target=fork)
    forker.start()
    assert not gate_closed.wait(0.3)  # a connection is open: no fork yet
    held.close()
    assert gate_closed.wait(5)
    with engine.connect() as connection:  # waits for the fork to be over
        assert fork_over.is_set()
        connection.execute(text("SELECT 1"))
    forker.join()
    assert SQLITE_CONNECTIONS.count == before
