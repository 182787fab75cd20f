"""Conformance fuzzing (schemathesis) of the served OpenAPI document against a live server
on the tiny model: no 5xx, and every response matches the status codes, content types and
schemas the document declares.

Bounded to fit `make test` (LOOPSERVE_FUZZ_EXAMPLES per operation, default 40: about a
minute on the 2-core machine); docs/server.md gives the longer run for release checks.
"""

from __future__ import annotations

import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import make_server

EXAMPLES = int(os.environ.get("LOOPSERVE_FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_NEW_TOKENS = 4  # valid answers stay short: the fuzzing is about the protocol, not decoding


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = make_server(tmp_path_factory, default_max_tokens=MAX_NEW_TOKENS, max_queue=64, max_body_bytes=256 * 1024)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http_session():
    session = requests.Session()
    session.trust_env = False  # loopback only: never a proxy from the environment
    yield session
    session.close()


@pytest.fixture(scope="module")
def served_schema(fuzz_server, http_session):
    doc = http_session.get(fuzz_server.url + "/openapi.json", timeout=60).json()  # the document as served
    return schemathesis.openapi.from_dict(doc)


def _operations(doc: dict) -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, ops in doc["paths"].items() for method in ops]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_served_schema_conformance(served_schema, fuzz_server, http_session, mode):
    # (schemathesis's own pytest plugin does not run under this pytest: the strategies are driven here)
    operations = [r.ok() for r in served_schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/chat/completions"), ("GET", "/metrics")}
    window = fuzz_server.state.engine.max_context
    seen: dict[tuple[str, str], set[int]] = {}
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def conforms(case):
            body = case.body if isinstance(case.body, dict) else None
            for name in ("max_tokens", "max_completion_tokens"):
                v = body.get(name) if body is not None else None
                # Accepted values are kept short to generate; larger ones (400s) go through as drawn.
                if isinstance(v, int) and not isinstance(v, bool) and MAX_NEW_TOKENS < v <= window:
                    body[name] = MAX_NEW_TOKENS
            response = case.call(base_url=fuzz_server.url, session=http_session, timeout=120)
            seen.setdefault((op.method.upper(), op.path), set()).add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        try:
            conforms()
        except Unsatisfiable:
            # A negative run of an operation whose inputs admit no invalid value (a free-form
            # path string) has nothing to send; the chat request always has.
            assert mode == GenerationMode.NEGATIVE and op.path != "/v1/chat/completions", op.path
    chat = seen[("POST", "/v1/chat/completions")]
    assert (200 if mode == GenerationMode.POSITIVE else 400) in chat, seen  # the fuzzing reached the engine / the validation
