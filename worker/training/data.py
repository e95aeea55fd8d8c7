"""MNIST as two normalized tensors held once per process: the engine's fast data path.

The first process on a machine to read a split through torchvision also saves its
normalized tensors to a cache file; every later process (each job gets a fresh pool child)
maps that file instead of importing torchvision and normalizing again: the same tensors,
read in milliseconds, their pages shared by every process that uses them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.training.checkpoints import atomic_torch_save

logger = logging.getLogger(__name__)

# The seed recipe's Normalize((0.1307,), (0.3081,)), applied once to the whole split.
MEAN = 0.1307
STD = 0.3081

CACHE_VERSION = 1  # of the cache files' content; a new one is written when it changes
CACHE_ROOT: Path | None = None  # None: a folder in the system's temporary directory
RAW_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

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
    cached = _cache_file(root, train)
    if cached is not None and cached.exists() and _ours(cached.parent):
        try:
            saved = torch.load(cached, mmap=True, weights_only=True)
            return MnistSplit(saved["images"], saved["labels"])
        except Exception:  # a damaged file: read the split again and write it anew
            logger.warning("MNIST cache %s unreadable, reading the split again", cached)
    split = _read_with_torchvision(root, train=train, download=download)
    _write_cache(_cache_file(root, train), split)  # the raw files exist now
    return split


def _read_with_torchvision(root: Path, *, train: bool, download: bool) -> MnistSplit:
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


def _cache_file(root: Path, train: bool) -> Path | None:
    """Where the split's tensors are cached, named after its raw files (path, size, mtime)
    and how they were normalized; None while the raw files are not there."""
    raw = root / "MNIST" / "raw"
    try:
        stats = [(raw / name).stat() for name in RAW_FILES[train]]
    except OSError:
        return None
    key = repr((CACHE_VERSION, MEAN, STD, str(raw), [(s.st_size, s.st_mtime_ns) for s in stats]))
    folder = CACHE_ROOT or Path(tempfile.gettempdir()) / "mnistq-mnist"
    name = f"{'train' if train else 'test'}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    return folder / name


def _ours(folder: Path) -> bool:
    """Whether only this user can write to ``folder`` (it sits in a shared temporary folder)."""
    info = folder.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _write_cache(path: Path | None, split: MnistSplit) -> None:
    """Save ``split`` to ``path`` whole or not at all."""
    if path is None:
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _ours(path.parent):
            logger.warning("MNIST cache folder %s is not this user's alone: not used", path.parent)
            return
        atomic_torch_save({"images": split.images, "labels": split.labels}, path)
    except OSError as exc:  # no room, no permission: every process just reads the raw files
        logger.warning("MNIST cache %s not written: %s", path, exc)
