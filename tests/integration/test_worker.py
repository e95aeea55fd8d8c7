"""The whole path of a job through real processes: gunicorn API, Redis, Celery workers, PostgreSQL.

Jobs train the real MNIST. Leases are short (4 s, heartbeat 1 s, reaper every 1 s) so that
a killed worker's job is requeued within seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select
from standardwebhooks import Webhook

from client import events as sse
from client.events import ServerEvent
from shared import workers
from shared.celery_app import make_celery, publish_train
from shared.config import Settings
from shared.models import Artifact, Job, Metric
from tests.integration.conftest import RedisServer, engine_and_factory
from tests.integration.stack import Api, Process, stack_env
from tests.webhook_receiver import Receiver, receiving

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
    """API and a cpu worker (whose main process also reaps), sharing env."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.api = Api(env, logs / "api.log")
        self.worker = self.new_worker()
        settings = Settings(
            broker_url=env["MNISTQ_BROKER_URL"], var_dir=Path(env["MNISTQ_VAR_DIR"])
        )
        self.celery: Celery = make_celery(settings)
        self.engine, self.db = engine_and_factory(env["MNISTQ_DATABASE_URL"])
        self._workers = itertools.count(1)

    def new_worker(self, log: str = "worker.log") -> Process:
        """A cpu worker process (not started)."""
        return Process(
            ["worker", "--queues", "cpu", "--concurrency", "1"], self.env, self.logs / log
        )

    def extra_worker(self) -> Process:
        """Another cpu worker with a log of its own (not started)."""
        return self.new_worker(f"worker-{next(self._workers)}.log")

    def artifact_path(self, job_id: str, name: str) -> Path:
        """Where the worker wrote a job's file."""
        return Path(self.env["MNISTQ_ARTIFACT_DIR"]) / job_id / name

    def live_workers(self, queue: str = "cpu") -> int:
        """Workers the registry counts as alive on ``queue`` now."""
        with self.db() as session:
            return sum(1 for w in workers.live_workers(session) if workers.serves(w, queue))

    def wait_live_workers(self, count: int, queue: str = "cpu", timeout: float = 30) -> None:
        """Block until exactly ``count`` live workers serve ``queue``."""
        deadline = time.monotonic() + timeout
        while (live := self.live_workers(queue)) != count:
            if time.monotonic() > deadline:
                pytest.fail(f"{live} live {queue} workers after {timeout}s, expected {count}")
            time.sleep(0.1)


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
    yield system
    for process in (system.worker, system.api.process):
        process.kill()
    system.engine.dispose()


@pytest.fixture(scope="module")
def trained(stack: Stack) -> dict[str, Any]:
    """A one-epoch job trained to ≥ 0.93 test accuracy, and how it looked while it ran:
    watched here, so whichever test of the module comes first, the run is seen running."""
    body = {"name": "one epoch", "hyperparameters": {"n_epochs": 1, "log_interval": 5, **ACCURATE}}
    created = stack.api.submit(body)
    submitted_at = time.monotonic()
    running = stack.api.wait(
        created["id"], lambda j: j["status"] == "running" and j["progress"]["step"] > 0
    )
    latency = time.monotonic() - submitted_at
    later = stack.api.wait(
        created["id"],
        lambda j: j["progress"]["samples_seen"] > running["progress"]["samples_seen"],
    )
    return {"created": created, "running": running, "later": later, "latency": latency}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_submitted_job_runs_and_reports_progress_to_success(
    stack: Stack, trained: dict[str, Any]
) -> None:
    created = trained["created"]
    assert (created["status"], created["queue"], created["attempt"]) == ("queued", "cpu", 0)
    job_id = created["id"]
    running, later = trained["running"], trained["later"]
    assert running["status"] == "running" and running["progress"]["step"] > 0
    assert later["status"] in ("running", "succeeded")
    assert later["progress"]["samples_seen"] > running["progress"]["samples_seen"]
    job = stack.api.wait_finished(job_id)
    print(f"submit → running with progress: {trained['latency']:.2f}s")
    assert job["status"] == "succeeded", job["error"]
    assert (job["attempt"], job["device_used"]) == (1, "cpu")
    assert job["test_accuracy"] >= 0.93
    assert [m["epoch"] for m in job["test_metrics"]] == [0, 1]
    progress = job["progress"]
    assert (progress["epoch"], progress["step"]) == (1, progress["steps_per_epoch"])


TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[(\d+)/60000 \((\d+)%\)\]\tLoss: \d+\.\d{6}")
TEST_LINE = re.compile(r"Test set: Avg\. loss: \d+\.\d{4}, Accuracy: (\d+)/10000 \((\d+)%\)")


def test_a_one_epoch_jobs_log_holds_the_claim_then_the_seeds_lines_once_each(
    stack: Stack, trained: dict[str, Any]
) -> None:
    job = stack.api.wait_finished(trained["created"]["id"])
    lines = stack.api.log_lines(job["id"])
    messages = [line["message"] for line in lines]
    assert re.fullmatch(r"claimed by worker \w+ \(pid \d+\) on host .+, attempt 1", messages[0])
    assert messages[1] == "training from scratch on cpu"
    # The seed's test() before training (the untrained net guesses), then epoch 1 logged
    # every log_interval=5 of its 100 batches of 128, then epoch 1's test.
    untrained = TEST_LINE.fullmatch(messages[2])
    assert untrained and 500 <= int(untrained.group(1)) <= 2000, messages[2]
    assert messages[3].startswith("Train Epoch: 1 [0/60000 (0%)]\tLoss: ")
    trains = [TRAIN_LINE.fullmatch(m) for m in messages[3:23]]
    assert [int(m.group(2)) for m in trains if m] == [b * 128 for b in range(0, 100, 5)]
    tested = TEST_LINE.fullmatch(messages[23])
    assert tested and int(tested.group(1)) == round(job["test_accuracy"] * 10000)
    assert messages[24] == f"succeeded: test loss {job['test_loss']:.4f}, accuracy " + (
        f"{job['test_accuracy']:.2%}"
    )
    assert len(messages) == 25 and {line["attempt"] for line in lines} == {1}
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(set(seqs))
    text = stack.api.http.get(f"{stack.api.base}/api/v1/jobs/{job['id']}/logs.txt", timeout=10)
    assert text.text == "".join(f"{m}\n" for m in messages)


def read_events(
    stack: Stack, job_id: str, last_id: int | None, stop_after: int | None
) -> list[ServerEvent]:
    """The job's event stream (after ``last_id``): ``stop_after`` events, or all to ``end``."""
    headers = {"Accept": "text/event-stream"}
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    url = f"{stack.api.base}/api/v1/jobs/{job_id}/events"
    got: list[ServerEvent] = []
    with stack.api.http.get(url, headers=headers, stream=True, timeout=(10, 30)) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for event in sse.parse(sse.lines(response.iter_content(chunk_size=None))):
            got.append(event)
            if event.event == "end" or len(got) == stop_after:
                break
    return got


