"""``squadbus plan``: which backend to run for a squad, and why, with what it costs.

Three sources, each named where it is used:

* the migration triggers of the design (``spec/scaling-architecture-guide.md``,
  "Next Steps", 2: > 1,000 agents plan the NATS migration, > 10 msgs/s start
  NATS testing, > 50k msgs/day deploy NATS) and its cost lines ("Cost
  Analysis" for 5,000 agents / 250k msgs/day, managed and self-hosted; the
  range of "Cost Comparison"): the guide's figures, not measured by us;
* measured capacities: ``squadbus bench --json`` files given with ``--bench``,
  else the figures of docs/benchmarks.md (:data:`MEASURED`, each with its command);
* with ``--from URL``, live figures of a running ``squadbus serve``: agents
  from ``GET /v1/agents``, messages of the last hour and their busiest minute
  from ``GET /v1/messages``, the current rate from two reads of ``/metrics``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from squadbus.cli.api import ApiClient, ApiError

GUIDE = "scaling-architecture-guide.md"
AGENTS_TRIGGER = 1_000
RATE_TRIGGER = 10.0
DAILY_TRIGGER = 50_000


@dataclass(frozen=True, slots=True)
class Trigger:
    """One migration trigger of the guide, and whether the squad crosses it."""

    name: str
    limit: float
    value: float
    action: str

    @property
    def crossed(self) -> bool:
        return self.value > self.limit


@dataclass(frozen=True, slots=True)
class Option:
    """A backend the plan can pick, with the guide's cost lines (US$ per month)."""

    key: str
    name: str
    url: str
    managed: str
    self_hosted: str
    cost_range: str


OPTIONS: dict[str, Option] = {
    "memory": Option("memory", "in-process (memory://) + SQLite history", "memory://", "-", "$0 (no server)",
                     f"$0 ({GUIDE}, When to Migrate: Cost)"),
    "nats": Option("nats", "NATS JetStream", "nats://HOST:4222", "$100 (NATS Cloud)",
                   "$50 (3x t3.small cluster)", "$50-150 managed, $30 self-hosted cluster"),
    "redis": Option("redis", "Redis Streams", "redis://HOST:6379/0", "$80 (AWS ElastiCache)",
                    "$35 (t3.medium $30 + $5 backup)", "$50-100 managed, $20 one instance"),
    "kafka": Option("kafka", "Kafka", "kafka://HOST:9092", "$300 (Confluent Cloud)",
                    "$150 (3x t3.medium)", "$200-500 managed, $100+ 3 brokers"),
    "rabbitmq": Option("rabbitmq", "RabbitMQ (quorum queues + a stream)", "amqp://USER:PASS@HOST:5672/",
                       "- (not in the guide)", "- (not in the guide)",
                       f"$100 ({GUIDE}, Comparison Matrix; no Cost Analysis line)"),
}
"""Cost lines from the guide's "Cost Analysis" (5,000 agents, 250k messages/day) and "Cost Comparison"."""


@dataclass(frozen=True, slots=True)
class Capacity:
    """Messages per second squadbus moved on one backend, and where that figure comes from."""

    msgs_per_s: float
    source: str


_BENCH = "docs/benchmarks.md (2026-12-04, 2 shared cores): squadbus bench --url {} --max --senders 100, worst of 3"
MEASURED: dict[str, Capacity] = {
    "memory": Capacity(59_000, _BENCH.format("memory://")),
    "redis": Capacity(27_900, _BENCH.format("redis:// (no AOF, profile=fast)")),
    "nats": Capacity(1_600, _BENCH.format("nats:// (file stream, fsync every write)")),
    "kafka": Capacity(12_200, _BENCH.format("kafka:// (tansu 0.6, memory storage)")),
    "rabbitmq": Capacity(700, _BENCH.format("amqp:// (RabbitMQ 3.10.8, quorum queue + stream, confirms)")),
}
"""Built-in capacities (one 2-core machine shared with other test runs; a lower bound for a real server)."""

