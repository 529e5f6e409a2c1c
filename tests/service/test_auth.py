"""Security: 401, 403, 413, 422; invalid input never reaches the bus; tokens file parsing."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from squadbus.core.backend import Delivery
from squadbus.core.errors import ConfigError
from squadbus.service.auth import Role, TokenTable
from tests.service.conftest import Api, MakeApp, asgi, auth, message


async def test_missing_or_unknown_token_is_401(secure_api: Api) -> None:
    c = secure_api.client
    for path in ("/v1/messages", f"/v1/executions/{uuid.uuid4()}/events", "/metrics",
                 f"/v1/executions/{uuid.uuid4()}"):
        r = await c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = await c.post("/v1/messages", json=message(), headers={"Authorization": "Bearer not-a-known-token"})
    assert r.status_code == 401
    r = await c.post("/v1/messages", json=message(), headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401


async def test_health_endpoints_need_no_token(secure_api: Api) -> None:
    assert (await secure_api.client.get("/healthz")).status_code == 200
    assert (await secure_api.client.get("/readyz")).status_code == 200
    assert (await secure_api.client.get("/openapi.json")).status_code == 200


async def test_agent_sends_only_as_itself(secure_api: Api) -> None:
    c = secure_api.client
    ok = await c.post("/v1/messages", json=message(sender="pm"), headers=auth("pm"))
    assert ok.status_code == 201
    r = await c.post("/v1/messages", json=message(sender="dev-1"), headers=auth("pm"))
    assert r.status_code == 403
    assert "cannot send as" in r.json()["detail"]
    batch = {"messages": [message(sender="pm"), message(sender="dev-1")]}
    assert (await c.post("/v1/messages:batch", json=batch, headers=auth("pm"))).status_code == 403
    assert (await c.get("/v1/messages", headers=auth("pm"))).status_code == 200


async def test_viewer_reads_but_never_sends(secure_api: Api) -> None:
    c = secure_api.client
    assert (await c.post("/v1/messages", json=message(), headers=auth("viewer"))).status_code == 403
    batch = {"messages": [message()]}
    assert (await c.post("/v1/messages:batch", json=batch, headers=auth("viewer"))).status_code == 403
    assert (await c.get("/v1/messages", headers=auth("viewer"))).status_code == 200
    assert (await c.get("/metrics", headers=auth("viewer"))).status_code == 200


async def test_admin_sends_as_anyone(secure_api: Api) -> None:
    r = await secure_api.client.post("/v1/messages", json=message(sender="anyone"), headers=auth("admin"))
    assert r.status_code == 201


async def test_body_and_content_limits_are_413(make_app: MakeApp) -> None:
    async with asgi(make_app(max_content_bytes=1000, workers=())) as running:
        c = running.client
        limit = running.service.options.body_limit(running.service.settings)
        r = await c.post("/v1/messages", content=b"{" + b" " * limit + b"}",
                         headers={"content-type": "application/json"})
        assert r.status_code == 413

        async def chunks():  # no Content-Length: the limit holds while streaming
            for _ in range(limit // 1000 + 2):
                yield b" " * 1000

        r = await c.post("/v1/messages", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await c.post("/v1/messages", json=message(content="x" * 1001))
        assert r.status_code == 413
        assert "limit is 1000" in r.json()["detail"]
        assert (await c.post("/v1/messages", json=message(content="x" * 1000))).status_code == 201


@pytest.mark.parametrize("body", [
    b"not json",
    b"[]",
    b'{"content": "no sender"}',
    b'{"sender_id": "pm", "content": 5}',
    b'{"sender_id": "pm", "content": "x", "unknown_field": 1}',
    b'{"sender_id": "has space", "content": "x"}',
    b'{"sender_id": "pm", "recipient_id": "a.b", "content": "x"}',
    b'{"sender_id": "pm", "recipient_id": "broadcast", "content": "x"}',
    b'{"sender_id": "pm", "content": "x", "id": "not-a-uuid"}',
    b'{"sender_id": "pm", "content": "x", "task_execution_id": 12}',
    b'{"sender_id": "pm", "content": "x", "metadata": [1]}',
    b'{"sender_id": "pm", "content": "\\ud800"}',
    b'{"sender_id": "pm", "content": "x", "message_type": ""}',
])
async def test_malformed_input_is_422_and_never_reaches_the_bus(api: Api, body: bytes) -> None:
    published: list[Delivery] = []

    async def spy(delivery: Delivery) -> None:
        published.append(delivery)

    await api.service.bus.subscribe("agent.>", spy)
    r = await api.client.post("/v1/messages", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail[0]["msg"]
    await asyncio.sleep(0.05)
    assert published == []


async def test_bad_last_event_id_is_422(api: Api) -> None:
    r = await api.client.get(f"/v1/executions/{uuid.uuid4()}/events", headers={"Last-Event-ID": "abc"})
    assert r.status_code == 422


def test_tokens_file_format(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"tokens": [
        {"token": "abcdefgh1", "role": "agent", "agent_id": "dev-1"},
        {"token": "abcdefgh2", "role": "viewer", "name": "board"},
    ]}))
    table = TokenTable.from_file(path)
    agent = table.lookup("abcdefgh1")
    assert agent is not None and agent.role is Role.AGENT and agent.agent_id == "dev-1"
    viewer = table.lookup("abcdefgh2")
    assert viewer is not None and viewer.role is Role.VIEWER and viewer.name == "board"
    assert table.lookup("abcdefgh3") is None
    assert not table.open


@pytest.mark.parametrize("doc", [
    {},
    {"tokens": []},
    {"tokens": [{"token": "short", "role": "admin"}]},
    {"tokens": [{"token": "abcdefgh1", "role": "root"}]},
    {"tokens": [{"token": "abcdefgh1", "role": "agent"}]},
    {"tokens": [{"token": "abcdefgh1", "role": "viewer", "agent_id": "x"}]},
    {"tokens": [{"token": "abcdefgh1", "role": "admin"}, {"token": "abcdefgh1", "role": "viewer"}]},
])
def test_bad_tokens_files_are_refused(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError):
        TokenTable.from_file(path)


def test_unreadable_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TokenTable.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        TokenTable.from_file(tmp_path / "bad.json")
