"""The loop on a tiny synthetic set: metrics, hooks, artifacts, stop, determinism, resume."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.schemas import Hyperparameters
from worker.training.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
)
from worker.training.data import MnistSplit
from worker.training.loop import (
    FitResult,
    Hooks,
    MetricPoint,
    Progress,
    TrainingDiverged,
    evaluate,
    fit,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: tiny batches gain nothing from two, and a busy machine hurts less."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_hp(**changes: Any) -> Hyperparameters:
    """Seed recipe, scaled to the synthetic set."""
    base: dict[str, Any] = {"n_epochs": 2, "batch_size_test": 100, "log_interval": 3,
                            "learning_rate": 0.05, "device": "cpu"}  # fmt: skip
    return Hyperparameters(**{**base, **changes})


def run(hp: Hyperparameters, train: MnistSplit, test: MnistSplit, out: Path,
        **kwargs: Any) -> FitResult:  # fmt: skip
    """fit() on the CPU."""
    return fit(hp, train, test, out, device=CPU, **kwargs)


class Recorder:
    """Hooks that remember every call."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.metrics: list[MetricPoint] = []
        self.artifacts: list[tuple[str, str, Path]] = []
        self.lines: list[str] = []
        self.polls = 0
        self.stop_after = stop_after

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_after is not None and self.polls > self.stop_after

    def hooks(self) -> Hooks:
        return Hooks(
            on_progress=self.progress.append,
            on_metrics=self.metrics.extend,
            on_artifact=lambda *a: self.artifacts.append(a),
            on_line=self.lines.append,
            should_stop=self.should_stop,
        )


