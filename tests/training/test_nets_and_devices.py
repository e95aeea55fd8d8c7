"""Networks by name, devices and threads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.schemas import Hyperparameters
from worker.training.devices import (
    DeviceUnavailable,
    configure_threads,
    resolve_device,
    usable_cores,
)
from worker.training.loop import fit
from worker.training.nets import FastNet, Net, build_model

from .conftest import synthetic_split

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(("name", "cls"), [("tutorial_cnn", Net), ("fast_cnn", FastNet)])
def test_models_give_log_probabilities_per_class(name: str, cls: type) -> None:
    model = build_model(name).eval()
    assert isinstance(model, cls)
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)


def test_tutorial_net_has_the_tutorial_parameter_names() -> None:
    assert list(Net().state_dict()) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    ]  # fmt: skip


def test_unknown_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="resnet"):
        build_model("resnet")


def test_configure_threads_zero_means_all_usable_cores() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(0) == usable_cores() == torch.get_num_threads()
        assert configure_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# Steps of fast_cnn on random input; the median page faults of ten steps once five steps
# have warmed it up (the median: a step that grows the heap once is not what a step costs).
_FAULTS_PER_STEP = """
import resource, statistics, sys, torch
import torch.nn.functional as F
from worker.training.devices import configure_threads
from worker.training.nets import FastNet
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    configure_threads(1)
model = FastNet().to(memory_format=torch.channels_last)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
def step():
    model.zero_grad()
    F.nll_loss(model(x), y).backward()
for _ in range(5):
    step()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults))
"""


def _faults_per_step(mode: str) -> float:
    cmd = [sys.executable, "-c", _FAULTS_PER_STEP, mode]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_a_configured_process_reuses_freed_activation_memory() -> None:
    # By default each step page-faults its freed activations back in (hundreds of faults).
    # glibc moves its mmap threshold up as it frees big blocks, so some default runs fault
    # far less than others: the most of three runs is what the default costs.
    default = max(_faults_per_step("default") for _ in range(3))
    tuned = _faults_per_step("tuned")
    assert default > 150
    assert tuned < default / 5  # configured: the freed blocks are reused


def test_cpu_and_auto_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(DeviceUnavailable):
        resolve_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU, so 'cuda' is available")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(DeviceUnavailable, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
def test_fit_on_cuda_is_deterministic_and_learns(tmp_path: Path) -> None:
    train, test = synthetic_split(600, seed=0), synthetic_split(200, seed=1)
    hp = Hyperparameters(n_epochs=2, batch_size_test=100, learning_rate=0.05, device="cuda")
    device = resolve_device("cuda")
    first = fit(hp, train, test, tmp_path / "a", device=device)
    second = fit(hp, train, test, tmp_path / "b", device=device)
    assert first.device == "cuda:0"
    assert [p.loss for p in first.metrics] == [p.loss for p in second.metrics]
    assert first.test_accuracy is not None and first.test_accuracy > 0.9
