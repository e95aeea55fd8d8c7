"""Sweeps through real processes: gunicorn API, Redis, PostgreSQL, two Celery workers.

Each worker's main process runs the sweep controller duty; trials train the real MNIST with
epochs capped at MAX_TRAIN_BATCHES batches. Leases are 4 s, so a dead controller is
replaced within seconds.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from shared.models import Job, Sweep
from tests.integration.conftest import engine_and_factory
from tests.integration.stack import Api, Process, stack_env
from tests.integration.test_worker import maps_torch

pytestmark = [pytest.mark.integration, pytest.mark.mnist]

# 600 x 100 batches is a whole epoch (~3 s on one core): long enough for a prune or a kill
# to land inside the next epoch.
FULL_EPOCH = {"batch_size_train": 600, "log_interval": 5}
QUICK = {"batch_size_train": 64, "log_interval": 5}


class SweepStack:
    """The API and two cpu workers of one slot each; both main processes control sweeps."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.api = Api(env, logs / "api.log")
        self._names = itertools.count(1)
        self.workers = [self.new_worker(), self.new_worker()]
        self.engine, self.db = engine_and_factory(env["MNISTQ_DATABASE_URL"])

    def new_worker(self) -> Process:
        """A started cpu worker with one slot and a log of its own."""
        log = self.logs / f"worker-{next(self._names)}.log"
        return Process(["worker", "--queues", "cpu", "--concurrency", "1"], self.env, log).start()

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a sweep; it must be accepted."""
        response = self.api.http.post(f"{self.api.base}/api/v1/sweeps", json=body, timeout=10)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def wait(
        self, sweep_id: str, until: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Poll the sweep until ``until(sweep)``; fail with its state and the logs after timeout."""
        deadline = time.monotonic() + timeout
        while not until(sweep := self.api.get(f"/sweeps/{sweep_id}")):
            if time.monotonic() > deadline:
                tails = "\n".join(w.tail(1500) for w in self.workers)
                pytest.fail(f"sweep {sweep_id} not there after {timeout}s: {sweep}\n{tails}")
            time.sleep(0.2)
        return sweep

    def wait_ended(self, sweep_id: str, timeout: float = 600) -> dict[str, Any]:
        """Poll until the sweep is no longer running."""
        return self.wait(sweep_id, lambda s: s["status"] != "running", timeout)

    def trials(self, sweep_id: str) -> list[dict[str, Any]]:
        """GET the sweep's trials, best first."""
        return list(self.api.get(f"/sweeps/{sweep_id}/trials")["items"])

    def trial_rows(self, sweep_id: str) -> list[Job]:
        """The trial job rows, by number."""
        with self.db() as session:
            stmt = select(Job).where(Job.sweep_id == sweep_id).order_by(Job.trial_number)
            return list(session.scalars(stmt))


@pytest.fixture(scope="module")
def stack(
    make_pg_database: Callable[[], str],
    redis_server: Any,
    mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SweepStack]:
    """The running system, on a database of its own."""
    var = tmp_path_factory.mktemp("sweeps")
    env = stack_env(
        database_url=make_pg_database(), broker_url=redis_server.url, var_dir=var,
        data_dir=mnist_dir,
    )  # fmt: skip
    system = SweepStack(env, var)
    system.api.start()
    yield system
    for process in (*system.workers, system.api.process):
        process.kill()
    system.engine.dispose()


def most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The largest number of the intervals that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    return max(itertools.accumulate(step for _, step in events))


