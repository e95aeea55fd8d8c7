"""A sweep's Optuna study, rebuilt from its trial jobs at every controller pass (ask and tell).

The trial job rows are the only record of a sweep's search: each pass replays them into an
in-memory study (every trial's values enqueued, its per-epoch metric reported, its end told),
then asks the sampler for new trials and the pruner about running ones. A controller that
dies loses nothing, and there is no second store to keep in step with the jobs.
Optuna only, never torch: this runs in the worker's prefork parent.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial, TrialState

from shared.models import JobStatus
from shared.sweep_schemas import ParameterSpec, steps

optuna.logging.set_verbosity(optuna.logging.WARNING)
logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """What the study needs of one trial job."""

    number: int
    params: dict[str, Any]
    status: JobStatus
    epochs: Sequence[tuple[int, float]] = ()  # (epoch, the metric after it), ascending
    value: float | None = None  # the final metric of a trial that succeeded


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    """The parts of a stored sweep the search needs."""

    method: str
    parameters: dict[str, ParameterSpec]
    maximize: bool
    seed: int
    max_trials: int
    early_terminate: dict[str, Any] | None = None

    @classmethod
    def of(cls, method: str, spec: dict[str, Any], max_trials: int) -> SearchSpec:
        """From a sweep row's method, stored request and resolved budget."""
        return cls(
            method=method,
            parameters={n: ParameterSpec.model_validate(p) for n, p in spec["parameters"].items()},
            maximize=spec["metric"]["goal"] == "maximize",
            seed=spec["seed"],
            max_trials=max_trials,
            early_terminate=spec.get("early_terminate"),
        )

    @property
    def searched(self) -> dict[str, ParameterSpec]:
        """The parameters that vary."""
        return {n: p for n, p in self.parameters.items() if p.distribution != "constant"}

    @property
    def constants(self) -> dict[str, Any]:
        """The parameters given one value."""
        return {n: p.value for n, p in self.parameters.items() if p.distribution == "constant"}


def distribution(spec: ParameterSpec, grid: bool) -> BaseDistribution:
    """The Optuna distribution of one searched parameter (a grid's axes are categorical)."""
    kind, low, high = spec.distribution, spec.min, spec.max
    if grid or kind == "categorical":
        return CategoricalDistribution(spec.choices() or [])
    assert low is not None and high is not None  # a range, checked at the door
    if kind == "int_uniform":
        return IntDistribution(int(low), int(high), step=int(spec.q or 1))
    if kind == "log_uniform_values":
        return FloatDistribution(float(low), float(high), log=True)
    step = float(spec.q) if spec.q is not None else None
    # Optuna wants max - min to be a multiple of the step; the top step is dropped otherwise.
    if step is not None:
        high = low + step * steps(low, high, step)
    return FloatDistribution(float(low), float(high), step=step)


def _sampler(search: SearchSpec, number: int) -> optuna.samplers.BaseSampler:
    # Seeded by trial number: the same history asks for the same next trial, whichever
    # process controls the sweep.
    seed = search.seed + number
    if search.method == "grid":
        axes = {n: p.choices() or [] for n, p in search.searched.items()}
        return optuna.samplers.GridSampler(axes, seed=search.seed)
    if search.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Startup trials are random; constant_liar makes running trials count as bad guesses,
    # so trials asked while others run do not all land on the same point.
    startup = max(2, min(10, search.max_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _pruner(search: SearchSpec) -> optuna.pruners.BasePruner:
    rule = search.early_terminate
    if rule is None:
        return optuna.pruners.NopPruner()
    if rule["type"] == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=rule["min_epochs"], reduction_factor=rule["eta"]
        )
    startup = max(1, min(5, search.max_trials // 4))
    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=rule["min_epochs"])


@dataclass
class Search:
    """The rebuilt study of one sweep: ask for trials, and which running ones to prune."""

    spec: SearchSpec
    records: Sequence[TrialRecord]
    study: optuna.Study = field(init=False)
    verdicts: dict[int, bool] = field(init=False, default_factory=dict)
    asked: list[dict[str, Any]] = field(init=False, default_factory=list)  # in this pass

    def __post_init__(self) -> None:
        self.distributions = {
            n: distribution(p, self.spec.method == "grid") for n, p in self.spec.searched.items()
        }
        self.next_number = 1 + max((r.number for r in self.records), default=-1)
        self.study = optuna.create_study(
            direction="maximize" if self.spec.maximize else "minimize",
            sampler=_sampler(self.spec, self.next_number),
            pruner=_pruner(self.spec),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Ended trials first: the pruner judges each running trial against all of them.
            for record in sorted(self.records, key=lambda r: (not r.status.finished, r.number)):
                self._replay(record)

    def _replay(self, record: TrialRecord) -> None:
        self.study.enqueue_trial(record.params, skip_if_exists=False)
        trial = self.study.ask(self.distributions)
        verdict = False
        for epoch, value in record.epochs:
            trial.report(value, epoch)
            verdict = trial.should_prune()
        if record.status is JobStatus.RUNNING and record.epochs:
            self.verdicts[record.number] = verdict
        if record.status.finished:
            self._tell(trial, record)

    def _tell(self, trial: Trial, record: TrialRecord) -> None:
        if record.status is JobStatus.SUCCEEDED and record.value is not None:
            self.study.tell(trial, record.value)
        elif record.status is JobStatus.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:  # failed, cancelled, or a success without a finite metric
            self.study.tell(trial, state=TrialState.FAIL)

    def to_prune(self) -> list[int]:
        """Numbers of the running trials the pruner stops at their newest epoch."""
        return sorted(number for number, stop in self.verdicts.items() if stop)

    def ask(self) -> tuple[int, dict[str, Any]]:
        """(trial number, searched values) of a new trial, kept running in the study."""
        number = self.next_number
        retry = self._grid_retry(number)
        if retry is not None:
            self.study.enqueue_trial(retry, skip_if_exists=False)
        elif self.spec.method == "grid" and number >= self.spec.max_trials:
            # GridSampler would hand out a random, already covered cell: a duplicate.
            raise RuntimeError(f"grid trial {number}: every cell is covered already")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trial = self.study.ask(self.distributions)
        self.next_number += 1
        self.asked.append(dict(trial.params))
        return number, dict(trial.params)

    def _grid_retry(self, number: int) -> dict[str, Any] | None:
        """Past the grid's last cell: a failed cell no other trial covers (a grid loses none)."""
        if self.spec.method != "grid" or number < self.spec.max_trials:
            return None
        covered = [r.params for r in self.records if r.status is not JobStatus.FAILED]
        covered += self.asked
        for record in sorted(self.records, key=lambda r: r.number):
            if record.status is JobStatus.FAILED and record.params not in covered:
                return record.params
        return None