def test_a_running_jobs_stream_sends_progress_every_log_interval_and_resumes_without_gaps(
    stack: Stack,
) -> None:
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 1, **QUICK, "log_interval": 2}})[
        "id"
    ]
    stack.api.wait(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
    first = read_events(stack, job_id, None, stop_after=30)  # then the connection drops
    rest = read_events(stack, job_id, first[-1].id, stop_after=None)
    assert rest[-1].event == "end"
    whole = read_events(stack, job_id, None, stop_after=None)  # a replay from the start
    ids = [e.id for e in first + rest[:-1]]
    assert ids == [e.id for e in whole[:-1]]  # resumed exactly where it left off
    trains = [e for e in whole if e.event == "metric" and e.data["kind"] == "train"]
    progress = [e for e in whole if e.event == "progress"]
    # 100 batches logged every 2: 50 train points, each written with its progress.
    assert len(trains) == 50 and len(progress) >= 50
    # Between two train points there is always a progress event: one per log interval.
    between = "".join("t" if e in trains else "p" if e in progress else "" for e in whole)
    assert "tt" not in between and between.endswith("p")
    assert [e.data["status"] for e in whole if e.event == "status"] == ["running", "succeeded"]
    assert progress[-1].data["fraction"] == 1.0


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


def test_the_same_message_delivered_twice_at_once_runs_the_job_once(stack: Stack) -> None:
    second = stack.extra_worker().start()
    try:
        stack.wait_live_workers(2)  # both idle, each free to take one of the two messages
        job_id = stack.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
        publish_train(stack.celery, job_id, "cpu")  # the API published it once already
        skip = f"message for job {job_id}: nothing queued"
        logs = (stack.worker, second)
        deadline = time.monotonic() + 30
        while not any(skip in p.tail(100_000) for p in logs) and time.monotonic() < deadline:
            time.sleep(0.1)
        # The other worker took the duplicate while the job still ran: a real race for the claim.
        assert stack.api.job(job_id)["status"] == "running", [p.tail() for p in logs]
        job = stack.api.wait_finished(job_id)
    finally:
        second.terminate()
    assert (job["status"], job["attempt"]) == ("succeeded", 1)
    metrics = stack.api.get(f"/jobs/{job_id}/metrics")
    steps = [point["step"] for point in metrics["train"]]
    assert steps == sorted(set(steps))
    assert [point["epoch"] for point in metrics["test"]] == [0, 1]


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
    assert [m["epoch"] for m in job["test_metrics"]] == [0, 1, 2]
    assert job["test_metrics"][:2] == source["test_metrics"][:2]
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
    waiting = stack.api.job(job["id"])
    assert waiting["status"] == "queued"
    # ... and says so rather than waiting silently.
    assert waiting["queue_status"] == {
        "position": 1,
        "live_workers": 0,
        "message": "no live worker serves the 'gpu' queue; "
        "start one with: mnistq worker --queues gpu",
    }
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


def test_a_queued_job_is_cancelled_at_once_and_a_finished_one_cannot_be(stack: Stack) -> None:
    job_id = stack.api.submit({"device": "cuda", "hyperparameters": {"n_epochs": 1}})["id"]
    cancel = f"{stack.api.base}/api/v1/jobs/{job_id}/cancel"
    response = stack.api.http.post(cancel, timeout=10)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "cancelled"
    job = stack.api.job(job_id)
    assert (job["status"], job["attempt"], job["queue_status"]) == ("cancelled", 0, None)
    again = stack.api.http.post(cancel, timeout=10)
    assert again.status_code == 409, again.text
    assert again.json()["error"] and "cancelled" in again.json()["message"]
    time.sleep(2)  # two reaper passes: a cancelled job is never published or run
    assert stack.api.job(job_id)["status"] == "cancelled"


def test_cancelling_a_running_job_stops_it_at_the_next_heartbeat(stack: Stack) -> None:
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 2, **SLOW}})["id"]
    stack.api.wait(job_id, lambda j: j["progress"]["epoch"] == 2 and j["progress"]["step"] > 0)
    asked = time.monotonic()
    response = stack.api.http.post(f"{stack.api.base}/api/v1/jobs/{job_id}/cancel", timeout=10)
    assert response.status_code == 202, response.text
    job = stack.api.wait_finished(job_id, timeout=30)
    print(f"cancel → cancelled: {time.monotonic() - asked:.2f}s")
    assert (job["status"], job["attempt"]) == ("cancelled", 1)
    assert job["finished_at"] is not None and job["test_accuracy"] is None
    # What it trained is kept: the epoch-1 checkpoint can be resumed from.
    assert "checkpoints/epoch-1.pt" in {a["name"] for a in job["artifacts"]}
    assert [m["epoch"] for m in job["test_metrics"]] == [0, 1]
    finished = stack.api.http.post(f"{stack.api.base}/api/v1/jobs/{job_id}/cancel", timeout=10)
    assert finished.status_code == 409, finished.text


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
    # The worker left the registry as it went: the job says nobody serves its queue now.
    assert job["queue_status"]["live_workers"] == 0
    assert "mnistq worker --queues cpu" in job["queue_status"]["message"]
    stack.worker = stack.new_worker().start()
    done = stack.api.wait_finished(job_id)
    assert (done["status"], done["attempt"]) == ("succeeded", 1)
    assert [m["epoch"] for m in done["test_metrics"]] == [0, 1, 2]


