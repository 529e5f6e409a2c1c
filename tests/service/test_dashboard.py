"""The dashboard: its files are served by squadbus with nothing from elsewhere, and its script's core
(API errors, the executions list, the SSE client with resume, the conversation summary) run by Node
against a live server. The DOM views are left to the browser tests (issue 18)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tomllib
import uuid
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import httpx

from squadbus.service.dashboard import ASSETS, asset
from squadbus.testing.servers.process import ServerUnavailable
from tests.service.conftest import MakeApp, asgi, auth, message, served

ROOT = Path(__file__).resolve().parents[2]
URL = re.compile(r"https?://\S*")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


async def test_the_page_and_its_assets_are_served_with_nothing_from_elsewhere(make_app: MakeApp) -> None:
    async with asgi(make_app()) as api:
        page = await api.client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assets = re.findall(r"""(?:src|href)="([^"#]+)\"""", page.text)
        assert set(assets) >= {"static/dashboard/dashboard.js", "static/dashboard/dashboard.css", "favicon.ico"}
        texts = {"/": page.text}
        for path, media in ((f"{ASSETS}/dashboard.js", "text/javascript"), (f"{ASSETS}/dashboard.css", "text/css")):
            r = await api.client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == f"{media}; charset=utf-8"
            texts[path] = r.text
        for path in assets:
            assert (await api.client.get("/" + path)).status_code == 200, path
    for path, text in texts.items():
        # the SVG namespace name is an identifier (createElementNS), nothing is fetched from it
        named = [u.rstrip('";,)') for u in URL.findall(text)]
        assert [u for u in named if u != SVG_NAMESPACE] == [], f"{path} names a URL elsewhere"
        assert "//cdn" not in text and 'src="//' not in text and 'href="//' not in text, path


async def test_favicon_is_served(make_app: MakeApp) -> None:
    async with asgi(make_app()) as api:
        r = await api.client.get("/favicon.ico")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/svg+xml"
    assert r.content.startswith(b"<svg")


async def test_the_script_uses_endpoints_that_exist(make_app: MakeApp) -> None:
    js = asset("dashboard.js").decode()
    async with asgi(make_app()) as api:
        paths = (await api.client.get("/openapi.json")).json()["paths"]
    assert "/v1/executions" in paths and "/v1/executions/{execution_id}/events" in paths
    assert 'const EXECUTIONS = "v1/executions";' in js
    assert "${EXECUTIONS}/${encodeURIComponent(executionId)}/events" in js
    assert "Last-Event-ID" in js and "Bearer " in js


