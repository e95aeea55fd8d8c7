"""The run's figures: examples.png is drawn once per process for the digits it shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure

from tests.training.conftest import synthetic_split
from worker.training import plots
from worker.training.data import MnistSplit


def test_examples_png_is_drawn_once_for_the_same_digits_and_anew_for_others(
    tmp_path: Path, tiny_train: MnistSplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plots, "_examples", {})
    drawn: list[Figure] = []
    draw = plots._image_grid

    def counted(*args: Any) -> Figure:
        drawn.append(draw(*args))
        return drawn[-1]

    monkeypatch.setattr(plots, "_image_grid", counted)

    plots.save_examples(tiny_train, tmp_path / "first.png")
    # Another split object with the same digits (a second job on the same data): kept bytes.
    same = MnistSplit(tiny_train.images.clone(), tiny_train.labels.clone())
    plots.save_examples(same, tmp_path / "again.png")
    assert len(drawn) == 1
    first = (tmp_path / "first.png").read_bytes()
    assert first.startswith(b"\x89PNG") and (tmp_path / "again.png").read_bytes() == first

    # What a fresh process draws is byte for byte what was kept.
    monkeypatch.setattr(plots, "_examples", {})
    plots.save_examples(tiny_train, tmp_path / "fresh.png")
    assert (tmp_path / "fresh.png").read_bytes() == first

    # Other digits are another figure.
    plots.save_examples(synthetic_split(600, seed=7), tmp_path / "other.png")
    assert len(drawn) == 3
    assert (tmp_path / "other.png").read_bytes() != first
