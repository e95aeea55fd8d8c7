"""The data path: real MNIST as one normalized tensor, read once, and a clear missing-data error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.training.data import MnistNotFound, MnistSplit, load_split


@pytest.mark.mnist
def test_splits_are_normalized_tensors_equal_to_the_seed_transform(
    mnist_dir: Path, mnist_train: MnistSplit, mnist_test: MnistSplit
) -> None:
    from torchvision import datasets, transforms

    assert mnist_train.images.shape == (60000, 1, 28, 28) and len(mnist_test) == 10000
    assert mnist_train.images.dtype == torch.float32 and mnist_train.labels.dtype == torch.int64
    seed = datasets.MNIST(
        str(mnist_dir), train=False, download=False,
        transform=transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        ),
    )  # fmt: skip
    for i in (0, 1, 4321, 9999):
        image, label = seed[i]
        assert torch.equal(mnist_test.images[i], image)  # bit for bit, not just close
        assert mnist_test.labels[i].item() == label


@pytest.mark.mnist
def test_a_split_is_read_once_per_process(mnist_dir: Path, mnist_train: MnistSplit) -> None:
    again = load_split(mnist_dir, train=True, download=False)
    assert again is mnist_train


def test_missing_files_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(MnistNotFound) as info:
        load_split(tmp_path, train=True, download=False)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)
    assert "download disabled" in str(info.value)


def test_split_head_and_to_keep_pairs_together() -> None:
    split = MnistSplit(torch.zeros(5, 1, 28, 28), torch.arange(5))
    assert split.head(3).labels.tolist() == [0, 1, 2]
    assert split.head(None) is split
    assert split.to(torch.device("cpu")) is split


@pytest.mark.mnist
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_a_loaded_split_is_copied_to_the_gpu_once(mnist_test: MnistSplit) -> None:
    device = torch.device("cuda:0")
    on_gpu = mnist_test.to(device)
    assert on_gpu.images.device == device and on_gpu.to(device) is on_gpu
    assert mnist_test.to(device) is on_gpu
    assert torch.equal(on_gpu.images.cpu(), mnist_test.images)
