"""Seconds per training epoch: the seed recipe as written against the engine, alternately.

    .venv/bin/python bench/train_speed.py [--epochs N | --quick] [--threads N] [--data-dir DIR]
                                          [--no-concurrency] [--no-fast-cnn] [--profile N]

Both sides train the same net (the tutorial's), with the same hyperparameters (batch 64,
SGD lr 0.01 momentum 0.5, log every 10 batches) and the same thread count, each round in a
fresh process of its own: the seed as its script runs, the engine set up as a job process
sets itself up (``configure_threads``). Then it measures jobs per hour for two concurrent
single-thread jobs (two processes) against one two-thread job, and the wall seconds
``fast_cnn`` with its recommended settings takes to reach 99 % test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from shared.config import usable_cores
from shared.schemas import Hyperparameters
from worker.training.data import load_split
from worker.training.devices import configure_threads
from worker.training.loop import Hooks, MetricPoint, evaluate, fit, make_optimizer, train_epoch
from worker.training.nets import FAST_CNN_SETTINGS, Net

HP = Hyperparameters(device="cpu")  # the seed's defaults
QUICK_BATCHES = 300
SEED_EPOCHS_PER_JOB = 3


def seed_epoch(data_dir: Path, results: Path, max_batches: int | None) -> tuple[float, float]:
    """One epoch of the tutorial's train(): DataLoader, ToTensor/Normalize, saves as it logs."""
    train_loader = DataLoader(
        datasets.MNIST(str(data_dir), train=True, download=False,
                       transform=transforms.Compose([
                           transforms.ToTensor(),
                           transforms.Normalize((0.1307,), (0.3081,))])),
        batch_size=HP.batch_size_train, shuffle=True)  # fmt: skip
    torch.manual_seed(HP.random_seed)
    network = Net()
    optimizer = torch.optim.SGD(network.parameters(), lr=HP.learning_rate, momentum=HP.momentum)
    start, cpu = time.perf_counter(), time.process_time()
    network.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        if max_batches is not None and batch_idx >= max_batches:
            break
        optimizer.zero_grad()
        output = network(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % HP.log_interval == 0:
            loss.item()
            torch.save(network.state_dict(), results / "model.pth")
            torch.save(optimizer.state_dict(), results / "optimizer.pth")
    return time.perf_counter() - start, time.process_time() - cpu


def engine_epoch(data_dir: Path, max_batches: int | None) -> tuple[float, float]:
    """One epoch through the engine's ``train_epoch``, set up as ``fit`` sets it up."""
    train = load_split(data_dir, train=True, download=False)
    torch.manual_seed(HP.random_seed)
    model = Net().to(memory_format=torch.channels_last)
    optimizer = make_optimizer(HP, model)
    generator = torch.Generator().manual_seed(HP.random_seed)
    start, cpu = time.perf_counter(), time.process_time()
    train_epoch(model, optimizer, train, epoch=1, batch_size=HP.batch_size_train,
                log_interval=HP.log_interval, generator=generator,
                max_batches=max_batches)  # fmt: skip
    return time.perf_counter() - start, time.process_time() - cpu


def side(name: str, data_dir: Path, threads: int, max_batches: int | None) -> None:
    """A round's process: one epoch of the seed (``name`` "seed") or of the engine; prints s."""
    if name == "engine":
        configure_threads(threads)  # what a job process does before its job
        load_split(data_dir, train=True, download=False)  # the worker's one-off load, not timed
        seconds, cpu = engine_epoch(data_dir, max_batches)
    else:
        torch.set_num_threads(threads)  # the seed script's process, glibc's allocator defaults
        with tempfile.TemporaryDirectory() as results:
            seconds, cpu = seed_epoch(data_dir, Path(results), max_batches)
    print(json.dumps({"seconds": seconds, "cpu": cpu}), flush=True)


def _child_cmd(data_dir: Path, threads: int, quick: bool, *flags: str) -> list[str]:
    return [sys.executable, __file__, "--threads", str(threads), "--data-dir", str(data_dir),
            *(["--quick"] if quick else []), *flags]  # fmt: skip


def run_side(
    name: str, data_dir: Path, threads: int, max_batches: int | None
) -> tuple[float, float]:
    """(wall, CPU) seconds of one epoch of ``name`` in a fresh process."""
    cmd = _child_cmd(data_dir, threads, max_batches is not None, "--side", name)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    return float(found["seconds"]), float(found["cpu"])


def compare(
    data_dir: Path, epochs: int, threads: int, max_batches: int | None
) -> tuple[float, float]:
    """Alternate seed and engine epochs; print each; return the two medians."""
    seed_times: list[float] = []
    engine_times: list[float] = []
    cpu_ratios: list[float] = []
    for i in range(1, epochs + 1):
        seed, seed_cpu = run_side("seed", data_dir, threads, max_batches)
        engine, engine_cpu = run_side("engine", data_dir, threads, max_batches)
        seed_times.append(seed)
        engine_times.append(engine)
        cpu_ratios.append(engine_cpu / seed_cpu)
        # CPU seconds (of the whole process, every thread) are less disturbed by other
        # processes on a busy machine than wall seconds, at one thread at least.
        print(f"round {i}: seed {seed:6.2f} s   engine {engine:6.2f} s   ratio "
              f"{engine / seed:.3f}   (CPU s: seed {seed_cpu:.2f}, engine {engine_cpu:.2f}, "
              f"ratio {cpu_ratios[-1]:.3f})", flush=True)  # fmt: skip
    print(f"median CPU-seconds ratio: {statistics.median(cpu_ratios):.3f}")
    # The fastest round is the one least disturbed by other processes on the machine.
    print(f"fastest round: seed {min(seed_times):.2f} s, engine {min(engine_times):.2f} s, "
          f"ratio {min(engine_times) / min(seed_times):.3f}")  # fmt: skip
    return statistics.median(seed_times), statistics.median(engine_times)


def child(data_dir: Path, threads: int, max_batches: int | None) -> None:
    """A job process: load, wait for 'go' on stdin, time one train epoch + one evaluation."""
    configure_threads(threads)
    load_split(data_dir, train=False, download=False)
    engine_epoch(data_dir, 20)  # warm up allocator and kernels
    print("ready", flush=True)
    sys.stdin.readline()
    train_seconds, _ = engine_epoch(data_dir, max_batches)
    test = load_split(data_dir, train=False, download=False)
    start = time.perf_counter()
    evaluate(Net().to(memory_format=torch.channels_last), test, batch_size=HP.batch_size_test)
    print(json.dumps({"train": train_seconds, "test": time.perf_counter() - start}), flush=True)


def jobs_per_hour(data_dir: Path, processes: int, threads: int, max_batches: int | None) -> float:
    """Seed-default jobs (3 epochs) per hour for ``processes`` concurrent jobs of ``threads``."""
    cmd = _child_cmd(data_dir, threads, max_batches is not None, "--child")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(processes)]  # fmt: skip
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    scale = 938 / max_batches if max_batches else 1.0  # a quick run stands for a full epoch
    per_epoch = max(r["train"] * scale + r["test"] for r in results)
    per_job = per_epoch * SEED_EPOCHS_PER_JOB
    return processes * 3600 / per_job


