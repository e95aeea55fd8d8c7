"""The Celery tasks: a thin adapter between the job row (lease protocol) and the engine.

``mnistq.train`` claims the job, trains it with callbacks that write progress, metrics and
artifact rows under the lease, and ends it. It never raises for Celery to retry: a
training error fails the job; infrastructure loss (this process dies, the database goes
away) leaves the lease to expire and the reaper requeues the job.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import lease as leases
from shared.artifacts import ArtifactStore, checkpoint_name
from shared.celery_app import TRAIN_TASK, publish_train
from shared.config import Settings
from shared.db import make_engine, make_session_factory
from shared.lease import Lease, MetricRecord, ProgressUpdate
from shared.models import Job, JobStatus
from shared.schemas import Hyperparameters

if TYPE_CHECKING:  # torch only in the child process, inside run_job
    from worker.training.checkpoints import Checkpoint
    from worker.training.loop import FitResult, Hooks, Progress
    from worker.training.metrics import MetricPoint

logger = logging.getLogger(__name__)

# Set in a pool child when its worker shuts down (see worker.celery_main): the running job
# stops at its next log interval and is handed back to the queue at once.
SHUTDOWN = threading.Event()


def make_worker_engine(settings: Settings) -> Engine:
    """The engine of a worker process; on PostgreSQL a frozen worker cannot hold a row lock."""
    if not settings.database_url.startswith("postgresql"):
        return make_engine(settings.database_url)
    # A worker paused (SIGSTOP, a VM freeze) inside a transaction would keep the job row
    # locked and block the reaper and the next claim. The server ends such a session once
    # it is idle in a transaction for as long as a lease; the worker's commit then fails.
    timeout_ms = int(settings.lease_seconds * 1000)
    options = f"-c idle_in_transaction_session_timeout={timeout_ms}"
    return make_engine(settings.database_url, connect_args={"options": options})


@dataclass
class WorkerContext:
    """What tasks in one worker process share: settings, the DB engine (built lazily)."""

    settings: Settings
    publish: Callable[[str, str], None]
    hostname: str = field(default_factory=socket.gethostname)
    threads: int = 0  # torch threads per job, set in each pool child; 0 = all usable cores
    _engine: Engine | None = None
    _factory: sessionmaker[Session] | None = None

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """Sessions on this process's own engine, built on first use (after the fork)."""
        if self._factory is None:
            self._engine = make_worker_engine(self.settings)
            self._factory = make_session_factory(self._engine)
        return self._factory

    @property
    def store(self) -> ArtifactStore:
        """The artifact store shared with the API."""
        return ArtifactStore(self.settings.artifact_dir)

    def after_fork(self) -> None:
        """Drop connections inherited from the parent without closing them under it."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._engine, self._factory = None, None


class LeaseLost(Exception):
    """A fenced write found another worker's lease: this process must write nothing more."""


@dataclass
class StopFlags:
    """Why a running fit should stop; polled by the engine through ``should_stop``."""

    lost: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        """True once the lease is lost, cancellation was asked for or the worker shuts down."""
        return self.lost.is_set() or self.cancel.is_set() or SHUTDOWN.is_set()


class Heartbeat:
    """A thread that renews the lease every ``heartbeat_seconds`` and raises stop flags."""

    def __init__(self, ctx: WorkerContext, lease: Lease, flags: StopFlags) -> None:
        self.ctx, self.lease, self.flags = ctx, lease, flags
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}")
        self._thread.daemon = True

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        settings = self.ctx.settings
        while not self._done.wait(settings.heartbeat_seconds):
            try:
                beat = leases.heartbeat(
                    self.ctx.session_factory, self.lease, settings.lease_seconds
                )
            except DBAPIError:
                # The lease may still be renewed at the next beat; if the database stays
                # away past the lease, the reaper hands the job on and our writes are fenced.
                logger.warning("job %s: heartbeat failed", self.lease.job_id, exc_info=True)
                continue
            if beat.lost:
                logger.warning("job %s: lease lost, stopping", self.lease.job_id)
                self.flags.lost.set()
                return  # nothing of ours to renew any more
            if beat.cancel_requested:
                logger.info("job %s: cancellation requested, stopping", self.lease.job_id)
                self.flags.cancel.set()