def test_fit_logs_like_the_seed_and_writes_every_artifact(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    rec = Recorder()
    result = run(tiny_hp(), tiny_train, tiny_test, tmp_path, hooks=rec.hooks())
    assert result.status == "completed" and result.epochs_done == 2 and result.device == "cpu"
    train_points = [p for p in result.metrics if p.kind == "train"]
    # 600 images / 64 = 10 batches (last one partial); logged at batch_idx 0, 3, 6, 9.
    assert [p.samples_seen for p in train_points] == [
        b * 64 + (e - 1) * 600 for e in (1, 2) for b in (0, 3, 6, 9)
    ]
    assert [p.step for p in train_points] == [1, 4, 7, 10, 11, 14, 17, 20]
    tests = [p for p in result.metrics if p.kind == "test"]
    assert [(p.epoch, p.step, p.samples_seen) for p in tests] == [
        (0, 0, 0), (1, 10, 600), (2, 20, 1200)
    ]  # fmt: skip
    assert result.test_accuracy is not None and result.test_accuracy > 0.9
    assert rec.metrics == result.metrics
    assert rec.progress[-1].samples_seen == 1200 and rec.progress[-1].global_step == 20
    names = [(name, kind) for name, kind, _ in rec.artifacts]
    assert names == [
        ("examples.png", "plot"), ("checkpoints/epoch-1.pt", "checkpoint"),
        ("checkpoints/epoch-2.pt", "checkpoint"), ("model.pth", "model"),
        ("optimizer.pth", "model"), ("loss_curve.png", "plot"), ("predictions.png", "plot"),
        ("metrics.json", "log"),
    ]  # fmt: skip
    assert all(path.stat().st_size > 0 for _, _, path in rec.artifacts)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["test_accuracy"] == result.test_accuracy and len(summary["metrics"]) == 11


def test_fit_prints_the_seeds_lines_a_test_before_training_first(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    rec = Recorder()
    result = run(tiny_hp(), tiny_train, tiny_test, tmp_path, hooks=rec.hooks())
    untrained = result.metrics[0]
    assert (untrained.kind, untrained.epoch, untrained.samples_seen) == ("test", 0, 0)
    assert untrained.accuracy is not None
    correct = round(untrained.accuracy * 200)
    assert rec.lines[0] == (
        f"Test set: Avg. loss: {untrained.loss:.4f}, Accuracy: {correct}/200 "
        f"({100 * correct / 200:.0f}%)"
    )
    first_train = result.metrics[1]
    # 600 images in 10 batches of 64: batch_idx 3 is 192 images in, 30 % of the batches.
    assert rec.lines[1] == f"Train Epoch: 1 [0/600 (0%)]\tLoss: {first_train.loss:.6f}"
    assert rec.lines[2].startswith("Train Epoch: 1 [192/600 (30%)]\tLoss: ")
    kinds = ["test" if line.startswith("Test set: ") else "train" for line in rec.lines]
    assert kinds == [p.kind for p in result.metrics]


def test_a_resumed_fit_does_not_test_the_untrained_net_again(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    run(tiny_hp(n_epochs=1), tiny_train, tiny_test, tmp_path / "a", max_train_batches=2)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "epoch-1.pt")
    rec = Recorder()
    resumed = run(tiny_hp(), tiny_train, tiny_test, tmp_path / "b", resume=ckpt,
                  max_train_batches=2, hooks=rec.hooks())  # fmt: skip
    assert [(p.kind, p.epoch) for p in resumed.metrics if p.kind == "test"] == [
        ("test", 0), ("test", 1), ("test", 2)
    ]  # fmt: skip
    assert [p.epoch for p in rec.metrics if p.kind == "test"] == [2]
    assert rec.lines[0].startswith("Train Epoch: 2 [0/600 (0%)]")


def test_the_test_before_training_can_be_left_out(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    result = run(tiny_hp(n_epochs=1), tiny_train, tiny_test, tmp_path, max_train_batches=2,
                 initial_test=False)  # fmt: skip
    assert [p.epoch for p in result.metrics if p.kind == "test"] == [1]


def test_evaluate_averages_summed_nll_over_examples(tiny_test: MnistSplit) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10),
                                torch.nn.LogSoftmax(dim=1))  # fmt: skip
    loss, accuracy = evaluate(model, tiny_test, batch_size=64)  # 200 = 3 x 64 + 8
    output = model(tiny_test.images)
    expected = torch.nn.functional.nll_loss(output, tiny_test.labels, reduction="sum") / 200
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert accuracy == int((output.argmax(1) == tiny_test.labels).sum()) / 200


def test_same_seed_same_numbers_other_seed_other_numbers(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    first = run(tiny_hp(), tiny_train, tiny_test, tmp_path / "a")
    second = run(tiny_hp(), tiny_train, tiny_test, tmp_path / "b")
    other = run(tiny_hp(random_seed=2), tiny_train, tiny_test, tmp_path / "c")
    losses = [[p.loss for p in r.metrics] for r in (first, second, other)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_resume_from_a_checkpoint_equals_a_straight_run(
    optimizer: str, tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    lr = 0.05 if optimizer == "sgd" else 0.002
    hp3 = tiny_hp(n_epochs=3, optimizer=optimizer, learning_rate=lr, weight_decay=1e-4)
    straight = run(hp3, tiny_train, tiny_test, tmp_path / "straight")
    run(hp3.model_copy(update={"n_epochs": 2}), tiny_train, tiny_test, tmp_path / "two")
    checkpoint = load_checkpoint(tmp_path / "two" / "checkpoints" / "epoch-2.pt")
    resumed = run(hp3, tiny_train, tiny_test, tmp_path / "resumed", resume=checkpoint)
    assert resumed.epochs_done == 3 and len(resumed.metrics) == len(straight.metrics)
    for a, b in zip(straight.metrics, resumed.metrics, strict=True):
        assert (a.kind, a.epoch, a.step, a.samples_seen) == (
            b.kind,
            b.epoch,
            b.step,
            b.samples_seen,
        )
        assert a.loss == pytest.approx(b.loss, abs=1e-6)
    assert resumed.test_accuracy == straight.test_accuracy
    assert not (tmp_path / "resumed" / "checkpoints" / "epoch-2.pt").exists()


def test_checkpoint_round_trip_holds_everything_needed(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    result = run(tiny_hp(), tiny_train, tiny_test, tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "epoch-2.pt"
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "epoch-2.pt")
    assert ckpt.epoch == 2 and ckpt.global_step == 20 and ckpt.samples_seen == 1200
    assert ckpt.hyperparameters == tiny_hp().model_dump()
    assert ckpt.metrics == result.metrics
    assert set(ckpt.rng_state) == {"torch", "cuda", "shuffle"}
    final = torch.load(tmp_path / "model.pth", weights_only=True)
    assert final.keys() == ckpt.model_state.keys()
    assert all(torch.equal(final[k], ckpt.model_state[k]) for k in final)
    assert torch.load(tmp_path / "optimizer.pth", weights_only=True)["state"]


def test_latest_checkpoint_is_none_without_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    bad = tmp_path / "epoch-1.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"epoch-1\.pt"):
        load_checkpoint(bad)


def test_resume_with_another_optimizer_is_refused(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    run(tiny_hp(n_epochs=1), tiny_train, tiny_test, tmp_path / "a", max_train_batches=2)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "epoch-1.pt")
    with pytest.raises(CheckpointError, match="optimizer"):
        run(tiny_hp(optimizer="adam"), tiny_train, tiny_test, tmp_path / "b", resume=ckpt)


def test_resume_applies_the_new_learning_rate(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    run(tiny_hp(n_epochs=1), tiny_train, tiny_test, tmp_path / "a", max_train_batches=2)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "epoch-1.pt")
    run(tiny_hp(learning_rate=0.2, momentum=0.9), tiny_train, tiny_test, tmp_path / "b",
        resume=ckpt, max_train_batches=2)  # fmt: skip
    group = torch.load(tmp_path / "b" / "optimizer.pth", weights_only=True)["param_groups"][0]
    assert (group["lr"], group["momentum"]) == (0.2, 0.9)


def test_stop_check_ends_fit_promptly_without_final_artifacts(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    rec = Recorder(stop_after=6)  # polls: epoch 1 start + 4 log points, epoch 2 start + 1
    result = run(tiny_hp(n_epochs=3), tiny_train, tiny_test, tmp_path, hooks=rec.hooks())
    assert result.status == "stopped" and result.epochs_done == 1
    assert rec.polls == 7
    assert [p.step for p in result.metrics if p.kind == "train"] == [1, 4, 7, 10, 11]
    assert (tmp_path / "checkpoints" / "epoch-1.pt").exists()
    assert not (tmp_path / "checkpoints" / "epoch-2.pt").exists()
    assert not (tmp_path / "model.pth").exists()


def test_stop_before_training_trains_nothing(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    result = run(tiny_hp(), tiny_train, tiny_test, tmp_path, hooks=Hooks(should_stop=lambda: True))
    assert (result.status, result.epochs_done, result.metrics) == ("stopped", 0, [])
    assert result.test_loss is None


def test_limits_cut_batches_and_test_samples(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    result = run(tiny_hp(n_epochs=1), tiny_train, tiny_test, tmp_path, max_train_batches=4,
                 max_test_samples=30)  # fmt: skip
    test_point = result.metrics[-1]
    assert (test_point.step, test_point.samples_seen) == (4, 256)
    assert result.test_accuracy is not None
    assert math.isclose(result.test_accuracy * 30, round(result.test_accuracy * 30))


def test_lr_gamma_decays_the_rate_per_epoch_and_survives_resume(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    hp = tiny_hp(n_epochs=3, lr_gamma=0.5)
    straight = run(hp, tiny_train, tiny_test, tmp_path / "a", max_train_batches=3)
    group = torch.load(tmp_path / "a" / "optimizer.pth", weights_only=True)["param_groups"][0]
    assert group["lr"] == pytest.approx(0.05 * 0.25)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoints" / "epoch-1.pt")
    resumed = run(hp, tiny_train, tiny_test, tmp_path / "b", max_train_batches=3, resume=ckpt)
    assert [p.loss for p in resumed.metrics] == pytest.approx([p.loss for p in straight.metrics])


def test_a_loss_that_becomes_nan_stops_the_fit_as_training_diverged(
    tiny_train: MnistSplit, tiny_test: MnistSplit, tmp_path: Path
) -> None:
    # Weight decay 1 at lr 10 flips and multiplies every weight by about 9 per step.
    hot = tiny_hp(n_epochs=1, log_interval=1, learning_rate=10.0, momentum=0.99, weight_decay=1.0)
    rec = Recorder()
    with pytest.raises(TrainingDiverged) as raised:
        run(hot, tiny_train, tiny_test, tmp_path, hooks=rec.hooks())
    message = str(raised.value)
    assert message.startswith("train loss became nan at epoch 1 step "), message
    assert message.endswith("; lower the learning rate")
    step = int(message.split("step ")[1].split(";")[0])
    # Every point before the bad one was recorded and finite; the NaN itself never was.
    train = [p for p in rec.metrics if p.kind == "train"]
    assert [p.step for p in train] == list(range(1, step))
    assert all(math.isfinite(p.loss) for p in train)
    assert not (tmp_path / "checkpoints" / "epoch-1.pt").exists()
