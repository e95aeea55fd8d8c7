"""`mnistq sweep create | list | status | watch | cancel` and the client's sweep methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.api import Conflict, ValidationFailed
from tests.client.conftest import Server

pytestmark = [pytest.mark.integration, pytest.mark.mnist]

ONE_CELL = {
    "name": "cli-grid",
    "method": "grid",
    "parameters": {"learning_rate": {"values": [0.05]}, "n_epochs": {"value": 1}},
    "base": {"hyperparameters": {"log_interval": 5}},
}


def test_create_watch_runs_the_sweep_and_prints_its_trials(server: Server, tmp_path: Path) -> None:
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps(ONE_CELL))
    result = server.cli("sweep", "create", str(spec), "--watch", timeout=180)
    assert result.code == 0, f"{result}\n{server.worker.tail()}"
    sweep_id = result.out.splitlines()[0]
    sweep = server.client.sweep(sweep_id)
    assert sweep.status == "completed" and sweep.best is not None
    assert f"best      #0 test_accuracy {sweep.best.value:.4f} (learning_rate=0.05)" in result.out
    assert "1/1 trials" in result.err  # the live line
    header = next(line for line in result.out.splitlines() if line.startswith("#"))
    assert header.split() == ["#", "STATUS", "LEARNING_RATE", "METRIC", "EPOCHS", "JOB"]
    listed = server.cli("sweep", "list", "--status", "completed")
    assert sweep_id in listed.out and "cli-grid" in listed.out
    shown = server.cli("sweep", "status", sweep_id, "--json")
    assert json.loads(shown.out)["counts"]["succeeded"] == 1
    ended = server.cli("sweep", "cancel", sweep_id)
    assert ended.code == 1 and "only a running sweep can be cancelled" in ended.err
    with pytest.raises(Conflict):
        server.client.cancel_sweep(sweep_id)


def test_a_refused_spec_names_the_parameter(server: Server, tmp_path: Path) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps(ONE_CELL | {"parameters": {"momentum": {"values": [1.5]}}}))
    result = server.cli("sweep", "create", str(spec))
    assert result.code == 1
    assert result.err.startswith("Error: invalid request: body.parameters.momentum.values.0: ")
    with pytest.raises(ValidationFailed) as refused:
        server.client.create_sweep({"method": "bayes", "parameters": {}})
    assert {"body.method", "body.parameters"} <= {f.split(":")[0] for f in refused.value.fields}