class JobWriter:
    """The engine's hooks: progress and metrics batched per log interval, artifact rows."""

    def __init__(self, ctx: WorkerContext, lease: Lease, flags: StopFlags) -> None:
        self.ctx, self.lease, self.flags = ctx, lease, flags
        self.pending: list[MetricRecord] = []

    def hooks(self) -> Hooks:
        """The callbacks ``fit`` calls."""
        from worker.training.loop import Hooks

        return Hooks(
            on_progress=self.on_progress,
            on_metrics=self.on_metrics,
            on_artifact=self.on_artifact,
            should_stop=self.flags.should_stop,
        )

    def drain(self) -> list[MetricRecord]:
        """Metric rows not written yet, handed to the caller's own transaction."""
        pending, self.pending = self.pending, []
        return pending

    def on_metrics(self, points: list[MetricPoint]) -> None:
        """Buffer points; they go out with the next progress write (one transaction)."""
        self.pending.extend(to_record(point) for point in points)

    def on_progress(self, progress: Progress) -> None:
        """Write progress and buffered metrics in one fenced transaction."""
        self._fenced(leases.record_progress(
            self.ctx.session_factory, self.lease, to_update(progress), self.drain()
        ))  # fmt: skip

    def on_artifact(self, name: str, kind: str, path: Path) -> None:
        """Record a finished file (size, sha256) with the metrics that led to it."""
        # An epoch's test point comes just before its checkpoint: flushing here keeps the
        # database's history in step with what the checkpoint holds.
        if self.pending:
            self._fenced(leases.record_metrics(self.ctx.session_factory, self.lease, self.drain()))
        size, sha256 = ArtifactStore.describe(path)
        self._fenced(leases.record_artifact(
            self.ctx.session_factory, self.lease, name=name, kind=kind, size=size, sha256=sha256
        ))  # fmt: skip

    def _fenced(self, written: bool) -> None:
        # Raised, not just flagged: the engine would otherwise go on to its next file write
        # (a checkpoint, a plot) before it polls the stop check again.
        if not written:
            self.flags.lost.set()
            raise LeaseLost(f"job {self.lease.job_id}: lease taken over, writing nothing more")


def to_record(point: MetricPoint) -> MetricRecord:
    """The metric row of an engine metric point."""
    return MetricRecord(
        kind=point.kind, epoch=point.epoch, step=point.step, samples_seen=point.samples_seen,
        loss=point.loss, accuracy=point.accuracy, seconds=point.seconds,
    )  # fmt: skip


def to_update(progress: Progress) -> ProgressUpdate:
    """The job-row progress of an engine progress report (``step`` counts within the epoch)."""
    loss = progress.train_loss
    return ProgressUpdate(
        epoch=progress.epoch, n_epochs=progress.n_epochs, step=progress.step_in_epoch,
        steps_per_epoch=progress.steps_per_epoch, samples_seen=progress.samples_seen,
        total_samples=progress.total_samples, samples_per_second=progress.samples_per_second,
        train_loss=loss if loss is None or math.isfinite(loss) else None,
    )  # fmt: skip


@dataclass(frozen=True)
class JobSpec:
    """What the task needs from the job row to start training."""

    hyperparameters: dict[str, Any]
    device: str
    resume_from_job_id: str | None
    resume_from_epoch: int | None


def load_spec(factory: sessionmaker[Session], job_id: str) -> JobSpec:
    """Read the claimed job's request."""
    with factory() as session:
        row = session.execute(
            select(
                Job.hyperparameters, Job.device_requested,
                Job.resume_from_job_id, Job.resume_from_epoch,
            ).where(Job.id == job_id)
        ).one()  # fmt: skip
    return JobSpec(dict(row[0]), row[1], row[2], row[3])


def find_resume(store: ArtifactStore, job_id: str, spec: JobSpec) -> Checkpoint | None:
    """The job's own newest checkpoint (a requeued job), else the one it was asked to resume."""
    from worker.training.checkpoints import latest_checkpoint, load_checkpoint

    own = latest_checkpoint(store.job_dir(job_id))
    if own is not None:
        return load_checkpoint(own)
    if spec.resume_from_job_id is None:
        return None
    source = spec.resume_from_job_id
    if spec.resume_from_epoch is None:
        newest = latest_checkpoint(store.job_dir(source))
        if newest is None:
            raise FileNotFoundError(f"job {source} has no checkpoint to resume from")
        return load_checkpoint(newest)
    return load_checkpoint(store.open_existing(source, checkpoint_name(spec.resume_from_epoch)))


