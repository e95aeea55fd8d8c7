"""The sweep routes: validation against the job schema, ownership, idempotency, cancel."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.models import Job, JobStatus, Sweep
from tests.api.conftest import Caller, client_as, insert_job, insert_metrics

GRID: dict[str, Any] = {
    "name": "lr-momentum",
    "method": "grid",
    "metric": {"name": "test_accuracy", "goal": "maximize"},
    "parameters": {
        "learning_rate": {"values": [0.01, 0.05]},
        "momentum": {"values": [0.5, 0.9]},
        "n_epochs": {"value": 1},
    },
    "base": {"hyperparameters": {"model": "tutorial_cnn"}, "priority": 0},
    "budget": {"max_concurrent": 2},
}
TPE: dict[str, Any] = {
    "method": "tpe",
    "parameters": {
        "learning_rate": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
        "momentum": {"values": [0.5, 0.9]},
        "batch_size_train": {"distribution": "int_uniform", "min": 32, "max": 256},
        "weight_decay": {"distribution": "q_uniform", "min": 0, "max": 0.01, "q": 0.001},
    },
    "budget": {"max_trials": 20, "max_concurrent": 2, "max_failed": 3},
    "early_terminate": {"type": "asha", "min_epochs": 1, "eta": 3},
    "seed": 7,
}


def with_(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with the value at ``path`` replaced (None: removed)."""
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return out


def invalid(client: FlaskClient, body: dict[str, Any]) -> list[str]:
    """POST ``body``, expect a 422, return the dotted locations it names."""
    response = client.post("/api/v1/sweeps", json=body)
    assert response.status_code == 422, response.get_json()
    payload = response.get_json()
    assert payload["error"] == "validation_error"
    return [".".join(map(str, e["loc"])) for e in payload["details"]]


def test_a_grid_is_created_with_its_size_as_budget_and_a_location(client: FlaskClient) -> None:
    response = client.post("/api/v1/sweeps", json=GRID)
    assert response.status_code == 201, response.get_json()
    sweep = response.get_json()
    assert response.headers["Location"] == f"/api/v1/sweeps/{sweep['id']}"
    assert sweep["status"] == "running"
    assert sweep["budget"] == {"max_trials": 4, "max_concurrent": 2, "max_failed": 3}
    assert sweep["trials"] == 0 and sweep["best"] is None
    assert sweep["counts"]["pruned"] == 0
    assert client.get(sweep["links"]["self"]).get_json()["id"] == sweep["id"]


def test_every_distribution_of_the_grammar_is_accepted(client: FlaskClient) -> None:
    response = client.post("/api/v1/sweeps", json=TPE)
    assert response.status_code == 201, response.get_json()
    params = response.get_json()["parameters"]
    assert params["momentum"]["distribution"] == "categorical"
    assert params["batch_size_train"]["distribution"] == "int_uniform"


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("parameters", "learning_rte"), {"values": [0.1]}, "body.parameters.learning_rte"),
        (("parameters", "momentum"), {"values": [0.5, 1.5]}, "body.parameters.momentum.values.1"),
        (
            ("parameters", "learning_rate"),
            {"distribution": "log_uniform_values", "min": 0.001, "max": 20},
            "body.parameters.learning_rate.max",
        ),
        (("parameters", "n_epochs"), {"value": 0}, "body.parameters.n_epochs.value"),
        (("parameters", "model"), {"values": ["resnet"]}, "body.parameters.model.values.0"),
        (
            ("parameters", "batch_size_train"),
            {"distribution": "uniform", "min": 32, "max": 256},
            "body.parameters.batch_size_train.distribution",
        ),
        (("parameters", "momentum"), {"values": []}, "body.parameters.momentum.values"),
        (("parameters", "momentum"), {"min": 0.9, "max": 0.5}, "body.parameters.momentum"),
        (
            ("parameters", "momentum"),
            {"distribution": "normal"},
            "body.parameters.momentum.distribution",
        ),
        (("method",), "bayes", "body.method"),
        (("metric", "name"), "train_loss", "body.metric.name"),
        (("budget", "max_concurrent"), 0, "body.budget.max_concurrent"),
        (("budget", "max_trials"), None, "body.budget.max_trials"),
        (("early_terminate", "type"), "hyperband", "body.early_terminate.type"),
        (("base", "hyperparameters", "optimizer"), "lion", "body.base.hyperparameters.optimizer"),
    ],
)
def test_a_bad_sweep_is_a_422_naming_the_field(
    client: FlaskClient, path: tuple[str, ...], value: Any, named: str
) -> None:
    assert named in invalid(client, with_(TPE, path, value))


def test_a_grid_needs_finite_choices_and_runs_each_cell_once(client: FlaskClient) -> None:
    ranged = {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1}
    assert invalid(client, with_(GRID, ("parameters", "learning_rate"), ranged)) == [
        "body.parameters.learning_rate"
    ]
    assert invalid(client, with_(GRID, ("budget", "max_trials"), 3)) == ["body.budget.max_trials"]
    assert "body.parameters" in invalid(client, with_(GRID, ("parameters",), {}))
    stepped = {"distribution": "q_uniform", "min": 0.01, "max": 0.03, "q": 0.01}
    response = client.post(
        "/api/v1/sweeps", json=with_(GRID, ("parameters", "learning_rate"), stepped)
    )
    assert response.status_code == 201
    assert response.get_json()["budget"]["max_trials"] == 6  # 3 rates x 2 momenta


