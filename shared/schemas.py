"""Hyperparameters: the one validated description of a training run, shared by API and worker."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ModelName = Literal["tutorial_cnn", "fast_cnn"]
OptimizerName = Literal["sgd", "adam", "adamw"]
Device = Literal["auto", "cpu", "cuda"]


class Hyperparameters(BaseModel):
    """A training run's knobs, with the classic PyTorch MNIST recipe as the defaults."""

    # Strict: unknown keys, NaN/inf and silently coerced strings are errors, not guesses.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    n_epochs: int = Field(3, ge=1, le=100, description="passes over the training set")
    batch_size_train: int = Field(64, ge=1, le=8192, description="training batch size")
    batch_size_test: int = Field(1000, ge=1, le=10000, description="evaluation batch size")
    learning_rate: float = Field(0.01, gt=0, le=10, description="optimizer step size")
    momentum: float = Field(0.5, ge=0, lt=1, description="SGD momentum (adam/adamw: beta1)")
    log_interval: int = Field(10, ge=1, le=10000, description="batches between train-loss logs")
    random_seed: int = Field(1, ge=0, le=2**31 - 1, description="seeds torch and the shuffles")
    model: ModelName = Field("tutorial_cnn", description="network architecture")
    optimizer: OptimizerName = Field("sgd", description="optimizer")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 penalty")
    device: Device = Field("auto", description="auto picks CUDA when the worker has it")
