"""Property-based fuzzing of the live app against its own /openapi.json (schemathesis).

Every generated request, valid and invalid, is sent with a valid token through the WSGI app;
no answer may be a server error, and every answer must match the documented status codes,
content types and schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api import create_app
from api.db import ENGINE_KEY, SESSIONS_KEY
from tests.api.conftest import Caller, RecordingPublisher, add_user, make_settings

MAX_EXAMPLES = 75  # per operation and mode; the whole run stays well under a minute
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MIN_SENT = 100  # generated requests each mode must send, so a broken generator cannot pass


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> Iterator[Flask]:
    """One app for the whole run: its own database, limits high enough to reach the views."""
    tmp = tmp_path_factory.mktemp("fuzz")
    db = tmp / "mnistq.db"
    db.write_bytes(migrated_sqlite.read_bytes())
    settings_ = make_settings(
        tmp,
        f"sqlite:///{db}",
        submit_rate_limit="100000/minute",
        max_queued_jobs_per_user=100000,
    )
    # The embedded broker's folder, so health answers 200 and not a (documented) 503.
    (settings_.broker_dir / "queue").mkdir(parents=True)
    app = create_app(settings_, publish=RecordingPublisher())
    yield app
    app.extensions[ENGINE_KEY].dispose()


@pytest.fixture(scope="module")
def fuzz_caller(fuzzed: Flask) -> Caller:
    """The admin whose token every generated request carries."""
    return add_user(fuzzed.extensions[SESSIONS_KEY], "fuzzer", admin=True)


@pytest.fixture(scope="module")
def api_schema(fuzzed: Flask) -> schemathesis.BaseSchema:
    """The app's own document, loaded through the app."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzzed)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
    )
    return schema


def _fuzz(
    api_schema: schemathesis.BaseSchema, mode: GenerationMode, headers: dict[str, str]
) -> list[str]:
    """Send MAX_EXAMPLES generated requests of ``mode`` to every operation and check each.

    Returns "METHOD path" of every request sent.
    """
    sent: list[str] = []
    for result in api_schema.get_all_operations():
        if isinstance(result, Err):
            pytest.fail(f"the document has an invalid operation: {result.err()}")
        operation = result.ok()
        raw = operation.definition.raw
        if (
            mode is GenerationMode.NEGATIVE
            and not raw.get("parameters")
            and "requestBody" not in raw
        ):
            continue  # nothing to make invalid (e.g. GET /api/v1/me)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            sent.append(f"{case.method} {case.path}")
            case.call_and_validate(headers=headers, checks=CHECKS)

        check()
    return sent


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_openapi_document(
    api_schema: schemathesis.BaseSchema, fuzz_caller: Caller, mode: GenerationMode
) -> None:
    """Each mode on its own: no server error, and enough requests sent to mean something."""
    sent = _fuzz(api_schema, mode, fuzz_caller.headers)
    print(f"\nschemathesis ({mode.value}) sent {len(sent)} requests over {len(set(sent))} paths")
    assert len(sent) >= MIN_SENT
