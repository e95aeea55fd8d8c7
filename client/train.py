"""``mnistq train``: one job in this process, no queue, no database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from client.hyperparameters import hyperparameter_options, hyperparameters_from_flags
from shared.config import get_settings


@click.command("train")
@hyperparameter_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="folder for checkpoints, model.pth, plots and metrics.json")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="torch threads, 0 = all cores (default: MNISTQ_TRAIN_THREADS)")  # fmt: skip
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="torchvision MNIST root (default: MNISTQ_DATA_DIR)")  # fmt: skip
@click.option("--resume", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="continue from a checkpoints/epoch-<n>.pt file")  # fmt: skip
@click.option("--max-train-batches", type=click.IntRange(min=1), default=None,
              help="stop each epoch after this many batches (a quick smoke run)")  # fmt: skip
def train_command(
    out_dir: Path,
    threads: int | None,
    data_dir: Path | None,
    resume: Path | None,
    max_train_batches: int | None,
    **flags: Any,
) -> None:
    """Train one model in-process and write its artifacts to a folder."""
    settings = get_settings()
    _run(
        flags,
        out_dir=out_dir,
        threads=settings.train_threads if threads is None else threads,
        data_dir=data_dir or settings.data_dir,
        download=settings.download_mnist,
        resume=resume,
        max_train_batches=max_train_batches,
    )


def _run(
    flags: dict[str, Any],
    *,
    out_dir: Path,
    threads: int,
    data_dir: Path,
    download: bool,
    resume: Path | None,
    max_train_batches: int | None,
) -> None:
    """Load data, train with a progress bar, print the final test numbers."""
    # torch and the engine load here, not at import, so `mnistq --help` stays quick.
    from worker.training.checkpoints import CheckpointError, load_checkpoint
    from worker.training.data import MnistNotFound, load_split
    from worker.training.devices import DeviceUnavailable, configure_threads, resolve_device
    from worker.training.loop import TrainingDiverged, fit

    try:
        checkpoint = load_checkpoint(resume) if resume else None
        base = checkpoint.hyperparameters if checkpoint else {}
        hp = hyperparameters_from_flags(base, flags)
        n_threads = configure_threads(threads)
        device = resolve_device(hp.device)
        train = load_split(data_dir, train=True, download=download)
        test = load_split(data_dir, train=False, download=download)
        click.echo(f"training {hp.model} on {device} with {n_threads} thread(s) into {out_dir}")
        with _ProgressBar(hp.n_epochs * len(train)) as bar:
            result = fit(hp, train, test, out_dir, device=device, hooks=bar.hooks(),
                         resume=checkpoint, max_train_batches=max_train_batches)  # fmt: skip
    except (CheckpointError, MnistNotFound, DeviceUnavailable, TrainingDiverged) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{result.status} after {result.epochs_done} epoch(s): "
        f"test loss {result.test_loss:.4f}, accuracy {result.test_accuracy:.2%}"
    )


class _ProgressBar:
    """A tqdm bar over training examples, fed by the engine's progress hook."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", unit_scale=True, dynamic_ncols=True)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def hooks(self) -> Any:
        """Engine hooks that move this bar."""
        from worker.training.loop import Hooks

        return Hooks(on_progress=self.update, on_line=self.bar.write)

    def update(self, progress: Any) -> None:
        """Show where training stands: epoch, step, latest loss, examples per second."""
        self.bar.total = progress.total_samples
        self.bar.n = progress.samples_seen
        loss = "-" if progress.train_loss is None else f"{progress.train_loss:.4f}"
        self.bar.set_postfix_str(
            f"epoch {progress.epoch}/{progress.n_epochs} "
            f"step {progress.step_in_epoch}/{progress.steps_per_epoch} "
            f"loss {loss} {progress.samples_per_second:,.0f} img/s",
            refresh=False,
        )
        self.bar.refresh()
