"""The Celery task: a thin adapter from a broker message to a job run (``worker.runner.run_job``
in a job process).

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
from shared.workers import is_draining
from worker.runner import WorkerContext


def register_tasks(app: Celery, ctx: WorkerContext, run: Callable[[str], str]) -> None:
    """Register ``mnistq.train`` on ``app``: ``run(job_id)`` runs the job (in a job process
    of its own, ``worker.job_process``) and says how it ended."""

    @app.task(name=TRAIN_TASK, ignore_result=True, acks_late=True)
    def train(job_id: str) -> str:
        """Run the best queued job of ``job_id``'s queue, if any is still queued."""
        if is_draining(ctx.session_factory, ctx.worker_id):
            # Back to the broker for another worker: this one takes nothing new.
            raise Reject("this worker is draining", requeue=True)
        return run(job_id)


def make_context(settings: Settings, app: Celery, worker_id: str | None = None) -> WorkerContext:
    """The context of a worker process publishing through ``app``."""
    return WorkerContext(settings, functools.partial(publish_train, app), worker_id=worker_id)