def fast_cnn_to_99(data_dir: Path, threads: int) -> dict[str, float | int | None]:
    """fit() of fast_cnn with its settings: wall seconds (and epochs) to >= 99 % test accuracy."""
    configure_threads(threads)
    train = load_split(data_dir, train=True, download=False)
    test = load_split(data_dir, train=False, download=False)
    hp = Hyperparameters.model_validate({**FAST_CNN_SETTINGS, "n_epochs": 2, "device": "cpu"})
    reached: list[MetricPoint] = []

    def on_metrics(points: list[MetricPoint]) -> None:
        reached.extend(p for p in points if p.kind == "test" and (p.accuracy or 0) >= 0.99)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = fit(hp, train, test, Path(out), device=torch.device("cpu"),
                     hooks=Hooks(on_metrics=on_metrics))  # fmt: skip
    first = reached[0] if reached else None
    return {
        "seconds_to_99": first.seconds if first else None,
        "epoch": first.epoch if first else None,
        "accuracy": result.test_accuracy,
        "fit_seconds": time.perf_counter() - start,
    }


def profile(data_dir: Path, threads: int, steps: int) -> None:
    """Where the engine's train step goes: torch.profiler over ``steps`` steps, by operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled

    configure_threads(threads)
    load_split(data_dir, train=True, download=False)
    engine_epoch(data_dir, 20)  # kernels and allocator warm, as in a job process
    with profiled(activities=[ProfilerActivity.CPU]) as prof:
        engine_epoch(data_dir, steps)
    print(f"threads {threads}, {steps} engine steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    """Parse flags and run the comparisons."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="rounds of seed + engine epochs")
    parser.add_argument("--quick", action="store_true",
                        help=f"1 round of {QUICK_BATCHES} batches per side")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("MNISTQ_DATA_DIR", "var/data")))  # fmt: skip
    parser.add_argument("--no-concurrency", action="store_true", help="skip the jobs/hour part")
    parser.add_argument("--no-fast-cnn", action="store_true", help="skip fast_cnn's time to 99%%")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="only profile N engine steps and print where they go")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=("seed", "engine", "fast_cnn"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    max_batches = QUICK_BATCHES if args.quick else None
    threads = args.threads or usable_cores()
    if args.child:
        return child(args.data_dir, threads, max_batches)
    if args.profile:
        return profile(args.data_dir, threads, args.profile)
    if args.side == "fast_cnn":
        return print(json.dumps(fast_cnn_to_99(args.data_dir, threads)), flush=True)
    if args.side:
        return side(args.side, args.data_dir, threads, max_batches)
    epochs = 1 if args.quick else args.epochs
    print(f"threads {threads}, {f'{max_batches} batches' if max_batches else 'full epochs'}")
    seed, engine = compare(args.data_dir, epochs, threads, max_batches)
    print(f"median train s/epoch: seed {seed:.2f}, engine {engine:.2f}, ratio {engine / seed:.3f}")
    if not args.no_concurrency:
        two = jobs_per_hour(args.data_dir, 2, 1, max_batches)
        one = jobs_per_hour(args.data_dir, 1, 2, max_batches)
        print(
            f"jobs/hour (seed defaults, 3 epochs): 2 x 1-thread {two:.0f}, 1 x 2-thread {one:.0f}"
        )
    if not args.no_fast_cnn:
        cmd = _child_cmd(args.data_dir, threads, False, "--side", "fast_cnn")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        fast = json.loads(out.strip().splitlines()[-1])
        print(f"fast_cnn ({threads} threads, its settings, 2 epochs): "
              f"{fast['seconds_to_99'] or float('nan'):.2f} s to >= 99 % "
              f"(epoch {fast['epoch']}), final accuracy {fast['accuracy']:.2%}, "
              f"whole fit {fast['fit_seconds']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
