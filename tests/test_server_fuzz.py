"""Property-based fuzz of the published OpenAPI schema (schemathesis + hypothesis): no input gets a 5xx and
every error has an OpenAI error body. Examples are bounded and images tiny, so the run takes seconds."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis

MAX_EXAMPLES = 30
FUZZ_SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)  # fmt: skip


@pytest.fixture(scope="module")
def api_schema(start_server):
    with start_server(max_pixels=16 * 16, max_steps=60, max_n=2, request_timeout_s=30, default_size="16x16") as live:
        yield schemathesis.openapi.from_url(f"{live.url}/openapi.json")


def test_schema_lists_every_route(api_schema):
    operations = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in api_schema.get_all_operations())}
    assert {"POST /v1/images/generations", "POST /v1/images/edits", "GET /v1/models", "GET /health"} <= operations


def test_no_input_gets_a_server_error(api_schema):
    for result in api_schema.get_all_operations():
        assert_no_server_error(result.ok())


def assert_no_server_error(operation):
    @FUZZ_SETTINGS
    @hypothesis.given(case=operation.as_strategy())
    def no_server_error(case):
        response = case.call(timeout=60)
        assert response.status_code < 500, f"{operation.method} {operation.path}: {response.text}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    no_server_error()
