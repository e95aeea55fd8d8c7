"""A job process's warm-up: it fits every model briefly, and the job after it is unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.schemas import Hyperparameters
from worker.training.data import MnistSplit
from worker.training.loop import fit
from worker.training.warmup import warm_up

pytestmark = pytest.mark.mnist


def fit_points(
    mnist_train: MnistSplit, mnist_test: MnistSplit, out: Path
) -> list[tuple[str, int, float]]:
    """A short default fit on one thread: (kind, step, loss) of every metric point."""
    hp = Hyperparameters(n_epochs=1, device="cpu")
    result = fit(hp, mnist_train, mnist_test, out, device=torch.device("cpu"),
                 max_train_batches=20, max_test_samples=500)  # fmt: skip
    return [(p.kind, p.step, p.loss) for p in result.metrics]


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_job_after_the_warm_up_has_the_numbers_it_has_without_it(
    mnist_dir: Path, mnist_train: MnistSplit, mnist_test: MnistSplit, tmp_path: Path
) -> None:
    cold = fit_points(mnist_train, mnist_test, tmp_path / "cold")
    # Draws from every random stream and builds both models' kernels in this process.
    warm_up(mnist_dir, threads=1, download=False)
    assert fit_points(mnist_train, mnist_test, tmp_path / "warm") == cold


@pytest.mark.usefixtures("one_thread")
def test_a_warm_up_cut_short_mid_fit_leaves_the_jobs_numbers_unchanged(
    mnist_dir: Path, mnist_train: MnistSplit, mnist_test: MnistSplit, tmp_path: Path
) -> None:
    checks: list[int] = []

    def job_waiting() -> bool:
        checks.append(1)
        return len(checks) > 1  # the job arrives during the first model's fit

    cold = fit_points(mnist_train, mnist_test, tmp_path / "cold")
    warm_up(mnist_dir, threads=1, download=False, job_waiting=job_waiting)
    # Before the first fit; the fit's first stop check; before the second model: done.
    assert len(checks) == 3
    assert fit_points(mnist_train, mnist_test, tmp_path / "after") == cold
