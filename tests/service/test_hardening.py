"""Bad input and misuse of the HTTP service (issue 16): each answer is a clean 4xx, never a 500."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from squadbus.store import position_cursor
from tests.service.conftest import Api, MakeApp, asgi, auth, message, read_events, served

SURROGATE_FIELDS = ("message_type", "recipient_id", "domain", "sender_id")


@pytest.mark.parametrize("field", SURROGATE_FIELDS)
async def test_lone_surrogate_in_a_field_is_a_422(secure_api: Api, field: str) -> None:
    # json.dumps escapes the lone surrogate: valid JSON text, not a valid Unicode string
    body = json.dumps({"sender_id": "pm", "content": "x", field: "a\ud800b"})
    assert "\\ud800" in body
    r = await secure_api.client.post("/v1/messages", content=body,
                                     headers={**auth("admin"), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][0] == "body"
    page = (await secure_api.client.get("/v1/messages", headers=auth("admin"))).json()
    assert page["items"] == []


async def test_lone_surrogate_in_a_batch_is_a_422(secure_api: Api) -> None:
    body = '{"messages": [{"sender_id": "pm", "content": "x", "message_type": "\\udfff"}]}'
    r = await secure_api.client.post("/v1/messages:batch", content=body,
                                     headers={**auth("admin"), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text


async def test_agent_tokens_cannot_read_metrics(secure_api: Api) -> None:
    assert (await secure_api.client.get("/metrics", headers=auth("pm"))).status_code == 403
    assert (await secure_api.client.get("/metrics", headers=auth("viewer"))).status_code == 200
    assert (await secure_api.client.get("/metrics", headers=auth("admin"))).status_code == 200
    assert (await secure_api.client.get("/metrics")).status_code == 401


@pytest.mark.parametrize("value", [str(2**63), str(2**64 + 5), "9" * 39, str(2**62 + 1)])
async def test_huge_last_event_id_is_refused_before_streaming(secure_api: Api, value: str) -> None:
    execution = uuid.uuid4()
    for path in (f"/v1/executions/{execution}/events", "/v1/events"):
        r = await secure_api.client.get(path, headers={**auth("admin"), "Last-Event-ID": value})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]


@pytest.mark.parametrize("value", ["+5", "1_000", "\u0661\u0662", "0x10", "-1"])
async def test_last_event_id_is_plain_ascii_digits(secure_api: Api, value: str) -> None:
    r = await secure_api.client.get(f"/v1/executions/{uuid.uuid4()}/events",
                                    headers={**auth("admin"), "Last-Event-ID": value.encode()})
    assert r.status_code == 422, r.text


async def test_largest_last_event_id_still_streams(make_app: MakeApp, tokens_file: Path) -> None:
    execution = uuid.uuid4()
    app = make_app(tokens_file=tokens_file)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=15, headers=auth("admin")) as c, \
            c.stream("GET", f"/v1/executions/{execution}/events",
                     headers={"Last-Event-ID": str(2**62)}) as resp:
        assert resp.status_code == 200
        [snapshot] = await read_events(resp, 1)
        assert snapshot.event == "snapshot"


async def test_405_lists_every_method_of_the_path(secure_api: Api) -> None:
    r = await secure_api.client.put("/v1/messages", headers=auth("admin"))
    assert r.status_code == 405
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["GET", "POST"]
    r = await secure_api.client.delete(f"/v1/messages/{uuid.uuid4()}", headers=auth("admin"))
    assert r.status_code == 405
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["GET"]


# ---- open mode: loopback only, in the app itself ------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "attacker.example:8000", "10.0.0.5", "127.0.0.1.nip.io",
                                  "localhost.evil.example"])
async def test_open_mode_refuses_foreign_host_headers(api: Api, host: str) -> None:
    # DNS rebinding: the browser connects to 127.0.0.1 but names the attacker's host
    r = await api.client.get("/v1/messages", headers={"Host": host})
    assert r.status_code == 403, r.text
    r = await api.client.post("/v1/messages", json=message(), headers={"Host": host})
    assert r.status_code == 403
    assert (await api.client.get("/v1/messages")).json()["items"] == []


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:8000", "[::1]:8000",
                                  "127.1.2.3"])
async def test_open_mode_accepts_loopback_host_headers(api: Api, host: str) -> None:
    r = await api.client.get("/v1/messages", headers={"Host": host})
    assert r.status_code == 200, r.text


async def test_open_mode_refuses_clients_off_loopback(make_app: MakeApp) -> None:
    # what `uvicorn squadbus.service:create_app --factory --host 0.0.0.0` without tokens would see
    app = make_app()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            r = await client.post("/v1/messages", json=message())
            assert r.status_code == 403, r.text
            assert "loopback" in r.json()["detail"]
            assert (await client.get("/healthz")).status_code == 403
    async with asgi(make_app()) as running:
        assert (await running.client.get("/v1/messages")).json()["items"] == []


async def test_with_tokens_any_host_and_client_is_served(make_app: MakeApp, tokens_file: Path) -> None:
    app = make_app(tokens_file=tokens_file)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://squad.example") as client:
            r = await client.post("/v1/messages", json=message(), headers=auth("pm"))
            assert r.status_code == 201, r.text


@pytest.mark.parametrize("position", [2**63, 2**70])
async def test_cursor_past_int64_is_a_422(secure_api: Api, position: int) -> None:
    r = await secure_api.client.get("/v1/messages", params={"cursor": position_cursor(position)},
                                    headers=auth("admin"))
    assert r.status_code == 422, r.text


async def test_batch_over_500_is_a_422_with_nothing_sent(api: Api) -> None:
    execution = uuid.uuid4()
    bodies = [message(execution=execution, content=f"m{i}") for i in range(501)]
    r = await api.client.post("/v1/messages:batch", json={"messages": bodies})
    assert r.status_code == 422
    page = (await api.client.get("/v1/messages", params={"task_execution_id": str(execution)})).json()
    assert page["items"] == []
