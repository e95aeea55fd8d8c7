"""The prefork pool the workers run: Celery's own, replacing a finished child promptly."""

from __future__ import annotations

from collections.abc import Callable

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool

# How often the pool makes sure it has all its children, at the longest.
MAINTAIN_SECONDS = 0.25


class PromptAsynPool(AsynPool):
    """AsynPool whose periodic pool maintenance runs every MAINTAIN_SECONDS, not 5 s."""

    @property
    def timers(self) -> dict[Callable[[], None], float]:
        # One job per child (--max-tasks-per-child 1) makes every job end in a child exit.
        # The exit is usually seen at once, but when it is not, the replacement waited for
        # the next 5 s maintenance and a job submitted to an idle worker waited with it.
        return {self.maintain_pool: MAINTAIN_SECONDS}


class JobPool(TaskPool):
    """``--pool worker.pool:JobPool``: prefork with prompt child replacement."""

    Pool = PromptAsynPool
