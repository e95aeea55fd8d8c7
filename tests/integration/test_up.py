"""``mnistq up``: the embedded system (SQLite, filesystem broker, one worker, the reaper loop)."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.integration.stack import Api, stack_env

pytestmark = [pytest.mark.integration, pytest.mark.mnist]


def test_up_trains_a_job_and_ctrl_c_hands_the_running_one_back(
    tmp_path: Path, mnist_dir: Path
) -> None:
    var = tmp_path / "var"
    env = stack_env(
        database_url=f"sqlite:///{var / 'mnistq.db'}", broker_url="filesystem://",
        var_dir=var, data_dir=mnist_dir,
    )  # fmt: skip
    up = Api(env, tmp_path / "up.log", command="up")
    up.start()
    try:
        quick = {"n_epochs": 1, "batch_size_train": 64, "log_interval": 5}
        done = up.wait_finished(up.submit({"hyperparameters": quick})["id"], timeout=120)
        assert done["status"] == "succeeded", up.process.tail()
        assert (var / "artifacts" / done["id"] / "model.pth").is_file()
        slow = {"n_epochs": 2, "batch_size_train": 250, "log_interval": 2}
        running = up.submit({"hyperparameters": slow})["id"]
        up.wait(running, lambda j: j["status"] == "running" and j["progress"]["step"] > 0)
        # Ctrl-C reaches the whole foreground process group, as a terminal sends it.
        assert up.process.popen is not None
        os.killpg(up.process.popen.pid, signal.SIGINT)
        assert up.process.popen.wait(timeout=40) == 0, up.process.tail()
        with pytest.raises(ProcessLookupError):
            os.killpg(up.process.popen.pid, 0)  # nothing of it is left running
    finally:
        up.process.kill()
    with sqlite3.connect(var / "mnistq.db") as db:
        row = db.execute("SELECT status, attempt FROM job WHERE id = ?", (running,)).fetchone()
    assert tuple(row) == ("queued", 0), up.process.tail(6000, requests=False)
