"""The train/test loop: ``train_epoch``, ``evaluate`` and ``fit`` with callbacks for the caller."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.artifacts import write_bytes_atomic
from shared.schemas import Hyperparameters
from worker.training import plots
from worker.training.checkpoints import (
    Checkpoint,
    CheckpointError,
    atomic_torch_save,
    checkpoint_name,
    save_checkpoint,
)
from worker.training.data import MnistSplit
from worker.training.metrics import MetricPoint
from worker.training.nets import build_model

__all__ = [
    "EpochResult",
    "FitResult",
    "Hooks",
    "MetricPoint",
    "Progress",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "format_test_line",
    "format_train_line",
    "make_optimizer",
    "train_epoch",
]


def _noop(*_: Any) -> None:
    """A callback that ignores what it is given."""


def _never() -> bool:
    """A stop check that never asks to stop."""
    return False


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the run cannot recover with these hyperparameters."""


@dataclass(frozen=True)
class Progress:
    """Where a running fit stands, for progress bars and heartbeats."""

    epoch: int
    n_epochs: int
    step_in_epoch: int
    steps_per_epoch: int
    global_step: int
    samples_seen: int
    total_samples: int  # n_epochs * len(train split)
    samples_per_second: float
    train_loss: float | None  # latest logged train loss


@dataclass
class Hooks:
    """The caller's callbacks; every one is optional."""

    on_progress: Callable[[Progress], None] = _noop  # each log interval and epoch end
    on_metrics: Callable[[list[MetricPoint]], None] = _noop  # train points as logged; test points
    on_artifact: Callable[[str, str, Path], None] = _noop  # (name, kind, path) once written
    on_line: Callable[[str], None] = _noop  # the seed's printed lines (train logs, test results)
    should_stop: Callable[[], bool] = _never  # polled each log interval and between epochs


@dataclass(frozen=True)
class FitResult:
    """How a fit ended and everything it measured."""

    status: str  # "completed" | "stopped"
    epochs_done: int
    test_loss: float | None
    test_accuracy: float | None
    metrics: list[MetricPoint]
    device: str


@dataclass(frozen=True)
class EpochResult:
    """What ``train_epoch`` did: batches trained and whether a stop check cut it short."""

    batches: int
    samples: int
    stopped: bool


def make_optimizer(hp: Hyperparameters, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``hp`` names; momentum doubles as Adam's beta1."""
    # fused: one kernel updates every parameter instead of a Python loop of small ops.
    common: dict[str, Any] = {
        "lr": hp.learning_rate,
        "weight_decay": hp.weight_decay,
        "fused": True,
    }
    params = model.parameters()
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=hp.momentum, **common)
    betas = (hp.momentum, 0.999)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, betas=betas, **common)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, betas=betas, **common)
    raise ValueError(f"unknown optimizer {hp.optimizer!r}")


def apply_hyperparameters(optimizer: torch.optim.Optimizer, hp: Hyperparameters) -> None:
    """Set lr, momentum (beta1) and weight decay on a restored optimizer's groups."""
    for group in optimizer.param_groups:
        group["lr"] = hp.learning_rate
        group["weight_decay"] = hp.weight_decay
        if "momentum" in group:
            group["momentum"] = hp.momentum
        if "betas" in group:
            group["betas"] = (hp.momentum, group["betas"][1])


