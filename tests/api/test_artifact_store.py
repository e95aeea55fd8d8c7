"""Both artifact stores (a folder, real S3 on SeaweedFS): names stay inside, writes are whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.artifacts import (
    ArtifactNotFound,
    InvalidArtifactName,
    artifact_kind,
    describe,
    write_bytes_atomic,
)
from shared.config import Settings
from shared.store import ArtifactStore, LocalStore, S3Store, StoreUnavailable, make_store
from tests.seaweedfs import SeaweedFS

JOB = "a" * 32
ENGINE_NAMES = ("model.pth", "optimizer.pth", "loss_curve.png", "checkpoints/epoch-12.pt")


@pytest.fixture(params=["local", "s3"])
def any_store(
    request: pytest.FixtureRequest, tmp_path: Path, s3_env: dict[str, str]
) -> ArtifactStore:
    """A local folder store, and an S3 store on a fresh bucket of a real SeaweedFS."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    settings = Settings(
        artifact_url=f"s3://{server.new_bucket()}/runs", s3_endpoint_url=server.endpoint_url
    )
    return make_store(settings)


def put_bytes(store: ArtifactStore, tmp_path: Path, job_id: str, name: str, data: bytes) -> None:
    """Upload ``data`` as the worker does: from a local scratch file."""
    scratch = tmp_path / "scratch" / name
    write_bytes_atomic(scratch, data)
    store.put(job_id, name, scratch, sha256=describe(scratch)[1])


def read(store: ArtifactStore, job_id: str, name: str) -> bytes:
    """The stored bytes of an artifact."""
    with store.open(job_id, name) as stream:
        return bytes(stream.read())


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
def test_unsafe_names_are_refused(any_store: ArtifactStore, tmp_path: Path, name: str) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(InvalidArtifactName):
        any_store.put(JOB, name, tmp_path / "f", sha256="0" * 64)
    with pytest.raises(InvalidArtifactName):
        any_store.open(JOB, name).__enter__()


@pytest.mark.parametrize("job_id", ["", "..", "a/b", "x" * 65, "a\x00"])
def test_unsafe_job_ids_are_refused(any_store: ArtifactStore, job_id: str) -> None:
    with pytest.raises(InvalidArtifactName):
        any_store.list(job_id)
    with pytest.raises(InvalidArtifactName):
        any_store.delete_job(job_id)


def test_put_open_fetch_list_round_trip(any_store: ArtifactStore, tmp_path: Path) -> None:
    for name in ENGINE_NAMES:
        put_bytes(any_store, tmp_path, JOB, name, f"content of {name}".encode())
    assert any_store.list(JOB) == sorted(ENGINE_NAMES)
    assert read(any_store, JOB, "checkpoints/epoch-12.pt") == b"content of checkpoints/epoch-12.pt"
    dest = any_store.fetch(JOB, "model.pth", tmp_path / "down" / "model.pth")
    assert dest.read_bytes() == b"content of model.pth"
    assert any_store.list("b" * 32) == []


def test_a_new_put_replaces_the_whole_object(any_store: ArtifactStore, tmp_path: Path) -> None:
    put_bytes(any_store, tmp_path, JOB, "checkpoints/epoch-1.pt", b"first, and longer")
    put_bytes(any_store, tmp_path, JOB, "checkpoints/epoch-1.pt", b"second")
    assert read(any_store, JOB, "checkpoints/epoch-1.pt") == b"second"
    assert any_store.list(JOB) == ["checkpoints/epoch-1.pt"]  # no temp object left


def test_missing_artifacts_are_not_found(any_store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFound):
        any_store.open(JOB, "model.pth").__enter__()
    with pytest.raises(ArtifactNotFound):
        any_store.fetch(JOB, "model.pth", tmp_path / "x")


def test_delete_job_removes_its_artifacts_only(any_store: ArtifactStore, tmp_path: Path) -> None:
    put_bytes(any_store, tmp_path, JOB, "model.pth", b"m")
    put_bytes(any_store, tmp_path, JOB, "checkpoints/epoch-1.pt", b"c")
    put_bytes(any_store, tmp_path, "b" * 32, "model.pth", b"m")
    any_store.delete_job(JOB)
    any_store.delete_job(JOB)
    assert any_store.list(JOB) == []
    assert any_store.list("b" * 32) == ["model.pth"]


def test_a_symlinked_job_folder_cannot_lead_out_of_the_local_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("private")
    store.root.mkdir()
    (store.root / JOB).symlink_to(outside)  # the job's whole folder points out of the root
    with pytest.raises(InvalidArtifactName):
        store.open(JOB, "secret.txt").__enter__()
    with pytest.raises(InvalidArtifactName):
        put_bytes(store, tmp_path, JOB, "model.pth", b"m")
    assert store.list(JOB) == []


def test_a_symlinked_file_cannot_lead_out_of_the_local_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (store.root / JOB).mkdir(parents=True)
    (store.root / JOB / "leak.txt").symlink_to(secret)
    with pytest.raises(InvalidArtifactName):
        store.open(JOB, "leak.txt").__enter__()


def test_s3_objects_sit_under_the_prefix_and_carry_their_sha256(
    seaweedfs: SeaweedFS, s3_env: dict[str, str], tmp_path: Path
) -> None:
    bucket = seaweedfs.new_bucket()
    store = S3Store(bucket, "team/runs", endpoint_url=seaweedfs.endpoint_url)
    put_bytes(store, tmp_path, JOB, "checkpoints/epoch-1.pt", b"weights")
    assert seaweedfs.keys(bucket) == [f"team/runs/{JOB}/checkpoints/epoch-1.pt"]
    head = seaweedfs.client().head_object(
        Bucket=bucket, Key=f"team/runs/{JOB}/checkpoints/epoch-1.pt"
    )
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_s3_store_creates_a_missing_bucket_on_first_upload(
    seaweedfs: SeaweedFS, s3_env: dict[str, str], tmp_path: Path
) -> None:
    store = S3Store("mnistq-new-bucket", endpoint_url=seaweedfs.endpoint_url)
    put_bytes(store, tmp_path, JOB, "model.pth", b"m")
    assert seaweedfs.keys("mnistq-new-bucket") == [f"{JOB}/model.pth"]


def test_an_unreachable_s3_server_is_store_unavailable(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    store = S3Store("mnistq", endpoint_url="http://127.0.0.1:9")  # nothing listens there
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StoreUnavailable):
        store.put(JOB, "model.pth", tmp_path / "f", sha256="0" * 64)
    with pytest.raises(StoreUnavailable):
        store.open(JOB, "model.pth").__enter__()


@pytest.mark.parametrize(
    ("url", "kind"),
    [("s3://bucket/prefix", S3Store), ("file:///tmp/a", LocalStore), ("var/artifacts", LocalStore)],
)
def test_the_artifact_url_chooses_the_store(url: str, kind: type, s3_env: dict[str, str]) -> None:
    assert isinstance(make_store(Settings(artifact_url=url)), kind)
    assert isinstance(make_store(Settings()), LocalStore)


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


def test_the_s3_server_refuses_a_wrong_key(
    seaweedfs: SeaweedFS, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = seaweedfs.new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3Store(bucket, endpoint_url=seaweedfs.endpoint_url)
    with pytest.raises(StoreUnavailable, match=r"InvalidAccessKeyId|SignatureDoesNotMatch"):
        put_bytes(store, tmp_path, JOB, "model.pth", b"m")
    assert seaweedfs.keys(bucket) == []
