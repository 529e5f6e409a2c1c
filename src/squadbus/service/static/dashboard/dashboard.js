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

/** Periods the executions list can be limited to (last activity within), in minutes. */
const PERIODS = {"15m": 15, "1h": 60, "24h": 1440, "7d": 10080};

function executionsQuery({q = "", agent = "", type = "", period = "", cursor = null, limit = PAGE_SIZE,
  now = Date.now()} = {}) {
  const params = new URLSearchParams({limit: String(limit)});
  if (q) params.set("q", q);
  if (agent) params.set("agent", agent);
  if (type) params.set("type", type);
  if (PERIODS[period]) params.set("since", new Date(now - PERIODS[period] * 60000).toISOString());
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

const AGENTS = "v1/agents";
const DEAD_LETTERS = "v1/dead-letters";
const SQUAD_EVENTS = "v1/events";
const SQUAD_LANE = "* (squad)";
const SEQUENCE_MAX = 500; // arrows drawn at most (the newest): an SVG of thousands of rows helps nobody
const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name: nothing is fetched from it

/** POST to the API (admin actions); returns the JSON answer or throws ApiError with a readable message. */
async function apiPost(path, token) {
  let resp;
  try {
    resp = await fetch(path, {method: "POST", headers: authHeaders(token)});
  } catch (e) {
    throw new ApiError(0, `cannot reach the squadbus service (${e.message})`);
  }
  if (!resp.ok) throw new ApiError(resp.status, errorText(resp.status, await resp.text()));
  return resp.json();
}

/** GET a text document (/metrics). */
async function apiText(path, token) {
  let resp;
  try {
    resp = await fetch(path, {headers: authHeaders(token)});
  } catch (e) {
    throw new ApiError(0, `cannot reach the squadbus service (${e.message})`);
  }
  if (!resp.ok) throw new ApiError(resp.status, errorText(resp.status, await resp.text()));
  return resp.text();
}

function deadLettersQuery({group = "", state = "dead", cursor = null, limit = PAGE_SIZE} = {}) {
  const params = new URLSearchParams({limit: String(limit), state});
  if (group) params.set("group", group);
  if (cursor) params.set("cursor", cursor);
  return `${DEAD_LETTERS}?${params}`;
}

function redrivePath(id) { return `${DEAD_LETTERS}/${encodeURIComponent(id)}:redrive`; }
function discardPath(id) { return `${DEAD_LETTERS}/${encodeURIComponent(id)}:discard`; }
function redriveGroupPath(group) { return `${DEAD_LETTERS}:redrive?group=${encodeURIComponent(group)}`; }

/**
 * The figures the overview reads from the Prometheus text of /metrics: the backend and version
 * (squadbus_info), and per consumer group its lag and pending (summed over its subjects) and dead letters.
 * groupsReported is false when the backend exports no squadbus_group_* figures at all.
 */
function parseMetrics(text) {
  const out = {backend: null, version: null, groups: new Map(), groupsReported: false, groupsUp: null};
  const line = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  for (const raw of text.split("\n")) {
    if (!raw || raw.startsWith("#")) continue;
    const m = line.exec(raw);
    if (!m) continue;
    const [, name, labelText, valueText] = m;
    const labels = {};
    for (const lm of (labelText || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[lm[1]] = lm[2].replace(/\\(.)/g, (_, ch) => (ch === "n" ? "\n" : ch));
    }
    const value = Number(valueText);
    if (name === "squadbus_info") { out.backend = labels.backend || null; out.version = labels.version || null; }
    else if (name === "squadbus_group_figures_up") out.groupsUp = value === 1;
    else if (name === "squadbus_group_lag" || name === "squadbus_group_pending" ||
             name === "squadbus_group_dead_letters") {
      out.groupsReported = true;
      const key = name.slice("squadbus_group_".length);
      const g = out.groups.get(labels.group) || {group: labels.group, lag: null, pending: null, dead_letters: null};
      g[key] = (g[key] || 0) + value;
      out.groups.set(labels.group, g);
    }
  }
  out.groups = [...out.groups.values()].sort((a, b) => a.group.localeCompare(b.group));
  return out;
}

/** Messages per second by type over the last `seconds` seconds, from message times (ms). */
class RateWindow {
  constructor(seconds = 60) { this.seconds = seconds; this.buckets = new Map(); this.types = new Set(); }
  add(type, atMs) {
    const sec = Math.floor(atMs / 1000);
    let b = this.buckets.get(sec);
    if (!b) { b = new Map(); this.buckets.set(sec, b); }
    b.set(type, (b.get(type) || 0) + 1);
    this.types.add(type);
  }
  /** {types, seconds: [{at, counts: Map}]} for the window ending at nowMs (oldest first); old buckets dropped. */
  series(nowMs) {
    const end = Math.floor(nowMs / 1000);
    for (const sec of this.buckets.keys()) if (sec <= end - this.seconds) this.buckets.delete(sec);
    const seconds = [];
    for (let sec = end - this.seconds + 1; sec <= end; sec++) {
      seconds.push({at: sec, counts: this.buckets.get(sec) || new Map()});
    }
    const types = [...this.types].filter((t) => seconds.some((s) => s.counts.has(t))).sort();
    return {types, seconds};
  }
  /** Average messages per second of each type over the last `span` seconds. */
  rates(nowMs, span = 10) {
    const {seconds} = this.series(nowMs);
    const out = new Map();
    for (const s of seconds.slice(-span)) for (const [t, n] of s.counts) out.set(t, (out.get(t) || 0) + n / span);
    return out;
  }
}

/**
 * The sequence diagram of messages (in order): agents as lanes in order of first appearance, broadcast
 * targets ("#domain", "* squad") as lanes of their own at the right, one arrow per message.
 */
function sequenceLayout(messages) {
  const agents = [], targets = [];
  const seen = new Set();
  const lane = (name, list) => { if (!seen.has(name)) { seen.add(name); list.push(name); } };
  const arrows = [];
  for (const m of messages) {
    lane(m.sender_id, agents);
    let to, broadcast = false;
    if (m.recipient_id) { to = m.recipient_id; lane(to, agents); } else { to = recipientLabel(m); broadcast = true; }
    arrows.push({from: m.sender_id, to, broadcast, type: m.message_type, seq: m.seq, id: m.id,
      reply: Boolean((m.headers || {}).correlation_id), content: m.content});
  }
  for (const a of arrows) {
    if (a.broadcast && a.to === "*") a.to = SQUAD_LANE;
    if (a.broadcast) lane(a.to, targets);
  }
  return {lanes: [...agents, ...targets], arrows};
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
  for (const kid of kids) if (kid !== null && kid !== undefined && kid !== false) el.append(kid);
  return el;
}

function svg(tag, attrs = {}, ...kids) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const kid of kids) if (kid !== null && kid !== undefined) el.append(kid);
  return el;
}