def _set_epoch_learning_rate(
    optimizer: torch.optim.Optimizer, hp: Hyperparameters, epoch: int
) -> None:
    """Step decay per epoch: lr * lr_gamma ** (epoch - 1)."""
    # Computed from the epoch alone, so a resumed run needs no scheduler state. At the
    # default 1.0 the rate stays constant, as in the seed recipe.
    if hp.lr_gamma != 1.0:
        for group in optimizer.param_groups:
            group["lr"] = hp.learning_rate * hp.lr_gamma ** (epoch - 1)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: MnistSplit,
    *,
    epoch: int,
    batch_size: int,
    log_interval: int,
    generator: torch.Generator,
    device: torch.device | None = None,
    on_log: Callable[[int, int, float], None] = _noop,
    should_stop: Callable[[], bool] = _never,
    max_batches: int | None = None,
) -> EpochResult:
    """One pass over ``split`` in seeded random order; ``on_log(epoch, batch_idx, loss)``."""
    model.train()
    if device is not None:
        split = split.to(device)
    n = len(split)
    # The shuffle generator lives on the CPU so its state is device-independent.
    order = torch.randperm(n, generator=generator).to(split.images.device)
    n_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    samples = 0
    for batch_idx in range(n_batches):
        index = order[batch_idx * batch_size : (batch_idx + 1) * batch_size]
        # index_select: the same rows as split.images[index], gathered in one plain copy.
        data = split.images.index_select(0, index)  # (B, 1, 28, 28)
        target = split.labels.index_select(0, index)  # (B,)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        samples += len(index)
        # The only host sync per log interval: the seed logs that one batch's loss.
        if batch_idx % log_interval == 0:
            on_log(epoch, batch_idx, loss.item())
            if should_stop():
                return EpochResult(batch_idx + 1, samples, stopped=True)
    return EpochResult(n_batches, samples, stopped=False)


@torch.inference_mode()
def evaluate(
    model: nn.Module, split: MnistSplit, *, batch_size: int, device: torch.device | None = None
) -> tuple[float, float]:
    """Average NLL loss (summed over examples / N) and accuracy on ``split``."""
    model.eval()
    if device is not None:
        split = split.to(device)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        data = split.images[start : start + batch_size]
        target = split.labels[start : start + batch_size]
        output = model(data)
        loss_sum += F.nll_loss(output, target, reduction="sum").item()
        correct += int((output.argmax(dim=1) == target).sum().item())
    return loss_sum / len(split), correct / len(split)


def format_train_line(
    epoch: int, batch_idx: int, batch_size: int, n_train: int, loss: float
) -> str:
    """The seed's train line: ``Train Epoch: 1 [640/60000 (1%)]``, a tab, ``Loss: 2.273389``."""
    n_batches = math.ceil(n_train / batch_size)
    done = batch_idx * batch_size
    return (
        f"Train Epoch: {epoch} [{done}/{n_train} ({100.0 * batch_idx / n_batches:.0f}%)]"
        f"\tLoss: {loss:.6f}"
    )


def format_test_line(loss: float, accuracy: float, n_test: int) -> str:
    """The seed's test line: ``Test set: Avg. loss: 0.2020, Accuracy: 9392/10000 (94%)``."""
    correct = round(accuracy * n_test)
    return (
        f"Test set: Avg. loss: {loss:.4f}, Accuracy: {correct}/{n_test} "
        f"({100.0 * correct / n_test:.0f}%)"
    )


