"""Running one job: claim, heartbeat, fenced writes, upload, resume, outcome.

A pool child ``claim``s the best queued job of the queue a message came from (the message
only says "there is work") for the job process it has forked ahead; that process's
``run_claimed`` trains it with callbacks that write progress, metrics and artifact rows
under the lease, and ends it. Training writes into a scratch folder of this machine;
each finished file is uploaded to the artifact store before its row is recorded, and the
scratch folder is removed when the job ends here. It never raises for Celery to retry: a
training error fails the job; infrastructure loss (this process dies, the database goes
away) leaves the lease to expire and a reaper requeues the job; a store that does not
answer is waited for (the lease held, the job paused) for ``store_wait_seconds``, and a
store that stays away longer hands the job back.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import events
from shared import lease as leases
from shared.artifacts import checkpoint_name, describe
from shared.config import Settings
from shared.db import make_engine, make_session_factory
from shared.events import NewEvent
from shared.jobs import checkpoint_epochs
from shared.lease import Claimant, Lease, MetricRecord, ProgressUpdate
from shared.models import Job, JobStatus
from shared.schemas import Hyperparameters
from shared.store import ArtifactStore, StoreUnavailable, make_store
from shared.workers import is_draining

if TYPE_CHECKING:  # torch only in the job process, inside run_claimed
    from worker.training.checkpoints import Checkpoint
    from worker.training.loop import FitResult, Hooks, Progress
    from worker.training.metrics import MetricPoint

logger = logging.getLogger(__name__)

# Set in a pool child when its worker shuts down (see worker.celery_main): the running job
# stops at its next log interval and is handed back to the queue at once.
SHUTDOWN = threading.Event()

T = TypeVar("T")

# The first wait after a store call failed (botocore has retried it already), doubled after
# each failure up to the longest.
STORE_RETRY_FIRST_SECONDS = 1.0
STORE_RETRY_LONGEST_SECONDS = 15.0


class Outcome(enum.StrEnum):
    """How a message's job ended (``claim`` then ``run_claimed``), for logs and tests."""

    SKIPPED = "skipped"  # nothing queued: another worker took the work
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"  # its sweep stopped it early
    RELEASED = "released"  # handed back: this worker shuts down
    REQUEUED = "requeued"  # handed back: the artifact store did not answer
    LOST = "lost"  # another worker holds the lease now
    ABANDONED = "abandoned"  # the database went away: the lease will expire


def make_worker_engine(settings: Settings) -> Engine:
    """The engine of a worker process; on PostgreSQL a frozen worker cannot hold a row lock.
    SQLite's is fork-safe: the main process forks pool children while its threads use it."""
    if not settings.database_url.startswith("postgresql"):
        return make_engine(settings.database_url, fork_safe=True)
    # A worker paused (SIGSTOP, a VM freeze) inside a transaction would keep the job row
    # locked and block the reaper and the next claim. The server ends such a session once
    # it is idle in a transaction for as long as a lease; the worker's commit then fails.
    timeout_ms = int(settings.lease_seconds * 1000)
    options = f"-c idle_in_transaction_session_timeout={timeout_ms}"
    return make_engine(settings.database_url, connect_args={"options": options})


@dataclass
class WorkerContext:
    """What tasks in one worker process share: settings, the DB engine and store (lazily)."""

    settings: Settings
    publish: Callable[[str, str], None]
    hostname: str = field(default_factory=socket.gethostname)
    worker_id: str | None = None  # the registry id of this worker (its main process)
    threads: int = 0  # torch threads per job, set in each pool child; 0 = all usable cores
    _engine: Engine | None = None
    _factory: sessionmaker[Session] | None = None
    _store: ArtifactStore | None = None

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """Sessions on this process's own engine, built on first use (after the fork)."""
        if self._factory is None:
            self._engine = make_worker_engine(self.settings)
            self._factory = make_session_factory(self._engine)
        return self._factory

    @property
    def store(self) -> ArtifactStore:
        """The artifact store (a folder, or object storage shared with every machine)."""
        if self._store is None:
            self._store = make_store(self.settings)
        return self._store

    def claimant(self, pid: int | None = None) -> Claimant:
        """Who claims: this host, this worker's registry id, and the process that will train
        (``pid``; this one when None)."""
        return Claimant(self.hostname, self.worker_id, pid if pid is not None else os.getpid())

    def scratch(self, job_id: str) -> Path:
        """This machine's folder for the files of ``job_id`` before they are uploaded."""
        return Path(self.settings.scratch_dir).absolute() / job_id

    def after_fork(self) -> None:
        """Drop connections inherited from the parent without closing them under it. The
        engine stays, with the statements it has compiled; its pool starts empty."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._store = None  # its HTTP connections are the parent's too


class LeaseLost(Exception):
    """A fenced write found another worker's lease: this process must write nothing more."""


