"""A running job's store calls wait out an outage: ``worker.runner.patiently``.

The whole path (a real SeaweedFS stopped under a training job) is in
tests/integration/test_scale_out.py; these pin the waiting itself.
"""

from __future__ import annotations

import threading
import time

import pytest

from shared.config import Settings
from shared.store import StoreUnavailable
from worker import runner
from worker.runner import StopFlags, patiently


class Store:
    """Answers after ``failures`` refusals (never, if None), counting the calls."""

    def __init__(self, failures: int | None) -> None:
        self.failures, self.calls = failures, 0

    def put(self) -> str:
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise StoreUnavailable("artifact store unreachable: connection refused")
        return "stored"


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STORE_RETRY_FIRST_SECONDS", 0.01)


def test_a_store_back_within_the_wait_answers_the_same_call() -> None:
    store = Store(failures=3)
    settings = Settings(store_wait_seconds=30)
    assert patiently(settings, StopFlags(), "j", "upload of model.pth", store.put) == "stored"
    assert store.calls == 4


def test_a_store_away_longer_than_the_wait_raises() -> None:
    store = Store(failures=None)
    with pytest.raises(StoreUnavailable):
        patiently(Settings(store_wait_seconds=0.2), StopFlags(), "j", "upload", store.put)
    assert store.calls >= 2


def test_no_wait_at_all_when_the_setting_is_zero() -> None:
    store = Store(failures=None)
    with pytest.raises(StoreUnavailable):
        patiently(Settings(store_wait_seconds=0), StopFlags(), "j", "upload", store.put)
    assert store.calls == 1


def test_a_cancel_ends_the_wait_without_sleeping_it_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STORE_RETRY_FIRST_SECONDS", 60.0)
    flags, store = StopFlags(), Store(failures=None)
    threading.Timer(0.3, flags.cancel.set).start()
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        patiently(Settings(store_wait_seconds=600), flags, "j", "upload", store.put)
    assert time.monotonic() - start < 30  # woken by the cancel, not by the 60 s wait
    assert store.calls == 1
