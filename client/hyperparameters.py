"""Command-line flags for the Hyperparameters schema: `mnistq train` and `mnistq submit`."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import click
from pydantic import ValidationError

from shared.schemas import Hyperparameters

F = typing.TypeVar("F", bound=Callable[..., Any])


def _click_type(annotation: Any) -> click.ParamType:
    """int and float flags convert on the command line; everything else is checked by pydantic."""
    if annotation is int:
        return click.INT
    if annotation is float:
        return click.FLOAT
    return click.STRING


def hyperparameter_options(func: F) -> F:
    """One ``--flag`` per Hyperparameters field, named after it, defaulting to the schema's."""
    for name, info in reversed(list(Hyperparameters.model_fields.items())):
        choices = typing.get_args(info.annotation)
        hint = f" [{'|'.join(choices)}]" if choices else ""
        func = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=_click_type(info.annotation),
            default=None,
            help=f"{info.description}{hint} (default: {info.default})",
        )(func)
    return func


def hyperparameters_from_flags(base: dict[str, Any], flags: dict[str, Any]) -> Hyperparameters:
    """Validate the flags given on top of ``base``; errors name the flag and what is wrong."""
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        return Hyperparameters.model_validate({**base, **given})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
            for err in exc.errors()
        )
        raise click.UsageError(f"invalid hyperparameters: {problems}") from exc
