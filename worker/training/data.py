"""MNIST as two normalized tensors held once per process: the engine's fast data path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# The seed recipe's Normalize((0.1307,), (0.3081,)), applied once to the whole split.
MEAN = 0.1307
STD = 0.3081

_cache: dict[tuple[Path, bool], MnistSplit] = {}
_device_cache: dict[tuple[int, str], MnistSplit] = {}


class MnistNotFound(Exception):
    """The MNIST files are not in the data directory and could not be downloaded."""


@dataclass(frozen=True)
class MnistSplit:
    """One MNIST split as tensors: normalized images and their labels."""

    images: torch.Tensor  # (N, 1, 28, 28) float32, (x/255 - MEAN) / STD
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> MnistSplit:
        """The same split on ``device``; a loaded split's copy is kept for the next job."""
        if self.images.device == device:
            return self
        key = (id(self), str(device))
        if key in _device_cache:
            return _device_cache[key]
        moved = MnistSplit(self.images.to(device), self.labels.to(device))
        if any(self is split for split in _cache.values()):
            _device_cache[key] = moved  # ids of cached splits stay valid: the cache holds them
        return moved

    def head(self, n: int | None) -> MnistSplit:
        """The first ``n`` examples (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return MnistSplit(self.images[:n], self.labels[:n])


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) → normalized float32 (N, 1, 28, 28), equal to ToTensor + Normalize."""
    # Same operations, same order and dtype as ToTensor (div 255) then Normalize (sub, div),
    # so a model sees exactly the numbers the seed's DataLoader would give it.
    return raw.unsqueeze(1).to(torch.float32).div(255).sub_(MEAN).div_(STD)


def load_split(data_dir: Path, *, train: bool, download: bool = True) -> MnistSplit:
    """The train or test split from a torchvision MNIST root, read once per process."""
    key = (Path(data_dir).resolve(), train)
    if key not in _cache:
        _cache[key] = _read_split(key[0], train=train, download=download)
    return _cache[key]


def _read_split(root: Path, *, train: bool, download: bool) -> MnistSplit:
    from torchvision.datasets import MNIST  # torchvision is slow to import; only here

    try:
        dataset = MNIST(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as exc:
        missing = "train-*-ubyte" if train else "t10k-*-ubyte"
        hint = "download failed" if download else "download disabled"
        raise MnistNotFound(
            f"MNIST not found in {root / 'MNIST' / 'raw'} (need {missing}; {hint}): {exc}"
        ) from exc
    return MnistSplit(normalize(dataset.data), dataset.targets.to(torch.int64))
