"""The Celery task: a thin adapter from a broker message to ``worker.runner.run_job``.

A message only says "there is work on this queue": the task claims the best queued job of
that queue, which may not be the one the message names. It never raises for Celery to
retry; the job row says how the run ended.
"""

from __future__ import annotations

import functools

from celery import Celery
from celery.exceptions import Reject

from shared.celery_app import TRAIN_TASK, publish_train
from shared.config import Settings
from shared.workers import is_draining
from worker.pool import wait_until_warm
from worker.runner import WorkerContext, run_job


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Register ``mnistq.train`` on ``app``, bound to ``ctx``."""

    @app.task(name=TRAIN_TASK, ignore_result=True, acks_late=True)
    def train(job_id: str) -> str:
        """Run the best queued job of ``job_id``'s queue, if any is still queued."""
        if is_draining(ctx.session_factory, ctx.worker_id):
            # Back to the broker for another worker: this one takes nothing new.
            raise Reject("this worker is draining", requeue=True)
        # A child that took the message while still warming up claims once it is ready,
        # so the job's clock starts with torch, MNIST and the kernels in place.
        wait_until_warm()
        return str(run_job(ctx, job_id))


def make_context(settings: Settings, app: Celery, worker_id: str | None = None) -> WorkerContext:
    """The context of a worker process publishing through ``app``."""
    return WorkerContext(settings, functools.partial(publish_train, app), worker_id=worker_id)
