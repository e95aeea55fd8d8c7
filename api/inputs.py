"""Reading a request's JSON body, query string and headers into validated pydantic models."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar, get_args, get_origin

from flask import request
from pydantic import BaseModel, ValidationError

from api.errors import ApiError, field_error, from_pydantic, validation_failed

M = TypeVar("M", bound=BaseModel)
IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII, as the header's draft standard asks


def json_body(model: type[M]) -> M:
    """The request body parsed as JSON and validated as ``model``; 400/413/422 otherwise."""
    if not request.is_json:
        raise ApiError(
            400,
            "invalid_content_type",
            "send the body as JSON with the header Content-Type: application/json",
        )
    raw = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: 413 from werkzeug
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # RecursionError: a body of [[[[...]]]] nested deeper than the parser's stack.
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, "body") from exc


def query_args(model: type[M]) -> M:
    """The query string validated as ``model``; list fields take repeated parameters."""
    data: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        field = model.model_fields.get(key)
        data[key] = values if field is not None and _is_list(field.annotation) else values[0]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, "query") from exc


def _is_list(annotation: Any) -> bool:
    """True for list[...] and list[...] | None."""
    if get_origin(annotation) is list:
        return True
    return any(get_origin(arg) is list for arg in get_args(annotation))


def idempotency_key() -> str | None:
    """The Idempotency-Key header, if sent; 422 if it is not 1-200 visible ASCII characters."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not _KEY.fullmatch(key):
        msg = "must be 1 to 200 visible ASCII characters"
        raise validation_failed([field_error(["header", IDEMPOTENCY_HEADER], msg)])
    return key