function tag(type) {
  return h("span", {class: "tag", style: `--hue: ${typeHue(type)}`}, type);
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

let stopView = () => {};

function view() { return document.getElementById("view"); }

function errorBox(message) { return h("div", {class: "error", role: "alert"}, message); }

function showError(target, err, retry) {
  if (err instanceof ApiError && err.status === 401) { askToken(retry, err); return; }
  target.replaceChildren(errorBox(err.message || String(err)));
}

/** The service has tokens: ask for one once, keep it for this tab, then retry what failed. */
function askToken(retry, err) {
  const input = h("input", {type: "password", autocomplete: "off", placeholder: "bearer token", id: "token-input"});
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
  stopView();
  stopView = () => {};
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

function apiBase() { return `${location.origin}${location.pathname}`; }

function sendHint(what) {
  return h("div", {class: "empty"},
    h("p", {}, what + " Send a first message with the CLI (any UUID as the execution, e.g. from uuidgen):"),
    h("pre", {}, `squadbus --api ${apiBase().replace(/\/$/, "")} send pm dev-1 "hello" --execution $(uuidgen)`),
    h("p", {}, "or over HTTP (add -H 'Authorization: Bearer <token>' when the service has tokens):"),
    h("pre", {}, `curl -X POST ${apiBase()}v1/messages -H 'Content-Type: application/json' \\\n` +
      `  -d '{"sender_id": "pm", "recipient_id": "dev-1", "content": "hello", "task_execution_id": "<uuid>"}'`));
}

function emptyState() {
  return sendHint("No executions yet. Messages that carry a task_execution_id appear here as they are sent.");
}

function rel(iso) {
  return h("span", {class: "rel", "data-at": iso, title: iso}, relativeTime(iso));
}

/** Keep every "5 s ago" on the page current; returns the stop function. */
function ticking() {
  const timer = setInterval(() => {
    for (const el of document.querySelectorAll(".rel")) el.textContent = relativeTime(el.dataset.at);
  }, 5000);
  return () => clearInterval(timer);
}

function markNav(name) {
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.dataset.view === name);
  }
}

// ---- overview ----------------------------------------------------------------------------------------

const CHART_H = 170, CHART_PAD = 28;

function drawRateChart(target, rates) {
  const now = Date.now();
  const CHART_W = Math.max(360, Math.round(target.clientWidth || 720)); // drawn at the card's width: text stays crisp
  const {types, seconds} = rates.series(now);
  const totals = seconds.map((s) => [...s.counts.values()].reduce((a, b) => a + b, 0));
  const max = Math.max(1, ...totals);
  const top = max <= 5 ? 5 : Math.ceil(max / 5) * 5;
  const bw = (CHART_W - CHART_PAD) / seconds.length;
  const y = (v) => CHART_H - 18 - (v / top) * (CHART_H - 30);
  const chart = svg("svg", {viewBox: `0 0 ${CHART_W} ${CHART_H}`, class: "chart", role: "img",
    "aria-label": "messages per second by type, last 60 seconds"});
  for (const v of [0, top / 2, top]) {
    chart.append(svg("line", {x1: CHART_PAD, x2: CHART_W, y1: y(v), y2: y(v), class: "grid"}),
      svg("text", {x: CHART_PAD - 4, y: y(v) + 4, class: "axis", "text-anchor": "end"}, String(v)));
  }
  seconds.forEach((s, i) => {
    let base = 0;
    for (const t of types) {
      const n = s.counts.get(t) || 0;
      if (!n) continue;
      const rect = svg("rect", {x: CHART_PAD + i * bw + 1, width: Math.max(1, bw - 2), y: y(base + n),
        height: y(base) - y(base + n), style: `fill: hsl(${typeHue(t)} 60% 55%)`});
      rect.append(svg("title", {}, `${t}: ${n} at ${new Date(s.at * 1000).toLocaleTimeString()}`));
      chart.append(rect);
      base += n;
    }
  });
  chart.append(svg("text", {x: CHART_PAD, y: CHART_H - 2, class: "axis"}, "60 s ago"),
    svg("text", {x: CHART_W, y: CHART_H - 2, class: "axis", "text-anchor": "end"}, "now"));
  const current = rates.rates(now);
  const legend = h("div", {class: "legend"}, ...(types.length ? types.map((t) =>
    h("span", {class: "legend-item"}, h("i", {style: `background: hsl(${typeHue(t)} 60% 55%)`}), t,
      h("span", {class: "muted"}, ` ${(current.get(t) || 0).toFixed(1)}/s`)))
    : [h("span", {class: "muted"}, "No message in the last minute.")]));
  target.replaceChildren(chart, legend);
}

function card(title, ...kids) {
  return h("section", {class: "card"}, h("h2", {}, title), ...kids);
}

