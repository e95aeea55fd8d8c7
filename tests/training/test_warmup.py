"""A pool child's warm-up: it fits every model briefly, and the job after it is unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.schemas import Hyperparameters
from worker.training.data import MnistSplit
from worker.training.loop import fit
from worker.training.warmup import warm_up

pytestmark = pytest.mark.mnist


def test_a_job_after_the_warm_up_has_the_numbers_it_has_without_it(
    mnist_dir: Path, mnist_train: MnistSplit, mnist_test: MnistSplit, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    hp = Hyperparameters(n_epochs=1, device="cpu")
    cpu = torch.device("cpu")

    def run(out: str) -> list[tuple[str, int, float]]:
        result = fit(hp, mnist_train, mnist_test, tmp_path / out, device=cpu,
                     max_train_batches=20, max_test_samples=500)  # fmt: skip
        return [(p.kind, p.step, p.loss) for p in result.metrics]

    try:
        torch.set_num_threads(1)
        cold = run("cold")
        # Draws from every random stream and builds both models' kernels in this process.
        warm_up(mnist_dir, threads=1, download=False)
        assert run("warm") == cold
    finally:
        torch.set_num_threads(before)


def test_a_warm_up_cut_short_mid_fit_leaves_the_jobs_numbers_unchanged(
    mnist_dir: Path, mnist_train: MnistSplit, mnist_test: MnistSplit, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    hp = Hyperparameters(n_epochs=1, device="cpu")
    checks: list[int] = []

    def job_waiting() -> bool:
        checks.append(1)
        return len(checks) > 1  # the job arrives during the first model's fit

    def run(out: str) -> list[tuple[str, int, float]]:
        result = fit(hp, mnist_train, mnist_test, tmp_path / out, device=torch.device("cpu"),
                     max_train_batches=20, max_test_samples=500)  # fmt: skip
        return [(p.kind, p.step, p.loss) for p in result.metrics]

    try:
        torch.set_num_threads(1)
        cold = run("cold")
        warm_up(mnist_dir, threads=1, download=False, job_waiting=job_waiting)
        # Before the first fit; the fit's first stop check; before the second model: done.
        assert len(checks) == 3
        assert run("after") == cold
    finally:
        torch.set_num_threads(before)
