"""Fixtures every test may use: where real MNIST lies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