ORDER = ("nats", "redis", "kafka", "rabbitmq")
"""Once a trigger is crossed: the guide recommends NATS, Redis Streams as the alternative, Kafka only if needed;
RabbitMQ it calls "not ideal for agent messaging", so it comes last (a squad that runs it already can)."""


@dataclass(slots=True)
class Live:
    """What a running service reports."""

    url: str
    backend: str | None = None
    agents_total: int = 0
    agents_active: int = 0
    messages_last_hour: int = 0
    hour_complete: bool = True
    peak_msgs_per_s: float = 0.0
    peak_minute: str | None = None
    current_msgs_per_s: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Plan:
    """The decision and everything it rests on."""

    agents: int
    msgs_per_hour_per_agent: float
    msgs_per_hour: float
    avg_msgs_per_s: float
    msgs_per_day: float
    needed_msgs_per_s: float
    headroom: float
    triggers: list[Trigger]
    backend: str
    reason: str
    capacities: dict[str, Capacity]
    live: Live | None = None

    def as_dict(self) -> dict[str, Any]:
        option = OPTIONS[self.backend]
        return {
            "agents": self.agents,
            "msgs_per_hour_per_agent": self.msgs_per_hour_per_agent,
            "msgs_per_hour": round(self.msgs_per_hour, 1),
            "avg_msgs_per_s": round(self.avg_msgs_per_s, 3),
            "msgs_per_day": round(self.msgs_per_day),
            "needed_msgs_per_s": round(self.needed_msgs_per_s, 3),
            "headroom": self.headroom,
            "triggers": [{"name": t.name, "limit": t.limit, "value": round(t.value, 3), "crossed": t.crossed,
                          "action": t.action} for t in self.triggers],
            "crossed": [t.name for t in self.triggers if t.crossed],
            "backend": self.backend,
            "backend_name": option.name,
            "url": option.url,
            "reason": self.reason,
            "capacities": {k: asdict(v) for k, v in self.capacities.items()},
            "costs": {k: {"name": o.name, "managed": o.managed, "self_hosted": o.self_hosted, "range": o.cost_range,
                          "source": f"{GUIDE}, Cost Analysis / Cost Comparison (the guide's figures, not measured)"}
                      for k, o in OPTIONS.items()},
            "live": None if self.live is None else asdict(self.live),
        }


def triggers_for(agents: float, avg_msgs_per_s: float, msgs_per_day: float,
                 peak_msgs_per_s: float | None = None) -> list[Trigger]:
    """The guide's three triggers ("Next Steps", 2. Set migration triggers)."""
    rate = max(avg_msgs_per_s, peak_msgs_per_s or 0.0)
    return [
        Trigger("agents > 1,000", AGENTS_TRIGGER, agents, "plan the NATS migration"),
        Trigger("msgs/s > 10", RATE_TRIGGER, rate, "start NATS testing"),
        Trigger("msgs/day > 50,000", DAILY_TRIGGER, msgs_per_day, "deploy NATS"),
    ]