def in_epoch_2(job: dict[str, Any]) -> bool:
    """True once a 2-epoch SLOW job is ten steps into its second epoch (a checkpoint exists)."""
    return bool(job["progress"]["epoch"] == 2 and job["progress"]["step"] >= 10)


def test_a_killed_workers_job_is_requeued_and_finished_by_a_fresh_worker(stack: Stack) -> None:
    # Only `mnistq api` and one `mnistq worker` run: no beat, no other process. The fresh
    # worker's own main process reaps the job its dead predecessor left.
    body = {"hyperparameters": {"n_epochs": 2, **SLOW}}
    job_id = stack.api.submit(body)["id"]
    mid_epoch_2 = stack.api.wait(job_id, in_epoch_2)
    assert mid_epoch_2["status"] == "running" and mid_epoch_2["lease"]["expired"] is False
    assert mid_epoch_2["lease"]["pid"] in job_process_pids(stack.worker)
    killed = time.monotonic()
    stack.worker.kill()
    stale = stack.api.wait(job_id, lambda j: j["lease"] and j["lease"]["expired"], timeout=30)
    assert stale["status"] == "running" and "stopped heartbeating" in stale["lease"]["message"]
    stack.worker = stack.new_worker().start()
    resumed = stack.api.wait(
        job_id, lambda j: j["status"] == "running" and j["attempt"] == 2, timeout=60
    )
    resumed_after = time.monotonic() - killed
    job = stack.api.wait_finished(job_id)
    print(f"SIGKILL → running again on a fresh worker {resumed_after:.2f}s")
    assert (job["status"], job["attempt"]) == ("succeeded", 2), job["error"]
    assert resumed["lease"]["expired"] is False
    assert [m["epoch"] for m in job["test_metrics"]] == [0, 1, 2]
    steps = [p["step"] for p in stack.api.get(f"/jobs/{job_id}/metrics")["train"]]
    assert all(a < b for a, b in itertools.pairwise(steps)), steps
    _assert_resumed_log(stack.api.log_lines(job_id))


def test_a_job_whose_process_is_killed_is_handed_back_at_once_and_resumed(stack: Stack) -> None:
    # The worker lives on; only the process that trains the job dies (the kernel's OOM
    # killer, say). Its pool child sees it die and hands the job back without waiting for
    # the lease to expire; a worker (this one) resumes it from its checkpoint.
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 2, **SLOW}})["id"]
    trainer = stack.api.wait(job_id, in_epoch_2)["lease"]["pid"]
    assert trainer in job_process_pids(stack.worker)
    os.kill(trainer, signal.SIGKILL)
    job = stack.api.wait_finished(job_id)
    assert (job["status"], job["attempt"]) == ("succeeded", 2), job["error"]
    assert [m["epoch"] for m in job["test_metrics"]] == [0, 1, 2]
    messages = [line["message"] for line in stack.api.log_lines(job_id)]
    handed_back = "its job process died: SIGKILL: queued again"
    assert handed_back in messages and not any("lease" in m for m in messages), messages
    resumed = messages.index(handed_back) + 2  # after attempt 2's claim line
    assert messages[resumed] == (
        "resumed from its own checkpoint checkpoints/epoch-1.pt (epoch 1) on cpu"
    )


def _assert_resumed_log(lines: list[dict[str, Any]]) -> None:
    """Attempt 1 up to its checkpoint, the lease lost, attempt 2 from it: each line once."""
    messages = [line["message"] for line in lines]
    lost = next(i for i, m in enumerate(messages) if m.startswith("lease lost: "))
    first, second = lines[:lost], lines[lost + 1 :]
    assert {line["attempt"] for line in first} == {1}, messages
    assert {line["attempt"] for line in second} == {2}, messages
    assert messages[lost].endswith("queued again, to resume from its newest checkpoint")
    assert second[0]["message"].endswith(", attempt 2")
    assert second[1]["message"] == (
        "resumed from its own checkpoint checkpoints/epoch-1.pt (epoch 1) on cpu"
    )
    # Attempt 1's epoch-2 lines, trained again by attempt 2, are gone: no line twice.
    trains = [m for m in messages if m.startswith("Train Epoch: ")]
    assert len(trains) == len(set(m.split("\t")[0] for m in trains)) == 100
    assert not any(m.startswith("Train Epoch: 2 ") for m in (x["message"] for x in first))
    assert sum(m.startswith("Test set: ") for m in messages) == 3  # epochs 0, 1 and 2
    assert messages[-1].startswith("succeeded: ")