def test_a_bad_sweep_writes_no_row(client: FlaskClient, sessions: sessionmaker[Session]) -> None:
    invalid(client, with_(TPE, ("parameters", "momentum"), {"values": [2.0]}))
    with sessions() as session:
        assert session.scalars(select(Sweep)).all() == []


def test_the_idempotency_key_returns_the_same_sweep_and_refuses_another_body(
    client: FlaskClient,
) -> None:
    key = {"Idempotency-Key": "sweep-1"}
    first = client.post("/api/v1/sweeps", json=GRID, headers=key)
    again = client.post("/api/v1/sweeps", json=GRID, headers=key)
    other = client.post("/api/v1/sweeps", json=TPE, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert other.status_code == 422
    assert other.get_json()["error"] == "idempotency_key_reused"


def test_other_users_sweeps_are_not_found_and_admins_see_all(
    app: Flask, alice: Caller, bob: Caller, admin: Caller
) -> None:
    mine = client_as(app, alice).post("/api/v1/sweeps", json=GRID).get_json()
    as_bob = client_as(app, bob)
    for path in ("", "/trials"):
        assert as_bob.get(f"/api/v1/sweeps/{mine['id']}{path}").status_code == 404
    assert as_bob.post(f"/api/v1/sweeps/{mine['id']}/cancel").status_code == 404
    assert as_bob.get("/api/v1/sweeps").get_json()["items"] == []
    admin_ids = [s["id"] for s in client_as(app, admin).get("/api/v1/sweeps").get_json()["items"]]
    assert admin_ids == [mine["id"]]


def test_sweeps_are_not_counted_by_the_job_submission_limit(
    app: Flask, alice: Caller, sessions: sessionmaker[Session]
) -> None:
    app.extensions["mnistq"].settings.submit_rate_limit = "1/minute"
    as_alice = client_as(app, alice)
    statuses = [as_alice.post("/api/v1/sweeps", json=GRID).status_code for _ in range(3)]
    assert statuses == [201, 201, 201]


def add_trial(
    sessions: sessionmaker[Session], sweep_id: str, number: int, status: JobStatus, **values: Any
) -> str:
    """A trial job row as the controller and a worker would have left it."""
    hp = {"n_epochs": 1, "learning_rate": 0.01 * (number + 1), "momentum": 0.5}
    return insert_job(
        sessions, sweep_id=sweep_id, trial_number=number, status=status, hyperparameters=hp,
        **values,
    )  # fmt: skip


def test_trials_are_listed_best_first_and_the_best_is_named(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    sweep = client.post("/api/v1/sweeps", json=GRID).get_json()
    low = add_trial(sessions, sweep["id"], 0, JobStatus.SUCCEEDED, test_accuracy=0.91)
    high = add_trial(sessions, sweep["id"], 1, JobStatus.SUCCEEDED, test_accuracy=0.95)
    cut = add_trial(sessions, sweep["id"], 2, JobStatus.PRUNED)
    insert_metrics(sessions, cut, [
        {"kind": "test", "epoch": 1, "step": 10, "samples_seen": 640, "loss": 0.5,
         "accuracy": 0.99, "seconds": 1.0},
    ])  # fmt: skip
    running = add_trial(sessions, sweep["id"], 3, JobStatus.RUNNING)
    trials = client.get(sweep["links"]["trials"]).get_json()["items"]
    assert [t["job"]["id"] for t in trials] == [high, low, running, cut]
    assert trials[0]["params"] == {"learning_rate": 0.02, "momentum": 0.5}
    assert trials[3]["epochs_trained"] == 1 and trials[3]["value"] is None
    assert trials[3]["job"]["status"] == "pruned" and trials[3]["job"]["trial_number"] == 2
    shown = client.get(sweep["links"]["self"]).get_json()
    assert shown["best"]["job_id"] == high and shown["best"]["value"] == 0.95
    assert shown["counts"] | {} == {
        "queued": 0, "running": 1, "succeeded": 2, "failed": 0, "cancelled": 0, "pruned": 1,
    }  # fmt: skip


def test_cancel_ends_queued_trials_flags_running_ones_and_is_409_after(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    sweep = client.post("/api/v1/sweeps", json=GRID).get_json()
    queued = add_trial(sessions, sweep["id"], 0, JobStatus.QUEUED)
    running = add_trial(sessions, sweep["id"], 1, JobStatus.RUNNING)
    response = client.post(sweep["links"]["cancel"])
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"
    with sessions() as session:
        q, r = session.get(Job, queued), session.get(Job, running)
        assert q is not None and r is not None
        assert q.status == JobStatus.CANCELLED
        assert (r.status, r.cancel_requested) == (JobStatus.RUNNING, True)
    again = client.post(sweep["links"]["cancel"])
    assert again.status_code == 409 and again.get_json()["error"] == "sweep_state_conflict"


def test_unknown_sweeps_are_404(client: FlaskClient) -> None:
    for path in ("/api/v1/sweeps/nope", "/api/v1/sweeps/nope/trials"):
        response = client.get(path)
        assert response.status_code == 404 and response.get_json()["error"] == "sweep_not_found"


def test_every_sweep_route_is_in_the_openapi_document(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    assert set(paths["/api/v1/sweeps"]) == {"get", "post"}
    assert "get" in paths["/api/v1/sweeps/{sweep_id}"]
    assert "get" in paths["/api/v1/sweeps/{sweep_id}/trials"]
    assert "post" in paths["/api/v1/sweeps/{sweep_id}/cancel"]
