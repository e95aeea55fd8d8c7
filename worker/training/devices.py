"""Where a job runs: the torch device and the number of CPU threads."""

from __future__ import annotations

import ctypes
import functools

import torch

from shared.config import usable_cores


class DeviceUnavailable(Exception):
    """The requested device does not exist on this machine."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable("device 'cuda' requested but no CUDA GPU is available here")
        return torch.device("cuda:0")
    if requested == "cpu":
        return torch.device("cpu")
    raise DeviceUnavailable(f"unknown device {requested!r}; use auto, cpu or cuda")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def configure_threads(n: int) -> int:
    """Set up this process to train: torch's intra-op threads (0 = every usable core) and an
    allocator that keeps freed memory. Returns the thread count set."""
    if n < 0:
        raise ValueError(f"thread count must be >= 0, got {n}")
    count = n or usable_cores()
    torch.set_num_threads(count)
    keep_freed_memory()
    return count


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc reuse freed activation buffers instead of handing them back to the kernel.

    Each training step frees and reallocates the same few megabytes of activations and
    gradients. By default glibc serves blocks this large with fresh ``mmap`` pages and
    returns them on free, so every step page-faults them in again (about 150 faults a step
    for tutorial_cnn, 3,000 for fast_cnn, 15-20 % of a step's CPU time). Raising the mmap
    and trim thresholds keeps them in the heap; the numbers computed do not change. A
    training process is one job's, so holding its peak memory until it exits costs nothing.
    False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
