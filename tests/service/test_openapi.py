"""Schemathesis against the served OpenAPI spec: no 5xx, statuses, content types and bodies as documented."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until

ADMIN_TOKEN = "schemathesis-admin-token"
# negative_data_rejection is left out on purpose: unknown query parameters are ignored (plain HTTP
# practice) and the bearer header is always sent; the 422 cases have their own tests (test_auth.py).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


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
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    finally:
        stop(proc)


# the SSE stream never ends (each case would wait for the timeout): it has its own tests over real HTTP
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=r"/events$")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, timeout=10, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
