"""The Python client against a live server: typed results and one exception per failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.api import (
    AuthenticationFailed,
    Client,
    Conflict,
    NotFound,
    ServerUnavailable,
    ValidationFailed,
)
from shared.schemas import ArtifactOut, JobOut, MetricsOut
from tests.client.conftest import Server, Trained, job_json
from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.mnist]


def test_results_are_the_servers_response_models(server: Server, trained: Trained) -> None:
    client, job_id = server.client, trained.job.id
    job = client.get(job_id)
    assert isinstance(job, JobOut) and job_json(job) == server.api.job(job_id)
    metrics = client.metrics(job_id)
    assert isinstance(metrics, MetricsOut) and [p.epoch for p in metrics.test] == [0, 1]
    assert metrics.test[-1].accuracy == job.test_accuracy
    artifacts = client.artifacts(job_id)
    assert all(isinstance(a, ArtifactOut) for a in artifacts)
    assert "model.pth" in {a.name for a in artifacts}
    assert job_id in [j.id for j in client.list(status=["succeeded"]).items]
    assert job_id in [j.id for j in client.iter_jobs(limit=1)]


def test_wait_reports_each_poll_and_returns_the_finished_job(
    server: Server, trained: Trained
) -> None:
    seen: list[str] = []
    job = server.client.wait(trained.job.id, on_update=lambda j: seen.append(j.status), poll=0.1)
    assert job.status == "succeeded" and seen == ["succeeded"]


def test_download_returns_the_paths_it_wrote(
    server: Server, trained: Trained, tmp_path: Path
) -> None:
    paths = server.client.download(trained.job.id, ["checkpoints/epoch-1.pt"], tmp_path)
    assert paths == [tmp_path / "checkpoints" / "epoch-1.pt"] and paths[0].stat().st_size > 0
    assert not list(tmp_path.glob("checkpoints/.*"))  # no partial file is left behind


def test_each_failure_is_its_own_exception_with_the_servers_error(server: Server) -> None:
    with pytest.raises(NotFound) as missing:
        server.client.get("nosuchjob")
    assert (missing.value.status, missing.value.code) == (404, "job_not_found")
    with pytest.raises(ValidationFailed) as invalid:
        server.client.submit({"n_epochs": 0, "colour": "red"})
    assert invalid.value.status == 422
    assert [f.split(":")[0] for f in invalid.value.fields] == [
        "body.hyperparameters.n_epochs", "body.hyperparameters.colour",
    ]  # fmt: skip
    with pytest.raises(AuthenticationFailed) as unauthorized:
        Client(server.url, "mnq_wrong").get("x")
    assert unauthorized.value.code == "invalid_token"
    with pytest.raises(ServerUnavailable):
        Client(f"http://127.0.0.1:{free_port()}", "mnq_x").get("x")


def test_cancelling_a_finished_job_is_a_conflict(server: Server, trained: Trained) -> None:
    with pytest.raises(Conflict) as conflict:
        server.client.cancel(trained.job.id)
    assert conflict.value.status == 409 and "succeeded" in conflict.value.message