function overviewView() {
  markNav("overview");
  const health = h("div", {class: "card-body"}, h("p", {class: "muted"}, "Loading…"));
  const chart = h("div", {class: "card-body", id: "rate-chart"});
  const busiest = h("div", {class: "card-body"}, h("p", {class: "muted"}, "Loading…"));
  const groups = h("div", {class: "card-body", id: "groups"}, h("p", {class: "muted"}, "Loading…"));
  const dead = h("div", {class: "card-body", id: "dead-summary"}, h("p", {class: "muted"}, "Loading…"));
  const active = h("div", {class: "card-body", id: "active"}, h("p", {class: "muted"}, "Loading…"));
  const live = h("span", {class: "status muted"}, "");
  view().replaceChildren(h("h1", {}, "Overview", live), h("div", {id: "overview-empty"}),
    h("div", {class: "cards"},
      card("Backend and store", health), card("Active executions (last 15 min)", active),
      card("Dead letters, last hour", dead),
      h("section", {class: "card wide"}, h("h2", {}, "Messages per second by type, last minute"), chart),
      card("Busiest agents and domains", busiest),
      h("section", {class: "card span2"}, h("h2", {}, "Consumer groups"), groups)));

  const rates = new RateWindow(60);
  const agents = new Map(); // agent_id -> {sent, received, domain}
  const executions = new Map(); // id -> {count, last}
  let dirty = true, stopped = false, failed = false, streamFailed = false;

  function fail(target, e) {
    if (e instanceof ApiError && e.status === 401) { if (!failed) { failed = true; askToken(route, e); } return; }
    target.replaceChildren(errorBox(e.message));
  }

  async function loadHealth() {
    let ready = null, metrics = null, metricsError = null;
    try {
      const resp = await fetch("readyz");
      ready = await resp.json();
    } catch (e) { ready = {status: "unreachable", checks: {service: "cannot reach the squadbus service"}}; }
    try { metrics = parseMetrics(await apiText("metrics", token())); } catch (e) { metricsError = e; }
    const rows = [];
    const backend = metrics && metrics.backend ? `${metrics.backend}` : "—";
    rows.push(h("tr", {}, h("th", {}, "Service"), h("td", {}, h("span", {class: `dot ${ready.status === "ready" ? "ok" : "bad"}`}),
      ready.status, metrics && metrics.version ? h("span", {class: "muted"}, ` · squadbus ${metrics.version}`) : null)));
    rows.push(h("tr", {}, h("th", {}, "Backend"), h("td", {}, h("b", {}, backend), " ",
      h("span", {class: "muted"}, (ready.checks || {}).bus || ""))));
    rows.push(h("tr", {}, h("th", {}, "Store"), h("td", {}, h("span", {class: "muted"}, (ready.checks || {}).store || ""))));
    health.replaceChildren(h("table", {class: "kv"}, h("tbody", {}, ...rows)));
    if (metricsError) {
      if (metricsError.status === 401) return fail(groups, metricsError);
      groups.replaceChildren(errorBox(`Consumer groups come from /metrics: ${metricsError.message}`));
      return;
    }
    if (!metrics.groupsReported) {
      groups.replaceChildren(h("p", {class: "muted"}, "Lag and pending per consumer group: not reported by this backend."));
      return;
    }
    const fmt = (v) => (v === null || v === undefined ? "—" : String(Math.round(v)));
    groups.replaceChildren(
      metrics.groupsUp === false ? errorBox("The backend did not answer the last group read; the figures may be old.") : "",
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Group"), h("th", {class: "num"}, "Lag"),
        h("th", {class: "num"}, "Pending"), h("th", {class: "num"}, "Dead letters"))),
      h("tbody", {}, ...metrics.groups.map((g) => h("tr", {"data-group": g.group},
        h("td", {class: "mono"}, g.group), h("td", {class: "num"}, fmt(g.lag)), h("td", {class: "num"}, fmt(g.pending)),
        h("td", {class: "num"}, g.dead_letters ? h("a", {href: `#/dead-letters?group=${encodeURIComponent(g.group)}`},
          fmt(g.dead_letters)) : fmt(g.dead_letters)))))));
  }

  async function loadDead() {
    try {
      const s = await apiGet(`${DEAD_LETTERS}:summary?minutes=60`, token());
      const groupsList = Object.entries(s.by_group).sort((a, b) => b[1] - a[1]);
      dead.replaceChildren(h("div", {class: "big", id: "dead-total"}, String(s.total)),
        s.total ? h("ul", {class: "plain"}, ...groupsList.map(([g, n]) => h("li", {},
          h("a", {href: `#/dead-letters?group=${encodeURIComponent(g)}`}, g), h("span", {class: "muted"}, ` ${n}`))))
          : h("p", {class: "muted"}, "None: every consumer group handled what it got."),
        h("p", {}, h("a", {href: "#/dead-letters"}, "All dead letters →")));
    } catch (e) { fail(dead, e); }
  }

  function renderBusiest() {
    const top = [...agents.entries()].map(([id, a]) => ({id, ...a, total: a.sent + a.received}))
      .filter((a) => a.total > 0) // an agent with an open inbox and no message yet is not busy
      .sort((a, b) => b.total - a.total || a.id.localeCompare(b.id)).slice(0, 8);
    const domains = new Map(); // domain -> messages sent and received by its agents
    for (const a of agents.values()) if (a.domain) domains.set(a.domain, (domains.get(a.domain) || 0) + a.sent + a.received);
    const topDomains = [...domains.entries()].sort((a, b) => b[1] - a[1]).slice(0, 6);
    if (!top.length) {
      busiest.replaceChildren(h("p", {class: "muted"}, "No agent has sent anything yet."));
      return;
    }
    const max = top[0].total || 1;
    busiest.replaceChildren(h("table", {class: "bars"}, h("tbody", {}, ...top.map((a) => h("tr", {"data-agent": a.id},
      h("td", {class: "mono"}, h("a", {href: `#/agents/${encodeURIComponent(a.id)}`}, a.id)),
      h("td", {class: "bar-cell"}, h("span", {class: "bar", style: `width: ${(100 * a.total / max).toFixed(1)}%`})),
      h("td", {class: "num", title: `${a.sent} sent, ${a.received} received`}, String(a.total)))))),
    topDomains.length ? h("p", {class: "muted domains"}, "Domains, by their agents' messages: ", ...topDomains.flatMap(([d, n], i) =>
      [i ? ", " : "", h("b", {}, "#" + d), ` ${n}`])) : null);
  }

  function renderActive() {
    const list = [...executions.entries()].sort((a, b) => b[1].last.localeCompare(a[1].last));
    if (!list.length) {
      active.replaceChildren(h("p", {class: "muted"}, "No execution had a message in the last 15 minutes."));
      return;
    }
    active.replaceChildren(h("div", {class: "big"}, String(list.length)), h("ul", {class: "plain"},
      ...list.slice(0, 6).map(([id, x]) => h("li", {}, h("a", {class: "mono", href: `#/executions/${id}`}, id.slice(0, 8)),
        h("span", {class: "muted"}, ` ${x.count} message${x.count === 1 ? "" : "s"} · `), rel(x.last)))),
    h("p", {}, h("a", {href: "#/executions"}, "All executions →")));
  }

  async function loadAgents() {
    try {
      const page = await apiGet(`${AGENTS}?limit=500`, token());
      for (const a of page.items) {
        agents.set(a.agent_id, {sent: a.messages_sent, received: a.messages_received, domain: a.domain});
      }
      if (!page.items.some((a) => a.messages_sent + a.messages_received > 0)) {
        document.getElementById("overview-empty")?.replaceChildren(sendHint("Nothing has been sent yet."));
      }
      renderBusiest();
    } catch (e) { fail(busiest, e); }
  }

  async function loadActive() {
    const since = new Date(Date.now() - 15 * 60000).toISOString();
    try {
      const page = await apiGet(`${EXECUTIONS}?limit=100&since=${encodeURIComponent(since)}`, token());
      for (const x of page.items) executions.set(x.task_execution_id, {count: x.message_count, last: x.last_activity_at});
      renderActive();
    } catch (e) { fail(active, e); }
  }

  async function seedRates() {
    const since = new Date(Date.now() - 60000).toISOString();
    try {
      const page = await apiGet(`v1/messages?limit=1000&since=${encodeURIComponent(since)}`, token());
      for (const m of page.items) rates.add(m.message_type, Date.parse(m.created_at));
    } catch (e) { /* the live stream fills the chart; errors are shown by the other cards */ }
    dirty = true;
  }

  function onMessage(m) {
    rates.add(m.message_type, Date.parse(m.created_at) || Date.now());
    const a = agents.get(m.sender_id) || {sent: 0, received: 0, domain: m.domain};
    a.sent += 1;
    if (m.domain) a.domain = m.domain;
    agents.set(m.sender_id, a);
    if (m.recipient_id) {
      const r = agents.get(m.recipient_id) || {sent: 0, received: 0, domain: null};
      r.received += 1;
      agents.set(m.recipient_id, r);
    }
    if (m.task_execution_id) {
      const x = executions.get(m.task_execution_id) || {count: 0, last: m.stored_at || m.created_at};
      x.count += 1;
      x.last = m.stored_at || m.created_at;
      executions.set(m.task_execution_id, x);
    }
    document.getElementById("overview-empty")?.replaceChildren();
    dirty = true;
  }

  loadHealth(); loadDead(); loadAgents(); loadActive(); seedRates();
  const stopStream = followStream(`${SQUAD_EVENTS}?start=new`, token(), {
    onStatus(text) { live.textContent = text; live.classList.toggle("live", text === "live"); },
    onError(e) { live.textContent = ""; streamFailed = true; fail(chart, e); },
    onEvent(kind, data) { if (kind === "message") onMessage(data); },
  });
  const draw = setInterval(() => {
    if (!streamFailed) drawRateChart(chart, rates);
    if (dirty) { renderBusiest(); renderActive(); dirty = false; }
  }, 1000);
  drawRateChart(chart, rates);
  const poll = setInterval(() => { if (!stopped) { loadHealth(); loadDead(); } }, 5000);
  const tick = ticking();
  return () => { stopped = true; stopStream(); clearInterval(draw); clearInterval(poll); tick(); };
}

