"""The edge is on by default and off with ``SQUADBUS_A2A=0`` (Settings.a2a)."""

from __future__ import annotations

from pathlib import Path

import pytest

from squadbus.core.errors import ConfigError
from squadbus.core.settings import Settings
from squadbus.service import ServiceOptions, create_app
from tests.service.conftest import asgi


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_setting_from_env(value: str | None, on: bool) -> None:
    env = {} if value is None else {"SQUADBUS_A2A": value}
    assert Settings.from_env(env).a2a is on


def test_setting_rejects_a_non_boolean() -> None:
    with pytest.raises(ConfigError, match="SQUADBUS_A2A"):
        Settings.from_env({"SQUADBUS_A2A": "maybe"})


@pytest.mark.parametrize("on", [True, False])
async def test_edge_mounted_only_when_on(tmp_path: Path, on: bool) -> None:
    settings = Settings(store_url=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}", a2a=on)
    app = create_app(settings, options=ServiceOptions(audit_path=str(tmp_path / "audit.jsonl")))
    async with asgi(app) as api:
        card = await api.client.get("/.well-known/agent-card.json")
        rpc = await api.client.post("/a2a/jsonrpc", json={"jsonrpc": "2.0", "id": 1, "method": "ListTasks"})
    if on:
        assert card.status_code == 200 and card.json()["supportedInterfaces"][0]["protocolVersion"] == "1.0"
        assert "securitySchemes" not in card.json()  # open mode: no token to declare
        assert rpc.json() == {"jsonrpc": "2.0", "id": 1,
                              "result": {"tasks": [], "nextPageToken": "", "pageSize": 50, "totalSize": 0}}
    else:
        assert card.status_code == 404 and rpc.status_code == 404
