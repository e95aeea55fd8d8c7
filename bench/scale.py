"""How mnistq's costs grow with its work: 1,000 to 100,000 jobs in PostgreSQL, and tiny jobs.

For each size, a fresh PostgreSQL database gets that many jobs by COPY (mostly finished, each
with artifacts and metrics; 1,000 queued; a few running, some of them with expired leases),
then it times, in this process and against that database:

  GET job      GET /api/v1/jobs/<random finished id> through the Flask app, as the jobs' owner
  list page    GET /api/v1/jobs (the owner's newest 50)
  position     the queue position of the last queued job (shared.workers.queue_positions)
  claim        shared.lease.claim_next of the queue of a queued job, as a worker's pool child
               claims for a message naming that job
  reaper pass  worker.reaper.reap_once (requeue expired leases, re-publish due rows)

and prints p50/p99 in milliseconds per size. Then it runs tiny jobs (1 epoch of one batch,
MNISTQ_MAX_TRAIN_BATCHES=1) end to end through `mnistq api` and `mnistq worker` with 2 slots
on Redis, and prints jobs per minute and the seconds each job costs beyond its own run.

Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (scripts/services) and MNIST
in MNISTQ_DATA_DIR.

    python bench/scale.py [--sizes 1000,10000,100000] [--samples 200] [--tiny-jobs 30]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from service_overhead import (
    fresh_database,
    percentile,
    poll_until,
    stack,
    submit,
)

QUEUED = 1_000
RUNNING = 20  # half of them with expired leases: the reaper's first pass requeues those
ARTIFACTS = ("model.pth", "optimizer.pth", "examples.png", "loss_curve.png",
             "predictions.png", "metrics.json", "checkpoints/epoch-1.pt")  # fmt: skip
HP = json.dumps({"n_epochs": 1, "batch_size_train": 64, "model": "tutorial_cnn"})


@dataclass(frozen=True)
class Seeded:
    """Ids the measurements draw from, and the token of the user who owns every job."""

    finished: list[str]
    queued: list[str]
    owner_id: int
    token: str


def _copy(conn: Any, table: str, columns: tuple[str, ...], rows: Iterator[tuple[Any, ...]]) -> None:
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


JOB_COLUMNS = ("id", "status", "hyperparameters", "device_requested", "device_used", "queue",
               "priority", "attempt", "cancel_requested", "epoch", "n_epochs", "step",
               "steps_per_epoch", "samples_seen", "total_samples", "test_loss", "test_accuracy",
               "lease_token", "lease_expires_at", "heartbeat_at", "worker_hostname",
               "created_at", "queued_at", "published_at", "started_at", "finished_at",
               "owner_id")  # fmt: skip


def queued_count(size: int) -> int:
    """1,000 queued jobs, or a tenth of a smaller table (mostly finished all the same)."""
    return min(QUEUED, size // 10)


def _job_rows(size: int, now: datetime, seeded: Seeded) -> Iterator[tuple[Any, ...]]:
    """``size`` jobs over the last days, oldest first: finished, then running, then queued."""
    finished = size - queued_count(size) - RUNNING
    for n in range(size):
        job_id = uuid.uuid4().hex
        created = now - timedelta(seconds=5 * (size - n))
        if n < finished:
            status = random.choice(("succeeded",) * 18 + ("failed", "cancelled"))
            seeded.finished.append(job_id)
            yield (job_id, status, HP, "auto", "cpu", "cpu", 0, 1, False, 1, 1, 938, 938,
                   60000, 60000, 0.1, 0.97, None, None, created, "bench", created, created,
                   created, created, created + timedelta(seconds=4), seeded.owner_id)  # fmt: skip
        elif n < finished + RUNNING:
            expires = now + timedelta(seconds=30 if n % 2 else -30)
            yield (job_id, "running", HP, "auto", "cpu", "cpu", 0, 1, False, 1, 1, 400, 938,
                   25600, 60000, None, None, uuid.uuid4().hex, expires, now, "bench", created,
                   created, created, created, None, seeded.owner_id)  # fmt: skip
        else:
            seeded.queued.append(job_id)
            yield (job_id, "queued", HP, "auto", None, "cpu", 0, 0, False, 0, 1, 0, 0, 0,
                   0, None, None, None, None, None, None, created, created, now, None,
                   None, seeded.owner_id)  # fmt: skip


def seed(database_url: str, size: int) -> Seeded:
    """COPY ``size`` jobs of one (ordinary) user, with artifacts and metrics, into the database."""
    import psycopg

    from shared.auth import create_user
    from shared.db import make_engine, make_session_factory

    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        user, issued = create_user(session, "bench")
        seeded = Seeded([], [], user.id, issued.secret)
    engine.dispose()
    now = datetime.now(UTC)
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        _copy(conn, "job", JOB_COLUMNS, _job_rows(size, now, seeded))
        _copy(conn, "artifact", ("job_id", "name", "kind", "size", "sha256", "created_at"),
              ((j, name, "model", 1000, "0" * 64, now) for j in seeded.finished
               for name in ARTIFACTS))  # fmt: skip
        _copy(conn, "metric", ("job_id", "kind", "epoch", "step", "samples_seen", "loss",
                               "accuracy", "seconds"),
              ((j, kind, 1, step, step * 64, 0.5, acc, 1.0) for j in seeded.finished
               for kind, step, acc in (("train", 1, None), ("train", 500, None),
                                       ("train", 931, None), ("test", 938, 0.97))))  # fmt: skip
        conn.execute("ANALYZE")
    return seeded


def timed(fn: Callable[[], object], samples: int) -> tuple[float, float]:
    """(p50, p99) of ``fn``'s wall time in milliseconds over ``samples`` calls, after 5."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), percentile(times, 0.99)


