"""The seed recipe on real MNIST, and its model.pth in the tutorial's own Net."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim  # noqa: F401  (the tutorial's imports, kept as written)

from shared.schemas import Hyperparameters
from worker.training.data import MnistSplit
from worker.training.devices import configure_threads
from worker.training.loop import FitResult, fit
from worker.training.nets import FAST_CNN_SETTINGS

pytestmark = pytest.mark.mnist


# The classic tutorial's network, verbatim.
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()  # noqa: UP008  (verbatim)
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x)


@pytest.fixture(scope="module")
def seed_run(
    mnist_train: MnistSplit, mnist_test: MnistSplit, tmp_path_factory: pytest.TempPathFactory
) -> tuple[FitResult, Path]:
    """The seed recipe as it stands: defaults, 3 epochs, on the CPU."""
    out = tmp_path_factory.mktemp("seed")
    configure_threads(2)  # as a worker's one slot trains on this 2-core machine
    result = fit(Hyperparameters(device="cpu"), mnist_train, mnist_test, out,
                 device=torch.device("cpu"))  # fmt: skip
    return result, out


def test_one_epoch_of_the_seed_recipe_passes_93_percent(seed_run: tuple[FitResult, Path]) -> None:
    untrained, first = [p for p in seed_run[0].metrics if p.kind == "test"][:2]
    # The seed's test() before training: the untrained net guesses (about 10 %, loss ~2.30).
    assert (untrained.epoch, untrained.samples_seen) == (0, 0)
    assert untrained.accuracy is not None and 0.05 <= untrained.accuracy <= 0.2
    assert 2.2 <= untrained.loss <= 2.4
    assert first.epoch == 1 and first.samples_seen == 60000
    assert first.accuracy is not None and first.accuracy >= 0.935


def test_three_epochs_of_the_seed_recipe_pass_96_5_percent(
    seed_run: tuple[FitResult, Path],
) -> None:
    result = seed_run[0]
    assert result.status == "completed" and result.epochs_done == 3
    assert result.test_accuracy is not None and result.test_accuracy >= 0.965
    assert [p.samples_seen for p in result.metrics if p.kind == "test"] == [
        0,
        60000,
        120000,
        180000,
    ]
    train_points = [p for p in result.metrics if p.kind == "train"]
    assert len(train_points) == 3 * 94  # 938 batches, logged at batch_idx % 10 == 0


@pytest.mark.filterwarnings("ignore:Implicit dimension choice:UserWarning")
def test_model_pth_loads_into_the_tutorial_net_and_scores_the_same(
    mnist_dir: Path, seed_run: tuple[FitResult, Path]
) -> None:
    from torchvision import datasets, transforms

    result, out = seed_run
    network = Net()
    network.load_state_dict(torch.load(out / "model.pth"))
    test_loader = torch.utils.data.DataLoader(
        datasets.MNIST(str(mnist_dir), train=False, download=False,
                       transform=transforms.Compose([
                           transforms.ToTensor(),
                           transforms.Normalize((0.1307,), (0.3081,))])),
        batch_size=1000, shuffle=False)  # fmt: skip
    network.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            output = network(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.data.max(1, keepdim=True)[1]
            correct += int(pred.eq(target.data.view_as(pred)).sum())
    test_loss /= len(test_loader.dataset)  # type: ignore[arg-type]  # the tutorial's line
    assert correct / 10000 == result.test_accuracy
    assert test_loss == pytest.approx(result.test_loss, rel=1e-5)


def test_fast_cnn_passes_99_percent_in_two_epochs_with_its_settings(
    mnist_train: MnistSplit, mnist_test: MnistSplit, tmp_path: Path
) -> None:
    configure_threads(2)  # as bench/train_speed.py runs it: 99.16-99.19 % after epoch 2
    hp = Hyperparameters.model_validate({"n_epochs": 2, "device": "cpu", **FAST_CNN_SETTINGS})
    result = fit(hp, mnist_train, mnist_test, tmp_path, device=torch.device("cpu"))
    assert result.test_accuracy is not None and result.test_accuracy >= 0.99