def test_a_2x2_grid_runs_four_trials_two_at_a_time_and_names_the_best(stack: SweepStack) -> None:
    sweep = stack.create({
        "name": "lr-momentum", "method": "grid",
        "parameters": {
            "learning_rate": {"values": [0.01, 0.05]}, "momentum": {"values": [0.5, 0.9]},
            "n_epochs": {"value": 1},
        },
        "base": {"hyperparameters": QUICK},
        "budget": {"max_concurrent": 2},
    })  # fmt: skip
    done = stack.wait_ended(sweep["id"])
    assert done["status"] == "completed", done
    assert done["counts"]["succeeded"] == 4 and done["trials"] == 4
    rows = stack.trial_rows(sweep["id"])
    cells = {(j.hyperparameters["learning_rate"], j.hyperparameters["momentum"]) for j in rows}
    assert cells == set(itertools.product([0.01, 0.05], [0.5, 0.9]))
    # Queued or running, a trial holds one of max_concurrent places from creation to end.
    assert most_at_once([(j.created_at, j.finished_at) for j in rows if j.finished_at]) <= 2
    best = max(rows, key=lambda j: j.test_accuracy or 0)
    assert done["best"]["job_id"] == best.id
    assert math.isclose(done["best"]["value"], best.test_accuracy or 0)
    assert stack.trials(sweep["id"])[0]["job"]["id"] == best.id


def test_a_pruned_trial_stops_within_its_next_epoch_and_keeps_its_checkpoints(
    stack: SweepStack,
) -> None:
    # Seed 1 puts the good rate first; one at a time, ASHA (eta 3) keeps the best of the
    # two at epoch 1, so the poor second trial is stopped while it trains epoch 2.
    sweep = stack.create({
        "name": "asha", "method": "grid",
        "parameters": {"learning_rate": {"values": [0.05, 0.0001]}, "n_epochs": {"value": 2}},
        "base": {"hyperparameters": FULL_EPOCH},
        "budget": {"max_concurrent": 1},
        "early_terminate": {"type": "asha", "min_epochs": 1, "eta": 3},
        "seed": 1,
    })  # fmt: skip
    done = stack.wait_ended(sweep["id"])
    assert done["status"] == "completed", done
    kept, cut = stack.trials(sweep["id"])
    assert (kept["params"], kept["job"]["status"]) == ({"learning_rate": 0.05}, "succeeded")
    assert (cut["params"], cut["job"]["status"]) == ({"learning_rate": 0.0001}, "pruned")
    assert (kept["epochs_trained"], cut["epochs_trained"]) == (2, 1)
    assert cut["job"]["attempt"] == 1 and cut["job"]["error"] is None
    assert "checkpoints/epoch-1.pt" in {a["name"] for a in cut["job"]["artifacts"]}
    assert done["best"]["job_id"] == kept["job"]["id"]
    assert done["counts"] | {} == {
        "queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0, "pruned": 1,
    }  # fmt: skip


def test_a_killed_controller_is_replaced_and_the_sweep_completes_without_duplicates(
    stack: SweepStack,
) -> None:
    sweep = stack.create({
        "name": "survivor", "method": "random",
        "parameters": {
            "learning_rate": {"distribution": "log_uniform_values", "min": 0.005, "max": 0.1},
            "n_epochs": {"value": 1},
        },
        "base": {"hyperparameters": QUICK},
        "budget": {"max_trials": 4, "max_concurrent": 2},
        "seed": 5,
    })  # fmt: skip
    # Both slots busy: the controller's worker is running a trial that dies with it.
    first = stack.wait(sweep["id"], lambda s: s["counts"]["running"] == 2, timeout=120)
    controller = first["controller"]
    pid = int(controller.rsplit(":", 1)[1])
    victim = next(w for w in stack.workers if w.popen is not None and w.popen.pid == pid)
    assert not maps_torch(pid)  # the controller runs Optuna in the prefork parent, never torch
    victim.kill()  # SIGKILL of the main process and its child, mid-trial
    stack.workers = [w for w in stack.workers if w is not victim] + [stack.new_worker()]
    done = stack.wait_ended(sweep["id"])
    assert done["status"] == "completed", done
    rows = stack.trial_rows(sweep["id"])
    assert [j.trial_number for j in rows] == list(range(4))
    assert len({j.hyperparameters["learning_rate"] for j in rows}) == 4
    assert all(j.status == "succeeded" for j in rows)
    assert max(j.attempt for j in rows) == 2  # the killed trial resumed, still one trial
    with stack.db() as session:
        after = session.scalar(select(Sweep.controller).where(Sweep.id == sweep["id"]))
    assert after is not None and after != controller