// ---- executions --------------------------------------------------------------------------------------

function executionRow(x) {
  const id = x.task_execution_id;
  const more = (n, shown) => (n > shown ? h("span", {class: "muted"}, ` +${n - shown}`) : null);
  return h("tr", {"data-execution": id},
    h("td", {class: "mono"}, h("a", {href: `#/executions/${id}`, title: id}, id.slice(0, 8))),
    h("td", {}, rel(x.last_activity_at)),
    h("td", {class: "num"}, String(x.message_count)),
    h("td", {}, x.agents.join(", "), more(x.agent_count, x.agents.length)),
    h("td", {}, ...x.message_types.map(tag), more(x.message_type_count, x.message_types.length)));
}

const LIVE_ROWS_MS = 400; // executions touched by the stream are read again at most this often, together
const LIVE_ROWS_MAX = 20; // one read per execution up to this many, else one read of the first page

function executionsView(params) {
  markNav("executions");
  const q = params.get("q") || "", agent = params.get("agent") || "", type = params.get("type") || "";
  const period = PERIODS[params.get("period")] ? params.get("period") : "";
  const qInput = h("input", {name: "q", value: q, placeholder: "execution id (prefix)", size: "30"});
  const agentInput = h("input", {name: "agent", value: agent, placeholder: "agent id", size: "16"});
  const typeInput = h("input", {name: "type", value: type, placeholder: "message type", size: "14"});
  const periodSelect = h("select", {name: "period"}, ...[["", "any time"], ["15m", "last 15 min"], ["1h", "last hour"],
    ["24h", "last 24 h"], ["7d", "last 7 days"]].map(([v, label]) =>
    h("option", v === period ? {value: v, selected: "selected"} : {value: v}, label)));
  const search = h("form", {class: "search", onsubmit: (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    if (qInput.value.trim()) next.set("q", qInput.value.trim());
    if (agentInput.value.trim()) next.set("agent", agentInput.value.trim());
    if (typeInput.value.trim()) next.set("type", typeInput.value.trim());
    if (periodSelect.value) next.set("period", periodSelect.value);
    location.hash = "#/executions" + (next.toString() ? "?" + next : "");
  }}, qInput, agentInput, typeInput, periodSelect, h("button", {}, "Search"));
  const body = h("tbody");
  const table = h("table", {id: "executions"}, h("thead", {}, h("tr", {}, h("th", {}, "Execution"),
    h("th", {}, "Last activity"), h("th", {class: "num"}, "Messages"), h("th", {}, "Agents"), h("th", {}, "Types"))), body);
  const out = h("div", {}, h("p", {class: "muted"}, "Loading…"));
  const live = h("span", {class: "status muted"}, "");
  view().replaceChildren(h("h1", {}, "Executions", live), search, out);
  let loaded = false; // the first page is on screen (or the empty state)

  async function load(cursor) {
    let page;
    try {
      page = await apiGet(executionsQuery({q, agent, type, period, cursor}), token());
    } catch (e) {
      if (cursor) out.append(errorBox(e.message)); else showError(out, e, route);
      return;
    }
    if (!cursor) {
      loaded = true;
      if (!page.items.length && !body.children.length) {
        out.replaceChildren(q || agent || type || period ? h("p", {class: "muted"}, "No execution matches this search.")
          : emptyState());
        return;
      }
      out.replaceChildren(table);
    }
    for (const x of page.items) {
      if (!body.querySelector(`tr[data-execution="${x.task_execution_id}"]`)) body.append(executionRow(x));
    }
    out.querySelector(".more")?.remove();
    if (page.next_cursor) {
      out.append(h("button", {class: "more", onclick: (ev) => { ev.target.disabled = true; load(page.next_cursor); }},
        "More"));
    }
  }

  // Live: the squad's stream says which executions moved; each is read again (with this search's filters, so
  // one that does not match stays out) and put at the top with its new counts and last activity.
  const touched = new Set();
  let reading = false;
  function onMessage(m) {
    const id = m.task_execution_id;
    if (!id || (q && !id.startsWith(q.toLowerCase()))) return;
    touched.add(id);
  }
  async function readTouched() {
    if (reading || !loaded || !touched.size) return;
    reading = true;
    try {
      let items;
      if (touched.size > LIVE_ROWS_MAX) { // a busy squad: one read of the first page instead
        touched.clear();
        const page = await apiGet(executionsQuery({q, agent, type, period}), token()).catch(() => null);
        items = page ? page.items : [];
      } else {
        const ids = [...touched];
        touched.clear();
        const pages = await Promise.all(ids.map((id) =>
          apiGet(executionsQuery({q: id, agent, type, limit: 1}), token()).catch(() => null)));
        items = pages.map((page) => page && page.items[0]).filter(Boolean)
          .sort((a, b) => b.last_activity_at.localeCompare(a.last_activity_at));
      }
      for (const x of [...items].reverse()) { // the newest ends at the top
        const old = body.querySelector(`tr[data-execution="${x.task_execution_id}"]`);
        const changed = !old || old.children[2].textContent !== String(x.message_count);
        old?.remove();
        const row = executionRow(x);
        if (changed) { // highlighted for a moment: new, or new messages
          row.classList.add("fresh");
          setTimeout(() => row.classList.remove("fresh"), 2000);
        }
        body.prepend(row);
      }
      if (items.length && !out.contains(table)) out.replaceChildren(table);
    } finally { reading = false; }
  }
  const stopStream = followStream(`${SQUAD_EVENTS}?start=new`, token(), {
    onStatus(text) { live.textContent = text; live.classList.toggle("live", text === "live"); },
    onError(e) {
      live.classList.remove("live");
      live.textContent = e.status === 401 || e.status === 403 ? "not live: updates need a viewer or admin token"
        : `not live: ${e.message}`;
    },
    onEvent(kind, data) { if (kind === "message") onMessage(data); },
  });
  const reader = setInterval(readTouched, LIVE_ROWS_MS);
  load(null);
  const tick = ticking();
  return () => { stopStream(); clearInterval(reader); tick(); };
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
  const headers = m.headers || {};
  const isRequest = Boolean(headers.reply_to);
  const redriven = headers["redriven-from"]
    ? h("span", {class: "note", title: `re-driven from ${headers["redriven-from"]} by ${headers["redriven-by"]}`},
      "re-driven") : null;
  const execution = link.showExecution && m.task_execution_id
    ? h("a", {class: "note mono", href: `#/executions/${m.task_execution_id}`}, m.task_execution_id.slice(0, 8)) : null;
  return h("div", {class: link.request ? "msg reply" : "msg", id: `m-${m.id}`, "data-seq": String(m.seq)},
    h("div", {class: "time", title: `${at} · seq ${m.seq}`}, Number.isNaN(time.getTime()) ? "" : time.toLocaleTimeString()),
    h("div", {}, h("span", {class: "route"}, m.sender_id, h("span", {class: "to"}, " → "), recipientLabel(m)), " ",
      tag(m.message_type), isRequest ? h("span", {class: "note"}, "request") : null, note, redriven, execution),
    ...contentBlock(m.content));
}

