"""Sweeps through the whole system: a TPE search against the seed recipe, and ASHA's savings.

Starts `mnistq api` and cpu workers on a fresh SQLite database with the filesystem broker
(nothing else needed but MNIST in MNISTQ_DATA_DIR), then, in one run:

  default  a TPE sweep of --trials trials of tutorial_cnn for --epochs full epochs over
           learning_rate, momentum and batch_size_train, beside one job of the seed recipe
           (its defaults, --epochs epochs) submitted at the same time; prints the seed's
           test accuracy and the sweep's best, with the best trial's values;
  --asha   a random sweep of --trials trials of --epochs epochs with ASHA (min 1 epoch,
           eta 3); prints the trials, how many were pruned, the epochs trained against
           trials x epochs without pruning, the best accuracy and the wall time.

    MNISTQ_DATA_DIR=../shared/datasets python bench/sweep.py [--trials 16] [--epochs 3]
    MNISTQ_DATA_DIR=../shared/datasets python bench/sweep.py --asha --trials 9
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.migrate import upgrade  # noqa: E402
from tests.integration.stack import Api, Process, stack_env  # noqa: E402

SEARCH: dict[str, Any] = {
    "learning_rate": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.3},
    "momentum": {"distribution": "uniform", "min": 0.0, "max": 0.95},
    "batch_size_train": {"distribution": "int_uniform", "min": 32, "max": 256},
}
ASHA_SEARCH: dict[str, Any] = {
    "learning_rate": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.3}
}


def start_stack(var: Path, slots: int) -> tuple[Api, Process]:
    """`mnistq api` and a cpu worker of ``slots`` slots on SQLite and the filesystem broker."""
    database = f"sqlite:///{var / 'mnistq.db'}"
    upgrade(database)
    env = stack_env(
        database_url=database, broker_url="filesystem://", var_dir=var,
        data_dir=Path(os.environ.get("MNISTQ_DATA_DIR", "var/data")).resolve(),
    )  # fmt: skip
    # Whole epochs, the default lease and reaper timings: a run as a user would have it.
    for name in ("MNISTQ_MAX_TRAIN_BATCHES", "MNISTQ_LEASE_SECONDS", "MNISTQ_HEARTBEAT_SECONDS"):
        env.pop(name)
    env["MNISTQ_REAPER_INTERVAL_SECONDS"] = "2"
    api = Api(env, var / "api.log").start()
    # One worker: its slots share the cores out (one thread each on two cores).
    args = ["worker", "--queues", "cpu", "--concurrency", str(slots), "--loglevel", "WARNING"]
    return api, Process(args, env, var / "worker.log").start()


def wait_sweep(api: Api, sweep_id: str, timeout: float) -> dict[str, Any]:
    """Poll the sweep until it ends, printing each change of its trial counts."""
    deadline, last = time.monotonic() + timeout, ""
    while (sweep := api.get(f"/sweeps/{sweep_id}"))["status"] == "running":
        line = ", ".join(f"{n} {s}" for s, n in sweep["counts"].items() if n)
        if line != last:
            print(f"  {time.strftime('%H:%M:%S')} {sweep['trials']} trials: {line}", flush=True)
            last = line
        if time.monotonic() > deadline:
            raise TimeoutError(f"sweep still running after {timeout}s: {sweep}")
        time.sleep(2)
    return sweep


def tpe_run(api: Api, trials: int, epochs: int, slots: int, timeout: float) -> None:
    """The TPE sweep beside the seed recipe; print both results."""
    seed = api.submit({"name": "seed recipe", "hyperparameters": {"n_epochs": epochs}})
    sweep = api.http.post(f"{api.base}/api/v1/sweeps", timeout=10, json={
        "name": "tpe-bench", "method": "tpe",
        "parameters": {**SEARCH, "n_epochs": {"value": epochs}},
        "base": {"hyperparameters": {"model": "tutorial_cnn"}},
        "budget": {"max_trials": trials, "max_concurrent": slots, "max_failed": 3},
        "seed": 7,
    }).json()  # fmt: skip
    started = time.monotonic()
    done = wait_sweep(api, sweep["id"], timeout)
    wall = time.monotonic() - started
    seed_job = api.wait_finished(seed["id"], timeout=timeout)
    best = done["best"]
    values = {k: best["hyperparameters"][k] for k in SEARCH} if best else {}
    print(f"\nTPE sweep of {done['trials']} trials of tutorial_cnn, {epochs} epochs each "
          f"({done['status']}, {wall:.0f} s wall, {slots} slots)")  # fmt: skip
    print(f"  seed recipe (lr 0.01, momentum 0.5, batch 64): test accuracy "
          f"{seed_job['test_accuracy']:.4f}")  # fmt: skip
    if best:
        print(f"  sweep best, trial #{best['trial_number']}: test accuracy {best['value']:.4f} "
              f"with {values}")  # fmt: skip
        print(f"  best - seed: {best['value'] - seed_job['test_accuracy']:+.4f}")


def asha_run(api: Api, trials: int, epochs: int, slots: int, timeout: float) -> None:
    """The random sweep with ASHA; print what pruning saved."""
    sweep = api.http.post(f"{api.base}/api/v1/sweeps", timeout=10, json={
        "name": "asha-bench", "method": "random",
        "parameters": {**ASHA_SEARCH, "n_epochs": {"value": epochs}},
        "base": {"hyperparameters": {"model": "tutorial_cnn"}},
        "budget": {"max_trials": trials, "max_concurrent": slots},
        "early_terminate": {"type": "asha", "min_epochs": 1, "eta": 3},
        "seed": 11,
    }).json()  # fmt: skip
    started = time.monotonic()
    done = wait_sweep(api, sweep["id"], timeout)
    wall = time.monotonic() - started
    items = api.get(f"/sweeps/{sweep['id']}/trials")["items"]
    trained = sum(t["epochs_trained"] for t in items)
    pruned = [t for t in items if t["job"]["status"] == "pruned"]
    full = len(items) * epochs
    print(f"\nASHA (min 1 epoch, eta 3) on a random sweep ({done['status']}, {slots} slots)")
    print(f"  trials {len(items)}, pruned {len(pruned)} "
          f"(after epochs {sorted(t['epochs_trained'] for t in pruned)})")  # fmt: skip
    print(f"  epochs trained {trained}, without pruning {full}: {1 - trained / full:.0%} fewer")
    best = done["best"]
    if best:
        rate = best["hyperparameters"]["learning_rate"]
        print(f"  best test accuracy {best['value']:.4f} (trial #{best['trial_number']}, "
              f"learning_rate {rate:.4g}, not pruned)")  # fmt: skip
    print(f"  wall time {wall:.0f} s")
    for t in items:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        rate = t["params"]["learning_rate"]
        print(f"    #{t['trial_number']:<2} {t['job']['status']:<9} lr {rate:.4g}"
              f"  epochs {t['epochs_trained']}  accuracy {value}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asha", action="store_true", help="the ASHA run instead of TPE")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2, help="jobs the worker runs at once")
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mnistq-sweep-bench-") as tmp:
        api, worker = start_stack(Path(tmp), args.slots)
        try:
            run = asha_run if args.asha else tpe_run
            run(api, args.trials, args.epochs, args.slots, args.timeout)
        finally:
            for process in (worker, api.process):
                process.kill()


if __name__ == "__main__":
    main()
