"""The artifact routes: the list, and downloads with the right bytes and headers."""

from __future__ import annotations

import hashlib

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from shared.store import LocalStore
from tests.api.conftest import add_artifact, insert_job

JOBS = "/api/v1/jobs"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@pytest.fixture
def job_id(sessions: sessionmaker[Session], store: LocalStore) -> str:
    """A finished job with a plot, a model and a checkpoint."""
    job_id = insert_job(sessions, status="succeeded")
    add_artifact(sessions, store, job_id, "loss_curve.png", PNG)
    add_artifact(sessions, store, job_id, "model.pth", b"model-bytes")
    add_artifact(sessions, store, job_id, "checkpoints/epoch-1.pt", b"checkpoint-bytes")
    return job_id


def test_list_names_kinds_sizes_digests_and_urls(client: FlaskClient, job_id: str) -> None:
    body = client.get(f"{JOBS}/{job_id}/artifacts").get_json()
    assert body["job_id"] == job_id
    by_name = {a["name"]: a for a in body["items"]}
    assert set(by_name) == {"loss_curve.png", "model.pth", "checkpoints/epoch-1.pt"}
    plot = by_name["loss_curve.png"]
    assert (plot["kind"], plot["size"]) == ("plot", len(PNG))
    assert plot["sha256"] == hashlib.sha256(PNG).hexdigest()
    assert plot["url"] == f"{JOBS}/{job_id}/artifacts/loss_curve.png"
    assert by_name["checkpoints/epoch-1.pt"]["kind"] == "checkpoint"


def test_download_png_as_image(client: FlaskClient, job_id: str) -> None:
    response = client.get(f"{JOBS}/{job_id}/artifacts/loss_curve.png")
    assert response.status_code == 200
    assert response.data == PNG
    assert response.mimetype == "image/png"
    assert response.headers["Content-Length"] == str(len(PNG))
    assert "filename=loss_curve.png" in response.headers["Content-Disposition"]
    assert response.headers["Content-Disposition"].startswith("attachment")


@pytest.mark.parametrize(
    ("name", "data", "filename"),
    [
        ("model.pth", b"model-bytes", "model.pth"),
        ("checkpoints/epoch-1.pt", b"checkpoint-bytes", "epoch-1.pt"),
    ],
)
def test_download_weights_as_octet_stream(
    client: FlaskClient, job_id: str, name: str, data: bytes, filename: str
) -> None:
    response = client.get(f"{JOBS}/{job_id}/artifacts/{name}")
    assert response.status_code == 200
    assert response.data == data
    assert response.mimetype == "application/octet-stream"
    assert response.headers["Content-Length"] == str(len(data))
    assert f"filename={filename}" in response.headers["Content-Disposition"]


def test_download_answers_304_to_a_matching_etag(client: FlaskClient, job_id: str) -> None:
    etag = client.get(f"{JOBS}/{job_id}/artifacts/model.pth").headers["ETag"]
    response = client.get(f"{JOBS}/{job_id}/artifacts/model.pth", headers={"If-None-Match": etag})
    assert response.status_code == 304


def test_unknown_artifact_and_unknown_job_are_404(client: FlaskClient, job_id: str) -> None:
    missing = client.get(f"{JOBS}/{job_id}/artifacts/predictions.png")
    assert (missing.status_code, missing.get_json()["error"]) == (404, "artifact_not_found")
    no_job = client.get(f"{JOBS}/{'e' * 32}/artifacts/model.pth")
    assert (no_job.status_code, no_job.get_json()["error"]) == (404, "job_not_found")
    assert client.get(f"{JOBS}/{'e' * 32}/artifacts").status_code == 404


def test_recorded_artifact_whose_file_is_gone_is_404(
    client: FlaskClient, job_id: str, store: LocalStore
) -> None:
    ((store.root / job_id) / "model.pth").unlink()
    assert client.get(f"{JOBS}/{job_id}/artifacts/model.pth").status_code == 404
