"""The artifact store keeps every name inside its job's folder and writes atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactName,
    artifact_kind,
    write_bytes_atomic,
)

JOB = "a" * 32


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a\\b",
        "a\x00b",
        "..%2F..%2Fetc",
        "a%2Fb",
        ".hidden",
        "a//b",
        "a/",
        "a/b/c",
        "x" * 256,
        "-rf",
        "C:evil",
    ],
)
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(InvalidArtifactName):
        store.path_for(JOB, name)
    with pytest.raises(InvalidArtifactName):
        store.open_existing(JOB, name)


@pytest.mark.parametrize("job_id", ["", "..", "a/b", "x" * 65, "a\x00"])
def test_unsafe_job_ids_are_refused(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(InvalidArtifactName):
        ArtifactStore(tmp_path).job_dir(job_id)


def test_names_of_the_training_engine_are_accepted(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for name in ("model.pth", "optimizer.pth", "loss_curve.png", "checkpoints/epoch-12.pt"):
        assert store.path_for(JOB, name) == tmp_path / JOB / name
    assert (tmp_path / JOB / "checkpoints").is_dir()


def test_symlink_out_of_the_job_folder_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (store.job_dir(JOB) / "leak.txt").symlink_to(secret)
    (store.job_dir(JOB) / "checkpoints").symlink_to(tmp_path)
    with pytest.raises(InvalidArtifactName):
        store.open_existing(JOB, "leak.txt")
    with pytest.raises(InvalidArtifactName):
        store.path_for(JOB, "checkpoints/secret.txt")


def test_open_existing_needs_a_regular_file(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactNotFound):
        store.open_existing(JOB, "model.pth")
    store.path_for(JOB, "checkpoints/x.pt")
    with pytest.raises(ArtifactNotFound):
        store.open_existing(JOB, "checkpoints")


def test_atomic_write_and_describe(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    path = store.path_for(JOB, "checkpoints/epoch-1.pt")
    write_bytes_atomic(path, b"first")
    write_bytes_atomic(path, b"second version")
    assert path.read_bytes() == b"second version"
    assert store.describe(path) == (14, hashlib.sha256(b"second version").hexdigest())
    assert [p.name for p in path.parent.iterdir()] == ["epoch-1.pt"]  # no temp file left


def test_delete_job_removes_its_folder_only(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    write_bytes_atomic(store.path_for(JOB, "model.pth"), b"m")
    write_bytes_atomic(store.path_for("b" * 32, "model.pth"), b"m")
    store.delete_job(JOB)
    store.delete_job(JOB)
    assert not (tmp_path / JOB).exists()
    assert (tmp_path / ("b" * 32) / "model.pth").exists()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("checkpoints/epoch-1.pt", "checkpoint"),
        ("model.pth", "model"),
        ("optimizer.pth", "model"),
        ("loss_curve.png", "plot"),
        ("train.log", "log"),
    ],
)
def test_artifact_kind(name: str, kind: str) -> None:
    assert artifact_kind(name) == kind