@dataclass
class _Run:
    """Counters, metric history and timing of one fit call; makes the points and progress."""

    hp: Hyperparameters
    hooks: Hooks
    n_train: int
    steps_per_epoch: int
    n_test: int
    metrics: list[MetricPoint] = field(default_factory=list)
    global_step: int = 0
    samples_seen: int = 0
    samples_this_call: int = 0
    last_train_loss: float | None = None
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        """Wall clock since this fit call started."""
        return time.perf_counter() - self.started

    def epoch_samples(self) -> int:
        """Examples one epoch trains on (fewer than the split when batches are capped)."""
        return min(self.n_train, self.steps_per_epoch * self.hp.batch_size_train)

    def log_train(self, epoch: int, batch_idx: int, loss: float) -> None:
        """Record the seed's train point: that batch's loss, samples seen before it."""
        seen = self.samples_seen + batch_idx * self.hp.batch_size_train
        step = self.global_step + batch_idx + 1
        if not math.isfinite(loss):
            # NaN never recovers: stop now rather than train on garbage to the end.
            raise TrainingDiverged(
                f"train loss became {loss} at epoch {epoch} step {step}; lower the learning rate"
            )
        point = MetricPoint("train", epoch, step, seen, loss, None, self.seconds())
        self.metrics.append(point)
        self.last_train_loss = loss
        self.hooks.on_metrics([point])
        batch = self.hp.batch_size_train
        self.hooks.on_line(format_train_line(epoch, batch_idx, batch, self.n_train, loss))
        done = min((batch_idx + 1) * self.hp.batch_size_train, self.n_train)
        self.progress(epoch, batch_idx + 1, done)

    def end_epoch(self, epoch: int, done: EpochResult, test_loss: float, accuracy: float) -> None:
        """Record an epoch's test point and advance the counters past it."""
        if not math.isfinite(test_loss):
            raise TrainingDiverged(
                f"test loss became {test_loss} after epoch {epoch}; lower the learning rate"
            )
        self.progress(epoch, done.batches, done.samples)
        self.global_step += done.batches
        self.samples_seen += done.samples
        self.samples_this_call += done.samples
        self.record_test(epoch, test_loss, accuracy)

    def record_test(self, epoch: int, test_loss: float, accuracy: float) -> None:
        """The test point after ``epoch`` (0: the untrained net) and the seed's line for it."""
        point = MetricPoint("test", epoch, self.global_step, self.samples_seen, test_loss,
                            accuracy, self.seconds())  # fmt: skip
        self.metrics.append(point)
        self.hooks.on_metrics([point])
        self.hooks.on_line(format_test_line(test_loss, accuracy, self.n_test))

    def progress(self, epoch: int, step_in_epoch: int, samples_in_epoch: int) -> None:
        """Tell the caller where the epoch stands."""
        rate = (self.samples_this_call + samples_in_epoch) / max(self.seconds(), 1e-9)
        self.hooks.on_progress(Progress(
            epoch, self.hp.n_epochs, step_in_epoch, self.steps_per_epoch,
            self.global_step + step_in_epoch, self.samples_seen + samples_in_epoch,
            self.hp.n_epochs * self.epoch_samples(), rate, self.last_train_loss,
        ))  # fmt: skip


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream the loop draws from: dropout's (torch) and the shuffle's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "shuffle": generator.get_state()}


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what ``_rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["shuffle"])


