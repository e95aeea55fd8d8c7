"""The prefork pool the workers run: Celery's own, replacing a lost child promptly, and the
warm-up a job process does while it waits for its one job (see ``worker.job_process``)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import billiard.pool
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool

from shared.db import SQLITE_CONNECTIONS

logger = logging.getLogger(__name__)

# How often the pool makes sure it has all its children, at the longest.
MAINTAIN_SECONDS = 0.25
# A job waits at most this long for its process's warm-up, then runs cold.
WARM_UP_TIMEOUT_SECONDS = 300.0

# Logged by a job process once warm; bench/service_overhead.py waits for it to measure a warm
# worker.
WARM_MESSAGE = "job process %d warmed up in %.1f s"
CUT_SHORT_MESSAGE = "job process %d: its job arrived after %.1f s of warming up, which it cut short"

# Set in a process once its warm-up is over (or when it has none): its job may be claimed.
_warm = threading.Event()
_warm.set()
# Set when the process's job has arrived and waits: the warm-up does only what the job needs.
_job_waiting = threading.Event()


class ForkAfterSqlite:
    """A billiard pool mixin: a child is forked only while no thread of this process (the
    registry, the maintenance lanes) has SQLite open, or the child would inherit its locks
    half-held and could hang on its first query (see ``shared.db.SqliteConnections``)."""

    def _create_worker_process(self, i: int) -> Any:
        with SQLITE_CONNECTIONS.none_open():
            return super()._create_worker_process(i)  # type: ignore[misc]


class PromptAsynPool(ForkAfterSqlite, AsynPool):
    """AsynPool whose periodic pool maintenance runs every MAINTAIN_SECONDS, not 5 s."""

    @property
    def timers(self) -> dict[Callable[[], None], float]:
        # A child that died (killed with its job, say) is usually replaced at once, but when
        # its exit is not seen, the replacement waited for the next 5 s maintenance and a
        # job submitted to the worker waited with it.
        return {self.maintain_pool: MAINTAIN_SECONDS}


class BlockingPool(ForkAfterSqlite, billiard.pool.Pool):
    """The pool of a worker whose broker has no event loop (the embedded filesystem one)."""


class JobPool(TaskPool):
    """``--pool worker.pool:JobPool``: prefork with prompt child replacement, forking only
    while no SQLite connection is open."""

    Pool = PromptAsynPool
    BlockingPool = BlockingPool


def warm_up_in_background(prepare: Callable[[Callable[[], bool]], None]) -> None:
    """In a fresh job process: run ``prepare`` in a thread; ``wait_until_warm`` waits for it.

    ``prepare`` is given a check that turns true once the process's job has arrived: what
    the job needs anyway it finishes, what only speeds up a later job's start (the kernels'
    first fits) it leaves for the job to pay, as a cold process's job does.
    """
    # A thread: the process waits for its job meanwhile, and a job that comes early cuts
    # the warm-up short instead of waiting for every model's kernels.
    _job_waiting.clear()
    _warm.clear()
    threading.Thread(target=_run, args=(prepare,), name="warm-up", daemon=True).start()


def _run(prepare: Callable[[Callable[[], bool]], None]) -> None:
    started = time.monotonic()
    try:
        prepare(_job_waiting.is_set)
        message = CUT_SHORT_MESSAGE if _job_waiting.is_set() else WARM_MESSAGE
        logger.info(message, os.getpid(), time.monotonic() - started)
    except Exception:
        # The job repeats whatever failed here and fails with the reason, if it still fails.
        logger.warning("warming up this job process failed", exc_info=True)
    finally:
        _warm.set()


def wait_until_warm(timeout: float = WARM_UP_TIMEOUT_SECONDS) -> bool:
    """Say the job is here, then block until this process's warm-up is over (cut short where
    it can be); False if it took longer than ``timeout``."""
    # With a backlog every fresh job process gets its job at once: warming up the kernels of
    # every model first would only delay it.
    _job_waiting.set()
    return _warm.wait(timeout)
