"""The whole path of a job through real processes: gunicorn API, Redis, Celery workers, PostgreSQL.

Jobs train the real MNIST. Leases are short (4 s, heartbeat 1 s, reaper every 1 s) so that
a killed worker's job is requeued within seconds.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from shared.celery_app import make_celery, publish_train
from shared.config import Settings
from tests.integration.conftest import RedisServer
from tests.integration.stack import Api, Process, stack_env

pytestmark = [pytest.mark.integration, pytest.mark.mnist]

ALL_ARTIFACTS = {
    "model.pth", "optimizer.pth", "examples.png", "loss_curve.png", "predictions.png",
    "checkpoints/epoch-1.pt", "metrics.json",
}  # fmt: skip
# Epochs are capped at MAX_TRAIN_BATCHES batches: QUICK epochs take well under a second,
# SLOW ones (100 batches of 250) a few seconds, long enough to stop a worker mid-epoch.
QUICK = {"batch_size_train": 64, "log_interval": 5}
SLOW = {"batch_size_train": 250, "log_interval": 2}
# Reaches ≥ 0.93 test accuracy within 100 batches (0.939 on CPU with seed 1).
ACCURATE = {"batch_size_train": 128, "optimizer": "adam", "learning_rate": 0.003, "momentum": 0.9}


class Stack:
    """API, a cpu worker and a maintenance worker running beat (the reaper), sharing env."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.api = Api(env, logs / "api.log")
        self.worker = self.new_worker()
        self.reaper = Process(
            ["worker", "--queues", "maintenance", "--beat", "--loglevel", "WARNING"],
            env, logs / "reaper.log",
        )  # fmt: skip
        settings = Settings(
            broker_url=env["MNISTQ_BROKER_URL"], var_dir=Path(env["MNISTQ_VAR_DIR"])
        )
        self.celery: Celery = make_celery(settings)

    def new_worker(self) -> Process:
        """A cpu worker process (not started)."""
        return Process(["worker", "--queues", "cpu"], self.env, self.logs / "worker.log")

    def artifact_path(self, job_id: str, name: str) -> Path:
        """Where the worker wrote a job's file."""
        return Path(self.env["MNISTQ_ARTIFACT_DIR"]) / job_id / name