@dataclass
class StopFlags:
    """Why a running fit should stop; polled by the engine through ``should_stop``."""

    lost: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    prune: threading.Event = field(default_factory=threading.Event)  # its sweep stops the trial

    def should_stop(self) -> bool:
        """True once the lease is lost, a cancel or prune was asked for or the worker shuts down."""
        stopped = self.lost.is_set() or self.cancel.is_set() or self.prune.is_set()
        return stopped or SHUTDOWN.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking within a quarter second of a reason to stop;
        True when there is one."""
        deadline = time.monotonic() + seconds
        while not self.should_stop():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.lost.wait(min(left, 0.25))
        return True


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
                # away past the lease, a reaper hands the job on and our writes are fenced.
                logger.warning("job %s: heartbeat failed", self.lease.job_id, exc_info=True)
                continue
            if beat.lost:
                logger.warning("job %s: lease lost, stopping", self.lease.job_id)
                self.flags.lost.set()
                return  # nothing of ours to renew any more
            if beat.cancel_requested:
                logger.info("job %s: cancellation requested, stopping", self.lease.job_id)
                self.flags.cancel.set()
            if beat.prune_requested and not self.flags.prune.is_set():
                logger.info("job %s: pruned by its sweep, stopping", self.lease.job_id)
                self.flags.prune.set()


class JobWriter:
    """The engine's hooks: progress and metrics batched per log interval, uploads and rows."""

    def __init__(self, ctx: WorkerContext, lease: Lease, flags: StopFlags) -> None:
        self.ctx, self.lease, self.flags = ctx, lease, flags
        self.pending: list[MetricRecord] = []
        self.lines: list[NewEvent] = []
        self.epoch = 0  # of the latest metric point: the seed's line after it belongs to it

    def hooks(self) -> Hooks:
        """The callbacks ``fit`` calls."""
        from worker.training.loop import Hooks

        return Hooks(
            on_progress=self.on_progress,
            on_metrics=self.on_metrics,
            on_artifact=self.on_artifact,
            on_line=self.on_line,
            should_stop=self.flags.should_stop,
        )

    def drain(self) -> list[MetricRecord]:
        """Metric rows not written yet, handed to the caller's own transaction."""
        pending, self.pending = self.pending, []
        return pending

    def drain_lines(self) -> list[NewEvent]:
        """Log lines not written yet, for the same transaction as the metrics."""
        lines, self.lines = self.lines, []
        return lines

    def on_metrics(self, points: list[MetricPoint]) -> None:
        """Buffer points; they go out with the next progress write (one transaction)."""
        self.pending.extend(to_record(point) for point in points)
        if points:
            self.epoch = points[-1].epoch

    def on_line(self, message: str) -> None:
        """Buffer one of the seed's printed lines; it goes out with the metrics."""
        self.lines.append(events.line(message, epoch=self.epoch))

    def on_progress(self, progress: Progress) -> None:
        """Write progress, buffered metrics and lines in one fenced transaction."""
        self._fenced(leases.record_progress(
            self.ctx.session_factory, self.lease, to_update(progress), self.drain(),
            self.drain_lines(),
        ))  # fmt: skip

    def on_artifact(self, name: str, kind: str, path: Path) -> None:
        """Upload a finished file, then record its row (size, sha256) under the lease."""
        # An epoch's test point comes just before its checkpoint: flushing here keeps the
        # database's history in step with what the checkpoint holds.
        if self.pending or self.lines:
            self._fenced(leases.record_metrics(
                self.ctx.session_factory, self.lease, self.drain(), self.drain_lines()
            ))  # fmt: skip
        size, sha256 = describe(path)
        # Uploaded before the row is written: a row always names a whole object. A worker
        # fenced out after its upload has written the same deterministic file its
        # successor writes, and records nothing.
        patiently(
            self.ctx.settings, self.flags, self.lease.job_id, f"upload of {name}",
            lambda: self.ctx.store.put(self.lease.job_id, name, path, sha256=sha256),
        )  # fmt: skip
        self._fenced(leases.record_artifact(
            self.ctx.session_factory, self.lease, name=name, kind=kind, size=size, sha256=sha256
        ))  # fmt: skip

    def _fenced(self, written: bool) -> None:
        # Raised, not just flagged: the engine would otherwise go on to its next file write
        # (a checkpoint, a plot) before it polls the stop check again.
        if not written:
            self.flags.lost.set()
            raise LeaseLost(f"job {self.lease.job_id}: lease taken over, writing nothing more")


