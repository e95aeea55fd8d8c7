"""Sweeps at the edge: the request body (the W&B sweep grammar) and the response shapes.

The search space is checked against the job schema itself in ``shared.sweeps``: this module
only says what a well-formed request looks like.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.schemas import MAX_PRIORITY, MIN_PRIORITY, Hyperparameters, JobOut, Name

SweepMethod = Literal["grid", "random", "tpe"]
SweepStatusName = Literal["running", "completed", "failed", "cancelled"]
MetricName = Literal["test_accuracy", "test_loss"]
Goal = Literal["maximize", "minimize"]
Distribution = Literal[
    "constant", "categorical", "uniform", "q_uniform", "log_uniform_values", "int_uniform"
]
Scalar = bool | int | float | str
MAX_TRIALS = 1000

# A metric's natural direction, when the request does not say.
DEFAULT_GOAL: dict[str, Goal] = {"test_accuracy": "maximize", "test_loss": "minimize"}


class ParameterSpec(BaseModel):
    """One searched hyperparameter: a ``value``, ``values`` or a distribution over min..max."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    distribution: Distribution | None = Field(
        None, description="inferred when omitted: categorical for values, uniform for min/max"
    )
    value: Scalar | None = Field(None, description="a constant")
    values: list[Scalar] | None = Field(
        None, min_length=1, max_length=MAX_TRIALS, description="the choices (grid: its axis)"
    )
    min: int | float | None = None
    max: int | float | None = None
    q: int | float | None = Field(None, gt=0, description="step: uniform and int_uniform")

    @model_validator(mode="after")
    def _one_kind(self) -> ParameterSpec:
        # The distribution is made explicit here, so everything downstream reads one field.
        self.distribution = _distribution(self)
        kind = self.distribution
        ranged = kind in ("uniform", "q_uniform", "log_uniform_values", "int_uniform")
        if ranged:
            _check_range(self, kind)
        elif self.min is not None or self.max is not None or self.q is not None:
            raise ValueError(f"min, max and q belong to a range distribution, not {kind}")
        if kind == "constant" and "value" not in self.model_fields_set:
            raise ValueError("constant needs value")
        if kind == "categorical" and self.values is None:
            raise ValueError("categorical needs values")
        return self

    def choices(self) -> list[Scalar] | None:
        """Every value it can take when that is a finite list (a grid's axis), else None."""
        kind = self.distribution
        if kind == "constant":
            return [self.value] if self.value is not None else []
        if kind == "categorical":
            return list(self.values or [])
        if kind in ("int_uniform", "q_uniform") and self.min is not None and self.max is not None:
            step = self.q or 1
            count = steps(self.min, self.max, step) + 1
            if count > MAX_TRIALS:
                return None
            points = [self.min + i * step for i in range(count)]
            # Rounded so 0.1 + 2 * 0.1 is 0.3, as a person reading the grid expects.
            return [int(p) if kind == "int_uniform" else round(p, 12) for p in points]
        return None


def steps(low: float, high: float, q: float) -> int:
    """Whole steps of ``q`` from ``low`` that stay within ``high`` (0.01..0.03 by 0.01: 2)."""
    # The epsilon absorbs binary fractions: (0.03 - 0.01) / 0.01 is 1.9999999999999998.
    return math.floor((high - low) / q + 1e-9)


def _distribution(spec: ParameterSpec) -> Distribution:
    given = spec.model_fields_set
    if spec.distribution is not None:
        return spec.distribution
    if "value" in given:
        if given & {"values", "min", "max", "q"}:
            raise ValueError("give value, values or min/max, not several")
        return "constant"
    if spec.values is not None:
        if given & {"min", "max", "q"}:
            raise ValueError("give values or min/max, not both")
        return "categorical"
    if spec.min is None or spec.max is None:
        raise ValueError("give value, values, or min and max (with a distribution)")
    if isinstance(spec.min, int) and isinstance(spec.max, int) and spec.q is None:
        return "int_uniform"
    return "q_uniform" if spec.q is not None else "uniform"


def _check_range(spec: ParameterSpec, kind: Distribution) -> None:
    if spec.min is None or spec.max is None:
        raise ValueError(f"{kind} needs min and max")
    if spec.values is not None or "value" in spec.model_fields_set:
        raise ValueError(f"{kind} takes min and max, not value or values")
    if not spec.min < spec.max:
        raise ValueError("min must be less than max")
    if kind == "int_uniform" and not all(
        isinstance(x, int) for x in (spec.min, spec.max, spec.q or 1)
    ):
        raise ValueError("int_uniform needs integer min, max and q")
    if kind == "q_uniform" and spec.q is None:
        raise ValueError("q_uniform needs q")
    if kind == "log_uniform_values":
        if spec.q is not None:
            raise ValueError("log_uniform_values takes no q")
        if spec.min <= 0:
            raise ValueError("log_uniform_values needs min > 0")
    if spec.q is not None and spec.q > spec.max - spec.min:
        raise ValueError("q must not exceed max - min")