@pytest.fixture(scope="module")
def stack(
    pg_url: str,
    redis_server: RedisServer,
    mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The running system; logs are printed when a test fails to help see why."""
    var = tmp_path_factory.mktemp("var")
    env = stack_env(
        database_url=pg_url, broker_url=redis_server.url, var_dir=var, data_dir=mnist_dir
    )
    system = Stack(env, var)
    system.api.start()
    system.worker.start()
    system.reaper.start()
    yield system
    for process in (system.worker, system.reaper, system.api.process):
        process.kill()


@pytest.fixture(scope="module")
def trained(stack: Stack) -> dict[str, Any]:
    """A one-epoch job (created in the first test), trained to ≥ 0.93 test accuracy."""
    body = {"name": "one epoch", "hyperparameters": {"n_epochs": 1, "log_interval": 5, **ACCURATE}}
    created = stack.api.submit(body)
    return {"created": created, "submitted_at": time.monotonic()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_submitted_job_runs_and_reports_progress_to_success(
    stack: Stack, trained: dict[str, Any]
) -> None:
    created = trained["created"]
    assert (created["status"], created["queue"], created["attempt"]) == ("queued", "cpu", 0)
    job_id = created["id"]
    running = stack.api.wait(
        job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0
    )
    latency = time.monotonic() - trained["submitted_at"]
    later = stack.api.wait(
        job_id, lambda j: j["progress"]["samples_seen"] > running["progress"]["samples_seen"]
    )
    assert later["status"] in ("running", "succeeded")
    job = stack.api.wait_finished(job_id)
    print(f"submit → running with progress: {latency:.2f}s")
    assert job["status"] == "succeeded", job["error"]
    assert (job["attempt"], job["device_used"]) == (1, "cpu")
    assert job["test_accuracy"] >= 0.93
    assert [m["epoch"] for m in job["test_metrics"]] == [1]
    progress = job["progress"]
    assert (progress["epoch"], progress["step"]) == (1, progress["steps_per_epoch"])


def test_a_succeeded_job_lists_every_artifact_with_a_matching_sha256(
    stack: Stack, trained: dict[str, Any]
) -> None:
    job_id = trained["created"]["id"]
    stack.api.wait_finished(job_id)
    listing = stack.api.get(f"/jobs/{job_id}/artifacts")["items"]
    assert {a["name"] for a in listing} == ALL_ARTIFACTS
    for artifact in listing:
        response = stack.api.http.get(f"{stack.api.base}{artifact['url']}", timeout=10)
        assert response.status_code == 200, artifact["name"]
        assert len(response.content) == artifact["size"] > 0
        assert sha256(response.content) == artifact["sha256"], artifact["name"]


def test_the_same_message_delivered_twice_runs_the_job_once(stack: Stack) -> None:
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 1, **QUICK}})["id"]
    publish_train(stack.celery, job_id, "cpu")
    publish_train(stack.celery, job_id, "cpu")
    job = stack.api.wait_finished(job_id)
    assert (job["status"], job["attempt"]) == ("succeeded", 1)
    metrics = stack.api.get(f"/jobs/{job_id}/metrics")
    steps = [point["step"] for point in metrics["train"]]
    assert steps == sorted(set(steps))
    assert [point["epoch"] for point in metrics["test"]] == [1]


def test_a_job_resumes_from_another_jobs_checkpoint(stack: Stack, trained: dict[str, Any]) -> None:
    source = stack.api.wait_finished(trained["created"]["id"])
    body = {
        "hyperparameters": {"n_epochs": 2, "log_interval": 5, **ACCURATE},
        "resume_from": {"job_id": source["id"], "epoch": 1},
    }
    job = stack.api.wait_finished(stack.api.submit(body)["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["resume_from"] == {"job_id": source["id"], "epoch": 1}
    # Epoch 1 is the source's (carried in the checkpoint); this job trained epoch 2 only.
    assert [m["epoch"] for m in job["test_metrics"]] == [1, 2]
    assert job["test_metrics"][0] == source["test_metrics"][0]
    metrics = stack.api.get(f"/jobs/{job['id']}/metrics")
    assert min(p["step"] for p in metrics["train"] if p["epoch"] == 2) > max(
        p["step"] for p in metrics["train"] if p["epoch"] == 1
    )
    names = {a["name"] for a in job["artifacts"]}
    assert "checkpoints/epoch-2.pt" in names and "checkpoints/epoch-1.pt" not in names


def test_a_cuda_job_waits_for_a_gpu_worker_and_fails_clearly_on_a_cpu_one(stack: Stack) -> None:
    job = stack.api.submit({"device": "cuda", "hyperparameters": {"n_epochs": 1, **QUICK}})
    assert job["queue"] == "gpu"
    time.sleep(2)  # no worker serves gpu here: it waits, published, untouched
    assert stack.api.job(job["id"])["status"] == "queued"
    # A worker without CUDA that takes it anyway (misrouted) must say why it cannot run it.
    publish_train(stack.celery, job["id"], "cpu")
    failed = stack.api.wait_finished(job["id"])
    assert (failed["status"], failed["attempt"]) == ("failed", 1)
    assert "cuda" in failed["error"]["message"].lower()


def test_an_error_in_training_fails_the_job_without_retrying(stack: Stack) -> None:
    source = stack.api.wait_finished(
        stack.api.submit({"hyperparameters": {"n_epochs": 1, **QUICK}})["id"]
    )
    stack.artifact_path(source["id"], "checkpoints/epoch-1.pt").write_bytes(b"not a checkpoint")
    body = {
        "hyperparameters": {"n_epochs": 2, **QUICK},
        "resume_from": {"job_id": source["id"], "epoch": 1},
    }
    job = stack.api.wait_finished(stack.api.submit(body)["id"])
    assert (job["status"], job["attempt"]) == ("failed", 1)
    assert "CheckpointError" in job["error"]["message"]
    assert "Traceback" in job["error"]["traceback"]
    time.sleep(2)  # two reaper passes: a failed job stays failed
    assert (stack.api.job(job["id"])["status"], stack.api.job(job["id"])["attempt"]) == (
        "failed", 1,
    )  # fmt: skip


def test_cancelling_a_running_job_stops_it_at_the_next_heartbeat(stack: Stack) -> None:
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 2, **SLOW}})["id"]
    stack.api.wait(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
    asked = time.monotonic()
    response = stack.api.http.post(f"{stack.api.base}/api/v1/jobs/{job_id}/cancel", timeout=10)
    assert response.status_code == 202, response.text
    job = stack.api.wait_finished(job_id, timeout=30)
    print(f"cancel → cancelled: {time.monotonic() - asked:.2f}s")
    assert (job["status"], job["attempt"]) == ("cancelled", 1)
    assert job["finished_at"] is not None and job["test_accuracy"] is None


def test_a_job_submitted_while_redis_is_down_runs_once_it_is_back(
    stack: Stack, redis_server: RedisServer
) -> None:
    redis_server.stop()
    try:
        started = time.monotonic()
        job = stack.api.submit({"hyperparameters": {"n_epochs": 1, **QUICK}})
        assert time.monotonic() - started < 10
        assert (job["status"], job["published_at"]) == ("queued", None)
    finally:
        redis_server.start()  # empty: whatever it held is lost, as after a crash
    done = stack.api.wait_finished(job["id"], timeout=60)
    assert (done["status"], done["attempt"]) == ("succeeded", 1)


def test_a_worker_shut_down_gracefully_hands_its_job_back_at_once(stack: Stack) -> None:
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 2, **SLOW}})["id"]
    stack.api.wait(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
    started = time.monotonic()
    exit_code = stack.worker.terminate(timeout=30)
    stopped_after = time.monotonic() - started
    job = stack.api.job(job_id)
    print(f"SIGTERM → worker exited, job queued: {stopped_after:.2f}s")
    assert exit_code == 0, stack.worker.tail()
    assert (job["status"], job["attempt"]) == ("queued", 0)
    assert stopped_after < 10
    stack.worker = stack.new_worker().start()
    done = stack.api.wait_finished(job_id)
    assert (done["status"], done["attempt"]) == ("succeeded", 1)
    assert [m["epoch"] for m in done["test_metrics"]] == [1, 2]


def test_a_killed_workers_job_is_requeued_and_finished_by_a_fresh_worker(stack: Stack) -> None:
    body = {"hyperparameters": {"n_epochs": 2, **SLOW}}
    job_id = stack.api.submit(body)["id"]
    mid_epoch_2 = stack.api.wait(
        job_id, lambda j: j["progress"]["epoch"] == 2 and j["progress"]["step"] >= 10
    )
    assert mid_epoch_2["status"] == "running"
    killed = time.monotonic()
    stack.worker.kill()
    requeued = stack.api.wait(job_id, lambda j: j["status"] != "running", timeout=30)
    requeued_after = time.monotonic() - killed
    assert requeued["status"] == "queued"
    stack.worker = stack.new_worker().start()
    resumed = stack.api.wait(job_id, lambda j: j["status"] == "running", timeout=60)
    resumed_after = time.monotonic() - killed
    job = stack.api.wait_finished(job_id)
    print(
        f"SIGKILL → requeued {requeued_after:.2f}s, → running again {resumed_after:.2f}s "
        f"(fresh worker started after the requeue)"
    )
    assert (job["status"], job["attempt"]) == ("succeeded", 2), job["error"]
    assert resumed["attempt"] == 2
    assert [m["epoch"] for m in job["test_metrics"]] == [1, 2]
    steps = [p["step"] for p in stack.api.get(f"/jobs/{job_id}/metrics")["train"]]
    assert all(a < b for a, b in itertools.pairwise(steps)), steps
