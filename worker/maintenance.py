"""Periodic duties that every worker's main process runs, so none needs a process of its own.

A duty is one pass of something correctness depends on: the reaper (requeue jobs whose
worker died, re-publish lost messages), and whatever else is registered in ``DUTIES``. Any
number of processes run the same duties at once; each duty guards the rows it acts on with
a compare-and-set or a lease, so a second runner is harmless and a dead one is not missed.
The loop runs in the Celery prefork parent and in `mnistq up`: it must never import torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from worker.reaper import reap_once

logger = logging.getLogger(__name__)

Publish = Callable[[str, str], None]
Duty = Callable[[Settings, sessionmaker[Session], Publish], None]


def reap(settings: Settings, factory: sessionmaker[Session], publish: Publish) -> None:
    """The reaper's pass: expired leases requeued or ended, lost messages re-published."""
    reap_once(settings, factory, publish)


# Every pass runs these in order; a failing duty never stops the others.
DUTIES: tuple[Duty, ...] = (reap,)


def run_pass(
    settings: Settings,
    factory: sessionmaker[Session],
    publish: Publish,
    duties: Sequence[Duty] = DUTIES,
) -> None:
    """Run each duty once; log what fails and go on (the next pass tries again)."""
    for duty in duties:
        try:
            duty(settings, factory, publish)
        except DBAPIError:
            name = duty.__name__
            logger.warning("%s: database unavailable, trying next pass", name, exc_info=True)
        except Exception:
            logger.exception("%s failed, trying next pass", duty.__name__)


class MaintenanceLoop:
    """A daemon thread that runs every duty each ``reaper_interval_seconds`` until stopped."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        publish: Publish,
        duties: Sequence[Duty] = DUTIES,
    ) -> None:
        self.settings, self.factory, self.publish, self.duties = settings, factory, publish, duties
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MaintenanceLoop:
        """Start the thread (once)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        """Ask the thread to stop after its current pass and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            run_pass(self.settings, self.factory, self.publish, self.duties)
            self._stop.wait(self.settings.reaper_interval_seconds)
