// The squadbus dashboard: the executions list and one execution's conversation, live.
// Plain script, no build step and no external asset. The first part (up to "DOM") touches no DOM, so the
// tests run it in Node against a live server; the rest renders the views.
"use strict";

const TOKEN_KEY = "squadbus.token";
const EXECUTIONS = "v1/executions";
const PAGE_SIZE = 50;
const FOLD_CHARS = 400;
const FOLD_LINES = 6;
const RECONNECT_MS = 2000;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** An API answer that was not 2xx: the status and a sentence for the page (never raw JSON). */
class ApiError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

function eventsPath(executionId) {
  return `${EXECUTIONS}/${encodeURIComponent(executionId)}/events`;
}

function authHeaders(token) {
  return token ? {Authorization: "Bearer " + token} : {};
}

/** The sentence for an error body: FastAPI's {"detail": str | [{loc, msg}]} or plain text. */
function errorText(status, body) {
  let detail = null;
  try { detail = JSON.parse(body).detail; } catch (e) { detail = null; }
  if (Array.isArray(detail)) {
    detail = detail.map((d) => {
      const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "path" && p !== "query").join(".") : "";
      return where ? `${where}: ${d.msg}` : String(d.msg);
    }).join("; ");
  }
  if (typeof detail !== "string" || !detail) detail = body && body.length < 200 && !body.startsWith("{") ? body : "";
  const what = {401: "a token is needed", 403: "this token may not do that", 404: "not found",
    422: "the request was refused", 503: "the service is unavailable"}[status] || "the request failed";
  return `${what} (HTTP ${status})${detail ? ": " + detail : ""}`;
}

/** GET a JSON document from the API; throws ApiError with a readable message. */
async function apiGet(path, token) {
  let resp;
  try {
    resp = await fetch(path, {headers: authHeaders(token)});
  } catch (e) {
    throw new ApiError(0, `cannot reach the squadbus service (${e.message})`);
  }
  if (!resp.ok) throw new ApiError(resp.status, errorText(resp.status, await resp.text()));
  return resp.json();
}

function executionsQuery({q = "", agent = "", cursor = null, limit = PAGE_SIZE} = {}) {
  const params = new URLSearchParams({limit: String(limit)});
  if (q) params.set("q", q);
  if (agent) params.set("agent", agent);
  if (cursor) params.set("cursor", cursor);
  return `${EXECUTIONS}?${params}`;
}

/** Who a message went to: the recipient, "#domain" for a domain broadcast, "*" for the whole squad. */
function recipientLabel(m) {
  if (m.recipient_id) return m.recipient_id;
  if (m.domain) return "#" + m.domain;
  return "*";
}

/** "5 s ago", "3 min ago", "2 h ago", "4 d ago" (then the date) from an ISO time. */
function relativeTime(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "";
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  if (s < 7 * 86400) return `${Math.floor(s / 86400)} d ago`;
  return new Date(t).toISOString().slice(0, 10);
}

/** A stable hue per message type, so a type keeps its colour everywhere. */
function typeHue(type) {
  let h = 0;
  for (const ch of String(type)) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

/**
 * Follow an SSE stream with fetch (the bearer token goes in a header, never in the URL, so EventSource,
 * which cannot set headers, is not used) and resume with Last-Event-ID after a dropped connection.
 * handlers: onEvent(kind, data), onStatus(text), onError(ApiError) (then it stops). Returns a stop function.
 */
function followStream(path, token, handlers) {
  const ctrl = new AbortController();
  let lastId = null;
  async function once() {
    const headers = authHeaders(token);
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    handlers.onStatus("connecting…");
    const resp = await fetch(path, {headers, signal: ctrl.signal});
    if (!resp.ok) throw new ApiError(resp.status, errorText(resp.status, await resp.text()));
    handlers.onStatus("live");
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buf += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        let kind = "message", data = "", id = null;
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) kind = line.slice(7);
          else if (line.startsWith("data: ")) data += (data ? "\n" : "") + line.slice(6);
          else if (line.startsWith("id: ")) id = line.slice(4);
        }
        if (id !== null) lastId = id;
        if (data) handlers.onEvent(kind, JSON.parse(data));
      }
    }
  }
  (async () => {
    while (!ctrl.signal.aborted) {
      try {
        await once();
      } catch (e) {
        if (ctrl.signal.aborted) return;
        if (e instanceof ApiError) { handlers.onError(e); return; }
      }
      if (ctrl.signal.aborted) return;
      handlers.onStatus("reconnecting…");
      await new Promise((r) => setTimeout(r, RECONNECT_MS));
    }
  })();
  return () => ctrl.abort();
}

/**
 * The state of one execution's conversation, fed by stream events: messages by seq (a repeated seq is
 * ignored), the summary (count, agents) kept current, and each reply paired with its request
 * (headers.correlation_id = the request's id).
 */