def test_every_dashboard_file_is_package_data() -> None:
    """A wheel install has the page: each file matches a package-data pattern of squadbus.service."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [f.name for f in resources.files("squadbus.service").joinpath("static", "dashboard").iterdir()]
    assert sorted(files) == ["dashboard.css", "dashboard.js", "index.html"]
    for name in files:
        assert any(fnmatch(f"static/dashboard/{name}", p) for p in patterns["squadbus.service"]), name


NODE_SHIM = """
const realFetch = globalThis.fetch;
globalThis.fetch = (url, opts) => realFetch(process.env.BASE + "/" + url, opts);
"""

NODE_DRIVER = """
const EXEC = process.env.EXEC, TOKEN = process.env.TOKEN;
const out = {};
try { await apiGet(executionsQuery(), ""); } catch (e) { out.noToken = e.message; }
try { await apiGet(`${EXECUTIONS}/not-a-uuid`, TOKEN); } catch (e) { out.badUuid = e.message; }
const page = await apiGet(executionsQuery({q: EXEC.slice(0, 8)}), TOKEN);
out.listed = page.items.map((x) => [x.task_execution_id, x.message_count, x.message_types]);
out.refused = await new Promise((resolve) => {
  followStream(eventsPath(EXEC), "wrong-token", {onStatus() {}, onEvent() {}, onError: (e) => resolve(e.message)});
});
const conv = new Conversation();
out.rows = [];
out.summaries = [];
await new Promise((resolve) => {
  const stop = followStream(eventsPath(EXEC), TOKEN, {
    onStatus(s) { out.status = s; },
    onError(e) { out.error = e.message; stop(); resolve(); },
    onEvent(kind, data) {
      if (kind === "snapshot") conv.snapshot(data);
      else if (kind === "message" && conv.add(data) !== null) {
        out.rows.push(`${data.seq} ${data.sender_id} → ${recipientLabel(data)} ${data.content}`);
      }
      out.summaries.push(conv.summary());
      if (out.rows.length >= Number(process.env.WANT)) { stop(); resolve(); }
    },
  });
  setTimeout(() => { stop(); resolve(); }, 15000);
});
// a reply placed with its request, a repeated seq ignored
const pair = new Conversation();
pair.add({id: "r1", seq: 1, sender_id: "pm", recipient_id: "dev-1", headers: {reply_to: "agent.reply.x.r1"}});
const link = pair.add({id: "a1", seq: 2, sender_id: "dev-1", recipient_id: "pm", headers: {correlation_id: "r1"}});
out.pairedWith = link.request && link.request.id;
out.repeat = pair.add({id: "a1", seq: 2, sender_id: "dev-1", recipient_id: "pm", headers: {}});
out.relative = [relativeTime("2026-01-01T00:00:00Z", Date.parse("2026-01-01T00:05:30Z")), relativeTime("x")];
console.log(JSON.stringify(out));
process.exit(0);
"""


async def run_node(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    node = shutil.which("node")
    if node is None:
        raise ServerUnavailable("node is not installed (Debian package nodejs): the dashboard test needs it")
    path = tmp_path / "dashboard.mjs"
    path.write_text(NODE_SHIM + asset("dashboard.js").decode() + NODE_DRIVER)
    proc = await asyncio.create_subprocess_exec(node, str(path), env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_script_core_lists_streams_and_reports_errors_against_a_live_server(
        make_app: MakeApp, tokens_file: Path, tmp_path: Path) -> None:
    execution = uuid.uuid4()
    async with served(make_app(tokens_file=tokens_file)) as url, httpx.AsyncClient(base_url=url) as c:
        bodies = [message(execution=execution, content="hello 0"),
                  message(execution=execution, content="to dev", recipient_id=None, domain="dev", message_type="plan"),
                  message(execution=execution, content="to all", recipient_id=None)]
        for body in bodies:
            r = await c.post("/v1/messages", json=body, headers=auth("pm"))
            assert r.status_code == 201, r.text

        async def later() -> None:
            # Only once the script is connected, so that this message arrives live rather than in the snapshot.
            async with asyncio.timeout(20):
                while True:
                    text = (await c.get("/metrics", headers=auth("viewer"))).text
                    viewers = re.search(r"^squadbus_sse_viewers (\S+)$", text, re.MULTILINE)
                    if viewers is not None and float(viewers.group(1)) >= 1:
                        break
                    await asyncio.sleep(0.02)
            await c.post("/v1/messages", json=message(execution=execution, content="live one"), headers=auth("pm"))

        poster = asyncio.create_task(later())
        env = {"BASE": url, "EXEC": str(execution), "TOKEN": "viewer-token-1", "WANT": "4", "PATH": "/usr/bin:/bin"}
        result = await run_node(tmp_path, env)
        await poster
    assert result["noToken"] == "a token is needed (HTTP 401): missing bearer token"
    assert str(result["badUuid"]).startswith("the request was refused (HTTP 422): execution_id: ")
    assert "{" not in str(result["badUuid"])
    assert result["listed"] == [[str(execution), 3, ["message", "plan"]]]
    assert str(result["refused"]).startswith("a token is needed (HTTP 401)")
    assert "error" not in result and result["status"] == "live"
    assert result["rows"] == ["1 pm → dev-1 hello 0", "2 pm → #dev to dev", "3 pm → * to all", "4 pm → dev-1 live one"]
    summaries = result["summaries"]
    assert isinstance(summaries, list)
    assert summaries[0] == "3 messages · 2 agents: dev-1, pm"
    assert summaries[-1] == "4 messages · 2 agents: dev-1, pm"
    assert result["pairedWith"] == "r1"
    assert result["repeat"] is None
    assert result["relative"] == ["5 min ago", ""]


NODE_HELPERS = """
const out = {};
const metrics = parseMetrics([
  '# TYPE squadbus_info gauge', 'squadbus_info{backend="nats",version="0.1.0"} 1.0',
  'squadbus_group_figures_up 1.0',
  'squadbus_group_lag{group="db-writer",subject="agent.>"} 3.0',
  'squadbus_group_lag{group="billing",subject="agent.message.>"} 2.0',
  'squadbus_group_lag{group="billing",subject="agent.reply.>"} 5.0',
  'squadbus_group_pending{group="billing",subject="agent.message.>"} 1.0',
  'squadbus_group_dead_letters{group="billing"} 4.0', ''].join("\\n"));