# Reaches NaN within the first log intervals: weight decay 1 at lr 10 multiplies every
# weight by -9 per step, on top of the gradients.
DIVERGES = {"learning_rate": 10.0, "momentum": 0.99, "weight_decay": 1.0}


def test_a_diverging_job_fails_once_and_says_it_diverged(stack: Stack) -> None:
    body = {"hyperparameters": {"n_epochs": 1, **QUICK, **DIVERGES}}
    job = stack.api.wait_finished(stack.api.submit(body)["id"])
    assert (job["status"], job["attempt"]) == ("failed", 1), job
    message = job["error"]["message"]
    assert message.startswith("TrainingDiverged: train loss became nan at epoch 1 step "), message
    assert "lower the learning rate" in message
    assert "Traceback" in job["error"]["traceback"]
    time.sleep(2)  # two reaper passes: a training error is not retried
    later = stack.api.job(job["id"])
    assert (later["status"], later["attempt"]) == ("failed", 1)


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (the prefork pool)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def maps_torch(pid: int) -> bool:
    """True when the process has libtorch mapped (it imported torch)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def wait_for_warm_job_process(stack: Stack, timeout: float = 60) -> tuple[int, int]:
    """``(pool child, job process)``: a job process forked ahead by one of the worker's pool
    children, once it has warmed up and while no job has recorded it (it is still idle)."""
    worker = stack.worker
    assert worker.popen is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with stack.db() as session:
            ran = set(session.scalars(select(Job.worker_pid).where(Job.worker_pid.is_not(None))))
        for child in child_pids(worker.popen.pid):
            for pid in child_pids(child):
                if pid not in ran and f"job process {pid} warmed up in" in worker.tail(20_000):
                    return child, pid
        time.sleep(0.1)
    pytest.fail(f"no job process of {worker.popen.pid}'s children warmed up: {worker.tail()}")


def test_the_prefork_parent_never_loads_torch_and_each_job_gets_a_fresh_warm_process(
    stack: Stack,
) -> None:
    assert stack.worker.popen is not None
    parent = stack.worker.popen.pid
    # Before any job: a pool child has imported torch and forked the process of its next job,
    # which has warmed up; the parent has loaded no torch.
    child, idle = wait_for_warm_job_process(stack)
    assert maps_torch(child) and maps_torch(idle) and not maps_torch(parent)
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
    running = stack.api.wait(job_id, lambda j: j["status"] == "running" and j["lease"])
    trainer = running["lease"]["pid"]  # the job process, recorded at claim
    children = child_pids(parent)
    assert trainer not in children  # not a pool child: a process one of them forked
    assert any(trainer in child_pids(c) for c in children)
    if trainer != idle:  # the other pool child's job process took the message
        child = next(c for c in children if trainer in child_pids(c))
    # Training runs at a lower CPU priority than the worker's own loop (MNISTQ_TRAIN_NICENESS).
    assert os.getpriority(os.PRIO_PROCESS, trainer) == os.getpriority(os.PRIO_PROCESS, parent) + 10
    # Cancelled rather than waited for: the job process ends within a heartbeat either way.
    stack.api.http.post(f"{stack.api.base}/api/v1/jobs/{job_id}/cancel", timeout=10)
    assert stack.api.wait_finished(job_id)["status"] == "cancelled"
    deadline = time.monotonic() + 15
    while trainer in child_pids(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    # One job per process: the one that ran it is gone. Its pool child lives on, with no
    # job's memory, and has forked the next job's process; the parent still has no torch.
    assert trainer not in child_pids(child) and child in child_pids(parent)
    successors = [pid for pid in child_pids(child) if pid != trainer]
    assert successors, f"pool child {child} forked no process for its next job"
    assert not maps_torch(parent)


def job_process_pids(worker: Process) -> list[int]:
    """The worker's job processes: each forked by one of its pool children."""
    assert worker.popen is not None
    return [pid for child in child_pids(worker.popen.pid) for pid in child_pids(child)]


