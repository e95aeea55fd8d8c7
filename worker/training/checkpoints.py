"""Epoch checkpoints and atomic writes of everything ``fit`` saves."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.artifacts import atomic_writer, checkpoint_name
from worker.training.metrics import MetricPoint

CHECKPOINT_DIR = "checkpoints"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


class CheckpointError(Exception):
    """A checkpoint file is unreadable or does not fit the run resuming from it."""


@dataclass
class Checkpoint:
    """What an epoch checkpoint holds: enough to continue training bit for bit."""

    epoch: int
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any]
    hyperparameters: dict[str, Any]
    metrics: list[MetricPoint]
    rng_state: dict[str, Any]  # torch CPU/CUDA generators and the shuffle generator
    global_step: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """Plain dict of tensors and primitives, loadable with ``weights_only=True``."""
        return {
            "format": 1,
            "epoch": self.epoch,
            "model_state": self.model_state,
            "optimizer_state": self.optimizer_state,
            "hyperparameters": self.hyperparameters,
            "metrics": [point.to_dict() for point in self.metrics],
            "rng_state": self.rng_state,
            "global_step": self.global_step,
            "samples_seen": self.samples_seen,
            "extra": self.extra,
        }


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` that readers see whole or not at all."""
    with atomic_writer(path) as out:
        torch.save(obj, out)


def save_checkpoint(checkpoint: Checkpoint, out_dir: Path) -> Path:
    """Write ``checkpoints/epoch-<n>.pt`` atomically; returns its path."""
    path = out_dir / checkpoint_name(checkpoint.epoch)
    atomic_torch_save(checkpoint.to_payload(), path)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read an epoch checkpoint written by ``save_checkpoint``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(
            epoch=int(data["epoch"]),
            model_state=data["model_state"],
            optimizer_state=data["optimizer_state"],
            hyperparameters=dict(data["hyperparameters"]),
            metrics=[MetricPoint.from_dict(point) for point in data["metrics"]],
            rng_state=data["rng_state"],
            global_step=int(data.get("global_step", 0)),
            samples_seen=int(data.get("samples_seen", 0)),
            extra=dict(data.get("extra", {})),
        )
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The highest-epoch ``checkpoints/epoch-<n>.pt`` in a run folder, if any."""
    folder = out_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return max(found)[1] if found else None
