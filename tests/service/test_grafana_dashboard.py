"""deploy/grafana/squadbus-dashboard.json: valid for import, and every metric it queries is in a live /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from squadbus.backends.dual import DualBackend
from squadbus.backends.memory import MemoryBackend
from squadbus.core.bus import Bus
from tests.service.conftest import MakeApp, asgi, message

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "squadbus-dashboard.json"
NAME = re.compile(r"\bsquadbus_[a-z0-9_]*[a-z0-9]\b")
NAME_REGEX = re.compile(r'__name__=~"([^"]+)"')
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("_info",)}


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", ())


def queries(doc: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in panels(doc) for t in p.get("targets", ())]
    found += [v["query"]["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return found


def test_the_dashboard_imports_with_a_prometheus_input() -> None:
    doc = load()
    assert 36 <= doc["schemaVersion"] <= 41
    (source,) = doc["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(doc):
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", ()):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    titles = {p["title"] for p in panels(doc)}
    for wanted in ("Messages/s in by type", "Publish latency", "Handle latency", "Lag per group", "Pending per group",
                   "Dead letters per group", "Redeliveries", "SSE viewers", "Store write lag", "Backend figures"):
        assert wanted in titles


async def test_every_metric_the_dashboard_queries_is_exported(make_app: MakeApp) -> None:
    # dual:// so a backend reports figures of its own (squadbus_backend_*); every worker runs
    async with Bus(DualBackend(MemoryBackend(), MemoryBackend())) as bus, asgi(make_app(bus=bus)) as api:
        assert (await api.client.post("/v1/messages", json=message())).status_code == 201
        text = (await api.client.get("/metrics")).text
    exported = set()
    for family in text_string_to_metric_families(text):
        exported.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    doc = load()
    used = set()
    for expr in queries(doc):
        for pattern in NAME_REGEX.findall(expr):
            assert any(re.fullmatch(pattern, name) for name in exported), f"nothing exported matches {pattern}"
        used.update(NAME.findall(NAME_REGEX.sub("", expr)))
    assert used, "the dashboard queries squadbus metrics"
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    for wanted in ("squadbus_group_lag", "squadbus_group_pending", "squadbus_group_dead_letters",
                   "squadbus_group_redeliveries", "squadbus_publish_latency_seconds_bucket",
                   "squadbus_handler_latency_seconds_bucket", "squadbus_consumer_lag_seconds_bucket",
                   "squadbus_sse_viewers", "squadbus_dead_letters_total"):
        assert wanted in used, wanted