out.metrics = {backend: metrics.backend, version: metrics.version, reported: metrics.groupsReported,
  up: metrics.groupsUp, groups: metrics.groups};
const bare = parseMetrics('squadbus_info{backend="kafka",version="0.1.0"} 1.0\\n');
out.bare = {backend: bare.backend, reported: bare.groupsReported, groups: bare.groups};
const rates = new RateWindow(60);
const now = Date.parse("2026-12-04T12:00:30Z");
for (let i = 0; i < 20; i++) rates.add("plan", now - 1000);
rates.add("task", now);
rates.add("old", now - 120000);
const series = rates.series(now);
out.rates = {types: series.types, seconds: series.seconds.length, last: [...series.seconds[59].counts],
  plan: rates.rates(now).get("plan")};
const layout = sequenceLayout([
  {id: "1", seq: 1, sender_id: "pm", recipient_id: "dev-1", message_type: "plan", content: "x", headers: {}},
  {id: "2", seq: 2, sender_id: "dev-1", recipient_id: null, domain: "dev", message_type: "m", content: "y"},
  {id: "3", seq: 3, sender_id: "qa", recipient_id: null, domain: null, message_type: "m", content: "z"},
  {id: "4", seq: 4, sender_id: "dev-1", recipient_id: "pm", message_type: "m", content: "w",
   headers: {correlation_id: "1"}}]);
out.layout = {lanes: layout.lanes, arrows: layout.arrows.map((a) => [a.from, a.to, a.broadcast, a.reply])};
out.paths = [deadLettersQuery({group: "billing"}), redrivePath("a b"), redriveGroupPath("g:1"),
  executionsQuery({type: "plan", period: "1h", now: Date.parse("2026-12-04T12:00:00Z")})];
console.log(JSON.stringify(out));
"""


async def test_script_helpers_for_metrics_rates_sequence_and_dead_letters(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        raise ServerUnavailable("node is not installed (Debian package nodejs): the dashboard test needs it")
    path = tmp_path / "helpers.mjs"
    path.write_text(asset("dashboard.js").decode() + NODE_HELPERS)
    proc = await asyncio.create_subprocess_exec(node, str(path), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["metrics"] == {
        "backend": "nats", "version": "0.1.0", "reported": True, "up": True,
        "groups": [{"group": "billing", "lag": 7, "pending": 1, "dead_letters": 4},
                   {"group": "db-writer", "lag": 3, "pending": None, "dead_letters": None}]}
    assert result["bare"] == {"backend": "kafka", "reported": False, "groups": []}
    assert result["rates"] == {"types": ["plan", "task"], "seconds": 60, "last": [["task", 1]], "plan": 2}
    assert result["layout"] == {
        "lanes": ["pm", "dev-1", "qa", "#dev", "* (squad)"],
        "arrows": [["pm", "dev-1", False, False], ["dev-1", "#dev", True, False], ["qa", "* (squad)", True, False],
                   ["dev-1", "pm", False, True]]}
    assert result["paths"] == ["v1/dead-letters?limit=50&state=dead&group=billing", "v1/dead-letters/a%20b:redrive",
                               "v1/dead-letters:redrive?group=g%3A1",
                               "v1/executions?limit=50&type=plan&since=2026-12-04T11%3A00%3A00.000Z"]
