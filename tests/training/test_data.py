"""The data path: real MNIST as one normalized tensor, read once, and a clear missing-data error."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from worker.training import data
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


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The normalized-split cache in a folder of the test's own."""
    root = tmp_path / "cache"
    monkeypatch.setattr(data, "CACHE_ROOT", root)
    return root


@pytest.fixture
def own_mnist(tmp_path: Path, mnist_dir: Path) -> Path:
    """A data folder holding a copy of the real MNIST raw files (torchvision wants all four)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (*data.RAW_FILES[True], *data.RAW_FILES[False]):
        shutil.copy2(mnist_dir / "MNIST" / "raw" / name, raw / name)
    return tmp_path / "data"


@pytest.mark.mnist
def test_a_split_read_once_is_cached_on_disk_and_mapped_by_later_processes(
    own_mnist: Path, cache_root: Path, mnist_test: MnistSplit
) -> None:
    first = data._read_split(own_mnist, train=False, download=False)
    [cached] = cache_root.glob("test-*.pt")
    again = data._read_split(own_mnist, train=False, download=False)
    for split in (first, again):
        assert torch.equal(split.images, mnist_test.images)
        assert torch.equal(split.labels, mnist_test.labels)
    # Mapped from the file, not read anew.
    assert str(cached) in Path("/proc/self/maps").read_text()


@pytest.mark.mnist
def test_changed_raw_files_or_a_damaged_cache_are_read_again(
    own_mnist: Path, cache_root: Path, mnist_test: MnistSplit
) -> None:
    data._read_split(own_mnist, train=False, download=False)
    [old] = cache_root.glob("test-*.pt")
    labels = own_mnist / "MNIST" / "raw" / data.RAW_FILES[False][1]
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    data._read_split(own_mnist, train=False, download=False)
    assert len(list(cache_root.glob("test-*.pt"))) == 2  # a new key for the new files
    [new] = set(cache_root.glob("test-*.pt")) - {old}
    new.write_bytes(b"not a tensor file")
    split = data._read_split(own_mnist, train=False, download=False)
    assert torch.equal(split.images, mnist_test.images)
    assert torch.load(new, weights_only=True)["labels"].shape == (10000,)  # written anew


@pytest.mark.mnist
def test_a_cache_folder_others_can_write_to_is_not_used(
    own_mnist: Path, cache_root: Path, mnist_test: MnistSplit
) -> None:
    cache_root.mkdir()
    cache_root.chmod(0o777)  # someone else could have put their own tensors there
    split = data._read_split(own_mnist, train=False, download=False)
    assert torch.equal(split.images, mnist_test.images)
    assert list(cache_root.iterdir()) == []