class Conversation {
  constructor() {
    this.seqs = new Set();
    this.byId = new Map();
    this.count = 0;
    this.baseSeq = 0;
    this.agents = new Set();
  }
  snapshot(s) {
    // A snapshot (first event of every connection) counts everything up to its last_seq.
    this.count = s.message_count;
    this.baseSeq = s.last_seq || 0;
    for (const a of s.agents || []) this.agents.add(a);
  }
  /** Record a message; returns {request} (the message it answers, if shown) or null for a repeat. */
  add(m) {
    if (m.seq !== null && m.seq !== undefined) {
      if (this.seqs.has(m.seq)) return null;
      this.seqs.add(m.seq);
      if (m.seq > this.baseSeq) { this.count += 1; this.baseSeq = m.seq; }
    }
    this.agents.add(m.sender_id);
    if (m.recipient_id) this.agents.add(m.recipient_id);
    this.byId.set(m.id, m);
    const corr = (m.headers || {}).correlation_id;
    return {request: corr ? this.byId.get(corr) || null : null, correlation: corr || null};
  }
  summary() {
    const agents = [...this.agents].sort();
    const n = this.count;
    return `${n} message${n === 1 ? "" : "s"} · ${agents.length} agent${agents.length === 1 ? "" : "s"}` +
      (agents.length ? ": " + agents.join(", ") : "");
  }
}

// ---- DOM ---------------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) el.append(kid);
  return el;
}

function tag(type) {
  return h("span", {class: "tag", style: `--hue: ${typeHue(type)}`}, type);
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

let stopView = () => {};

function view() { return document.getElementById("view"); }

function showError(target, err, retry) {
  if (err instanceof ApiError && err.status === 401) { askToken(retry, err); return; }
  target.replaceChildren(h("div", {class: "error"}, err.message || String(err)));
}

/** The service has tokens: ask for one once, keep it for this tab, then retry what failed. */
function askToken(retry, err) {
  const input = h("input", {type: "password", autocomplete: "off", placeholder: "bearer token"});
  const had = token();
  const form = h("form", {class: "token", onsubmit: (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    showWho();
    retry();
  }},
  h("h1", {}, "A token is needed"),
  h("p", {class: "muted"}, had ? `The service refused the token of this tab (${err.message}).`
    : "This squadbus service requires a bearer token (viewer, agent or admin) from its tokens file."),
  input, h("button", {}, "Use this token"),
  h("p", {class: "muted"}, "It is kept in this browser tab only (sessionStorage)."));
  view().replaceChildren(form);
  input.focus();
}

function showWho() {
  const who = document.getElementById("who");
  who.replaceChildren();
  if (token()) {
    who.append("token set · ", h("a", {href: "#", onclick: (ev) => {
      ev.preventDefault(); sessionStorage.removeItem(TOKEN_KEY); showWho(); route();
    }}, "forget"));
  }
}

function emptyState() {
  const base = `${location.origin}${location.pathname}`;
  return h("div", {class: "empty"},
    h("p", {}, "No executions yet. Messages that carry a task_execution_id appear here as they are sent. " +
      "Send a first one with the CLI (any UUID, e.g. from uuidgen):"),
    h("pre", {}, 'squadbus send pm dev-1 "hello" --execution <uuid>'),
    h("p", {}, "or over HTTP (add -H 'Authorization: Bearer <token>' when the service has tokens):"),
    h("pre", {}, `curl -X POST ${base}v1/messages -H 'Content-Type: application/json' \\\n` +
      `  -d '{"sender_id": "pm", "recipient_id": "dev-1", "content": "hello", "task_execution_id": "<uuid>"}'`));
}

function executionRow(x) {
  const id = x.task_execution_id;
  const more = (n, shown) => (n > shown ? h("span", {class: "muted"}, ` +${n - shown}`) : null);
  return h("tr", {},
    h("td", {class: "mono"}, h("a", {href: `#/executions/${id}`, title: id}, id.slice(0, 8))),
    h("td", {title: x.last_activity_at}, h("span", {class: "rel", "data-at": x.last_activity_at},
      relativeTime(x.last_activity_at))),
    h("td", {class: "num"}, String(x.message_count)),
    h("td", {}, x.agents.join(", "), more(x.agent_count, x.agents.length)),
    h("td", {}, ...x.message_types.map(tag), more(x.message_type_count, x.message_types.length)));
}

function executionsView(params) {
  const q = params.get("q") || "", agent = params.get("agent") || "";
  const qInput = h("input", {name: "q", value: q, placeholder: "execution id (prefix)", size: "30"});
  const agentInput = h("input", {name: "agent", value: agent, placeholder: "agent id", size: "16"});
  const search = h("form", {class: "search", onsubmit: (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    if (qInput.value.trim()) next.set("q", qInput.value.trim());
    if (agentInput.value.trim()) next.set("agent", agentInput.value.trim());
    location.hash = "#/executions" + (next.toString() ? "?" + next : "");
  }}, qInput, agentInput, h("button", {}, "Search"));
  const body = h("tbody");
  const table = h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Execution"), h("th", {}, "Last activity"),
    h("th", {class: "num"}, "Messages"), h("th", {}, "Agents"), h("th", {}, "Types"))), body);
  const out = h("div", {}, h("p", {class: "muted"}, "Loading…"));
  view().replaceChildren(h("h1", {}, "Executions"), search, out);

  async function load(cursor) {
    let page;
    try {
      page = await apiGet(executionsQuery({q, agent, cursor}), token());
    } catch (e) {
      if (cursor) out.append(h("div", {class: "error"}, e.message)); else showError(out, e, route);
      return;
    }
    if (!cursor) {
      if (!page.items.length) {
        out.replaceChildren(q || agent ? h("p", {class: "muted"}, "No execution matches this search.") : emptyState());
        return;
      }
      out.replaceChildren(table);
    }
    for (const x of page.items) body.append(executionRow(x));
    out.querySelector(".more")?.remove();
    if (page.next_cursor) {
      out.append(h("button", {class: "more", onclick: (ev) => { ev.target.disabled = true; load(page.next_cursor); }},
        "More"));
    }
  }
  load(null);
  const timer = setInterval(() => {
    for (const el of document.querySelectorAll(".rel")) el.textContent = relativeTime(el.dataset.at);
  }, 15000);
  return () => clearInterval(timer);
}