/** The SVG sequence diagram of `messages`: one lane per agent (and broadcast target), one arrow per message. */
function drawSequence(target, messages) {
  const shown = messages.slice(-SEQUENCE_MAX);
  const {lanes, arrows} = sequenceLayout(shown);
  if (!arrows.length) { target.replaceChildren(h("p", {class: "muted"}, "No message yet.")); return; }
  const laneW = 150, top = 40, rowH = 30, left = 20;
  const width = left * 2 + lanes.length * laneW, height = top + arrows.length * rowH + 20;
  const x = (name) => left + lanes.indexOf(name) * laneW + laneW / 2;
  const d = svg("svg", {viewBox: `0 0 ${width} ${height}`, width, height, class: "sequence", role: "img",
    "aria-label": `sequence of ${arrows.length} messages between ${lanes.length} lanes`});
  d.append(svg("defs", {}, svg("marker", {id: "arrowhead", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7,
    markerHeight: 7, orient: "auto-start-reverse"}, svg("path", {d: "M 0 0 L 10 5 L 0 10 z", class: "head"}))));
  lanes.forEach((name) => {
    const lx = x(name);
    const label = svg("text", {x: lx, y: 18, "text-anchor": "middle", class: "lane-label"}, name);
    d.append(svg("line", {x1: lx, x2: lx, y1: 26, y2: height - 6, class: "lifeline"}), label);
  });
  arrows.forEach((a, i) => {
    const y = top + i * rowH + 12;
    const x1 = x(a.from), x2 = x(a.to);
    const hue = typeHue(a.type);
    const g = svg("g", {class: "arrow", "data-seq": String(a.seq)});
    if (x1 === x2) {
      g.append(svg("path", {d: `M ${x1} ${y - 6} h 30 v 12 h -28`, class: a.broadcast ? "line dashed" : "line",
        style: `stroke: hsl(${hue} 60% 50%)`, "marker-end": "url(#arrowhead)", fill: "none"}));
    } else {
      g.append(svg("line", {x1, x2: x2 + (x2 > x1 ? -2 : 2), y1: y, y2: y, class: a.broadcast ? "line dashed" : "line",
        style: `stroke: hsl(${hue} 60% 50%)`, "marker-end": "url(#arrowhead)"}));
    }
    const text = `${a.type}${a.reply ? " (reply)" : ""}: ${a.content.replace(/\s+/g, " ").slice(0, 40)}`;
    g.append(svg("text", {x: (x1 + x2) / 2 + (x1 === x2 ? 36 : 0), y: y - 4,
      "text-anchor": x1 === x2 ? "start" : "middle", class: "arrow-label"}, text));
    g.append(svg("title", {}, `#${a.seq} ${a.from} → ${a.to}: ${a.content.slice(0, 200)}`));
    d.append(g);
  });
  const note = messages.length > shown.length
    ? h("p", {class: "muted"}, `The last ${shown.length} of ${messages.length} messages; the conversation has them all.`)
    : null;
  target.replaceChildren(...(note ? [note] : []), h("div", {class: "sequence-scroll"}, d));
}

