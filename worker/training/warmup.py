"""A process's first run of the engine, done before its first job: imports, data, kernels."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from shared.schemas import Hyperparameters
from worker.training import plots
from worker.training.data import load_split
from worker.training.devices import configure_threads
from worker.training.loop import Hooks, fit
from worker.training.nets import FAST_CNN_SETTINGS, MODELS

# Enough batches to build every kernel and buffer a step uses, with each model's shapes.
WARM_BATCHES = 2
WARM_TEST_SAMPLES = 1000  # one test batch of the seed's size


def _never() -> bool:
    return False


def prepare_template(data_dir: Path, *, download: bool) -> None:
    """Load what every job needs into a process that forks the jobs' processes: torch and the
    engine's modules, ``torch._dynamo`` (``torch.optim`` imports it on first use, and it takes
    about as long as torch itself), MNIST's tensors and the drawn ``examples.png``.

    Single-threaded and without CUDA, so that a fork of this process is sound: a fork inherits
    neither an OpenMP thread pool (whose threads it would not have) nor a CUDA context.
    """
    import torch._dynamo

    torch.set_num_threads(1)  # reading MNIST afresh normalizes it: not in a thread pool here
    train = load_split(data_dir, train=True, download=download)
    load_split(data_dir, train=False, download=download)
    # Kept by the plots module for every job on this data (and matplotlib's fonts loaded).
    with tempfile.TemporaryDirectory(prefix="mnistq-template-") as out:
        plots.save_examples(train, Path(out) / "examples.png")


def warm_up(
    data_dir: Path,
    *,
    threads: int,
    download: bool,
    cuda: bool = False,
    job_waiting: Callable[[], bool] = _never,
) -> None:
    """Set up threads, read MNIST into this process's tensors and fit each model briefly.

    The first fit in a process pays for imports (torchvision, matplotlib), oneDNN's kernel
    set-up, the allocator's first pages and matplotlib's fonts; a job run after this one
    pays none of them. Numbers do not change: ``fit`` seeds everything it draws from.
    Once ``job_waiting()`` is true the fits stop (at their next stop check): the job that
    waits builds its own model's kernels sooner than the warm-up would build every model's.
    """
    configure_threads(threads)
    train = load_split(data_dir, train=True, download=download)
    test = load_split(data_dir, train=False, download=download)
    devices = [torch.device("cpu")] + ([torch.device("cuda:0")] if cuda else [])
    hooks = Hooks(should_stop=job_waiting)
    with tempfile.TemporaryDirectory(prefix="mnistq-warm-") as out:
        for device in devices:
            for name in MODELS:
                if job_waiting():
                    return
                fit(_settings(name, device), train, test, Path(out) / f"{device.type}-{name}",
                    device=device, hooks=hooks, max_train_batches=WARM_BATCHES,
                    max_test_samples=WARM_TEST_SAMPLES)  # fmt: skip


def _settings(model: str, device: torch.device) -> Hyperparameters:
    """A model's usual hyperparameters (its batch sizes are what kernels are built for)."""
    base = FAST_CNN_SETTINGS if model == "fast_cnn" else {"model": model}
    return Hyperparameters.model_validate({**base, "n_epochs": 1, "device": device.type})