def runs(worker: Process, job: dict[str, Any]) -> bool:
    """True when the process that claimed ``job`` (its recorded pid) is one of the worker's."""
    return bool(job["lease"]) and job["lease"]["pid"] in job_process_pids(worker)


def test_jobs_queued_when_redis_restarts_empty_all_still_finish(
    stack: Stack, redis_server: RedisServer
) -> None:
    first = stack.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
    stack.api.wait(first, lambda j: j["status"] == "running")
    waiting = [
        stack.api.submit({"hyperparameters": {"n_epochs": 1, **QUICK}})["id"] for _ in range(2)
    ]
    jobs = [stack.api.job(job_id) for job_id in waiting]
    assert all(job["published_at"] for job in jobs)  # their messages are in Redis
    assert [job["queue_status"] for job in jobs] == [
        {"position": 1, "live_workers": 1, "message": None},
        {"position": 2, "live_workers": 1, "message": None},
    ]
    redis_server.stop()
    redis_server.start()  # empty: no persistence, every message is gone
    restarted = time.monotonic()
    done = [stack.api.wait_finished(job_id, timeout=90) for job_id in (first, *waiting)]
    print(f"Redis restarted empty → {len(done)} jobs finished: {time.monotonic() - restarted:.1f}s")
    assert [(job["status"], job["attempt"]) for job in done] == [("succeeded", 1)] * 3


def lease_token(stack: Stack, job_id: str) -> str | None:
    """The job's lease token as the database holds it now."""
    with stack.db() as session:
        return session.scalar(select(Job.lease_token).where(Job.id == job_id))