function executionView(id, params) {
  markNav("executions");
  if (!UUID_RE.test(id)) {
    view().replaceChildren(h("h1", {}, "Execution"), errorBox(
      `"${id}" is not an execution id: an execution id is a UUID such as 1b4e28ba-2fa1-11d2-883f-0016d3cca427.`),
    h("p", {}, h("a", {href: "#/executions"}, "← all executions")));
    return () => {};
  }
  let mode = params.get("view") === "sequence" ? "sequence" : "conversation";
  const conv = new Conversation();
  const ordered = [];
  const status = h("span", {class: "status muted"}, "");
  const summary = h("div", {class: "summary", id: "summary"}, "");
  const list = h("div", {class: "conversation", id: "conversation"});
  const sequence = h("div", {class: "sequence-view", id: "sequence"});
  const empty = h("p", {class: "muted"}, "No message in this execution yet: new ones appear here as they are sent.");
  const buttons = {};
  let drawPending = false;
  function redraw() {
    if (mode !== "sequence" || drawPending) return;
    drawPending = true;
    setTimeout(() => { drawPending = false; drawSequence(sequence, ordered); }, 200);
  }
  function setMode(next) {
    mode = next;
    list.hidden = mode !== "conversation";
    sequence.hidden = mode !== "sequence";
    for (const [k, b] of Object.entries(buttons)) b.classList.toggle("on", k === mode);
    history.replaceState(null, "", `#/executions/${id}${mode === "sequence" ? "?view=sequence" : ""}`);
    if (mode === "sequence") drawSequence(sequence, ordered);
  }
  for (const [k, label] of [["conversation", "Conversation"], ["sequence", "Sequence"]]) {
    buttons[k] = h("button", {type: "button", id: `show-${k}`, onclick: () => setMode(k)}, label);
  }
  view().replaceChildren(h("p", {}, h("a", {href: "#/executions"}, "← all executions")),
    h("h1", {}, "Execution ", h("span", {class: "mono"}, id), status), summary,
    h("div", {class: "toggle-group", role: "group"}, buttons.conversation, buttons.sequence), list, sequence);
  setMode(mode);
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
        ordered.push(data);
        const row = messageRow(data, link);
        const anchor = link.request && (lastReply.get(link.request.id) || document.getElementById(`m-${link.request.id}`));
        if (anchor) { anchor.after(row); lastReply.set(link.request.id, row); } else list.append(row);
        redraw();
      }
      summary.textContent = conv.summary();
    },
  });
  return stop;
}

// ---- agents ------------------------------------------------------------------------------------------

const INBOX_NOTES = {
  open: "Agents seen sending, as the recipient of a direct message, or with an inbox open now, grouped by the " +
    "domain they last broadcast to.",
  known: "Agents seen sending, as the recipient of a direct message, or with an inbox group on the broker (this " +
    "backend cannot tell whether it is open now), grouped by the domain they last broadcast to.",
  unavailable: "Agents seen sending or as the recipient of a direct message, grouped by the domain they last " +
    "broadcast to. The broker did not say in time which inboxes are open: reload to ask again.",
  unreported: "Agents seen sending or as the recipient of a direct message, grouped by the domain they last " +
    "broadcast to (this backend cannot list open inboxes).",
};

function inboxCell(a) {
  if (a.inbox === "open") {
    const title = ["inbox open", a.inbox_holder ? `held by ${a.inbox_holder}` : "",
      a.inbox_since ? `since ${a.inbox_since}` : ""].filter(Boolean).join(", ");
    return h("td", {}, h("span", {class: "inbox-open", title}, "inbox open"));
  }
  if (a.inbox === "known") return h("td", {}, h("span", {class: "muted", title: "the broker keeps its inbox group"}, "inbox group"));
  return h("td", {}, "");
}

