"""The pool child's warm-up gate: its task claims only once the warm-up is over, and its
arrival cuts the warm-up short."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from worker.pool import wait_until_warm, warm_up_in_background


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
    assert "warming up this pool child failed" in caplog.text


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
