"""The OpenAPI 3.1 document, generated from the routes and the pydantic models they declare."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from flask import Blueprint, Flask, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.schemas import ErrorOut

bp = Blueprint("openapi", __name__)

F = TypeVar("F", bound=Callable[..., Any])
Mode = Literal["validation", "serialization"]
REF = "#/components/schemas/{model}"
_CONVERTER = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")
ERROR_TEXT = {
    400: "malformed request",
    404: "no such job or artifact",
    409: "the job's state does not allow this",
    413: "request body too large",
    422: "invalid fields, each named in details",
    503: "database or broker unavailable",
}


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers, for the OpenAPI document."""

    summary: str
    responses: Mapping[int, type[BaseModel] | str]  # a model, or a media type for files
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[int, ...] = ()


def operation(**kwargs: Any) -> Callable[[F], F]:
    """Attach an Operation to a view function."""

    def attach(view: F) -> F:
        view.openapi = Operation(**kwargs)  # type: ignore[attr-defined]
        return view

    return attach


def _operations(app: Flask) -> list[tuple[str, str, str, Operation]]:
    """(path, method, endpoint, operation) of every documented route."""
    found = []
    for rule in app.url_map.iter_rules():
        op = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if op is None:
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((path, method.lower(), rule.endpoint, op))
    return found


def _models(ops: list[tuple[str, str, str, Operation]]) -> list[tuple[type[BaseModel], Mode]]:
    models: dict[tuple[type[BaseModel], Mode], None] = {(ErrorOut, "serialization"): None}
    for *_, op in ops:
        if op.body is not None:
            models[(op.body, "validation")] = None
        for answer in op.responses.values():
            if isinstance(answer, type):
                models[(answer, "serialization")] = None
    return list(models)


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    return [
        {
            "name": name,
            "in": "query",
            "required": name in schema.get("required", []),
            "schema": prop,
            "description": prop.get("description", ""),
        }
        for name, prop in schema["properties"].items()
    ]


def _parameters(path: str, op: Operation) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{([a-z_]+)}", path)
    ]
    params += [
        {
            "name": name,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": text,
        }
        for name, text in op.headers.items()
    ]
    return params + (_query_parameters(op.query) if op.query else [])


def _response(answer: type[BaseModel] | str, refs: Mapping[Any, Any], text: str) -> dict[str, Any]:
    if isinstance(answer, str):
        return {
            "description": text,
            "content": {answer: {"schema": {"type": "string", "format": "binary"}}},
        }
    schema = refs[(answer, "serialization")]
    return {"description": text, "content": {"application/json": {"schema": schema}}}


def _operation_object(
    path: str, endpoint: str, op: Operation, refs: Mapping[Any, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": endpoint.replace(".", "_"), "summary": op.summary}
    params = _parameters(path, op)
    if params:
        out["parameters"] = params
    if op.body is not None:
        schema = refs[(op.body, "validation")]
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    responses = {str(code): _response(ans, refs, "success") for code, ans in op.responses.items()}
    for code in (*op.errors, 500):
        responses[str(code)] = _response(ErrorOut, refs, ERROR_TEXT.get(code, "unexpected error"))
    out["responses"] = responses
    return out


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``app`` that declares an Operation."""
    ops = _operations(app)
    refs, defs = models_json_schema(_models(ops), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for path, method, endpoint, op in ops:
        paths.setdefault(path, {})[method] = _operation_object(path, endpoint, op, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "mnistq", "version": "1", "description": "MNIST training jobs"},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }


@bp.get("/openapi.json")
def document() -> ResponseReturnValue:
    """The OpenAPI document of this API."""
    return jsonify(build_document(current_app))
