"""Periodic duties that every worker's main process runs, so none needs a process of its own.

A duty is one pass of something correctness depends on: the reaper (requeue jobs whose
worker died, re-publish lost messages), the sweep controller and webhook delivery, as
registered in ``LANES``. Any number of processes run the same duties at once; each duty
guards the rows it acts on with a compare-and-set or a lease, so a second runner is
harmless and a dead one is not missed. Each lane is a thread of its own: a duty that waits
on the outside world (a webhook receiver that takes its time) never holds up the reaper.
The loop runs in the Celery prefork parent and in `mnistq up`: it must never import torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from worker.reaper import reap_once
from worker.sweeper import control_sweeps
from worker.webhooks import deliver_webhooks

logger = logging.getLogger(__name__)

Publish = Callable[[str, str], None]
Duty = Callable[[Settings, sessionmaker[Session], Publish], None]


def reap(settings: Settings, factory: sessionmaker[Session], publish: Publish) -> None:
    """The reaper's pass: expired leases requeued or ended, lost messages re-published."""
    reap_once(settings, factory, publish)


# Each lane runs its duties in order every pass; a failing duty never stops the others. The
# reaper goes first: a sweep's controller then counts trials whose worker died as queued
# again. Webhook posts wait on other people's servers, so they have a lane to themselves.
LANES: tuple[tuple[Duty, ...], ...] = ((reap, control_sweeps), (deliver_webhooks,))


def run_pass(
    settings: Settings, factory: sessionmaker[Session], publish: Publish, duties: Sequence[Duty]
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
    """One daemon thread per lane, each running its duties every ``reaper_interval_seconds``
    until stopped."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        publish: Publish,
        lanes: Sequence[Sequence[Duty]] = LANES,
    ) -> None:
        self.settings, self.factory, self.publish, self.lanes = settings, factory, publish, lanes
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> MaintenanceLoop:
        """Start the threads (once)."""
        if not self._threads:
            self._stop.clear()
            self._threads = [
                threading.Thread(
                    target=self._run,
                    args=(lane,),
                    name=f"maintenance-{lane[0].__name__}",
                    daemon=True,
                )
                for lane in self.lanes
            ]
            for thread in self._threads:
                thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        """Ask the threads to stop after their current pass and wait for them."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = []

    def _run(self, duties: Sequence[Duty]) -> None:
        while not self._stop.is_set():
            run_pass(self.settings, self.factory, self.publish, duties)
            self._stop.wait(self.settings.reaper_interval_seconds)
