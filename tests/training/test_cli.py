"""``mnistq train``: flags validated by the schema, a real short run, resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from client.cli import cli
from shared.config import get_settings


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings that never try to download."""
    monkeypatch.setenv("MNISTQ_DOWNLOAD_MNIST", "false")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_bad_flags_are_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["train", "--out", str(tmp_path), "--learning-rate", "nan", "--model", "resnet",
              "--n-epochs", "0"],
    )  # fmt: skip
    assert result.exit_code == 2
    for flag in ("--learning-rate", "--model", "--n-epochs"):
        assert flag in result.output
    assert not any(tmp_path.iterdir())


def test_missing_data_names_the_directory(tmp_path: Path, offline: None) -> None:
    result = CliRunner().invoke(
        cli, ["train", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "nothing")]
    )
    assert result.exit_code == 1
    assert str(tmp_path / "nothing") in result.output


@pytest.mark.mnist
def test_train_then_resume_writes_everything(
    mnist_dir: Path, tmp_path: Path, offline: None
) -> None:
    out = tmp_path / "run"
    common = ["--data-dir", str(mnist_dir), "--threads", "1", "--max-train-batches", "5",
              "--device", "cpu", "--out", str(out)]  # fmt: skip
    first = CliRunner().invoke(cli, ["train", "--n-epochs", "1", *common])
    assert first.exit_code == 0, first.output
    assert "completed after 1 epoch(s)" in first.output and "accuracy" in first.output
    # The seed's own lines: a test of the untrained net, then the train log.
    assert first.output.index("Test set: Avg. loss: ") < first.output.index(
        "Train Epoch: 1 [0/60000 (0%)]\tLoss: "
    )
    for name in ("model.pth", "optimizer.pth", "examples.png", "loss_curve.png",
                 "predictions.png", "metrics.json", "checkpoints/epoch-1.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    resumed = CliRunner().invoke(
        cli, ["train", "--n-epochs", "2", "--resume", str(out / "checkpoints/epoch-1.pt"), *common]
    )
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["epochs_done"] == 2
    assert [p["epoch"] for p in summary["metrics"] if p["kind"] == "test"] == [0, 1, 2]
    assert summary["hyperparameters"]["n_epochs"] == 2
