"""The networks a job can train, by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """``tutorial_cnn``: the classic PyTorch MNIST tutorial's net, same layers and names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(inplace=True)  # over conv2's output, read by no backward
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tutorial's ops in its order. Dropout2d and the ReLUs work in place: what they
        # overwrite (conv2's, a max-pool's or fc1's output) no backward step reads, so the
        # numbers are the same with four activation-sized buffers fewer a step.
        x = F.relu_(F.max_pool2d(self.conv1(x), 2))  # (B, 10, 12, 12)
        x = F.relu_(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))  # (B, 20, 4, 4)
        x = x.reshape(-1, 320)  # the tutorial views; reshape also takes channels-last input
        x = F.relu_(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)  # the tutorial's implicit dim for 2-D input


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU, 2x2 max-pool: halves the spatial size."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FastNet(nn.Module):
    """``fast_cnn``: a small batch-normalized CNN, 99% test accuracy in 2 epochs on a CPU.

    Train it with ``FAST_CNN_SETTINGS``. At a constant learning rate it plateaus near 98.8%
    after 2 epochs; the per-epoch decay (lr_gamma 0.1) takes it past 99%.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(1, 16),  # (B, 16, 14, 14)
            _conv_block(16, 32),  # (B, 32, 7, 7)
            _conv_block(32, 64),  # (B, 64, 3, 3)
        )
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(64 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)  # (B, 576)
        return F.log_softmax(self.fc(self.drop(x)), dim=1)


# Recommended hyperparameters for fast_cnn (Adam's beta1 is the momentum field).
FAST_CNN_SETTINGS: dict[str, object] = {
    "model": "fast_cnn",
    "optimizer": "adam",
    "learning_rate": 0.003,
    "momentum": 0.9,
    "batch_size_train": 128,
    "lr_gamma": 0.1,
}

MODELS: dict[str, type[nn.Module]] = {"tutorial_cnn": Net, "fast_cnn": FastNet}


def build_model(name: str) -> nn.Module:
    """A freshly initialized network for a ``Hyperparameters.model`` name."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