def measure(database_url: str, work: Path, seeded: Seeded, samples: int) -> dict[str, Any]:
    """p50/p99 of each operation against one seeded database."""
    from api import create_app
    from shared.config import Settings
    from shared.db import make_session_factory
    from shared.lease import Claimant, QueueOf, claim_next
    from shared.workers import queue_positions
    from worker.reaper import reap_once
    from worker.runner import make_worker_engine

    settings = Settings(database_url=database_url, var_dir=work / "var",
                        artifact_dir=work / "art", broker_url="filesystem://")  # fmt: skip
    app = create_app(settings, publish=lambda job_id, queue: None)
    factory = make_session_factory(make_worker_engine(settings))
    client = app.test_client()
    # The owner of every job, not an admin: the list is scoped to the caller's own jobs.
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {seeded.token}"

    def get_job() -> None:
        assert client.get(f"/api/v1/jobs/{random.choice(seeded.finished)}").status_code == 200

    def list_page() -> None:
        assert client.get("/api/v1/jobs").status_code == 200

    def position() -> None:
        with factory() as session:
            assert queue_positions(session, [seeded.queued[-1]])

    claimant = Claimant(hostname="bench", worker_id="b" * 32, pid=1)

    def claim() -> None:
        message = QueueOf(seeded.queued[-1])  # the newest: claims take the oldest first
        lease = claim_next(factory, message, claimant=claimant, lease_seconds=30,
                           max_running_per_user=settings.max_running_jobs_per_user)  # fmt: skip
        assert lease is not None

    def reap() -> None:
        reap_once(settings, factory, lambda job_id, queue: None)

    # Claims take queued jobs for good: at most a fifth of the queue, so it stays about as long.
    return {
        "get_job": timed(get_job, samples),
        "list_page": timed(list_page, samples),
        "position": timed(position, samples),
        "claim": timed(claim, min(samples, len(seeded.queued) // 5 - 5)),
        "reaper": timed(reap, max(10, samples // 10)),
    }


def dispatch(tiny_jobs: int, slots: int) -> dict[str, float]:
    """Tiny jobs end to end with ``slots`` slots: jobs/min, and seconds per job beyond its run."""
    work = Path(f"/tmp/mnistq-scale-{uuid.uuid4().hex[:6]}")
    work.mkdir(parents=True)
    with stack(work, slots=slots, extra_env={"MNISTQ_MAX_TRAIN_BATCHES": "1"}) as (base, _, _):
        # One job first: the worker is up and its job processes have warmed at least once.
        poll_until(base, submit(base, {"n_epochs": 1}), {"succeeded"}, 0.1, timeout=300)
        time.sleep(15)
        t0 = time.perf_counter()
        ids = [submit(base, {"n_epochs": 1}) for _ in range(tiny_jobs)]
        jobs = [poll_until(base, i, {"succeeded", "failed"}, 0.1, timeout=900) for i in ids]
        wall = time.perf_counter() - t0
    runs = [_seconds(j["finished_at"]) - _seconds(j["started_at"]) for j in jobs]
    per_slot = slots * wall / tiny_jobs
    return {
        "jobs": tiny_jobs,
        "failed": sum(j["status"] != "succeeded" for j in jobs),
        "jobs_per_minute": 60 * tiny_jobs / wall,
        "seconds_per_job_per_slot": per_slot,
        "run_seconds_p50": statistics.median(runs),
        "overhead_seconds_per_job": per_slot - statistics.median(runs),
    }


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def print_table(rows: list[tuple[int, dict[str, Any]]]) -> None:
    """One line per size; each cell p50 / p99 in ms."""
    names = ("get_job", "list_page", "position", "claim", "reaper")
    heads = ("GET job", "list page", "position", "claim", "reaper pass")
    print("\njobs     queued" + "".join(f"{h:>18}" for h in heads) + "   (p50 / p99 ms)")
    for size, result in rows:
        cells = "".join(f"{result[n][0]:>9.2f} /{result[n][1]:>7.2f}" for n in names)
        print(f"{size:<9}{queued_count(size):>6}{cells}")


def main() -> None:
    """Seed each size, measure, print the table; then the tiny-job dispatch rate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--tiny-jobs", type=int, default=30, help="0 skips the dispatch part")
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        work = Path(f"/tmp/mnistq-scale-{uuid.uuid4().hex[:6]}")
        with fresh_database() as database_url:
            from shared.migrate import upgrade

            upgrade(database_url)
            t0 = time.perf_counter()
            seeded = seed(database_url, size)
            print(f"{size} jobs seeded by COPY in {time.perf_counter() - t0:.1f} s", flush=True)
            rows.append((size, measure(database_url, work, seeded, args.samples)))
    if rows:
        print_table(rows)
    if args.tiny_jobs:
        tiny = dispatch(args.tiny_jobs, args.slots)
        print(
            f"\ntiny jobs (1 epoch, 1 batch), {args.slots} slots, Redis: {tiny['jobs']} jobs, "
            f"{tiny['jobs_per_minute']:.1f} jobs/min, {tiny['seconds_per_job_per_slot']:.2f} s "
            f"per job per slot, of which the run (started→finished) p50 "
            f"{tiny['run_seconds_p50']:.2f} s and the rest {tiny['overhead_seconds_per_job']:.2f} s"
            f"; failed {tiny['failed']}"
        )
    print(json.dumps({"sizes": dict(rows), "tiny": tiny if args.tiny_jobs else None}))


if __name__ == "__main__":
    main()