def snapshot(stack: Stack, job_id: str) -> dict[str, Any]:
    """Everything about a job a worker can write: its row, metrics, artifacts and files."""
    with stack.db() as session:
        row = session.scalars(select(Job).where(Job.id == job_id)).one()
        metrics = session.execute(
            select(Metric.id, Metric.kind, Metric.step, Metric.loss).where(Metric.job_id == job_id)
        ).all()
        artifacts = session.execute(
            select(Artifact.name, Artifact.sha256, Artifact.created_at).where(
                Artifact.job_id == job_id
            )
        ).all()
        job = {column.key: getattr(row, column.key) for column in Job.__table__.columns}
    folder = stack.artifact_path(job_id, "")
    files = {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    return {"job": job, "metrics": metrics, "artifacts": artifacts, "files": files}


def wait_for_line(process: Process, text: str, since: int, timeout: float = 30) -> str:
    """Block until a line with ``text`` shows in the log after byte ``since``; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with process.log.open("rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        for line in lines:
            if text in line:
                return line
        time.sleep(0.1)
    pytest.fail(f"{text!r} not in the log after {timeout}s:\n{process.tail()}")


def test_a_frozen_worker_loses_its_job_and_writes_nothing_after_it_wakes(stack: Stack) -> None:
    other = stack.extra_worker().start()
    stack.wait_live_workers(2)  # the one not running the job is idle, ready to take it over
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 1, **SLOW}})["id"]
    job = stack.api.wait(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= 6)
    mine = runs(stack.worker, job)
    frozen, stack.worker = (stack.worker, other) if mine else (other, stack.worker)
    assert frozen.popen is not None
    try:  # the frozen worker is this test's to stop, whatever fails
        assert runs(frozen, job)
        frozen_token = lease_token(stack, job_id)
        os.killpg(frozen.popen.pid, signal.SIGSTOP)  # the whole worker, as a paused VM
        stopped = time.monotonic()
        stack.api.wait(job_id, lambda j: (j["status"], j["attempt"]) == ("running", 2), 60)
        taken_after = time.monotonic() - stopped
        taker_token = lease_token(stack, job_id)
        done = stack.api.wait_finished(job_id)
        before = snapshot(stack, job_id)
        log_size = frozen.log.stat().st_size
        os.killpg(frozen.popen.pid, signal.SIGCONT)
        woke = time.monotonic()
        gave_up = wait_for_line(frozen, "succeeded in", since=log_size)  # its task returned
        gave_up_after = time.monotonic() - woke
        time.sleep(2)  # two of its heartbeats: whatever it would still write has landed
        after = snapshot(stack, job_id)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(frozen.popen.pid, signal.SIGCONT)
        frozen.terminate()
    print(
        f"SIGSTOP → taken over by another worker {taken_after:.2f}s; "
        f"SIGCONT → frozen worker gave the job up {gave_up_after:.2f}s"
    )
    assert (done["status"], done["attempt"]) == ("succeeded", 2), done["error"]
    assert frozen_token is not None and taker_token not in (None, frozen_token)
    assert "'lost'" in gave_up or "'abandoned'" in gave_up, gave_up
    assert after == before  # not one row, column or file changed once it woke
    steps = [p["step"] for p in stack.api.get(f"/jobs/{job_id}/metrics")["train"]]
    assert all(a < b for a, b in itertools.pairwise(steps)), steps
    assert [m["epoch"] for m in done["test_metrics"]] == [0, 1]


SOAK_TRIALS = 5


@pytest.fixture(scope="module")
def soak_figures() -> Iterator[list[dict[str, Any]]]:
    """Each soak trial's figures; a summary line is printed after the last (see it with -s)."""
    trials: list[dict[str, Any]] = []
    yield trials
    if not trials:
        return
    finished = sum(t["status"] == "succeeded" for t in trials)
    duplicates = sum(t["duplicates"] for t in trials)
    resumed = sorted(t["kill_to_resumed"] for t in trials)
    print(
        f"\nsoak: trials {len(trials)}, jobs finished {finished}/{len(trials)}, "
        f"duplicate runs seen {duplicates}, kill → resumed training "
        f"min {resumed[0]:.1f}s, median {resumed[len(resumed) // 2]:.1f}s, max {resumed[-1]:.1f}s"
    )


@pytest.mark.soak
@pytest.mark.parametrize("trial", range(1, SOAK_TRIALS + 1))
def test_soak_sigkill_mid_epoch_2_and_a_restarted_worker_finishes_the_job(
    stack: Stack, soak_figures: list[dict[str, Any]], trial: int
) -> None:
    job_id = stack.api.submit({"hyperparameters": {"n_epochs": 2, **SLOW}})["id"]
    mid = stack.api.wait(job_id, in_epoch_2)
    stack.worker.kill()
    killed = time.monotonic()
    stack.worker = stack.new_worker().start()  # a supervisor restarts it at once
    at_kill = mid["progress"]["samples_seen"]
    # Resumed: the new attempt wrote progress from the epoch-1 checkpoint, behind the kill.
    stack.api.wait(
        job_id,
        lambda j: j["attempt"] == 2 and 0 < j["progress"]["samples_seen"] < at_kill,
        timeout=60,
    )
    resumed_after = time.monotonic() - killed
    job = stack.api.wait_finished(job_id)
    steps = [p["step"] for p in stack.api.get(f"/jobs/{job_id}/metrics")["train"]]
    epochs = [m["epoch"] for m in job["test_metrics"]]
    # A duplicate run is a claim beyond the one the kill made necessary, or a metric point
    # written twice.
    duplicates = max(0, job["attempt"] - 2) + (len(steps) - len(set(steps)))
    duplicates += max(0, len(epochs) - len(set(epochs)))
    soak_figures.append(
        {"trial": trial, "status": job["status"], "duplicates": duplicates,
         "kill_to_resumed": resumed_after}
    )  # fmt: skip
    print(f"soak trial {trial}: {job['status']}, attempt {job['attempt']}, "
          f"kill → resumed {resumed_after:.1f}s")  # fmt: skip
    assert (job["status"], job["attempt"]) == ("succeeded", 2), job["error"]
    assert epochs == [0, 1, 2]
    assert all(a < b for a, b in itertools.pairwise(steps)), steps


def test_metrics_parse_and_count_jobs_as_the_database_does(
    stack: Stack, trained: dict[str, Any]
) -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from sqlalchemy import func

    quick = trained["created"]["id"]
    diverging = stack.api.submit({"hyperparameters": {"n_epochs": 1, **QUICK, **DIVERGES}})["id"]
    waiting = stack.api.submit({"hyperparameters": {"n_epochs": 1, "device": "cuda"}})["id"]
    stack.api.http.post(f"{stack.api.base}/api/v1/jobs/{waiting}/cancel", timeout=10)
    ends = {stack.api.wait_finished(job_id)["status"] for job_id in (quick, diverging, waiting)}
    assert ends == {"succeeded", "failed", "cancelled"}
    response = stack.api.http.get(f"{stack.api.base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    jobs = {
        (s.labels["status"], s.labels["queue"]): s.value for s in families["mnistq_jobs"].samples
    }
    finished = {s.labels["status"]: s.value for s in families["mnistq_jobs_finished"].samples
                if s.name.endswith("_total")}  # fmt: skip
    with stack.db() as session:
        rows = session.execute(
            select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
        )
        expected = {(status, queue): count for status, queue, count in rows}
    assert jobs == expected
    for status in ("succeeded", "failed", "cancelled"):
        assert finished[status] == sum(n for (s, _), n in expected.items() if s == status) >= 1
    # Counted in gunicorn's worker processes (PROMETHEUS_MULTIPROC_DIR), summed at the scrape.
    polls = [s for s in families["mnistq_http_requests"].samples
             if s.labels.get("endpoint") == "jobs.get" and s.name.endswith("_total")]  # fmt: skip
    assert sum(s.value for s in polls) >= 3


@pytest.fixture
def receiver() -> Iterator[str]:
    """A receiver on loopback, its records empty; yields its URL."""
    with receiving() as url:
        yield url


def wait_posts(count: int, timeout: float = 30) -> list[tuple[dict[str, str], bytes]]:
    deadline = time.monotonic() + timeout
    while len(Receiver.got) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(Receiver.got)} webhook posts after {timeout}s, expected {count}")
        time.sleep(0.1)
    return list(Receiver.got)