def patiently(
    settings: Settings, flags: StopFlags, job_id: str, what: str, call: Callable[[], T]
) -> T:
    """``call()``, tried again while the artifact store is unavailable, for up to
    ``store_wait_seconds`` with growing waits. The heartbeat keeps the lease meanwhile, so a
    store outage shorter than that pauses the job instead of costing it an attempt. Gives up
    (StoreUnavailable) sooner when the job must stop: lease lost, cancelled or shutting down."""
    deadline = time.monotonic() + settings.store_wait_seconds
    delay = STORE_RETRY_FIRST_SECONDS
    while True:
        try:
            return call()
        except StoreUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0 or flags.should_stop():
                raise
            wait = min(delay, left)
            logger.warning(
                "job %s: %s: artifact store unavailable (%s); trying again in %.0f s",
                job_id, what, exc, wait,
            )  # fmt: skip
            if flags.wait(wait):
                raise
            delay = min(delay * 2, STORE_RETRY_LONGEST_SECONDS)


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


def resume_point(
    factory: sessionmaker[Session], job_id: str, spec: JobSpec
) -> tuple[str, int] | None:
    """(job, epoch) of the checkpoint to start from: the job's own newest (a requeued job),
    else the one it was asked to resume; the database says which checkpoints exist."""
    with factory() as session:
        own = checkpoint_epochs(session, job_id)
        if own:
            return job_id, own[-1]
        if spec.resume_from_job_id is None:
            return None
        source = spec.resume_from_job_id
        if spec.resume_from_epoch is not None:
            return source, spec.resume_from_epoch
        theirs = checkpoint_epochs(session, source)
    if not theirs:
        raise FileNotFoundError(f"job {source} has no checkpoint to resume from")
    return source, theirs[-1]


def _start_line(job_id: str, point: tuple[str, int] | None, device: Any) -> str:
    """How this attempt starts: from scratch, or from which checkpoint."""
    if point is None:
        return f"training from scratch on {device}"
    source, epoch = point
    whose = "its own" if source == job_id else f"job {source}'s"
    return f"resumed from {whose} checkpoint {checkpoint_name(epoch)} (epoch {epoch}) on {device}"


def fetch_resume(
    ctx: WorkerContext, job_id: str, point: tuple[str, int] | None
) -> Checkpoint | None:
    """Download the checkpoint ``point`` (job, epoch) names (on any machine) and load it."""
    from worker.training.checkpoints import load_checkpoint

    if point is None:
        return None
    source, epoch = point
    name = checkpoint_name(epoch)
    local = ctx.scratch(job_id) / "resume" / source / name
    return load_checkpoint(ctx.store.fetch(source, name, local))


class Draining(Exception):
    """An admin asked this worker to drain: it takes nothing new."""


# A job id no row has: a claim of its queue takes nothing and changes nothing.
_NO_JOB = "0" * 32


