"""The OpenAPI document is generated from the routes and models and covers all of them."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_every_route_is_documented(app: Flask, client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        undocumented = rule.endpoint in ("static", "openapi.document", "docs.page")
        if undocumented or rule.endpoint.startswith("dashboard."):  # HTML pages, not the API
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)


def test_every_reference_resolves(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc["paths"]):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    for ref in _refs(schemas):
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_submit_operation_describes_body_key_and_answers(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    submit = doc["paths"]["/api/v1/jobs"]["post"]
    body_ref = submit["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = doc["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert body["additionalProperties"] is False
    assert {"name", "hyperparameters", "device", "resume_from"} <= set(body["properties"])
    assert {"201", "200", "400", "413", "422", "503"} <= set(submit["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in submit["parameters"])
    hyper = doc["components"]["schemas"]["Hyperparameters"]["properties"]
    assert hyper["n_epochs"]["minimum"] == 1 and hyper["n_epochs"]["default"] == 3
    listing = doc["paths"]["/api/v1/jobs"]["get"]
    names = {p["name"] for p in listing["parameters"]}
    assert names == {"status", "limit", "cursor", "If-None-Match"}
    download = doc["paths"]["/api/v1/jobs/{job_id}/artifacts/{name}"]["get"]
    assert {p["name"] for p in download["parameters"]} == {"job_id", "name"}


def test_security_scheme_and_auth_answers(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert doc["security"] == [{"bearerAuth": []}]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path == "/api/v1/health":
                assert op["security"] == [] and "401" not in op["responses"]
                continue
            assert "security" not in op, (path, method)  # the document's default applies
            unauthorized = op["responses"]["401"]
            assert "WWW-Authenticate" in unauthorized["headers"]
            assert "500" in op["responses"]
    submit = doc["paths"]["/api/v1/jobs"]["post"]["responses"]
    assert "Retry-After" in submit["429"]["headers"]
    assert "Location" in submit["201"]["headers"]
    assert "403" in doc["paths"]["/api/v1/users"]["get"]["responses"]


def test_downloads_declare_every_media_type_they_are_served_as(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    ok = doc["paths"]["/api/v1/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]["200"]
    assert {"image/png", "application/octet-stream", "text/plain"} <= set(ok["content"])
