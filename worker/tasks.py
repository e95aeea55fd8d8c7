"""The Celery task: a thin adapter from a broker message to a job run (claimed by the pool
child, trained in a job process: ``worker.celery_main``).

A message only says "there is work on this queue": the task claims the best queued job of
that queue, which may not be the one the message names. It never raises for Celery to
retry; the job row says how the run ended.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from celery import Celery
from celery.exceptions import Reject

from shared.celery_app import TRAIN_TASK, publish_train
from shared.config import Settings
from worker.runner import Draining, WorkerContext


def register_tasks(app: Celery, ctx: WorkerContext, run: Callable[[str], str]) -> None:
    """Register ``mnistq.train`` on ``app``: ``run(job_id)`` claims and runs the best queued
    job of that job's queue (in a job process of its own, ``worker.job_process``) and says
    how it ended, or raises ``Draining`` (the message goes back to the broker)."""

    @app.task(name=TRAIN_TASK, ignore_result=True, acks_late=True)
    def train(job_id: str) -> str:
        """Run the best queued job of ``job_id``'s queue, if any is still queued."""
        try:
            return run(job_id)
        except Draining:
            # Back to the broker for another worker: this one takes nothing new.
            raise Reject("this worker is draining", requeue=True) from None


def make_context(settings: Settings, app: Celery, worker_id: str | None = None) -> WorkerContext:
    """The context of a worker process publishing through ``app``."""
    return WorkerContext(settings, functools.partial(publish_train, app), worker_id=worker_id)