function agentsView() {
  markNav("agents");
  const out = h("div", {}, h("p", {class: "muted"}, "Loading…"));
  const note = h("p", {class: "muted"}, INBOX_NOTES.unreported);
  view().replaceChildren(h("h1", {}, "Agents"), note, out);
  (async () => {
    const all = [];
    let cursor = null, inboxes = "unreported";
    try {
      do {
        const page = await apiGet(`${AGENTS}?limit=500${cursor ? "&cursor=" + encodeURIComponent(cursor) : ""}`, token());
        all.push(...page.items);
        inboxes = page.inboxes || inboxes;
        cursor = page.next_cursor;
      } while (cursor && all.length < 5000);
    } catch (e) { showError(out, e, route); return; }
    note.textContent = INBOX_NOTES[inboxes] || INBOX_NOTES.unreported;
    if (!all.length) { out.replaceChildren(sendHint("No agent has sent anything or opened an inbox yet.")); return; }
    const byDomain = new Map();
    for (const a of all) {
      const d = a.domain || "";
      if (!byDomain.has(d)) byDomain.set(d, []);
      byDomain.get(d).push(a);
    }
    const sections = [...byDomain.entries()].sort((a, b) => (a[0] === "") - (b[0] === "") || a[0].localeCompare(b[0]));
    const open = (agents) => agents.filter((a) => a.inbox === "open").length;
    out.replaceChildren(...sections.map(([domain, agents]) => h("section", {class: "domain", "data-domain": domain},
      h("h2", {}, domain ? "#" + domain : "No domain", h("span", {class: "muted"},
        ` · ${agents.length} agent${agents.length === 1 ? "" : "s"}` + (open(agents) ? `, ${open(agents)} with an open inbox` : ""))),
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Agent"), h("th", {}, "Inbox"), h("th", {}, "Last activity"),
        h("th", {class: "num"}, "Sent"), h("th", {class: "num"}, "Received"))),
      h("tbody", {}, ...agents.map((a) => h("tr", {"data-agent": a.agent_id, "data-inbox": a.inbox || ""},
        h("td", {class: "mono"}, h("a", {href: `#/agents/${encodeURIComponent(a.agent_id)}`}, a.agent_id)),
        inboxCell(a),
        h("td", {}, a.last_activity_at ? rel(a.last_activity_at) : h("span", {class: "muted"}, "no message yet")),
        h("td", {class: "num"}, String(a.messages_sent)),
        h("td", {class: "num"}, String(a.messages_received)))))))));
  })();
  return ticking();
}

function agentView(agentId) {
  markNav("agents");
  const list = h("div", {class: "conversation", id: "agent-messages"});
  const out = h("div", {}, h("p", {class: "muted"}, "Loading…"));
  view().replaceChildren(h("p", {}, h("a", {href: "#/agents"}, "← all agents")),
    h("h1", {}, "Agent ", h("span", {class: "mono"}, agentId)),
    h("p", {class: "muted"}, "Messages it sent or received directly, oldest first."), out);
  async function load(cursor) {
    let page;
    const params = new URLSearchParams({agent_id: agentId, limit: "100"});
    if (cursor) params.set("cursor", cursor);
    try { page = await apiGet(`v1/messages?${params}`, token()); } catch (e) {
      if (cursor) out.append(errorBox(e.message)); else showError(out, e, route);
      return;
    }
    if (!cursor) {
      if (!page.items.length) { out.replaceChildren(sendHint(`No message from or to ${agentId} is stored.`)); return; }
      out.replaceChildren(list);
    }
    for (const m of page.items) list.append(messageRow(m, {request: null, correlation: null, showExecution: true}));
    out.querySelector(".more")?.remove();
    if (page.next_cursor) {
      out.append(h("button", {class: "more", onclick: (ev) => { ev.target.disabled = true; load(page.next_cursor); }},
        "More"));
    }
  }
  load(null);
  return () => {};
}

// ---- dead letters ------------------------------------------------------------------------------------