def prepare_claim(ctx: WorkerContext) -> None:
    """What a message's claim runs, done once with nothing to take: the database connection
    opened and the statements compiled (SQLAlchemy caches them per process), so the first
    claim of a fresh pool child is as quick as any later one."""
    leases.claim_next(ctx.session_factory, leases.QueueOf(_NO_JOB), claimant=ctx.claimant(),
                      lease_seconds=ctx.settings.lease_seconds,
                      max_running_per_user=ctx.settings.max_running_jobs_per_user)  # fmt: skip
    is_draining(ctx.session_factory, ctx.worker_id)


def connect(ctx: WorkerContext) -> None:
    """Open this process's database connection before its job's first write needs it."""
    with ctx.session_factory() as session:
        session.execute(select(1))


def claim(ctx: WorkerContext, job_id: str, pid: int) -> Lease | None:
    """Claim the best queued job of ``job_id``'s queue for the process ``pid`` to train;
    None when nothing is queued there (another worker took the work); Draining when this
    worker takes nothing new."""
    # One transaction when there is work. Only a message that finds none asks why: its job
    # unknown, its queue empty, or this worker draining (the message then goes back).
    lease = leases.claim_next(
        ctx.session_factory, leases.QueueOf(job_id), claimant=ctx.claimant(pid),
        lease_seconds=ctx.settings.lease_seconds,
        max_running_per_user=ctx.settings.max_running_jobs_per_user,
    )  # fmt: skip
    if lease is None:
        if is_draining(ctx.session_factory, ctx.worker_id):
            raise Draining(f"worker {ctx.worker_id} is draining")
        logger.info("message for job %s: nothing queued on its queue, skipping", job_id)
    elif lease.job_id != job_id:
        logger.info("message for job %s: running job %s, first in its queue", job_id, lease.job_id)
    return lease


def hand_back_died(ctx: WorkerContext, lease: Lease, how: str) -> JobStatus | None:
    """The process training ``lease`` died (``how``: "died: SIGKILL") and its pool child
    lives on: hand the job back now, as its lease's expiry would a reaper pass later (the
    attempt counts), and tell the workers at once. The new status; None when fenced."""
    try:
        status = leases.requeue(ctx.session_factory, lease, reason=f"its job process {how}",
                                max_attempts=ctx.settings.max_attempts)  # fmt: skip
    except DBAPIError:  # the database went away: the lease expires and a reaper requeues it
        logger.exception("job %s: its job process %s; not handed back", lease.job_id, how)
        return None
    logger.warning("job %s: its job process %s; handed back: %s", lease.job_id, how, status)
    if status == JobStatus.QUEUED:
        try:
            with ctx.session_factory() as session:
                queue = session.scalar(select(Job.queue).where(Job.id == lease.job_id))
            if queue is not None:  # None: deleted meanwhile
                leases.publish_stamped(ctx.session_factory, lease.job_id, queue, ctx.publish)
        except Exception:  # the broker: the reaper sends it, the row is queued either way
            logger.warning("job %s: queued again but not published", lease.job_id, exc_info=True)
    return status


def run_claimed(ctx: WorkerContext, lease: Lease) -> Outcome:
    """Train the job ``lease`` holds, in this process, and end it."""
    try:
        return _run_claimed(ctx, lease)
    finally:
        shutil.rmtree(ctx.scratch(lease.job_id), ignore_errors=True)


