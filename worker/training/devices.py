"""Where a job runs: the torch device and the number of CPU threads."""

from __future__ import annotations

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


def configure_threads(n: int) -> int:
    """Set torch's intra-op threads; 0 means every usable core. Returns the count set."""
    if n < 0:
        raise ValueError(f"thread count must be >= 0, got {n}")
    count = n or usable_cores()
    torch.set_num_threads(count)
    return count
