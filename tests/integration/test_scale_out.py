"""Many workers, no shared disk: object storage, priorities, claims and draining, for real.

The API and every worker share only PostgreSQL, Redis and a SeaweedFS S3 server. Each
worker has its own working directory and scratch folder; the API has no artifact folder.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from sqlalchemy import select

from shared.models import Job
from tests.integration.conftest import RedisServer, engine_and_factory
from tests.integration.stack import Api, Process, stack_env
from tests.seaweedfs import CREDENTIALS, SeaweedFS

pytestmark = [pytest.mark.integration, pytest.mark.mnist]

SLOW = {"batch_size_train": 250, "log_interval": 2}
QUICK = {"batch_size_train": 64, "log_interval": 5}


class Cluster:
    """`mnistq api` and any number of `mnistq worker`, sharing no folder."""

    def __init__(self, env: dict[str, str], root: Path, bucket: str, server: SeaweedFS) -> None:
        self.env, self.root, self.bucket, self.s3 = env, root, bucket, server
        self.api = Api(env, root / "api.log")
        self.engine, self.db = engine_and_factory(env["MNISTQ_DATABASE_URL"])
        self.workers: list[Process] = []
        self._names = itertools.count(1)

    def worker(self, concurrency: int = 1, **settings: str) -> Process:
        """Start a worker in a folder of its own, with its own var and scratch folders and
        any other ``MNISTQ_*`` ``settings``."""
        home = self.root / f"worker-{next(self._names)}"
        home.mkdir()
        env = self.env | settings | {"MNISTQ_VAR_DIR": str(home / "var"),
                                     "MNISTQ_SCRATCH_DIR": str(home / "scratch")}  # fmt: skip
        args = ["worker", "--queues", "cpu", "--concurrency", str(concurrency)]
        process = Process(args, env, home / "worker.log", cwd=home).start()
        self.workers.append(process)
        return process

    def registry_id(self, process: Process, timeout: float = 30) -> str:
        """The registry id of a started worker, by its pid, once it is live."""
        assert process.popen is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for worker in self.api.get("/workers")["items"]:
                if worker["pid"] == process.popen.pid and worker["state"] == "live":
                    return str(worker["id"])
            time.sleep(0.2)
        pytest.fail(f"worker {process.popen.pid} never became live: {process.tail()}")

    def stop_workers(self, timeout: float = 30) -> None:
        """Stop every worker still running as ``docker stop`` would, then wait until the
        registry lists none but lost ones (a killed worker's row ages out in three heartbeats), so
        the next test starts with no worker but its own."""
        for process in self.workers:
            if process.popen is not None and process.popen.poll() is None:
                process.terminate(timeout)
        self.workers.clear()
        deadline = time.monotonic() + timeout
        while any(w["state"] != "lost" for w in self.api.get("/workers")["items"]):
            assert time.monotonic() < deadline, self.api.get("/workers")["items"]
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill every process."""
        for process in [*self.workers, self.api.process]:
            process.kill()
        self.engine.dispose()


@pytest.fixture(scope="module")
def cluster(
    pg_module_url: str,
    redis_server: RedisServer,
    seaweedfs: SeaweedFS,
    mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """The API (no artifact folder) on PostgreSQL, Redis and a SeaweedFS bucket."""
    root = tmp_path_factory.mktemp("cluster")
    bucket = seaweedfs.new_bucket()
    env = stack_env(
        database_url=pg_module_url, broker_url=redis_server.url, var_dir=root / "api-var",
        data_dir=mnist_dir,
    )  # fmt: skip
    env |= CREDENTIALS | {
        "MNISTQ_ARTIFACT_URL": f"s3://{bucket}/runs",
        "MNISTQ_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
        # Set, but to a folder nobody creates: with an artifact URL it must stay unused.
        "MNISTQ_ARTIFACT_DIR": str(root / "no-artifact-folder"),
    }
    system = Cluster(env, root, bucket, seaweedfs)
    system.api.start()
    yield system
    system.stop()


@pytest.fixture(autouse=True)
def no_worker_left(cluster: Cluster) -> Iterator[None]:
    """Each test starts the workers it counts on, and leaves none behind."""
    yield
    cluster.stop_workers()


def ran_on(cluster: Cluster, job_id: str) -> str | None:
    """The registry id of the worker that claimed the job's last attempt."""
    with cluster.db() as session:
        return session.scalar(select(Job.worker_id).where(Job.id == job_id))


def digit_png() -> bytes:
    """A white 7 on black, as a PNG."""
    image = Image.new("L", (28, 28))
    ImageDraw.Draw(image).line([(6, 6), (21, 6), (11, 22)], fill=255, width=3)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def in_epoch_2(job: dict[str, Any]) -> bool:
    """Ten steps into epoch 2 of a 2-epoch SLOW job: the epoch-1 checkpoint is recorded."""
    return bool(job["progress"]["epoch"] == 2 and job["progress"]["step"] >= 10)


def log_text(cluster: Cluster, job_id: str) -> str:
    """The job's whole log, a line per entry."""
    return "\n".join(line["message"] for line in cluster.api.log_lines(job_id))


def every_artifact_is_whole(cluster: Cluster, job_id: str) -> set[str]:
    """Each recorded artifact downloads with its recorded size and sha256 (rows follow
    uploads); their names."""
    names = set()
    for artifact in cluster.api.get(f"/jobs/{job_id}/artifacts")["items"]:
        body = cluster.api.http.get(f"{cluster.api.base}{artifact['url']}", timeout=30)
        assert body.status_code == 200, artifact
        assert hashlib.sha256(body.content).hexdigest() == artifact["sha256"], artifact["name"]
        assert len(body.content) == artifact["size"], artifact["name"]
        names.add(artifact["name"])
    return names


def test_a_job_killed_on_one_machine_resumes_on_another_from_the_object_store(
    cluster: Cluster,
) -> None:
    first = cluster.worker()
    job_id = cluster.api.submit({"hyperparameters": {"n_epochs": 2, **SLOW}})["id"]
    at_kill = cluster.api.wait(job_id, in_epoch_2)
    assert "checkpoints/epoch-1.pt" in {a["name"] for a in at_kill["artifacts"]}
    first.kill()  # its scratch folder and everything in it stay behind on "machine A"
    second = cluster.worker()
    job = cluster.api.wait_finished(job_id, timeout=120)
    assert (job["status"], job["attempt"]) == ("succeeded", 2), job["error"]
    assert [m["epoch"] for m in job["test_metrics"]] == [0, 1, 2]
    assert ran_on(cluster, job_id) == cluster.registry_id(second)

    names = every_artifact_is_whole(cluster, job_id)
    assert {"model.pth", "optimizer.pth", "checkpoints/epoch-2.pt", "metrics.json"} <= names
    assert cluster.s3.keys(cluster.bucket, f"runs/{job_id}/") == sorted(
        f"runs/{job_id}/{name}" for name in names
    )
    assert not Path(cluster.env["MNISTQ_ARTIFACT_DIR"]).exists()
    # The worker that finished the job cleaned its scratch folder; the killed one could not.
    assert not (second.cwd / "scratch" / job_id).exists()
    assert (first.cwd / "scratch" / job_id).exists()
    # A prediction loads model.pth through the store too.
    answer = cluster.api.http.post(
        f"{cluster.api.base}/api/v1/jobs/{job_id}/predict", data=digit_png(),
        headers={"Content-Type": "image/png"}, timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert 0 <= answer.json()["digit"] <= 9


def test_queued_jobs_start_by_priority_then_age_and_their_positions_say_so(
    cluster: Cluster,
) -> None:
    cluster.worker()
    blocker = cluster.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
    cluster.api.wait(blocker, lambda j: j["status"] == "running")
    ids = {}
    for label, priority in [("a", 0), ("b", 0), ("c", 50), ("d", -10)]:
        body = {"name": label, "priority": priority, "hyperparameters": {"n_epochs": 1, **QUICK}}
        ids[label] = cluster.api.submit(body)["id"]
    positions = {
        label: cluster.api.job(job_id)["queue_status"]["position"] for label, job_id in ids.items()
    }
    listed = cluster.api.get("/queues")["items"]
    jobs = [cluster.api.wait_finished(job_id, timeout=120) for job_id in ids.values()]
    started = sorted(jobs, key=lambda job: job["started_at"])
    assert [job["name"] for job in started] == ["c", "a", "b", "d"]
    assert positions == {"c": 1, "a": 2, "b": 3, "d": 4}
    cpu = next(q for q in listed if q["name"] == "cpu")
    assert (cpu["queued"], cpu["running"], cpu["live_workers"]) == (4, 1, 1)
    assert cpu["oldest_wait_seconds"] > 0
    assert all(job["status"] == "succeeded" for job in jobs)


def test_a_draining_worker_finishes_its_job_takes_no_other_and_exits(cluster: Cluster) -> None:
    draining = cluster.worker()
    short = cluster.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
    cluster.api.wait(short, lambda j: j["status"] == "running")
    other = cluster.worker()
    long = cluster.api.submit({"hyperparameters": {"n_epochs": 3, **SLOW}})["id"]
    cluster.api.wait(long, lambda j: j["status"] == "running")
    waiting = cluster.api.submit({"hyperparameters": {"n_epochs": 1, **QUICK}})["id"]
    drained_id = cluster.registry_id(draining)
    response = cluster.api.http.post(
        f"{cluster.api.base}/api/v1/workers/{drained_id}/drain", timeout=10
    )
    assert response.status_code == 202 and response.json()["state"] == "draining", response.text
    assert cluster.api.wait_finished(short)["status"] == "succeeded"
    assert draining.popen is not None
    assert draining.popen.wait(timeout=60) == 0, draining.tail()  # it exits on its own
    job = cluster.api.wait_finished(waiting, timeout=180)
    assert job["status"] == "succeeded"
    assert job["lease"] is None
    assert ran_on(cluster, waiting) == cluster.registry_id(other)
    assert drained_id not in {w["id"] for w in cluster.api.get("/workers")["items"]}
    # Both ran on one host: the drain's control message reached only the drained worker.
    assert "Canceling queue" in draining.tail(100_000)
    assert "Canceling queue" not in other.tail(100_000)


def test_a_job_waits_out_a_store_outage_and_goes_on_without_losing_its_attempt(
    cluster: Cluster,
) -> None:
    worker = cluster.worker()
    job_id = cluster.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
    cluster.api.wait(job_id, lambda j: j["status"] == "running")
    cluster.s3.stop()  # the upload of its next file fails, after botocore's retries
    try:
        deadline = time.monotonic() + 60
        while "artifact store unavailable" not in worker.tail(100_000):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.2)
        assert cluster.api.job(job_id)["status"] == "running"  # paused, its lease held
    finally:
        cluster.s3.start()
    job = cluster.api.wait_finished(job_id, timeout=180)
    assert (job["status"], job["attempt"]) == ("succeeded", 1), job["error"]
    assert "the artifact store stayed unavailable" not in log_text(cluster, job_id)
    assert "trying again in" in worker.tail(100_000)
    every_artifact_is_whole(cluster, job_id)


def test_a_store_outage_longer_than_the_wait_hands_the_job_back_and_loses_nothing(
    cluster: Cluster,
) -> None:
    # Short waits, and attempts to spare while the store starts again.
    worker = cluster.worker(MNISTQ_STORE_WAIT_SECONDS="4", MNISTQ_MAX_ATTEMPTS="5")
    job_id = cluster.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
    cluster.api.wait(job_id, lambda j: j["status"] == "running")
    cluster.s3.stop()
    try:
        deadline = time.monotonic() + 90
        while "the artifact store stayed unavailable" not in log_text(cluster, job_id):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.2)
    finally:
        cluster.s3.start()
    job = cluster.api.wait_finished(job_id, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] >= 2, job["error"]
    every_artifact_is_whole(cluster, job_id)
    assert "artifact store unavailable, requeueing" in worker.tail(100_000)
