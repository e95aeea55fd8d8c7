"""The submit form: fields generated from the Hyperparameters model, and its validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from werkzeug.datastructures import MultiDict

from api.errors import field_error, from_pydantic
from shared.schemas import Hyperparameters, JobCreate

HP = "hyperparameters"


@dataclass(frozen=True)
class FormField:
    """One hyperparameter as the form shows it: input kind, default, bounds and help."""

    name: str
    label: str
    kind: str  # "integer", "number" or "choice"
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    @property
    def bounds(self) -> str:
        """The allowed range in words, e.g. '0 < x ≤ 10'; empty for choices."""
        if self.kind == "choice":
            return ""
        low = "" if self.minimum is None else _num(self.minimum)
        high = "" if self.maximum is None else _num(self.maximum)
        left = f"{low} {'<' if self.exclusive_minimum else '≤'} " if low else ""
        right = f" {'<' if self.exclusive_maximum else '≤'} {high}" if high else ""
        return f"{left}x{right}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _field(name: str, prop: dict[str, Any]) -> FormField:
    enum = prop.get("enum")
    low = prop.get("minimum", prop.get("exclusiveMinimum"))
    high = prop.get("maximum", prop.get("exclusiveMaximum"))
    return FormField(
        name=name,
        label=name.replace("_", " "),
        kind="choice" if enum else str(prop.get("type", "string")),
        default=prop.get("default"),
        description=str(prop.get("description", "")),
        choices=tuple(enum or ()),
        minimum=low,
        maximum=high,
        exclusive_minimum="exclusiveMinimum" in prop,
        exclusive_maximum="exclusiveMaximum" in prop,
    )


def form_fields() -> list[FormField]:
    """Every hyperparameter, in the model's order, from its JSON schema."""
    properties: dict[str, Any] = Hyperparameters.model_json_schema()["properties"]
    return [_field(name, prop) for name, prop in properties.items()]


@dataclass
class Submission:
    """What a submitted form holds: the validated body, or errors keyed by field name."""

    values: dict[str, str]
    body: JobCreate | None
    errors: dict[str, str]


def _parse(field: FormField, raw: str) -> Any:
    """The typed value of one input; ValueError with a sentence if it is not one."""
    if field.kind == "integer":
        try:
            return int(raw)
        except ValueError:
            raise ValueError("must be a whole number") from None
    if field.kind == "number":
        try:
            return float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
    return raw


def read_submission(form: MultiDict[str, str]) -> Submission:
    """Validate the form as the API validates a JSON body; errors carry the API's messages."""
    values = {f.name: form.get(f.name, "").strip() for f in form_fields()}
    values["name"] = form.get("name", "").strip()
    hyper: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    for field in form_fields():
        raw = values[field.name]
        if not raw:
            continue  # an empty input takes the default
        try:
            hyper[field.name] = _parse(field, raw)
        except ValueError as exc:
            details.append(field_error(["body", HP, field.name], str(exc)))
    data: dict[str, Any] = {HP: hyper, "name": values["name"] or None}
    body = None
    try:
        body = JobCreate.model_validate(data)
    except ValidationError as exc:
        details.extend(from_pydantic(exc, "body").details)
    return Submission(values, None if details else body, errors_by_field(details))


def errors_by_field(details: list[dict[str, Any]]) -> dict[str, str]:
    """422 details as {field name: message}; errors about the whole body under '' ."""
    errors: dict[str, str] = {}
    for detail in details:
        loc = [str(part) for part in detail["loc"]]
        name = loc[2] if len(loc) > 2 and loc[1] == HP else (loc[1] if len(loc) > 1 else "")
        errors.setdefault(name, detail["msg"])
    return errors
