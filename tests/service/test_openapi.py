"""Schemathesis against the served OpenAPI spec: no 5xx, statuses, content types and bodies as documented."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    ensure_resource_availability,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
    use_after_free,
)
from schemathesis.generation.modes import GenerationMode

from squadbus.core.settings import Settings
from squadbus.service import create_app
from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until

ADMIN_TOKEN = "schemathesis-admin-token"
# Positive and negative cases. positive_data_acceptance is left out: a schema cannot say every rule the
# server enforces (since < until, an id already used by another sender (409), a cursor that decodes to a
# position, Unicode printability beyond the token pattern), so some schema-valid requests are rightly 4xx.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, unsupported_method, allow_header_conformance,
          response_headers_conformance, missing_required_header, ignored_auth, use_after_free,
          ensure_resource_availability]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    """The OpenAPI schema of a uvicorn child process (tokens required, SQLite in a tmp dir), minus the SSE stream."""
    tmp: Path = tmp_path_factory.mktemp("openapi")
    (tmp / "tokens.json").write_text(json.dumps({"tokens": [{"token": ADMIN_TOKEN, "role": "admin"}]}))
    port = free_port()
    env = {**os.environ, "SQUADBUS_URL": "memory://", "SQUADBUS_STORE_URL": f"sqlite+aiosqlite:///{tmp / 'h.db'}",
           "SQUADBUS_TOKENS_FILE": str(tmp / "tokens.json")}
    argv = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', str(tmp), sys.executable, "-m", "uvicorn",
            "squadbus.service:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    proc = spawn(argv, tmp / "uvicorn.log", env=env)
    try:
        wait_until(lambda: port_open(port), 30, "uvicorn", proc)
        loaded = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
        # unknown query parameters are ignored (plain HTTP practice) and the bearer header is always sent
        # (ignored_auth checks the 401s): neither is a negative case here
        loaded.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                        allow_extra_parameters=False, with_security_parameters=False)
        yield loaded
    finally:
        stop(proc)


# the SSE stream never ends (each case would wait for the timeout): it has its own tests over real HTTP
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=r"/events$")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, timeout=10, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def test_schema_states_the_formats_the_server_enforces() -> None:
    spec = create_app(Settings(store_url="sqlite+aiosqlite:///:memory:")).openapi()
    message_in = spec["components"]["schemas"]["MessageIn"]["properties"]
    for field in ("sender_id", "recipient_id", "domain"):
        text = json.dumps(message_in[field])
        assert "pattern" in text and "'.', '*' or '>'" in text, field
    token = re.compile(message_in["sender_id"]["pattern"])
    assert token.match("dev-1") and token.match("d\u00e9veloppeur")
    assert not any(token.match(bad) for bad in ("a.b", "a*", "a>", "a b", "a\x00", "a\u0085", "a\u00a0b"))
    params = {p["name"]: p for p in spec["paths"]["/v1/messages"]["get"]["parameters"]}
    cursor = re.compile(params["cursor"]["schema"]["anyOf"][0]["pattern"])
    assert cursor.match("djE6MQ") and not cursor.match("djE6MQ==") and not cursor.match("a b")
    for path in ("/v1/events", "/v1/executions/{execution_id}/events"):
        header = next(p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "Last-Event-ID")
        event_id = re.compile(header["schema"]["pattern"])
        assert event_id.match("42") and event_id.match("") and not event_id.match("-1")
        assert not event_id.match("+5") and not event_id.match("1" * 20)
