"""The run's PNG figures, drawn with matplotlib's object API on the Agg canvas."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.artifacts import write_bytes_atomic
from worker.training.data import MnistSplit
from worker.training.metrics import MetricPoint

ROWS, COLS = 3, 4

# examples.png by what it shows (a digest of its digits and labels). Every job on the same
# data draws the same figure; a worker's pool child draws it once before it forks the jobs'
# processes, so each job writes the kept bytes instead of spending a third of a second
# drawing it again.
_examples: dict[str, bytes] = {}
_EXAMPLES_KEPT = 4


def _png(fig: Figure) -> bytes:
    """The figure rendered to PNG bytes."""
    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


def _save(fig: Figure, path: Path) -> None:
    """Render to PNG and write it whole: readers never see half a file."""
    write_bytes_atomic(path, _png(fig))


def _image_grid(images: torch.Tensor, titles: Sequence[str], colors: Sequence[str]) -> Figure:
    """A 3x4 grid of digits, each under its own title."""
    # Fixed margins (room for the longest title, "Prediction: 3 (true 5)"), not a layout
    # engine: constrained layout doubled the time a figure takes to draw.
    fig = Figure(figsize=(8, 6.5))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.94, wspace=0.1, hspace=0.3)
    for i, (image, title, color) in enumerate(zip(images, titles, colors, strict=False)):
        ax = fig.add_subplot(ROWS, COLS, i + 1)
        ax.imshow(image[0].cpu().numpy(), cmap="gray", interpolation="none")
        ax.set_title(title, color=color, fontsize=12)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def save_examples(split: MnistSplit, path: Path) -> None:
    """``examples.png``: the first 12 training images with their labels, as the seed draws."""
    n = ROWS * COLS
    images, labels = split.images[:n].cpu(), split.labels[:n].cpu()
    key = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    png = _examples.get(key)
    if png is None:
        titles = [f"Ground Truth: {int(label)}" for label in labels]
        png = _png(_image_grid(images, titles, ["black"] * n))
        if len(_examples) >= _EXAMPLES_KEPT:
            _examples.clear()
        _examples[key] = png
    write_bytes_atomic(path, png)


def save_loss_curve(metrics: Sequence[MetricPoint], path: Path) -> None:
    """``loss_curve.png``: train loss by examples seen; test losses as red dots (0: untrained)."""
    train = [p for p in metrics if p.kind == "train"]
    test = [p for p in metrics if p.kind == "test"]
    fig = Figure(figsize=(9, 5))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.93)  # fixed, as in _image_grid
    ax = fig.add_subplot()
    ax.plot(
        [p.samples_seen for p in train],
        [p.loss for p in train],
        color="tab:blue",
        linewidth=1,
        label="Train loss",
    )
    ax.scatter(
        [p.samples_seen for p in test],
        [p.loss for p in test],
        color="tab:red",
        zorder=3,
        s=40,
        label="Test loss (before training, after each epoch)",
    )
    ax.set_xlabel("number of training examples seen")
    ax.set_ylabel("negative log likelihood loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    _save(fig, path)


@torch.inference_mode()
def save_predictions(model: torch.nn.Module, split: MnistSplit, path: Path) -> None:
    """``predictions.png``: test images with the model's guesses; mistakes in red."""
    n = ROWS * COLS
    model.eval()
    head = split.head(500)
    predicted = model(head.images).argmax(dim=1).cpu()
    labels = head.labels.cpu()
    chosen = _chosen(predicted == labels, n)
    titles = [_prediction_title(int(predicted[i]), int(labels[i])) for i in chosen]
    colors = ["black" if predicted[i] == labels[i] else "red" for i in chosen]
    _save(_image_grid(head.images[chosen], titles, colors), path)


def _chosen(correct: torch.Tensor, n: int) -> list[int]:
    """``n`` indexes in order: up to a third of them mistakes, the rest right guesses (more
    mistakes only when there are too few right ones, as for an untrained net)."""
    right = correct.nonzero().flatten().tolist()
    wrong = (~correct).nonzero().flatten().tolist()
    shown_wrong = wrong[: max(n // 3, n - len(right))]
    return sorted(right[: n - len(shown_wrong)] + shown_wrong)


def _prediction_title(predicted: int, label: int) -> str:
    """ "Prediction: n", plus the true label when the prediction is wrong."""
    return (
        f"Prediction: {predicted}"
        if predicted == label
        else f"Prediction: {predicted} (true {label})"
    )