def run_job(ctx: WorkerContext, job_id: str) -> str:
    """Claim and run one job; returns how it ended (for logs and tests)."""
    lease = leases.claim(
        ctx.session_factory, job_id, hostname=ctx.hostname, lease_seconds=ctx.settings.lease_seconds
    )
    if lease is None:
        logger.info("job %s: not queued (already claimed, cancelled or gone), skipping", job_id)
        return "skipped"
    flags = StopFlags()
    with Heartbeat(ctx, lease, flags):
        try:
            return _train(ctx, lease, flags)
        except LeaseLost as exc:
            logger.warning("%s", exc)
            return "lost"
        except DBAPIError:
            # Infrastructure, not the job's fault: the lease expires and the job is retried.
            logger.exception("job %s: database error, leaving the job to the reaper", job_id)
            return "abandoned"
        except Exception as exc:
            logger.exception("job %s: training failed", job_id)
            leases.finish(
                ctx.session_factory, lease, JobStatus.FAILED,
                error_message=f"{type(exc).__name__}: {exc}",
                error_traceback=traceback.format_exc(),
            )  # fmt: skip
            return "failed"


def _train(ctx: WorkerContext, lease: Lease, flags: StopFlags) -> str:
    from worker.training.data import load_split
    from worker.training.devices import DeviceUnavailable, configure_threads, resolve_device
    from worker.training.loop import fit

    factory, settings = ctx.session_factory, ctx.settings
    configure_threads(ctx.threads or settings.train_threads)
    spec = load_spec(factory, lease.job_id)
    try:
        device = resolve_device(spec.device)
    except DeviceUnavailable as exc:
        leases.finish(factory, lease, JobStatus.FAILED, error_message=str(exc))
        return "failed"
    if not leases.record_start(factory, lease, device_used=str(device)):
        return "lost"
    hp = Hyperparameters.model_validate(spec.hyperparameters)
    train = load_split(settings.data_dir, train=True, download=settings.download_mnist)
    test = load_split(settings.data_dir, train=False, download=settings.download_mnist)
    resume = find_resume(ctx.store, lease.job_id, spec)
    history = [to_record(point) for point in resume.metrics] if resume else []
    if not leases.replace_metrics(factory, lease, history):
        return "lost"
    writer = JobWriter(ctx, lease, flags)
    result = fit(
        hp, train, test, ctx.store.job_dir(lease.job_id), device=device, hooks=writer.hooks(),
        resume=resume, max_train_batches=settings.max_train_batches,
    )  # fmt: skip
    return _conclude(ctx, lease, flags, result, writer)


def _conclude(
    ctx: WorkerContext, lease: Lease, flags: StopFlags, result: FitResult, writer: JobWriter
) -> str:
    factory = ctx.session_factory
    if flags.lost.is_set():
        return "lost"
    if result.status == "completed":
        written = leases.finish(
            factory, lease, JobStatus.SUCCEEDED, test_loss=result.test_loss,
            test_accuracy=result.test_accuracy, metrics=writer.drain(),
        )  # fmt: skip
        return "succeeded" if written else "lost"
    if flags.cancel.is_set():
        written = leases.finish(factory, lease, JobStatus.CANCELLED, metrics=writer.drain())
        return "cancelled" if written else "lost"
    return _hand_back(ctx, lease)


def _hand_back(ctx: WorkerContext, lease: Lease) -> str:
    """Graceful shutdown: queue the job again now; it resumes from its newest checkpoint."""
    # Not published from here: this worker is shutting down but may still be consuming, and
    # would take the message back itself. published_at is NULL, so the next reaper pass
    # (another worker's beat, or the next `mnistq up`) publishes it.
    return "released" if leases.release(ctx.session_factory, lease) else "lost"


def register_tasks(app: Celery, ctx: WorkerContext) -> None:
    """Register ``mnistq.train`` on ``app``, bound to ``ctx``."""
    @app.task(name=TRAIN_TASK, ignore_result=True, acks_late=True)
    def train(job_id: str) -> str:
        """Run job ``job_id`` if it is still queued."""
        return run_job(ctx, job_id)


def make_context(settings: Settings, app: Celery) -> WorkerContext:
    """The context of a worker process publishing through ``app``."""
    return WorkerContext(settings, functools.partial(publish_train, app))
