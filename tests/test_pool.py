"""The pool child's warm-up gate: its task claims only once the warm-up is over."""

from __future__ import annotations

import threading

import pytest

from worker.pool import wait_until_warm, warm_up_in_background


def test_a_task_waits_for_the_warm_up_to_end() -> None:
    release = threading.Event()

    def slow() -> None:
        release.wait(10)

    warm_up_in_background(slow)
    assert not wait_until_warm(0.05)  # still warming: a task would wait here
    release.set()
    assert wait_until_warm(5)


def test_a_failed_warm_up_is_logged_and_lets_the_task_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> None:
        raise OSError("no MNIST here")

    warm_up_in_background(broken)
    assert wait_until_warm(5)
    assert "warming up this pool child failed" in caplog.text
