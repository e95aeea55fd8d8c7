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

from api.auth import is_public, public
from shared.schemas import ErrorOut

bp = Blueprint("openapi", __name__)

F = TypeVar("F", bound=Callable[..., Any])
Mode = Literal["validation", "serialization"]
REF = "#/components/schemas/{model}"
_CONVERTER = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")
ERROR_TEXT = {
    400: "malformed request",
    401: "no token, a malformed Authorization header, or an unknown or revoked token",
    403: "the token's user may not do this",
    404: "no such job, sweep or artifact",
    409: "the job's or sweep's state does not allow this",
    413: "request body too large",
    415: "unsupported media type",
    422: "invalid fields, each named in details",
    429: "too many submissions for this token, or too many queued jobs; see Retry-After",
    503: "database or broker unavailable",
}
SUCCESS_TEXT = {304: "not modified: the If-None-Match tag still holds; no body"}


DESCRIPTION = (
    "MNIST training jobs. Every route except health and this document needs the header "
    "`Authorization: Bearer <token>`; `mnistq users create NAME` prints a token."
)
SCHEME = "bearerAuth"
SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API token (mnq_…) from `mnistq users create` or `mnistq tokens create`",
}
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "job_id": {"type": "string", "maxLength": 64},
    "sweep_id": {"type": "string", "maxLength": 64},
    "name": {"type": "string", "maxLength": 255},
    "endpoint_id": {"type": "string", "maxLength": 32},
}
RESPONSE_HEADERS = {
    201: ("Location", "the URL of the new job or sweep"),
    304: ("ETag", "the tag that still holds"),
    401: ("WWW-Authenticate", 'Bearer realm="mnistq", with error="invalid_token" for bad tokens'),
    429: ("Retry-After", "seconds until a submission may succeed"),
}


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers, for the OpenAPI document."""

    summary: str
    # A model, or the media types a file may be served as.
    responses: Mapping[int, type[BaseModel] | tuple[str, ...]]
    # A model (a JSON body), or media type → schema for other bodies (images, forms).
    body: type[BaseModel] | Mapping[str, Mapping[str, Any]] | None = None
    query: type[BaseModel] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[int, ...] = ()


def operation(**kwargs: Any) -> Callable[[F], F]:
    """Attach an Operation to a view function."""

    def attach(view: F) -> F:
        view.openapi = Operation(**kwargs)  # type: ignore[attr-defined]
        return view

    return attach


@dataclass(frozen=True)
class Route:
    """One documented method of one path."""

    path: str
    method: str
    endpoint: str
    op: Operation
    public: bool


def _operations(app: Flask) -> list[Route]:
    """Every documented route, one per method."""
    found = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        op = getattr(view, "openapi", None)
        if op is None:
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append(Route(path, method.lower(), rule.endpoint, op, is_public(view)))
    return found


def _models(ops: list[Route]) -> list[tuple[type[BaseModel], Mode]]:
    models: dict[tuple[type[BaseModel], Mode], None] = {(ErrorOut, "serialization"): None}
    for route in ops:
        op = route.op
        if isinstance(op.body, type):
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
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": PATH_PARAMETERS.get(name, {"type": "string"}),
        }
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


def _response(
    answer: type[BaseModel] | tuple[str, ...], refs: Mapping[Any, Any], text: str, code: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"description": text}
    if answer == ():
        pass  # no body (304)
    elif isinstance(answer, tuple):
        binary = {"schema": {"type": "string", "format": "binary"}}
        out["content"] = {media: binary for media in answer}
    else:
        schema = refs[(answer, "serialization")]
        out["content"] = {"application/json": {"schema": schema}}
    if code in RESPONSE_HEADERS:
        name, description = RESPONSE_HEADERS[code]
        out["headers"] = {name: {"description": description, "schema": {"type": "string"}}}
    return out


def _error_codes(route: Route) -> tuple[int, ...]:
    """The route's own errors, 401 for every route that needs a token, 400 and 413 for every
    JSON body (api.inputs.json_body answers them before validation), and 500."""
    auth = () if route.public else (401,)
    body = (400, 413) if isinstance(route.op.body, type) else ()
    return tuple(sorted({*route.op.errors, *auth, *body, 500}))


def _operation_object(route: Route, refs: Mapping[Any, Any]) -> dict[str, Any]:
    op = route.op
    out: dict[str, Any] = {"operationId": route.endpoint.replace(".", "_"), "summary": op.summary}
    if route.public:
        out["security"] = []  # overrides the document's default: no token needed
    params = _parameters(route.path, op)
    if params:
        out["parameters"] = params
    if isinstance(op.body, type):
        schema = refs[(op.body, "validation")]
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    elif op.body is not None:
        content = {media: {"schema": dict(schema)} for media, schema in op.body.items()}
        out["requestBody"] = {"required": True, "content": content}
    responses = {
        str(code): _response(ans, refs, SUCCESS_TEXT.get(code, "success"), code)
        for code, ans in op.responses.items()
    }
    if "304" in responses:
        tag = {
            "description": "a tag of this answer, for If-None-Match",
            "schema": {"type": "string"},
        }
        responses["200"].setdefault("headers", {})["ETag"] = tag
    for code in _error_codes(route):
        text = ERROR_TEXT.get(code, "unexpected error")
        responses[str(code)] = _response(ErrorOut, refs, text, code)
    out["responses"] = responses
    return out


def build_document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``app`` that declares an Operation."""
    ops = _operations(app)
    refs, defs = models_json_schema(_models(ops), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in ops:
        paths.setdefault(route.path, {})[route.method] = _operation_object(route, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "mnistq", "version": "1", "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {SCHEME: SECURITY_SCHEME},
        },
        "security": [{SCHEME: []}],
    }


@bp.get("/openapi.json")
@public
def document() -> ResponseReturnValue:
    """The OpenAPI document of this API."""
    return jsonify(build_document(current_app))
