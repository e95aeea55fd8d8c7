"""Hyperparameters reject bad input with an error naming the field."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from shared.schemas import Hyperparameters


def error_fields(data: dict[str, Any]) -> set[str]:
    """The fields a validation error names."""
    with pytest.raises(ValidationError) as info:
        Hyperparameters.model_validate(data)
    return {".".join(map(str, err["loc"])) for err in info.value.errors()}


def test_defaults_are_the_seed_recipe() -> None:
    hp = Hyperparameters()
    assert (hp.n_epochs, hp.batch_size_train, hp.batch_size_test) == (3, 64, 1000)
    assert (hp.learning_rate, hp.momentum, hp.log_interval, hp.random_seed) == (0.01, 0.5, 10, 1)
    assert (hp.model, hp.optimizer, hp.weight_decay, hp.device) == (
        "tutorial_cnn",
        "sgd",
        0,
        "auto",
    )


def test_unknown_key_is_named() -> None:
    assert error_fields({"epochs": 3}) == {"epochs"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_epochs", "3"), ("n_epochs", 2.5), ("learning_rate", "0.1"), ("model", 3),
     ("random_seed", True), ("log_interval", None)],
)  # fmt: skip
def test_wrong_type_is_named(field: str, value: Any) -> None:
    assert error_fields({field: value}) == {field}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["learning_rate", "momentum", "weight_decay"])
def test_nan_and_inf_are_rejected(field: str, value: float) -> None:
    assert error_fields({field: value}) == {field}


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_epochs", 0), ("n_epochs", 101), ("batch_size_train", 0), ("batch_size_train", 8193),
     ("batch_size_test", 10001), ("learning_rate", 0.0), ("learning_rate", 10.5),
     ("momentum", 1.0), ("momentum", -0.1), ("log_interval", 0), ("random_seed", -1),
     ("random_seed", 2**31), ("weight_decay", 1.5), ("model", "resnet"), ("optimizer", "rmsprop"),
     ("device", "tpu")],
)  # fmt: skip
def test_out_of_range_is_named(field: str, value: Any) -> None:
    assert error_fields({field: value}) == {field}


def test_bounds_themselves_are_accepted() -> None:
    hp = Hyperparameters(n_epochs=100, batch_size_train=8192, learning_rate=10.0, momentum=0.0,
                         random_seed=2**31 - 1, weight_decay=1.0)  # fmt: skip
    assert hp.n_epochs == 100
