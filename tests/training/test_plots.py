"""The run's figures: examples.png is drawn once per process for the digits it shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
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


class _Guesses(torch.nn.Module):
    """A "model" whose guesses are fixed: the label where ``right`` is true, else label + 1."""

    def __init__(self, labels: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__()
        self.guesses = torch.where(right, labels, (labels + 1) % 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.guesses[: len(images)], 10).float()


@pytest.mark.parametrize("right_every", [2, 7, 10_000])  # half right, a seventh, only the first
def test_predictions_png_colours_each_digit_by_whether_its_guess_is_right(
    tmp_path: Path, tiny_test: MnistSplit, monkeypatch: pytest.MonkeyPatch, right_every: int
) -> None:
    drawn: list[tuple[list[str], list[str]]] = []
    draw = plots._image_grid

    def seen(images: torch.Tensor, titles: list[str], colors: list[str]) -> Figure:
        drawn.append((titles, colors))
        return draw(images, titles, colors)

    monkeypatch.setattr(plots, "_image_grid", seen)
    n = len(tiny_test)
    right = torch.arange(n) % right_every == 0
    plots.save_predictions(_Guesses(tiny_test.labels, right), tiny_test, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    [(titles, colors)] = drawn
    assert len(titles) == plots.ROWS * plots.COLS
    for title, color in zip(titles, colors, strict=True):
        assert (color == "red") == ("true" in title)  # red exactly where the guess is wrong
    wanted_wrong = min(int((~right[:500]).sum()), max(4, 12 - int(right[:500].sum())))
    assert colors.count("red") == wanted_wrong
