"""The worker's Celery app: ``celery -A worker.celery_main worker -Q cpu``.

The one module that builds an app at import time, because the celery command line needs a
module-level ``app``. Nothing here imports torch: the prefork parent must never touch it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.signals import (
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)
from celery.worker import state as worker_state

from shared.celery_app import CPU_QUEUE, GPU_QUEUE, make_celery
from shared.config import Settings
from shared.db import make_session_factory
from shared.lease import Lease
from shared.workers import running_jobs
from worker.job_process import DIED, JobProcesses
from worker.maintenance import MaintenanceLoop
from worker.registry import RegistryBeat
from worker.runner import (
    SHUTDOWN,
    Outcome,
    claim,
    connect,
    hand_back_died,
    make_worker_engine,
    prepare_claim,
    run_claimed,
)
from worker.tasks import make_context, register_tasks

logger = logging.getLogger(__name__)

# Sent by the parent to its pool children when the worker shuts down; a child passes it on
# to its job process.
HAND_BACK_SIGNAL = signal.SIGUSR2
# How long the parent waits for a new pool child to report: the child imports torch and the
# engine and maps MNIST before it does (Celery's 4 s is too short on a busy machine).
CHILD_START_SECONDS = 120.0
TEMPLATE_MESSAGE = "pool child %d ready to fork job processes after %.1f s"


settings = Settings()
app = make_celery(settings)
# Celery's prefork pool, replacing a child that died without a 5 s wait.
app.conf.worker_pool = "worker.pool:JobPool"
app.conf.worker_proc_alive_timeout = CHILD_START_SECONDS


def _drain() -> None:
    """Asked to drain: consume nothing more, then exit once the running jobs are done."""
    name = registry.info.name if registry.info else None
    for queue in list(app.amqp.queues.consume_from):
        try:
            app.control.cancel_consumer(queue, destination=[name], reply=False)
        except Exception:  # a broker without broadcast (the embedded one): children refuse
            logger.warning("drain: could not stop consuming %s", queue, exc_info=True)
    threading.Thread(target=_exit_when_idle, name="drain", daemon=True).start()


def _exit_when_idle() -> None:
    """Warm shutdown once no job of this worker runs and no message waits in its pool."""
    factory = registry.session_factory
    while True:
        idle = not worker_state.active_requests and not worker_state.reserved_requests
        if idle and factory is not None and not running_jobs(factory, registry.worker_id):
            logger.warning("drain: nothing runs any more, exiting")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(settings.heartbeat_seconds)


# The registry id is made here, before the pool forks, so every child records it at claim.
registry = RegistryBeat(settings, on_drain=_drain)
context = make_context(settings, app, worker_id=registry.worker_id)


def _job_process_started() -> None:
    """First in each job process: connections of its own; the hand-back stops its job."""
    context.after_fork()
    signal.signal(HAND_BACK_SIGNAL, lambda *_: SHUTDOWN.set())


def _prepare_job(job_waiting: Callable[[], bool]) -> None:
    """While a job process waits for its job: a database connection of its own, torch's
    threads and a first fit of each model (CUDA's too on a GPU worker), the fits cut short
    once ``job_waiting()``."""
    import torch

    from worker.training.warmup import warm_up

    connect(context)  # the job's first write finds its connection open

    cuda = GPU_QUEUE in app.amqp.queues.consume_from and torch.cuda.is_available()
    warm_up(settings.data_dir, threads=context.threads or settings.train_threads,
            download=settings.download_mnist, cuda=cuda, job_waiting=job_waiting)  # fmt: skip


def _run_handed_over(job: str) -> str:
    """In a job process: train the job its pool child claimed for it ("<job id> <token>")."""
    job_id, token = job.split()
    return str(run_claimed(context, Lease(job_id, token)))


job_processes = JobProcesses(
    started=_job_process_started,
    prepare=_prepare_job,
    run=_run_handed_over,
    hand_back=HAND_BACK_SIGNAL,
)


def _run(job_id: str) -> str:
    """A message's task, in a pool child: claim the best queued job of its queue for the job
    process forked ahead and run it there. The claim's statements are compiled once in this
    long-lived child, not in each fresh job process; when nothing is queued, the process
    forked ahead stays, warm, for the next message. A job whose process dies is handed back
    at once, not when its lease expires."""
    lease = claim(context, job_id, job_processes.ready())
    if lease is None:
        return str(Outcome.SKIPPED)
    outcome = job_processes.run(f"{lease.job_id} {lease.token}")
    if outcome.startswith(DIED):  # killed (out of memory, a signal) or crashed mid-job
        hand_back_died(context, lease, outcome)
    return outcome


register_tasks(app, context, _run)

_controller: list[Any] = []
_maintenance: list[MaintenanceLoop] = []


@worker_init.connect
def _remember_controller(sender: Any = None, **_: Any) -> None:
    """Keep the WorkController so shutdown can reach its pool's children."""
    _controller[:] = [sender]


def _concurrency() -> int:
    """How many jobs this worker runs at once (its pool's size)."""
    controller = _controller[0] if _controller else None
    return int(getattr(controller, "concurrency", 0) or 1)


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    """In each pool child: a lower CPU priority, fresh DB connections, its share of the cores,
    no early hand-back; then, on a training worker, what every job needs and the process of
    its first job, forked ahead."""
    # First, while this is the child's only thread: every thread it starts inherits it.
    # Training takes every core it is given; the worker's own loop, its reaper and an API on
    # the same machine then still answer at once, and an idle machine trains as fast.
    os.nice(settings.train_niceness)
    context.after_fork()
    context.threads = settings.threads_per_job(_concurrency())
    registry.after_fork()
    SHUTDOWN.clear()
    # Ignored, not handled, here: billiard installs its exit handler after this hook on
    # every signal that is neither ignored nor default-less, so an idle child would die.
    signal.signal(HAND_BACK_SIGNAL, signal.SIG_IGN)
    if {CPU_QUEUE, GPU_QUEUE} & set(app.amqp.queues.consume_from):
        started = time.monotonic()
        _prepare_template()
        logger.info(TEMPLATE_MESSAGE, os.getpid(), time.monotonic() - started)
        job_processes.fork_ahead()


@worker_process_shutdown.connect
def _child_exits(**_: Any) -> None:
    """The job process forked ahead goes with its pool child, before the worker exits."""
    job_processes.close()


def _prepare_template() -> None:
    """What every job of this child needs, done once: the database, torch and the engine,
    MNIST. Nothing that starts a thread pool or CUDA: the job processes are forks of this.
    A failure here is the job's to meet again, and to fail with."""
    try:
        # Imported here, in the child: the prefork parent never loads torch.
        from worker.training.warmup import prepare_template

        prepare_claim(context)  # a job's claim finds its statements compiled
        prepare_template(settings.data_dir, download=settings.download_mnist)
    except Exception:
        logger.warning("preparing this pool child for its jobs failed", exc_info=True)


@worker_ready.connect
def _register(sender: Any = None, **_: Any) -> None:
    """Tell the registry (and so the API) this worker is alive and which queues it serves."""
    registry.start(sender.hostname, app.amqp.queues.consume_from.keys(), _concurrency())
    _start_maintenance()


def _start_maintenance() -> None:
    """The reaper and the other periodic duties, in this main process: no beat, no extra process."""
    factory = make_session_factory(make_worker_engine(settings))
    _maintenance[:] = [MaintenanceLoop(settings, factory, context.publish).start()]


@task_prerun.connect
def _listen_for_hand_back(**_: Any) -> None:
    """From a child's first task on, the hand-back signal reaches its job processes: the one
    that runs stops at its next log interval, a later one at its first."""
    signal.signal(HAND_BACK_SIGNAL, _hand_back)


def _hand_back(_signum: int, _frame: Any) -> None:
    SHUTDOWN.set()
    job_processes.forward()


@worker_shutting_down.connect
def _tell_children(**_: Any) -> None:
    """On warm or cold shutdown, ask running jobs to stop and go back to the queue."""
    # A warm shutdown would otherwise wait for the running job to finish, which may be
    # hours; the child stops at its next log interval and releases the job instead.
    pool = getattr(_controller[0], "pool", None) if _controller else None
    pids = pool.info.get("processes", []) if pool is not None else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # the child just exited
            os.kill(pid, HAND_BACK_SIGNAL)
    logger.info("shutting down: asked pool children %s to hand their jobs back", pids)
    # From now on this worker takes no new job: the API must not count it as serving.
    registry.stop()
    # Popped before stopping: Ctrl-C and the SIGTERM that follows may nest two calls here.
    while _maintenance:
        _maintenance.pop().stop()
