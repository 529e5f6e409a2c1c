"""The dashboard's own JavaScript, run by Node against a live server (DOM stubbed, real fetch and SSE parsing)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import uuid
from pathlib import Path

import httpx

from squadbus.service.dashboard import PAGE
from squadbus.testing.servers.process import ServerUnavailable
from tests.service.conftest import MakeApp, auth, message, served

DOM_STUB = """
const elements = {};
function el(id) {
  if (!elements[id]) {
    elements[id] = {id, value: "", textContent: "", className: "", children: [], listeners: {},
      append(...kids) { this.children.push(...kids); },
      addEventListener(kind, fn) { this.listeners[kind] = fn; }};
    Object.defineProperty(elements[id], "textContent", {
      get() { return this._text ?? ""; }, set(v) { this._text = v; if (v === "") this.children = []; }});
  }
  return elements[id];
}
globalThis.document = {getElementById: el, createElement: () => el("n" + Math.random())};
const realFetch = globalThis.fetch;
globalThis.fetch = (url, opts) => realFetch(process.env.BASE + "/" + url, opts);
"""

DRIVER = """
el("exec").value = process.env.EXEC;
el("token").value = process.env.TOKEN;
el("f").listeners.submit({preventDefault() {}});
const started = Date.now();
const timer = setInterval(() => {
  const log = el("log").children;
  const failed = el("status").textContent.startsWith("error");
  if (failed || log.length >= Number(process.env.WANT) || Date.now() - started > 15000) {
    clearInterval(timer);
    console.log(JSON.stringify({snapshot: el("snap").textContent, status: el("status").textContent,
      lines: log.map((d) => d.children.map((c) => c.textContent).join(" | "))}));
    process.exit(0);
  }
}, 50);
"""


def script() -> str:
    js = PAGE.split("<script>", 1)[1].split("</script>", 1)[0]
    return DOM_STUB + js + DRIVER


async def run_node(tmp_path: Path, env: dict[str, str]) -> dict[str, object]:
    node = shutil.which("node")
    if node is None:
        raise ServerUnavailable("node is not installed (Debian package nodejs): the dashboard test needs it")
    path = tmp_path / "dashboard.mjs"
    path.write_text(script())
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


async def test_dashboard_shows_snapshot_history_and_live_messages(make_app: MakeApp, tokens_file: Path,
                                                                 tmp_path: Path) -> None:
    execution = uuid.uuid4()
    async with served(make_app(tokens_file=tokens_file)) as url, httpx.AsyncClient(base_url=url) as c:
        for i in range(2):
            r = await c.post("/v1/messages", json=message(execution=execution, content=f"hello {i}"),
                             headers=auth("pm"))
            assert r.status_code == 201
        page = await c.get("/")
        assert page.text == PAGE

        async def later() -> None:
            # Only once the page is connected: its snapshot is taken before it joins the live feed, so
            # a message posted earlier would be in the snapshot rather than arrive live.
            async with asyncio.timeout(20):
                while True:
                    text = (await c.get("/metrics", headers=auth("viewer"))).text
                    viewers = re.search(r"^squadbus_sse_viewers (\S+)$", text, re.MULTILINE)
                    if viewers is not None and float(viewers.group(1)) >= 1:
                        break
                    await asyncio.sleep(0.02)
            await c.post("/v1/messages", json=message(execution=execution, content="live one"), headers=auth("pm"))

        poster = asyncio.create_task(later())
        env = {"BASE": url, "EXEC": str(execution), "TOKEN": "viewer-token-1", "WANT": "3", "PATH": "/usr/bin:/bin"}
        result = await run_node(tmp_path, env)
        await poster
    assert result["status"] == "live"
    assert str(result["snapshot"]).startswith("2 messages, seq 1..2")
    lines = result["lines"]
    assert isinstance(lines, list) and len(lines) == 3
    assert [line.split(" | ")[1] for line in lines] == ["hello 0", "hello 1", "live one"]
    assert lines[0].startswith("#1 ") and "pm → dev-1 [message]" in lines[0]


async def test_dashboard_reports_a_refused_token(make_app: MakeApp, tokens_file: Path, tmp_path: Path) -> None:
    async with served(make_app(tokens_file=tokens_file)) as url:
        env = {"BASE": url, "EXEC": str(uuid.uuid4()), "TOKEN": "wrong-token", "WANT": "1", "PATH": "/usr/bin:/bin"}
        result = await run_node(tmp_path, env)
    assert str(result["status"]).startswith("error 401")