def _run_claimed(ctx: WorkerContext, lease: Lease) -> Outcome:
    flags = StopFlags()
    with Heartbeat(ctx, lease, flags):
        try:
            return _train(ctx, lease, flags)
        except LeaseLost as exc:
            logger.warning("%s", exc)
            return Outcome.LOST
        except DBAPIError:
            # Infrastructure, not the job's fault: the lease expires and the job is retried.
            logger.exception("job %s: database error, leaving the job to the reaper", lease.job_id)
            return Outcome.ABANDONED
        except StoreUnavailable as exc:
            # Infrastructure too, and waited for already: the job goes back to the queue,
            # where a worker that reaches the store may take it (the attempt counts, so a
            # store that never comes back ends it failed after max_attempts).
            logger.exception("job %s: artifact store unavailable, requeueing", lease.job_id)
            status = leases.requeue(
                ctx.session_factory, lease, max_attempts=ctx.settings.max_attempts,
                reason=f"the artifact store stayed unavailable: {exc}",
            )  # fmt: skip
            return {
                JobStatus.QUEUED: Outcome.REQUEUED, JobStatus.FAILED: Outcome.FAILED,
                JobStatus.CANCELLED: Outcome.CANCELLED, JobStatus.PRUNED: Outcome.PRUNED,
            }.get(status or JobStatus.RUNNING, Outcome.LOST)  # fmt: skip
        except Exception as exc:
            logger.exception("job %s: training failed", lease.job_id)
            leases.finish(
                ctx.session_factory, lease, JobStatus.FAILED,
                error_message=f"{type(exc).__name__}: {exc}",
                error_traceback=traceback.format_exc(),
            )  # fmt: skip
            return Outcome.FAILED


def _train(ctx: WorkerContext, lease: Lease, flags: StopFlags) -> Outcome:
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
        return Outcome.FAILED
    if not leases.record_start(factory, lease, device_used=str(device), pid=os.getpid()):
        return Outcome.LOST
    hp = Hyperparameters.model_validate(spec.hyperparameters)
    train = load_split(settings.data_dir, train=True, download=settings.download_mnist)
    test = load_split(settings.data_dir, train=False, download=settings.download_mnist)
    point = resume_point(factory, lease.job_id, spec)
    resume = patiently(
        settings, flags, lease.job_id, "download of its checkpoint",
        lambda: fetch_resume(ctx, lease.job_id, point),
    )  # fmt: skip
    history = [to_record(p) for p in resume.metrics] if resume else []
    # A requeued job's log keeps the lines up to its checkpoint; the rest is trained again.
    own_epoch = point[1] if point is not None and point[0] == lease.job_id else -1
    start = [events.line(_start_line(lease.job_id, point, device))]
    if not leases.replace_metrics(factory, lease, history, after_epoch=own_epoch, lines=start):
        return Outcome.LOST
    writer = JobWriter(ctx, lease, flags)
    result = fit(
        hp, train, test, ctx.scratch(lease.job_id) / "out", device=device,
        hooks=writer.hooks(), resume=resume, max_train_batches=settings.max_train_batches,
    )  # fmt: skip
    return _conclude(ctx, lease, flags, result, writer)


def _conclude(
    ctx: WorkerContext, lease: Lease, flags: StopFlags, result: FitResult, writer: JobWriter
) -> Outcome:
    factory = ctx.session_factory
    if flags.lost.is_set():
        return Outcome.LOST
    if result.status == "completed":
        written = leases.finish(
            factory, lease, JobStatus.SUCCEEDED, test_loss=result.test_loss,
            test_accuracy=result.test_accuracy, metrics=writer.drain(),
            lines=writer.drain_lines(),
        )  # fmt: skip
        return Outcome.SUCCEEDED if written else Outcome.LOST
    if flags.cancel.is_set():
        written = leases.finish(
            factory, lease, JobStatus.CANCELLED, metrics=writer.drain(),
            lines=writer.drain_lines(),
            message=f"cancelled at the user's request after {result.epochs_done} epoch(s)",
        )  # fmt: skip
        return Outcome.CANCELLED if written else Outcome.LOST
    if flags.prune.is_set():  # stopped at a log interval; its epoch checkpoints stay
        written = leases.finish(factory, lease, JobStatus.PRUNED, metrics=writer.drain())
        return Outcome.PRUNED if written else Outcome.LOST
    # Graceful shutdown: queue the job again now; it resumes from its newest checkpoint.
    # Not published from here: this worker is shutting down but may still be consuming,
    # and would take the message back itself. published_at is NULL, so the next reaper
    # pass (any other worker's main process) publishes it.
    logger.info("job %s: this worker shuts down, handing the job back", lease.job_id)
    return Outcome.RELEASED if leases.release(factory, lease) else Outcome.LOST
