"""Fixtures for the engine's tests: a tiny synthetic split and the real MNIST splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.training.data import MnistSplit, load_split


def synthetic_split(n: int, seed: int) -> MnistSplit:
    """``n`` random images whose label is set by which quadrant is brightest: learnable, fast."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    for quadrant in range(4):
        rows = slice(14 * (quadrant // 2), 14 * (quadrant // 2) + 14)
        cols = slice(14 * (quadrant % 2), 14 * (quadrant % 2) + 14)
        images[labels == quadrant, :, rows, cols] += 1.5
    return MnistSplit(images, labels)


@pytest.fixture(scope="session")
def tiny_train() -> MnistSplit:
    """600 synthetic training images (10 batches of 64, the last one partial)."""
    return synthetic_split(600, seed=0)


@pytest.fixture(scope="session")
def tiny_test() -> MnistSplit:
    """200 synthetic test images."""
    return synthetic_split(200, seed=1)


@pytest.fixture(scope="session")
def mnist_train(mnist_dir: Path) -> MnistSplit:
    """The real MNIST training split (offline)."""
    return load_split(mnist_dir, train=True, download=False)


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> MnistSplit:
    """The real MNIST test split (offline)."""
    return load_split(mnist_dir, train=False, download=False)