def decide(agents: int, msgs_per_hour: float, *, capacities: Mapping[str, Capacity], headroom: float = 3.0,
           peak_msgs_per_s: float | None = None, live: Live | None = None) -> Plan:
    """The backend for ``agents`` agents sending ``msgs_per_hour`` messages an hour each."""
    total_per_hour = agents * msgs_per_hour
    avg = total_per_hour / 3600
    per_day = total_per_hour * 24
    needed = max(avg * headroom, peak_msgs_per_s or 0.0)
    triggers = triggers_for(agents, avg, per_day, peak_msgs_per_s)
    crossed = [t for t in triggers if t.crossed]
    memory = capacities.get("memory")
    if not crossed and (memory is None or memory.msgs_per_s >= needed):
        reason = (f"no trigger of the guide is crossed ({agents:,} agents, {avg:.2f} msgs/s, {per_day:,.0f} msgs/day): "
                  "one process with the in-process bus and the SQLite history (squadbus serve) is enough; "
                  "it is not durable across a restart of that process, the history is")
        return Plan(agents, msgs_per_hour, total_per_hour, avg, per_day, needed, headroom, triggers, "memory",
                    reason, dict(capacities), live)
    why = ("; ".join(f"{t.name} ({_num(t.value)}): {t.action}" for t in crossed) if crossed
           else f"needs {needed:,.0f} msgs/s, more than the in-process bus measured")
    for key in ORDER:
        capacity = capacities.get(key)
        if capacity is not None and capacity.msgs_per_s >= needed:
            pick = key
            break
    else:
        measured = [k for k in ORDER if k in capacities]
        pick = max(measured, key=lambda k: capacities[k].msgs_per_s) if measured else "nats"
        why += (f"; no backend measured here holds {needed:,.0f} msgs/s on one broker: the fastest measured is "
                f"{OPTIONS[pick].name}; spread the load over partitions / brokers and measure on your hardware")
        return Plan(agents, msgs_per_hour, total_per_hour, avg, per_day, needed, headroom, triggers, pick,
                    f"{why}", dict(capacities), live)
    guide = {"nats": "the guide recommends NATS JetStream (Phase 2/3); Redis Streams is its alternative if you "
                     "already run Redis",
             "redis": "NATS did not measure enough here; the guide's alternative, Redis Streams, did",
             "kafka": "neither NATS nor Redis measured enough here; the guide keeps Kafka for that (and for its "
                      "ecosystem)",
             "rabbitmq": "neither NATS, Redis nor Kafka measured enough here; RabbitMQ did (the guide ranks it "
                         "last for agent messaging)"}[pick]
    cap = capacities[pick]
    reason = (f"{why}; {guide}; measured {cap.msgs_per_s:,.0f} msgs/s >= the {needed:,.1f} needed "
              f"(average x {headroom:g} headroom{' or the peak' if peak_msgs_per_s else ''})")
    return Plan(agents, msgs_per_hour, total_per_hour, avg, per_day, needed, headroom, triggers, pick, reason,
                dict(capacities), live)


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def capacities_from(files: Sequence[str]) -> dict[str, Capacity]:
    """:data:`MEASURED`, replaced per backend by what ``squadbus bench --json`` files measured.

    A ``--max`` file gives the best squadbus msgs/s of its runs; an open-loop file gives its offered
    rate where every message arrived (a lower bound: it held that rate).
    """
    capacities = dict(MEASURED)
    found: dict[str, Capacity] = {}
    for name in files:
        document = json.loads(Path(name).read_text())
        backend = {"rediss": "redis", "tls": "nats", "amqp": "rabbitmq", "amqps": "rabbitmq"}.get(
            document["backend"], document["backend"])
        best = 0.0
        for run in document["runs"]:
            line = run["squadbus"]
            if document["mode"] == "max":
                best = max(best, line["msgs_per_s"] or 0.0)
            elif line["lost"] == 0 and line["received"] == line["sent"]:
                best = max(best, document["rate"] or 0.0)
        if best > 0 and best > found.get(backend, Capacity(0, "")).msgs_per_s:
            how = "--max" if document["mode"] == "max" else f"held --rate {document['rate']:g}"
            broker = document["broker"]
            found[backend] = Capacity(best, f"{name}: squadbus bench {how} on {broker['name']} {broker['version']}"
                                            f" ({broker.get('durability', 'durability not recorded')})")
    capacities.update(found)
    return capacities


# ---- live figures ---------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_BACKEND_LABEL = re.compile(r'backend="([^"]*)"')
PAGES = 200


def _metric_sum(text: str, name: str) -> float | None:
    total, found = 0.0, False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            try:
                total += float(match.group(3))
                found = True
            except ValueError:
                continue
    return total if found else None