def test_a_receiver_gets_job_succeeded_signed_with_the_endpoints_secret(
    stack: Stack, receiver: str
) -> None:
    created = stack.api.http.post(f"{stack.api.base}/api/v1/webhooks", timeout=10,
                                  json={"url": receiver, "events": ["job.succeeded"]})  # fmt: skip
    assert created.status_code == 201, created.text
    job_id = stack.api.submit({"name": "hooked", "hyperparameters": {"n_epochs": 1, **QUICK}})["id"]
    assert stack.api.wait_finished(job_id)["status"] == "succeeded"
    [(headers, body)] = wait_posts(1)
    message = Webhook(created.json()["secret"]).verify(body, headers)
    assert message["type"] == "job.succeeded" and message["data"]["id"] == job_id
    assert message["data"]["status"] == "succeeded" and message["data"]["name"] == "hooked"
    assert message["data"]["test_accuracy"] == stack.api.job(job_id)["test_accuracy"]
    stack.api.http.delete(f"{stack.api.base}/api/v1/webhooks/{created.json()['id']}", timeout=10)


def test_a_receiver_failing_three_times_gets_the_event_on_the_fourth_try_once(
    stack: Stack, receiver: str
) -> None:
    Receiver.answers = [500, 500, 500, 200]
    hook = {"url": receiver, "events": ["job.failed"]}
    created = stack.api.http.post(f"{stack.api.base}/api/v1/webhooks", json=hook, timeout=10).json()
    body = {"hyperparameters": {"n_epochs": 1, **QUICK, **DIVERGES}}
    job_id = stack.api.submit(body)["id"]
    assert stack.api.wait_finished(job_id)["status"] == "failed"
    posts = wait_posts(4)
    time.sleep(2)  # a fifth post would come within a couple of maintenance passes
    assert len(Receiver.got) == 4
    assert len({headers["webhook-id"] for headers, _ in posts}) == 1  # one event, four tries
    log = stack.api.get(f"/webhooks/{created['id']}/deliveries")["items"]
    assert [(d["event_type"], d["status"], d["attempts"]) for d in log] == [
        ("job.failed", "succeeded", 4)
    ]
    tries = log[0]["tries"]
    assert [(t["number"], t["outcome"], t["status_code"]) for t in tries] == [
        (1, "failed", 500), (2, "failed", 500), (3, "failed", 500), (4, "succeeded", 200)
    ]  # fmt: skip
    stack.api.http.delete(f"{stack.api.base}/api/v1/webhooks/{created['id']}", timeout=10)
