"""Fixtures every test may use: where real MNIST lies, a real S3 object store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.seaweedfs import CREDENTIALS, SeaweedFS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The torchvision root holding MNIST/raw/*-ubyte; a missing one fails, it never skips."""
    candidates = [os.environ.get("MNISTQ_DATA_DIR"), str(ROOT.parent / "shared" / "datasets")]
    for candidate in filter(None, candidates):
        path = Path(candidate).resolve()
        if (path / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return path
    pytest.fail("real MNIST not found: set MNISTQ_DATA_DIR to a torchvision root with MNIST/raw")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS server (S3 API) for the whole session, started on first use."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The AWS_* variables boto3 reads, set for this test (and its subprocesses' env)."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return dict(CREDENTIALS)
