"""Metric points: one logged train loss or one epoch's test result."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class MetricPoint:
    """A train loss as the seed logs it, or a test loss and accuracy after an epoch."""

    kind: str  # "train" | "test"
    epoch: int  # 1-based; 0 for the test of the untrained net before training
    step: int  # global batch counter across epochs (batches done so far)
    samples_seen: int  # training examples seen so far, as the seed's train_counter counts
    loss: float
    accuracy: float | None  # test points only, fraction 0..1
    seconds: float  # wall clock since the start of the fit() call that made it

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricPoint:
        """Inverse of ``to_dict``."""
        return cls(**data)
