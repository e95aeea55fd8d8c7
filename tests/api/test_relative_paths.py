"""Relative folders in the settings (the embedded defaults, e.g. var/artifacts) work."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.store import LocalStore
from tests.api.conftest import add_artifact, insert_job, make_settings


@pytest.fixture
def settings(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The defaults' shape: the artifact folder relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return make_settings(tmp_path, database_url, artifact_dir=Path("var/artifacts"))


def test_an_artifact_under_a_relative_folder_downloads(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore, tmp_path: Path
) -> None:
    job_id = insert_job(sessions, status="succeeded")
    add_artifact(sessions, store, job_id, "model.pth", b"model-bytes")
    assert (tmp_path / "var" / "artifacts" / job_id / "model.pth").is_file()

    response = client.get(f"/api/v1/jobs/{job_id}/artifacts/model.pth")

    assert response.status_code == 200, response.get_json()
    assert response.data == b"model-bytes"