function deadLettersView(params) {
  markNav("dead-letters");
  const group = params.get("group") || "", state = params.get("state") || "dead";
  const groupInput = h("input", {name: "group", value: group, placeholder: "consumer group", size: "20"});
  const stateSelect = h("select", {name: "state"}, ...["dead", "redriven", "discarded", "all"].map((s) =>
    h("option", s === state ? {value: s, selected: "selected"} : {value: s}, s === "dead" ? "waiting" : s)));
  const filter = h("form", {class: "search", onsubmit: (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    if (groupInput.value.trim()) next.set("group", groupInput.value.trim());
    if (stateSelect.value !== "dead") next.set("state", stateSelect.value);
    location.hash = "#/dead-letters" + (next.toString() ? "?" + next : "");
  }}, groupInput, stateSelect, h("button", {}, "Filter"));
  const notice = h("div", {id: "dl-notice", "aria-live": "polite"});
  const body = h("tbody");
  const out = h("div", {}, h("p", {class: "muted"}, "Loading…"));
  const all = group && state === "dead" ? h("button", {class: "danger", id: "redrive-group", type: "button",
    onclick: async (ev) => {
      ev.target.disabled = true;
      try {
        const r = await apiPost(redriveGroupPath(group), token());
        notice.replaceChildren(h("div", {class: "ok-box"}, `Re-drove ${r.redriven.length} dead letter` +
          `${r.redriven.length === 1 ? "" : "s"} of ${group}` +
          (r.skipped.length ? `; ${r.skipped.length} left as they were: ${r.skipped.map((s) => s.reason).join("; ")}` : ".")));
        for (const d of r.redriven) body.querySelector(`[data-id="${d.dead_letter_id}"]`)?.remove();
      } catch (e) { notice.replaceChildren(errorBox(e.message)); }
      ev.target.disabled = false;
    }}, `Re-drive all of ${group}`) : null;
  view().replaceChildren(h("h1", {}, "Dead letters"), h("p", {class: "muted"},
    "Messages a consumer group gave up on (after max_deliver attempts, or rejected by its handler). An admin " +
    "can re-drive one (published again to its original subject, under a new id) or discard it."),
  filter, all, notice, out);

  async function act(d, kind, row, button) {
    button.disabled = true;
    try {
      if (kind === "redrive") {
        const r = await apiPost(redrivePath(d.id), token());
        const [done] = r.redriven;
        notice.replaceChildren(h("div", {class: "ok-box"}, `Re-driven to ${done.subject} as message ${done.redriven_as}.`));
      } else {
        await apiPost(discardPath(d.id), token());
        notice.replaceChildren(h("div", {class: "ok-box"}, `Discarded dead letter ${d.id.slice(0, 8)}.`));
      }
      if (state === "dead") row.remove(); else route();
    } catch (e) {
      notice.replaceChildren(errorBox(e.message));
      button.disabled = false;
    }
  }

  function deadRow(d) {
    const m = d.message;
    const row = h("tr", {"data-id": d.id});
    const actions = h("td", {class: "actions"});
    if (d.state === "dead") {
      const redrive = h("button", {type: "button", class: "redrive",
        title: d.redrivable ? `publish again to ${d.original_subject}` : "this dead letter cannot be re-driven"},
      "Re-drive");
      if (!d.redrivable) redrive.disabled = true;
      redrive.addEventListener("click", () => act(d, "redrive", row, redrive));
      const discard = h("button", {type: "button", class: "discard"}, "Discard");
      discard.addEventListener("click", () => act(d, "discard", row, discard));
      actions.append(redrive, " ", discard);
    } else {
      actions.append(h("span", {class: "muted"}, `${d.state} by ${d.settled_by || "?"}`),
        d.redriven_as ? h("div", {class: "mono muted"}, "as " + d.redriven_as.slice(0, 8)) : null);
    }
    row.append(h("td", {}, rel(d.dead_at)), h("td", {class: "mono"}, d.group),
      h("td", {class: "reason"}, d.reason || h("span", {class: "muted"}, "(none given)")),
      h("td", {class: "num"}, d.attempts === null ? "—" : String(d.attempts)),
      h("td", {class: "mono"}, d.original_subject || "—"),
      h("td", {}, h("div", {}, h("span", {class: "route"}, m.sender_id, h("span", {class: "muted"}, " → "), recipientLabel(m)),
        " ", tag(m.message_type), m.task_execution_id ? h("a", {class: "note mono", href: `#/executions/${m.task_execution_id}`},
          m.task_execution_id.slice(0, 8)) : null), ...contentBlock(m.content)),
      actions);
    return row;
  }

  const table = h("table", {id: "dead-letters"}, h("thead", {}, h("tr", {}, h("th", {}, "Died"), h("th", {}, "Group"),
    h("th", {}, "Reason"), h("th", {class: "num"}, "Attempts"), h("th", {}, "Original subject"), h("th", {}, "Message"),
    h("th", {}, ""))), body);

  async function load(cursor) {
    let page;
    try { page = await apiGet(deadLettersQuery({group, state, cursor}), token()); } catch (e) {
      if (cursor) out.append(errorBox(e.message)); else showError(out, e, route);
      return;
    }
    if (!cursor) {
      if (!page.items.length) {
        out.replaceChildren(h("div", {class: "empty"}, h("p", {}, group || state !== "dead"
          ? "No dead letter matches this filter."
          : "No dead letters: every consumer group handled what it got. When a group gives up on a message " +
            "(its handler raised on the last of max_deliver attempts, or raised Reject), it shows here with the reason."),
        h("p", {class: "muted"}, "To watch for new ones from a terminal: ", h("code", {}, "squadbus tail 'agent.dlq.>'"))));
        if (all) all.hidden = true;
        return;
      }
      out.replaceChildren(table);
    }
    for (const d of page.items) { shown.add(d.id); body.append(deadRow(d)); }
    out.querySelector(".more")?.remove();
    if (page.next_cursor) {
      out.append(h("button", {class: "more", onclick: (ev) => { ev.target.disabled = true; load(page.next_cursor); }},
        "More"));
    }
  }
  const shown = new Set();
  // new dead letters come in at the top while the page is open (a work list: nothing else moves)
  async function poll() {
    let page;
    try { page = await apiGet(deadLettersQuery({group, state}), token()); } catch (e) { return; }
    const fresh = page.items.filter((d) => !shown.has(d.id));
    if (!fresh.length) return;
    if (!out.contains(table)) out.replaceChildren(table);
    if (all) all.hidden = false;
    for (const d of fresh.reverse()) { shown.add(d.id); body.prepend(deadRow(d)); }
  }
  load(null);
  const timer = setInterval(poll, 5000);
  const tick = ticking();
  return () => { clearInterval(timer); tick(); };
}

// ---- routing -----------------------------------------------------------------------------------------

function notFound(hash) {
  view().replaceChildren(errorBox(`There is no page "#/${hash}".`),
    h("p", {}, h("a", {href: "#/"}, "← overview")));
  return () => {};
}

function route() {
  stopView();
  stopView = () => {};
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?", 2);
  const params = new URLSearchParams(query || "");
  let parts;
  try {
    parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  } catch (e) {
    parts = ["executions", path]; // a malformed escape: shown as a bad execution id, not a blank page
  }
  const [page, arg] = parts;
  if (!page || page === "overview") stopView = parts.length <= 1 ? overviewView() : notFound(hash);
  else if (page === "executions" && parts.length === 2) stopView = executionView(arg, params);
  else if (page === "executions" && parts.length === 1) stopView = executionsView(params);
  else if (page === "agents" && parts.length === 1) stopView = agentsView();
  else if (page === "agents" && parts.length === 2) stopView = agentView(arg);
  else if (page === "dead-letters" && parts.length === 1) stopView = deadLettersView(params);
  else stopView = notFound(hash);
}

function boot() {
  showWho();
  window.addEventListener("hashchange", route);
  route();
}

if (typeof document !== "undefined" && document.getElementById("view")) boot();
