"""A minimal dashboard at ``/``: watch one execution's SSE stream in the browser.

It uses ``fetch`` with a streaming body rather than ``EventSource`` so it can
send the bearer token in a header (tokens never go into URLs) and resumes with
``Last-Event-ID`` after a dropped connection.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>squadbus</title>
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;max-width:70em}
 input{font:inherit;padding:.2em} #exec{width:24em} #log{margin-top:1em}
 .m{border-bottom:1px solid #ddd;padding:.3em 0} .meta{color:#666;font-size:12px}
 #status{color:#555;margin-left:1em} .gap{color:#a40}
</style></head><body>
<h1>squadbus</h1>
<form id="f">
 <label>Execution <input id="exec" placeholder="task_execution_id (UUID)" required></label>
 <label>Token <input id="token" type="password" placeholder="bearer token (if required)"></label>
 <button>Watch</button><span id="status"></span>
</form>
<div id="snap" class="meta"></div><div id="log"></div>
<script>
"use strict";
let ctrl = null, lastId = null;
const $ = (id) => document.getElementById(id);
function show(kind, data) {
  if (kind === "snapshot") {
    $("snap").textContent = `${data.message_count} messages, seq ${data.first_seq}..${data.last_seq}, ` +
      `agents: ${data.agents.join(", ")}`;
    return;
  }
  const div = document.createElement("div");
  div.className = kind === "gap" ? "m gap" : "m";
  if (kind === "gap") { div.textContent = `gap: seq ${data.from_seq}..${data.to_seq} (${data.reason})`; }
  else {
    const meta = document.createElement("div"); meta.className = "meta";
    meta.textContent = `#${data.seq} ${data.created_at} ${data.sender_id} → ` +
      `${data.recipient_id ?? "(broadcast)"} [${data.message_type}]`;
    const body = document.createElement("div"); body.textContent = data.content;
    div.append(meta, body);
  }
  $("log").append(div);
}
async function watch(exec, token) {
  ctrl = new AbortController();
  const headers = {};
  if (token) headers["Authorization"] = "Bearer " + token;
  if (lastId !== null) headers["Last-Event-ID"] = lastId;
  $("status").textContent = "connecting…";
  const resp = await fetch(`v1/executions/${encodeURIComponent(exec)}/events`, {headers, signal: ctrl.signal});
  if (!resp.ok) { $("status").textContent = `error ${resp.status}: ${await resp.text()}`; return false; }
  $("status").textContent = "live";
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return true;
    buf += value;
    let end;
    while ((end = buf.indexOf("\\n\\n")) >= 0) {
      const block = buf.slice(0, end); buf = buf.slice(end + 2);
      let kind = "message", data = "", id = null;
      for (const line of block.split("\\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
        else if (line.startsWith("id: ")) id = line.slice(4);
      }
      if (id !== null) lastId = id;
      if (data) show(kind, JSON.parse(data));
    }
  }
}
$("f").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (ctrl) ctrl.abort();
  lastId = null; $("log").textContent = ""; $("snap").textContent = "";
  const exec = $("exec").value.trim(), token = $("token").value.trim();
  for (;;) {
    try { if (!(await watch(exec, token))) return; } catch (e) { if (e.name === "AbortError") return; }
    $("status").textContent = "reconnecting…";
    await new Promise((r) => setTimeout(r, 2000));
  }
});
</script></body></html>
"""


@router.get("/", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The dashboard page (static; it authenticates its SSE request itself)."""
    return HTMLResponse(PAGE)