function contentBlock(text) {
  const long = text.length > FOLD_CHARS || text.split("\n").length > FOLD_LINES;
  const div = h("div", {class: long ? "content folded" : "content"}, text);
  if (!long) return [div];
  const toggle = h("button", {class: "toggle", type: "button"}, `show all (${text.length} characters)`);
  const flip = () => {
    const folded = div.classList.toggle("folded");
    toggle.textContent = folded ? `show all (${text.length} characters)` : "fold";
  };
  div.addEventListener("click", () => { if (div.classList.contains("folded")) flip(); });
  toggle.addEventListener("click", flip);
  return [div, toggle];
}

function messageRow(m, link) {
  const at = m.created_at;
  const time = new Date(at);
  const note = link.correlation && !link.request
    ? h("span", {class: "note"}, `↳ reply to ${link.correlation.slice(0, 8)}`) : null;
  const isRequest = Boolean((m.headers || {}).reply_to);
  return h("div", {class: link.request ? "msg reply" : "msg", id: `m-${m.id}`, "data-seq": String(m.seq)},
    h("div", {class: "time", title: `${at} · seq ${m.seq}`}, Number.isNaN(time.getTime()) ? "" : time.toLocaleTimeString()),
    h("div", {}, h("span", {class: "route"}, m.sender_id, h("span", {class: "to"}, " → "), recipientLabel(m)), " ",
      tag(m.message_type), isRequest ? h("span", {class: "note"}, "request") : null, note),
    ...contentBlock(m.content));
}

function executionView(id) {
  if (!UUID_RE.test(id)) {
    view().replaceChildren(h("h1", {}, "Execution"), h("div", {class: "error"},
      `"${id}" is not an execution id: an execution id is a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427.`),
    h("p", {}, h("a", {href: "#/executions"}, "← all executions")));
    return () => {};
  }
  const conv = new Conversation();
  const status = h("span", {class: "status muted"}, "");
  const summary = h("div", {class: "summary"}, "");
  const list = h("div", {class: "conversation"});
  const empty = h("p", {class: "muted"}, "No message in this execution yet: new ones appear here as they are sent.");
  view().replaceChildren(h("p", {}, h("a", {href: "#/executions"}, "← all executions")),
    h("h1", {}, "Execution ", h("span", {class: "mono"}, id), status), summary, list);
  const lastReply = new Map(); // request id -> the row its newest reply was placed after
  const stop = followStream(eventsPath(id), token(), {
    onStatus(text) { status.textContent = text; status.classList.toggle("live", text === "live"); },
    onError(err) { status.textContent = ""; showError(view(), err, route); },
    onEvent(kind, data) {
      if (kind === "snapshot") {
        conv.snapshot(data);
        if (!conv.seqs.size && !data.message_count) list.replaceChildren(empty);
      } else if (kind === "gap") {
        list.append(h("div", {class: "gap"}, `messages ${data.from_seq}..${data.to_seq} are not shown (${data.reason})`));
      } else if (kind === "message") {
        const link = conv.add(data);
        if (link === null) return;
        empty.remove();
        const row = messageRow(data, link);
        const anchor = link.request && (lastReply.get(link.request.id) || document.getElementById(`m-${link.request.id}`));
        if (anchor) { anchor.after(row); lastReply.set(link.request.id, row); } else list.append(row);
      }
      summary.textContent = conv.summary();
    },
  });
  return stop;
}

function route() {
  stopView();
  stopView = () => {};
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?", 2);
  let parts;
  try {
    parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  } catch (e) {
    parts = ["executions", path]; // a malformed escape: shown as a bad execution id, not a blank page
  }
  if (parts[0] === "executions" && parts.length === 2) stopView = executionView(parts[1]);
  else if (!parts.length || (parts[0] === "executions" && parts.length === 1)) {
    stopView = executionsView(new URLSearchParams(query || ""));
  } else {
    view().replaceChildren(h("div", {class: "error"}, `There is no page "#/${hash}".`),
      h("p", {}, h("a", {href: "#/executions"}, "← all executions")));
  }
}

function boot() {
  showWho();
  window.addEventListener("hashchange", route);
  route();
}

if (typeof document !== "undefined" && document.getElementById("view")) boot();