def _metrics(client: ApiClient) -> str:
    with client._open("GET", "/metrics") as response:
        return str(response.read().decode())


def read_live(url: str, *, token: str | None, sample: float) -> Live:
    """Agents (active = seen in the last hour), messages of the last hour and their busiest minute,
    the current rate from ``/metrics`` read twice ``sample`` seconds apart."""
    client = ApiClient(url, token=token, timeout=15)
    live = Live(url)
    first = _metrics(client)
    began = time.monotonic()
    for line in first.splitlines():
        if line.startswith("squadbus_info"):
            match = _BACKEND_LABEL.search(line)
            live.backend = match.group(1) if match else None
    now = datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)
    cursor: str | None = None
    for _ in range(PAGES):
        page = client._json("GET", "/v1/agents", query={"limit": 500, "cursor": cursor})
        for item in page["items"]:
            live.agents_total += 1
            last = item.get("last_activity_at")  # null: an agent with an open inbox and no message yet
            if item.get("inbox") == "open" or (last and datetime.fromisoformat(last) >= hour_ago):
                live.agents_active += 1
        cursor = page.get("next_cursor")
        if not cursor:
            break
    else:
        live.notes.append(f"agents: stopped after {PAGES * 500:,}")
    minutes: Counter[str] = Counter()
    cursor = None
    for _ in range(PAGES):
        page = client.history({"since": hour_ago.isoformat(), "limit": 1000, "cursor": cursor})
        for item in page["items"]:
            live.messages_last_hour += 1
            minutes[item["created_at"][:16]] += 1
        cursor = page.get("next_cursor")
        if not cursor:
            break
    else:
        live.hour_complete = False
        live.notes.append(f"messages: stopped after {PAGES * 1000:,}: the last hour had more")
    if minutes:
        live.peak_minute, busiest = minutes.most_common(1)[0]
        live.peak_msgs_per_s = busiest / 60
    time.sleep(max(0.0, sample - (time.monotonic() - began)))
    second = _metrics(client)
    elapsed = time.monotonic() - began
    for name in ("squadbus_messages_stored_total", "squadbus_messages_consumed_total",
                 "squadbus_messages_published_total"):
        before, after = _metric_sum(first, name), _metric_sum(second, name)
        if before is not None and after is not None:
            live.current_msgs_per_s = max(0.0, after - before) / elapsed
            live.notes.append(f"current rate from {name} over {elapsed:.1f} s")
            break
    return live


# ---- the command ----------------------------------------------------------------------------------


@click.command()
@click.option("--agents", type=click.IntRange(min=0), default=None, help="Agents in the squad.")
@click.option("--msgs-per-hour", type=click.FloatRange(min=0), default=None,
              help="Messages each agent sends per hour (the guide's scenarios: 100 agents x 10 msgs/h ...).")
@click.option("--from", "from_url", default=None, metavar="URL",
              help="A running squadbus serve: read agents, messages per hour and the peak rate from it.")
@click.option("--bench", "bench_files", multiple=True, metavar="FILE.json",
              help="squadbus bench --json files: measured capacities instead of the built-in ones (repeatable).")
@click.option("--headroom", type=click.FloatRange(min=1), default=3.0, show_default=True,
              help="The average rate times this must fit in the measured capacity (peaks above the average).")