class SweepMetric(BaseModel):
    """What the sweep optimizes: a trial's test metric, per epoch and at its end."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: MetricName = "test_accuracy"
    goal: Goal | None = Field(None, description="default: maximize accuracy, minimize loss")

    @model_validator(mode="after")
    def _default_goal(self) -> SweepMetric:
        self.goal = self.goal or DEFAULT_GOAL[self.name]
        return self


class SweepBase(BaseModel):
    """What every trial shares: hyperparameters the search does not vary, and the priority."""

    model_config = ConfigDict(extra="forbid", strict=True)

    hyperparameters: Hyperparameters = Field(
        default_factory=lambda: Hyperparameters.model_validate({}),
        description="omitted keys take the seed recipe's values",
    )
    priority: int = Field(
        0, ge=MIN_PRIORITY, le=MAX_PRIORITY, description="every trial job's priority"
    )


class SweepBudget(BaseModel):
    """How many trials, how many at once, how many failures before the sweep gives up."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_trials: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="trials that must not fail; a grid: its size"
    )
    max_concurrent: int = Field(2, ge=1, le=64, description="trials queued or running at once")
    max_failed: int = Field(
        3, ge=0, le=MAX_TRIALS, description="failures tolerated; one more ends it"
    )


class EarlyTerminate(BaseModel):
    """Stop unpromising trials after an epoch: ASHA (successive halving) or the median rule."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["asha", "median"]
    min_epochs: int = Field(1, ge=1, le=100, description="epochs every trial trains at least")
    eta: int = Field(3, ge=2, le=10, description="asha: keep the best 1/eta at each rung")


class SweepCreate(BaseModel):
    """The body of POST /api/v1/sweeps."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: Name | None = Field(None, description="a label for people")
    method: SweepMethod
    metric: SweepMetric = Field(default_factory=SweepMetric)
    parameters: dict[str, ParameterSpec] = Field(min_length=1, max_length=20)
    base: SweepBase = Field(default_factory=SweepBase)
    budget: SweepBudget = Field(default_factory=SweepBudget)
    early_terminate: EarlyTerminate | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the sampler")


class ListSweepsQuery(BaseModel):
    """Query parameters of GET /api/v1/sweeps."""

    model_config = ConfigDict(extra="forbid")

    status: list[SweepStatusName] | None = Field(None, description="repeat to match several")
    limit: int | None = Field(None, ge=1, le=500, description="at most this many, newest first")


class TrialCountsOut(BaseModel):
    """How many of a sweep's trials are in each job state."""

    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    pruned: int = 0


class SweepBestOut(BaseModel):
    """The best trial that ran to its end."""

    job_id: str
    trial_number: int
    value: float
    hyperparameters: dict[str, Any]


class SweepBudgetOut(BaseModel):
    """The budget as the sweep runs it (a grid's max_trials is its size)."""

    max_trials: int
    max_concurrent: int
    max_failed: int


class SweepLinksOut(BaseModel):
    """Where to go next from a sweep."""

    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    trials: str
    cancel: str


class SweepOut(BaseModel):
    """A sweep as the API shows it."""

    id: str
    name: str | None
    status: SweepStatusName
    method: SweepMethod
    metric: SweepMetric
    parameters: dict[str, Any]
    base: dict[str, Any]
    budget: SweepBudgetOut
    early_terminate: EarlyTerminate | None
    seed: int
    trials: int = Field(description="trial jobs submitted so far")
    counts: TrialCountsOut
    best: SweepBestOut | None
    error: str | None
    controller: str | None = Field(description="the process holding the sweep's lease")
    created_at: datetime
    finished_at: datetime | None
    links: SweepLinksOut


class SweepPageOut(BaseModel):
    """Sweeps, newest first."""

    items: list[SweepOut]


class TrialOut(BaseModel):
    """One trial: its number, the values searched, its metric and the job that ran it."""

    trial_number: int
    params: dict[str, Any] = Field(description="the searched hyperparameters' values")
    value: float | None = Field(description="its final metric; null unless it succeeded")
    epochs_trained: int
    job: JobOut


class TrialListOut(BaseModel):
    """A sweep's trials, best first (trials without a value last, newest first)."""

    sweep_id: str
    items: list[TrialOut]