def _restore(
    resume: Checkpoint,
    hp: Hyperparameters,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Put model, optimizer and random streams back where the checkpoint left them."""
    for key in ("model", "optimizer"):
        if resume.hyperparameters.get(key) != getattr(hp, key):
            raise CheckpointError(
                f"checkpoint was made with {key}={resume.hyperparameters.get(key)!r}, "
                f"this run asks for {key}={getattr(hp, key)!r}"
            )
    model.load_state_dict(resume.model_state)
    optimizer.load_state_dict(resume.optimizer_state)
    apply_hyperparameters(optimizer, hp)
    _set_rng_state(resume.rng_state, generator)


def _write(
    hooks: Hooks, out_dir: Path, name: str, kind: str, writer: Callable[[Path], None]
) -> None:
    """Write one artifact with ``writer`` and announce it once it is complete."""
    path = out_dir / name
    writer(path)
    hooks.on_artifact(name, kind, path)


def _write_json(data: dict[str, Any], path: Path) -> None:
    """JSON that readers see whole or not at all."""
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def fit(
    hp: Hyperparameters,
    train: MnistSplit,
    test: MnistSplit,
    out_dir: Path,
    *,
    device: torch.device,
    hooks: Hooks | None = None,
    resume: Checkpoint | None = None,
    max_train_batches: int | None = None,
    max_test_samples: int | None = None,
    initial_test: bool = True,
) -> FitResult:
    """Train ``hp.model`` to ``hp.n_epochs`` (from ``resume`` when given) and write artifacts.

    A fresh run first tests the untrained net, as the seed does (``test()`` before epoch 1):
    an epoch-0 test point at 0 examples seen. A resumed run has it in its history already.
    """
    hooks = hooks or Hooks()
    out_dir.mkdir(parents=True, exist_ok=True)
    model, optimizer, generator = _prepare(hp, device)
    train, test = train.to(device), test.head(max_test_samples).to(device)
    steps = math.ceil(len(train) / hp.batch_size_train)
    run = _Run(hp, hooks, len(train), min(steps, max_train_batches or steps), len(test))
    first_epoch = 1
    if resume is not None:
        _restore(resume, hp, model, optimizer, generator)
        run.metrics = list(resume.metrics)
        run.global_step, run.samples_seen = resume.global_step, resume.samples_seen
        first_epoch = resume.epoch + 1
    _write(hooks, out_dir, "examples.png", "plot", lambda p: plots.save_examples(train, p))
    for epoch in range(first_epoch, hp.n_epochs + 1):
        if hooks.should_stop():
            return _result("stopped", epoch - 1, run, device)
        if epoch == 1 and initial_test:
            # Dropout is off and no random stream is drawn: later numbers do not change.
            untrained = evaluate(model, test, batch_size=hp.batch_size_test, device=device)
            run.record_test(0, *untrained)
        _set_epoch_learning_rate(optimizer, hp, epoch)
        done = train_epoch(
            model, optimizer, train, epoch=epoch, batch_size=hp.batch_size_train,
            log_interval=hp.log_interval, generator=generator, device=device,
            on_log=run.log_train, should_stop=hooks.should_stop, max_batches=max_train_batches,
        )  # fmt: skip
        if done.stopped:
            return _result("stopped", epoch - 1, run, device)
        scores = evaluate(model, test, batch_size=hp.batch_size_test, device=device)
        run.end_epoch(epoch, done, *scores)
        _save_epoch(epoch, hp, model, optimizer, generator, run, out_dir)
    result = _result("completed", max(hp.n_epochs, first_epoch - 1), run, device)
    _finish(result, hp, model, optimizer, test, out_dir, hooks)
    return result


def _prepare(
    hp: Hyperparameters, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    """Seeded model, its optimizer and the shuffle generator, as a fresh run starts them."""
    if device.type == "cuda":
        # Same seed, same device → same numbers, at the cost of cuDNN's fastest kernels.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(hp.random_seed)
    # Channels-last lets oneDNN/cuDNN pick their fast conv and max-pool kernels; same math.
    model = build_model(hp.model).to(device).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(hp.random_seed)
    return model, make_optimizer(hp, model), generator


def _save_epoch(
    epoch: int,
    hp: Hyperparameters,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    run: _Run,
    out_dir: Path,
) -> None:
    """Write ``checkpoints/epoch-<n>.pt`` with everything a resume needs, then announce it."""
    checkpoint = Checkpoint(
        epoch, model.state_dict(), optimizer.state_dict(), hp.model_dump(), list(run.metrics),
        _rng_state(generator), run.global_step, run.samples_seen,
    )  # fmt: skip
    path = save_checkpoint(checkpoint, out_dir)
    run.hooks.on_artifact(checkpoint_name(epoch), "checkpoint", path)


def _result(status: str, epochs_done: int, run: _Run, device: torch.device) -> FitResult:
    """A FitResult carrying the last test point's numbers."""
    tests = [p for p in run.metrics if p.kind == "test"]
    last = tests[-1] if tests else None
    return FitResult(
        status, epochs_done, last.loss if last else None, last.accuracy if last else None,
        list(run.metrics), str(device),
    )  # fmt: skip


def _finish(
    result: FitResult,
    hp: Hyperparameters,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    test: MnistSplit,
    out_dir: Path,
    hooks: Hooks,
) -> None:
    """The end-of-run artifacts: the seed's model.pth/optimizer.pth, plots, metrics.json."""
    _write(hooks, out_dir, "model.pth", "model", lambda p: atomic_torch_save(model.state_dict(), p))
    _write(hooks, out_dir, "optimizer.pth", "model",
           lambda p: atomic_torch_save(optimizer.state_dict(), p))  # fmt: skip
    _write(hooks, out_dir, "loss_curve.png", "plot",
           lambda p: plots.save_loss_curve(result.metrics, p))  # fmt: skip
    _write(hooks, out_dir, "predictions.png", "plot",
           lambda p: plots.save_predictions(model, test, p))  # fmt: skip
    summary = {
        "status": result.status,
        "epochs_done": result.epochs_done,
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "device": result.device,
        "threads": torch.get_num_threads(),
        "hyperparameters": hp.model_dump(),
        "metrics": [p.to_dict() for p in result.metrics],
    }
    _write(hooks, out_dir, "metrics.json", "log", lambda p: _write_json(summary, p))