@click.option("--sample", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="With --from: seconds between the two reads of /metrics for the current rate.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def plan(ctx: click.Context, agents: int | None, msgs_per_hour: float | None, from_url: str | None,
         bench_files: tuple[str, ...], headroom: float, sample: float, as_json: bool) -> None:
    """Which backend to run for a squad, and why: the design's migration triggers, measured capacities,
    the design's cost lines. With --from, a running service's live figures say which triggers are crossed."""
    try:
        capacities = capacities_from(bench_files)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"cannot read the bench file: {type(exc).__name__}: {exc}")
    live: Live | None = None
    if from_url is not None:
        token = getattr(ctx.obj, "api_token", None) if ctx.obj is not None else None
        try:
            live = read_live(from_url, token=token, sample=sample)
        except ApiError as exc:
            _fail(str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            _fail(f"the service at {from_url} sent figures this plan cannot read: {type(exc).__name__}: {exc}")
    if agents is None or msgs_per_hour is None:
        if live is None:
            _fail("give --agents and --msgs-per-hour, or --from URL of a running service")
        assert live is not None
        agents = live.agents_active if agents is None else agents
        if msgs_per_hour is None:
            total = live.messages_last_hour
            msgs_per_hour = total / agents if agents else 0.0
    peak = live.peak_msgs_per_s if live is not None else None
    if agents == 0 and live is None:
        _fail("--agents must be at least 1")
    result = decide(agents, msgs_per_hour, capacities=capacities, headroom=headroom, peak_msgs_per_s=peak, live=live)
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(render(result) + "\n")


def _fail(message: str) -> None:
    click.echo(f"squadbus: error: {message}", err=True)
    raise SystemExit(1)


def render(result: Plan) -> str:
    """The plan as text."""
    option = OPTIONS[result.backend]
    out = []
    if result.live is not None:
        live = result.live
        more = "" if live.hour_complete else " (at least)"
        current = "-" if live.current_msgs_per_s is None else f"{live.current_msgs_per_s:,.2f} msgs/s"
        out += [f"live figures from {live.url} (backend {live.backend or '?'}):",
                f"  agents: {live.agents_total:,} seen, {live.agents_active:,} active in the last hour",
                f"  messages in the last hour: {live.messages_last_hour:,}{more}; busiest minute "
                f"{live.peak_minute or '-'} at {live.peak_msgs_per_s:,.2f} msgs/s; now {current}",
                *(f"  note: {n}" for n in live.notes), ""]
    out.append(f"squad: {result.agents:,} agents x {result.msgs_per_hour_per_agent:,.4g} msgs/h = "
               f"{result.msgs_per_hour:,.0f} msgs/h = {result.avg_msgs_per_s:,.2f} msgs/s average, "
               f"{result.msgs_per_day:,.0f} msgs/day")
    out.append(f"migration triggers ({GUIDE}, Next Steps: Set migration triggers):")
    for t in result.triggers:
        mark = "CROSSED" if t.crossed else "ok     "
        out.append(f"  {mark} {t.name:18} now {_num(t.value):>12}  -> {t.action}")
    crossed = [t.name for t in result.triggers if t.crossed]
    out.append(f"  crossed: {', '.join(crossed) if crossed else 'none'}")
    out.append("")
    out.append(f"run: {option.name}  ({option.url})")
    out.append(f"why: {result.reason}")
    out.append("")
    out.append(f"measured capacity, squadbus Bus.send -> group handler (needed: {result.needed_msgs_per_s:,.1f} "
               f"msgs/s = average x {result.headroom:g}{' or the live peak' if result.live else ''}):")
    for key, cap in result.capacities.items():
        mark = "enough" if cap.msgs_per_s >= result.needed_msgs_per_s else "short "
        out.append(f"  {key:8} {cap.msgs_per_s:>10,.0f} msgs/s  {mark}  ({cap.source})")
    out.append("")
    out.append(f"cost per month ({GUIDE}, Cost Analysis for 5,000 agents / 250k msgs/day, and Cost Comparison; "
               "the guide's figures for that one scenario, not measured and not scaled to this squad):")
    for key in ("memory", *ORDER):
        o = OPTIONS[key]
        pick = "  <-" if key == result.backend else ""
        out.append(f"  {o.name:42} managed {o.managed:24} self-hosted {o.self_hosted:34} "
                   f"[{o.cost_range}]{pick}")
    return "\n".join(out)
