"""``squadbus simulate``: a squad of simulated agents on real inboxes, and whether a scenario holds.

The parent process connects to the backend, runs the db-writer worker against
the history store (``--store-url``, default a temporary SQLite file), and
starts ``processes`` host processes (:mod:`squadbus.benchmarks.simulate_host`;
on ``memory://``, which lives inside one process, a single host runs in the
parent itself). Each host opens ``bus.inbox(agent, domains=(domain,))`` for the
agents placed on it (``crc32(agent_id) % processes``); an agent takes its
deliveries in a task of its own (``async for``, ``receive="iterator"``) or by a
plain-function handler the inbox calls inline (``receive="handler"``, no task per
agent). Once every host has opened, each sends its agents' messages at the scenario's rate times the speed-up
(the mix is in :mod:`squadbus.benchmarks.simulate_squad`). After ``duration``
seconds of sending, a drain period (ended early once every delivery and every
row arrived) lets the last messages land; then every host is stopped and
killed by PID if it does not exit.

What is measured, from the hosts' event logs:

* offered rate: messages sent (acked by the backend) per second of the sending
  window; the expected and delivered deliveries per second (a broadcast is one
  message and many deliveries);
* end-to-end latency (receive − send, both ``time.time()`` on one machine) of
  every delivery, in an HdrHistogram (3 significant digits): p50, p99, p99.9, max;
* lost: an expected (message, agent) delivery that never arrived by the end of
  the drain, for messages whose send succeeded; duplicated: a (message, agent)
  delivered more than once; misrouted: a delivery to an agent the message was
  not for, or on a host that does not host that agent;
* store lag: rows the db-writer committed for this run's messages at the end of
  sending and at the end, and how long after sending ended the last row landed;
* per process, at the end of sending (after opening, when the run stops
  there): RSS and peak RSS, open sockets; the longest GC pause while sending,
  overall and per generation (``gc.callbacks``; every host calls ``gc.freeze()``
  once its inboxes are open), and the objects the collector still tracks
  outside that frozen set when sending ends;
* broker resources at the end of sending: Redis client connections (``CLIENT
  LIST``, less this probe's own), NATS JetStream consumers on the stream
  (``consumer_count``), Kafka consumer groups (``list_consumer_groups``); on
  every backend, the sockets of all simulate processes (``/proc/<pid>/fd``).

A scenario is ``held`` when every inbox opened, nothing was lost, no send
failed, the offered rate reached 95 % of the target, the store caught up, and
p99 < 10 ms (50 ms on Kafka). Opening time is reported on its own line, not in
the rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from squadbus.benchmarks.loops import DEFAULT_LOOP, check_loop
from squadbus.benchmarks.simulate_host import (
    ITERATOR,
    MODULE,
    RECEIVE_MODES,
    GcPauses,
    Host,
    HostPlan,
    one_line,
    process_figures,
    socket_count,
)
from squadbus.benchmarks.simulate_squad import DIRECT, DOMAIN, KINDS, REPLY, REQUEST, SQUAD, Squad, host_of
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.core.registry import scheme_of
from squadbus.core.settings import sqlite_url
from squadbus.store.base import HistoryStore, StoredMessage, open_store
from squadbus.workers.db_writer import DbWriter

SCENARIOS: dict[int, tuple[int, int]] = {1: (100, 10), 2: (500, 20), 3: (1_000, 50), 4: (5_000, 100), 5: (10_000, 100)}
"""The guide's five scenarios: agents, messages per agent per hour."""

ROUTES: dict[str, tuple[str, ...]] = {
    "point_to_point": (DIRECT, REQUEST, REPLY), "domain": (DOMAIN,), "squad": (SQUAD,)}
"""Deliveries grouped by how they travel: to one agent (direct messages, requests, replies), or copied to a
domain's or to every agent's inbox. The latency of each is reported beside the overall one."""
ROUTE_NAMES = {"point_to_point": "direct+request+reply", "domain": "domain broadcast", "squad": "squad broadcast"}

P99_TARGET_MS = {"kafka": 50.0}
DEFAULT_P99_TARGET_MS = 10.0
RATE_SHORTFALL = 0.95
MAX_LATENCY_US = 3_600_000_000


class SimulateError(Exception):
    """The simulation could not run (bad URL, broker down, bad options): one line for the user."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """One simulation run."""

    url: str
    agents: int
    msgs_per_hour: float
    scenario: int | None = None
    processes: int = 1
    speedup: float = 1.0
    duration: float = 30.0
    drain: float = 10.0
    warmup: float = 0.0
    """Seconds at the start of sending whose messages are left out of the latency percentiles (Kafka group joins)."""
    open_timeout: float = 60.0
    request_timeout: float = 5.0
    connect_timeout: float = 10.0
    store_url: str | None = None
    seed: int = 0
    p99_target_ms: float | None = None
    """The p99 a held scenario stays under; None: 10 ms, 50 ms on Kafka."""
    loop: str = DEFAULT_LOOP
    """The event loop of the parent and every host: ``asyncio`` or ``uvloop`` (squadbus.benchmarks.loops)."""
    receive: str = ITERATOR
    """How the agents take their deliveries: ``iterator`` (a task per agent, ``async for delivery in inbox``) or
    ``handler`` (a plain function called inline by the inbox, no task per agent)."""

    def __post_init__(self) -> None:
        check_loop(self.loop)
        if self.receive not in RECEIVE_MODES:
            raise ConfigError(f"unknown --receive {self.receive!r}: expected {' or '.join(RECEIVE_MODES)}")
        if self.agents < 5:
            raise ConfigError("--agents must be at least 5 (a PM per domain)")
        if self.msgs_per_hour <= 0 or self.speedup <= 0 or self.duration <= 0:
            raise ConfigError("--msgs-per-hour, --speedup and --duration must be positive")
        if self.processes < 1:
            raise ConfigError("--processes must be at least 1")
        if self.drain < 0 or self.warmup < 0 or self.open_timeout <= 0:
            raise ConfigError("--drain and --warmup must be >= 0, --open-timeout positive")
        if self.p99_target_ms is not None and self.p99_target_ms <= 0:
            raise ConfigError("--p99-target must be positive")
        if self.processes > 1 and is_memory(self.url):
            raise ConfigError("memory:// lives inside one process: --processes must be 1 (use a broker URL)")

    @property
    def target_rate(self) -> float:
        """Messages per second the squad should offer (agents × msgs/h × speed-up / 3600)."""
        return self.agents * self.msgs_per_hour * self.speedup / 3600

    @property
    def label(self) -> str:
        """``scenario 3`` or ``custom``, with the squad's size and rate."""
        name = f"scenario {self.scenario}" if self.scenario else "custom"
        return f"{name} ({self.agents:,} agents × {self.msgs_per_hour:g} msgs/h)"


def is_memory(url: str) -> bool:
    """True for the in-process backend."""
    return url.split("://", 1)[0].lower() == "memory"


def p99_target_ms(config: SimConfig) -> float:
    """The p99 a scenario must stay under to be held: the one asked for, else the backend's."""
    if config.p99_target_ms is not None:
        return config.p99_target_ms
    return P99_TARGET_MS.get(scheme_of(config.url), DEFAULT_P99_TARGET_MS)


# ---- hosts ------------------------------------------------------------------------------------


class HostHandle(Protocol):
    """One host as the parent drives it, in this process or a child process."""

    pid: int
    status: dict[str, Any]
    """The latest figures the host reported."""

    async def open(self, timeout: float) -> dict[str, Any]:
        """Start the host and wait until its inboxes are open (or opening failed); its figures."""
        ...

    async def send(self, t0: float, duration: float) -> dict[str, Any]:
        """Send from ``t0`` for ``duration`` s and wait until the host is done; its figures."""
        ...

    async def stop(self, timeout: float) -> dict[str, Any]:
        """Stop the host (close its inboxes and Bus); its final figures. Never raises, always ends."""
        ...

    def kill(self) -> None:
        """Kill the host's process by PID if it is still running (no-op in process)."""
        ...


class LocalHost:
    """The one host of a ``memory://`` run, inside the parent and over the parent's Bus."""

    def __init__(self, bus: Bus, plan: HostPlan, squad: Squad, log_path: Path) -> None:
        self._log = open(log_path, "a", buffering=1 << 16)  # noqa: SIM115 - closed in stop()
        self.host = Host(bus, plan, squad, self._log)
        self.pid = 0
        self.status: dict[str, Any] = self.host.status()
        self.pauses = GcPauses()

    def _refresh(self) -> dict[str, Any]:
        self.status = {**self.host.status(), **process_figures()}
        return self.status

    async def open(self, timeout: float) -> dict[str, Any]:
        self.pauses.__enter__()
        await self.host.open()
        self.pauses.reset()
        return self._refresh()

    async def send(self, t0: float, duration: float) -> dict[str, Any]:
        self.pauses.reset()
        await self.host.send_for(t0, duration)
        self._refresh()
        self.status.update(self.pauses.figures())
        return self.status

    async def stop(self, timeout: float) -> dict[str, Any]:
        try:
            await self.host.stop()
        finally:
            self.pauses.__exit__()
            self._log.close()
            gc.unfreeze()  # the parent goes on (a test, a second scenario): its objects are collectable again
        self.status = {**self.status, **self.host.status()}  # process figures stay those of the end of sending
        return self.status

    def kill(self) -> None:
        """Nothing to kill: the host is this process."""


class ChildHost:
    """A host process (``python -m squadbus.benchmarks.simulate_host``), driven over its stdin and stdout."""

    def __init__(self, plan: HostPlan, stderr_path: Path) -> None:
        self.plan = plan
        self.pid = 0
        self.status: dict[str, Any] = {"host": plan.host, "opened": 0, "delivered": 0}
        self._stderr_path = stderr_path
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._events: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def _event(self, name: str) -> asyncio.Future[dict[str, Any]]:
        if name not in self._events:
            self._events[name] = asyncio.get_running_loop().create_future()
        return self._events[name]

    async def open(self, timeout: float) -> dict[str, Any]:
        with open(self._stderr_path, "ab") as stderr:  # noqa: ASYNC230 - opened once per host
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", MODULE, self.plan.to_json(),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            )
        self.pid = self._proc.pid
        self._reader = asyncio.create_task(self._read())
        try:
            return await asyncio.wait_for(asyncio.shield(self._event("opened")), timeout)
        except TimeoutError:
            return {**self.status, "open_error": self.status.get("open_error") or f"open timeout after {timeout:g} s"}

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.pop("t", "")
            self.status = {**self.status, **event}
            if kind == "error":
                self.status["open_error"] = event["error"]
                kind = "opened"
            if kind in ("opened", "sent", "final"):
                future = self._event(kind)
                if not future.done():
                    future.set_result(self.status)
        code = await self._proc.wait()
        why = f"host {self.plan.host} exited with status {code}: {self._stderr_tail()}"
        self.status.setdefault("open_error", why)
        for kind in ("opened", "sent", "final"):
            future = self._event(kind)
            if not future.done():
                future.set_result({**self.status, "exit_error": why})

    def _stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = [x for x in self._stderr_path.read_text(errors="replace").splitlines() if x.strip()]
            if lines:
                return lines[-1][:300]
        return "no output"

    async def _command(self, text: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.write(text.encode() + b"\n")
            await proc.stdin.drain()

    async def send(self, t0: float, duration: float) -> dict[str, Any]:
        await self._command(f"go {t0:.6f} {duration:.6f}")
        return await asyncio.shield(self._event("sent"))

    async def stop(self, timeout: float) -> dict[str, Any]:
        await self._command("stop")
        try:
            figures = await asyncio.wait_for(asyncio.shield(self._event("final")), timeout)
        except TimeoutError:
            figures = {**self.status, "close_error": f"host {self.plan.host} did not stop within {timeout:g} s"}
        if self._proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 3.0)
        self.kill()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        return figures

    def kill(self) -> None:
        """SIGKILL the host by its PID if it has not exited."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()


# ---- broker resources -------------------------------------------------------------------------


async def broker_resources(url: str) -> dict[str, Any]:
    """What the broker holds for the squad now (see the module docstring); a figure it cannot read is None."""
    scheme = scheme_of(url)
    out: dict[str, Any] = {}
    try:
        async with asyncio.timeout(10):
            if scheme in ("redis", "rediss"):
                out["redis_client_connections"] = await _redis_clients(url)
            elif scheme == "nats":
                out["nats_stream_consumers"] = await _nats_consumers(url)
            elif scheme == "kafka":
                out["kafka_consumer_groups"] = await _kafka_groups(url)
    except Exception as exc:  # a probe that fails is reported as such, the run's figures still stand
        out["probe_error"] = one_line(exc)
    return out


async def _redis_clients(url: str) -> int:
    import redis.asyncio as aioredis

    from squadbus.backends.redis.settings import RedisSettings

    s = RedisSettings.from_url(url)
    client = aioredis.Redis(host=s.host, port=s.port, db=s.db, username=s.username, password=s.password, ssl=s.tls)
    try:
        clients = await client.client_list()
    finally:
        await client.aclose()
    return len(clients) - 1  # less this probe's own connection


async def _nats_consumers(url: str) -> int:
    import nats
    from squadbus.backends.nats.settings import NatsSettings

    s = NatsSettings.from_url(url)
    nc = await nats.connect(servers=list(s.servers), user=s.user, password=s.password, token=s.token,
                            connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False)
    try:
        info = await nc.jetstream().stream_info(s.stream)
        return int(info.state.consumer_count)
    finally:
        await nc.close()


async def _kafka_groups(url: str) -> int:
    from aiokafka.admin import AIOKafkaAdminClient

    from squadbus.backends.kafka.settings import KafkaSettings

    s = KafkaSettings.from_url(url)
    admin = AIOKafkaAdminClient(bootstrap_servers=list(s.bootstrap_servers))
    await admin.start()
    try:
        return len(await admin.list_consumer_groups())
    finally:
        await admin.close()


# ---- one run ----------------------------------------------------------------------------------


@dataclass(slots=True)
class RunReport:
    """Everything one run measured (see :meth:`as_dict` for the JSON and :func:`format_report` for the table)."""

    config: SimConfig
    hosts: list[dict[str, Any]] = field(default_factory=list)
    parent: dict[str, Any] = field(default_factory=dict)
    opened: int = 0
    open_seconds: float = 0.0
    open_errors: list[str] = field(default_factory=list)
    sent_by_kind: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    offered: int = 0
    """Messages the agents sent on their own (all but replies): what the rate applies to."""
    sending_seconds: float = 0.0
    send_errors: int = 0
    first_send_error: str = ""
    request_timeouts: int = 0
    expected: int = 0
    delivered: int = 0
    delivered_in_window: int = 0
    delivered_by_kind: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_by_kind: dict[str, int] = field(default_factory=dict)
    duplicated: int = 0
    misrouted: int = 0
    unknown: int = 0
    stale: int = 0
    latency_ms: dict[str, float | int | None] = field(default_factory=dict)
    latency_by_kind_ms: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    latency_by_route_ms: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    last_copy_ms: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    """Per broadcast kind: over the broadcasts sent, the time from the send to the last of its copies (ms)."""
    persisted_sent: int = 0
    stored_at_end_of_sending: int = 0
    stored: int = 0
    store_catch_up_s: float | None = None
    broker: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        """True when no reason says otherwise."""
        return not self.reasons

    @property
    def verdict(self) -> str:
        """``<label>: held`` or ``<label>: not held: <reasons>`` on one line."""
        head = f"{self.config.label}: "
        return head + ("held" if self.held else "not held: " + "; ".join(self.reasons))

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-able values."""
        c = self.config
        seconds = self.sending_seconds or c.duration
        return {
            "scenario": c.scenario, "agents": c.agents, "msgs_per_hour": c.msgs_per_hour, "url": c.url,
            "processes": c.processes, "speedup": c.speedup, "duration_s": c.duration, "drain_s": c.drain,
            "warmup_s": c.warmup, "p99_target_ms": p99_target_ms(c), "loop": c.loop, "receive": c.receive,
            "held": self.held, "reasons": self.reasons, "verdict": self.verdict,
            "open": {"opened": self.opened, "of": c.agents, "seconds": round(self.open_seconds, 3),
                     "errors": self.open_errors},
            "rates": {"target_msgs_per_s": round(c.target_rate, 3),
                      "offered_msgs_per_s": round(self.offered / seconds, 3),
                      "expected_deliveries_per_s": round(self.expected / c.duration, 3),
                      "delivered_per_s": round(self.delivered_in_window / c.duration, 3)},
            "sent": {"total": self.sent, "by_kind": self.sent_by_kind, "errors": self.send_errors,
                     "first_error": self.first_send_error, "request_timeouts": self.request_timeouts},
            "delivered": {"total": self.delivered, "expected": self.expected, "by_kind": self.delivered_by_kind},
            "lost": self.lost, "lost_by_kind": self.lost_by_kind, "duplicated": self.duplicated,
            "misrouted": self.misrouted, "delivered_unknown": self.unknown, "stale": self.stale,
            "latency_ms": self.latency_ms, "latency_by_kind_ms": self.latency_by_kind_ms,
            "latency_by_route_ms": self.latency_by_route_ms, "broadcast_last_copy_ms": self.last_copy_ms,
            "store": {"sent_persisted": self.persisted_sent, "rows_at_end_of_sending": self.stored_at_end_of_sending,
                      "rows": self.stored, "lag_at_end_of_sending": self.persisted_sent - self.stored_at_end_of_sending,
                      "lag_at_end": self.persisted_sent - self.stored, "catch_up_s": self.store_catch_up_s},
            "processes_figures": {"parent": self.parent, "hosts": self.hosts},
            "broker": self.broker, "notes": self.notes,
        }


Progress = Callable[[str, dict[str, Any]], None]
"""Called with a phase name and the figures so far (for a progress bar)."""


async def simulate(config: SimConfig, progress: Progress | None = None) -> RunReport:
    """Run one simulation; raises :class:`SimulateError` when it cannot start (bad URL, broker down)."""
    report = RunReport(config)
    try:
        bus = Bus.from_url(config.url)
    except (ConfigError, ImportError, ValueError) as exc:
        raise SimulateError(f"bad backend URL {config.url!r}: {exc}") from exc
    try:
        await asyncio.wait_for(bus.start(), config.connect_timeout)
    except Exception as exc:  # any failure to connect is the one line the user sees
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.close(), 5)
        detail = one_line(exc) if not isinstance(exc, TimeoutError) else f"no answer in {config.connect_timeout:g} s"
        raise SimulateError(f"cannot reach {config.url}: {detail}") from exc
    workdir = Path(tempfile.mkdtemp(prefix="squadbus-simulate-"))
    try:
        return await _run(config, bus, workdir, report, progress or (lambda phase, figures: None))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.close(), 15)
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(config: SimConfig, bus: Bus, workdir: Path, report: RunReport, progress: Progress) -> RunReport:
    run_id = uuid.uuid4().hex[:12]
    squad = Squad(config.agents)
    store_url = config.store_url or sqlite_url(workdir / "history.db")
    store: HistoryStore = open_store(store_url)
    await store.open()
    stored: set[str] = set()
    stored_last = [0.0]

    async def on_written(rows: list[StoredMessage]) -> None:
        for row in rows:
            if row.message.metadata.get("sim") == run_id:
                stored.add(str(row.message.id))
        stored_last[0] = time.time()

    writer = DbWriter(bus, store, on_written=on_written)
    hosts: list[HostHandle] = []
    try:
        await writer.start()
        plans = [HostPlan(url=config.url, run_id=run_id, agents=config.agents, processes=config.processes, host=i,
                          rate_per_agent=config.msgs_per_hour * config.speedup / 3600,
                          log_path=str(workdir / f"host-{i}.log"), open_timeout=config.open_timeout,
                          request_timeout=config.request_timeout, connect_timeout=config.connect_timeout,
                          seed=config.seed, loop=config.loop, receive=config.receive)
                 for i in range(config.processes)]
        if is_memory(config.url):
            hosts.append(LocalHost(bus, plans[0], squad, Path(plans[0].log_path)))
        else:
            hosts += [ChildHost(plan, workdir / f"host-{plan.host}.stderr") for plan in plans]
        ticker = asyncio.create_task(_tick(hosts, progress, "open"))
        started = time.perf_counter()
        try:
            opened = await asyncio.gather(*(h.open(config.open_timeout + config.connect_timeout) for h in hosts))
        finally:
            ticker.cancel()
        report.open_seconds = time.perf_counter() - started
        report.opened = sum(int(o.get("opened", 0)) for o in opened)
        report.open_errors = [f"host {o.get('host')}: {o['open_error']}" for o in opened if o.get("open_error")]
        report.notes.append("gc.freeze() called in every process once its inboxes were open")
        progress("opened", {"opened": report.opened, "of": config.agents, "seconds": report.open_seconds})
        if report.opened == config.agents and not report.open_errors:
            await _send_and_drain(config, hosts, report, stored, stored_last, progress)
    finally:
        finals = await asyncio.gather(*(h.stop(15.0) for h in hosts), return_exceptions=True)
        for h in hosts:
            h.kill()
        report.hosts = [f if isinstance(f, dict) else {"close_error": one_line(f)} for f in finals]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.stop(), 15)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 10)
    report.parent = {**process_figures(), "role": "parent: db-writer" + (" and the host" if is_memory(config.url)
                                                                          else "")}
    report.stored = len(stored)
    if report.sending_seconds:
        _account(config, squad, workdir, report, stored)
    _judge(config, report)
    return report


async def _tick(hosts: list[HostHandle], progress: Progress, phase: str) -> None:
    while True:
        await asyncio.sleep(0.5)
        progress(phase, _totals(hosts))


def _totals(hosts: list[HostHandle]) -> dict[str, Any]:
    total: dict[str, Any] = {"opened": 0, "delivered": 0, "expected": 0, "persisted": 0, "sent": 0}
    for h in hosts:
        status = h.status if not isinstance(h, LocalHost) else h.host.status()
        for key in ("opened", "delivered", "expected", "persisted"):
            total[key] += int(status.get(key, 0))
        total["sent"] += sum(status.get("sent", {}).values()) if isinstance(status.get("sent"), dict) else 0
    return total


async def _send_and_drain(config: SimConfig, hosts: list[HostHandle], report: RunReport, stored: set[str],
                          stored_last: list[float], progress: Progress) -> None:
    t0 = time.time() + 0.2
    ticker = asyncio.create_task(_tick(hosts, progress, "send"))
    try:
        await asyncio.gather(*(h.send(t0, config.duration) for h in hosts))
        report.sending_seconds = config.duration
        end_of_sending = time.time()
        pids = [h.pid or "self" for h in hosts]
        report.broker = {**await broker_resources(config.url),
                         "sockets_of_all_processes": socket_count() + sum(
                             socket_count(p) for p in pids if p != "self")}
        totals = _totals(hosts)
        report.persisted_sent = totals["persisted"]
        report.stored_at_end_of_sending = len(stored)
        deadline = end_of_sending + config.drain
        while time.time() < deadline:
            totals = _totals(hosts)
            if totals["delivered"] >= totals["expected"] and len(stored) >= totals["persisted"]:
                break
            progress("drain", totals)
            await asyncio.sleep(0.1)
        if len(stored) >= report.persisted_sent:
            report.store_catch_up_s = max(0.0, stored_last[0] - end_of_sending) if report.persisted_sent else 0.0
    finally:
        ticker.cancel()


def _account(config: SimConfig, squad: Squad, workdir: Path, report: RunReport, stored: set[str]) -> None:
    """Read every host's event log: sends, deliveries, losses, duplicates, latencies (see the module docstring)."""
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

    sent: dict[str, tuple[str, str, float, bool]] = {}
    deliveries: list[tuple[str, str, int, int]] = []
    for i in range(config.processes):
        path = workdir / f"host-{i}.log"
        if not path.exists():
            continue
        with open(path) as log:
            for line in log:
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == "S" and len(parts) == 6:
                    sent[parts[1]] = (parts[2], parts[3], float(parts[4]), parts[5] == "1")
                elif parts[0] == "X" and len(parts) == 2:
                    sent.pop(parts[1], None)
                elif parts[0] == "D" and len(parts) == 4:
                    deliveries.append((parts[1], parts[2], int(parts[3]), i))
    t0 = min((s[2] for s in sent.values()), default=0.0)
    window_end = t0 + config.duration
    counts: Counter[tuple[str, str]] = Counter()
    histogram = HdrHistogram(1, MAX_LATENCY_US, 3)
    per_kind = {kind: HdrHistogram(1, MAX_LATENCY_US, 3) for kind in KINDS}
    by_kind: Counter[str] = Counter()
    last_copy: dict[str, int] = {}
    for message_id, agent, latency_us, host in deliveries:
        entry = sent.get(message_id)
        if entry is None:
            report.unknown += 1  # delivered, but its send failed (or was never logged)
            continue
        kind, target, sent_at, _ = entry
        counts[(message_id, agent)] += 1
        by_kind[kind] += 1
        placed = host_of(agent, config.processes, config.url)
        if not squad.reaches(kind, target, agent) or (kind != REPLY and placed != host):
            report.misrouted += 1
        if sent_at + latency_us / 1e6 <= window_end:
            report.delivered_in_window += 1
        if sent_at >= t0 + config.warmup:
            histogram.record_value(min(latency_us, MAX_LATENCY_US))
            per_kind[kind].record_value(min(latency_us, MAX_LATENCY_US))
            if kind in (SQUAD, DOMAIN):
                last_copy[message_id] = max(last_copy.get(message_id, 0), latency_us)
    report.delivered = sum(counts.values())
    report.duplicated = sum(n - 1 for n in counts.values() if n > 1)
    report.delivered_by_kind = {k: by_kind[k] for k in KINDS}
    reached: Counter[str] = Counter(message_id for message_id, _ in counts)
    lost_by_kind: Counter[str] = Counter()
    for message_id, (kind, target, _, _) in sent.items():
        missing = squad.expected(kind, target) - reached[message_id]
        if missing > 0:
            lost_by_kind[kind] += missing
    report.lost = sum(lost_by_kind.values())
    report.lost_by_kind = {k: lost_by_kind[k] for k in KINDS}
    report.expected = sum(squad.expected(kind, target) for kind, target, _, _ in sent.values())
    report.sent = len(sent)
    report.sent_by_kind = {k: sum(1 for s in sent.values() if s[0] == k) for k in KINDS}
    report.offered = report.sent - report.sent_by_kind[REPLY]
    report.persisted_sent = sum(1 for s in sent.values() if s[3])
    report.stored = sum(1 for message_id, s in sent.items() if s[3] and message_id in stored)
    report.send_errors = sum(int(h.get("send_errors", 0)) for h in report.hosts)
    report.first_send_error = next((h["first_send_error"] for h in report.hosts if h.get("first_send_error")), "")
    report.request_timeouts = sum(int(h.get("request_timeouts", 0)) for h in report.hosts)
    report.stale = sum(int(h.get("stale", 0)) for h in report.hosts)
    report.latency_ms = _percentiles(histogram)
    report.latency_by_kind_ms = {kind: _percentiles(h) for kind, h in per_kind.items()}
    for route, kinds in ROUTES.items():
        merged = HdrHistogram(1, MAX_LATENCY_US, 3)
        for kind in kinds:
            merged.add(per_kind[kind])
        report.latency_by_route_ms[route] = _percentiles(merged)
    for kind in (SQUAD, DOMAIN):
        lasts = sorted(us for message_id, us in last_copy.items() if sent[message_id][0] == kind)
        report.last_copy_ms[kind] = {
            "count": len(lasts), "p50": lasts[len(lasts) // 2] / 1e3 if lasts else None,
            "max": lasts[-1] / 1e3 if lasts else None}
    report.notes.append("latency = time.time() at delivery - time.time() before the send, one machine, one clock")


def _percentiles(histogram: Any) -> dict[str, float | int | None]:
    n = int(histogram.get_total_count())
    return {
        "count": n,
        "p50": histogram.get_value_at_percentile(50) / 1e3 if n else None,
        "p99": histogram.get_value_at_percentile(99) / 1e3 if n else None,
        "p99.9": histogram.get_value_at_percentile(99.9) / 1e3 if n else None,
        "max": histogram.get_max_value() / 1e3 if n else None,
    }


def _judge(config: SimConfig, report: RunReport) -> None:
    reasons = report.reasons
    if report.opened < config.agents or report.open_errors:
        why = report.open_errors[0] if report.open_errors else "open phase ended early"
        if len(report.open_errors) > 1:
            why += f" (and {len(report.open_errors) - 1} more host(s))"
        reasons.append(f"opened {report.opened:,} of {config.agents:,} inboxes in {report.open_seconds:.1f} s: {why}")
        return
    if report.sent == 0:
        reasons.append(f"no message was sent in {config.duration:g} s (raise --speedup or --duration)")
        return
    if report.lost:
        kinds = ", ".join(f"{k} {n:,}" for k, n in report.lost_by_kind.items() if n)
        reasons.append(f"lost {report.lost:,} deliveries ({kinds})")
    if report.send_errors:
        reasons.append(f"{report.send_errors:,} sends failed: {report.first_send_error}")
    offered = report.offered / report.sending_seconds
    if offered < RATE_SHORTFALL * config.target_rate:
        reasons.append(f"offered only {offered:.1f} of {config.target_rate:.1f} msgs/s")
    target = p99_target_ms(config)
    p99 = report.latency_ms.get("p99")
    if p99 is not None and p99 >= target:
        routes = ", ".join(f"{ROUTE_NAMES[r]} {v['p99']:.1f}" for r, v in report.latency_by_route_ms.items()
                           if v.get("p99") is not None)
        reasons.append(f"p99 {p99:.1f} ms ≥ {target:g} ms" + (f" (p99 by route: {routes})" if routes else ""))
    if report.stored < report.persisted_sent:
        behind = report.persisted_sent - report.stored
        reasons.append(f"store {behind:,} rows behind after the {config.drain:g} s drain")
    if report.misrouted:
        reasons.append(f"{report.misrouted:,} deliveries reached the wrong agent or host")


# ---- output -----------------------------------------------------------------------------------


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mib(kib: Any) -> str:
    return f"{int(kib or 0) / 1024:.0f} MiB"


def format_report(report: RunReport) -> str:
    """The final table of one run."""
    c = report.config
    d = report.as_dict()
    rates, store, lat = d["rates"], d["store"], report.latency_ms
    lines = [
        f"{c.label} on {c.url}: {c.processes} host process(es), speed-up {c.speedup:g}×, "
        f"{c.duration:g} s sending + up to {c.drain:g} s drain, {c.loop} loop, agents receive by {c.receive}",
        f"  open        {report.opened:,} of {c.agents:,} inboxes in {report.open_seconds:.2f} s"
        + (f"  ({'; '.join(report.open_errors)})" if report.open_errors else ""),
    ]
    if report.sending_seconds:
        kinds = ", ".join(f"{k} {n:,}" for k, n in report.sent_by_kind.items())
        lines += [
            f"  offered     {rates['offered_msgs_per_s']:.1f} msgs/s (target {rates['target_msgs_per_s']:.1f}); "
            f"sent {report.sent:,} with the replies: {kinds}",
            f"  delivered   {rates['delivered_per_s']:.1f} deliveries/s in the window "
            f"(expected {rates['expected_deliveries_per_s']:.1f}/s); {report.delivered:,} of {report.expected:,} "
            "by the end",
            f"  latency     p50 {_ms(lat.get('p50'))} ms  p99 {_ms(lat.get('p99'))} ms  "
            f"p99.9 {_ms(lat.get('p99.9'))} ms  max {_ms(lat.get('max'))} ms  ({lat.get('count', 0):,} deliveries"
            + (f", first {c.warmup:g} s left out" if c.warmup else "") + ")",
            "  by route    " + "; ".join(
                f"{ROUTE_NAMES[r]} p50 {_ms(v['p50'])} p99 {_ms(v['p99'])} ({v['count']:,})"
                for r, v in report.latency_by_route_ms.items() if v["count"]) + " (ms, deliveries)",
            "  by kind     " + "; ".join(
                f"{k} p50 {_ms(v['p50'])} p99 {_ms(v['p99'])}" for k, v in report.latency_by_kind_ms.items()
                if v["count"]) + " (ms)",
            "  last copy   " + ("; ".join(
                f"{ROUTE_NAMES[k]} median {_ms(v['p50'])} worst {_ms(v['max'])} ms ({v['count']:,} sent)"
                for k, v in report.last_copy_ms.items() if v["count"]) or "no broadcast")
            + " (send to its last copy)",
            f"  lost        {report.lost:,}   duplicated {report.duplicated:,}   misrouted {report.misrouted:,}   "
            f"send errors {report.send_errors:,}   request timeouts {report.request_timeouts:,}"
            + (f"   stale {report.stale:,}" if report.stale else ""),
            f"  store       {store['rows']:,} of {store['sent_persisted']:,} rows; "
            f"lag {store['lag_at_end_of_sending']:,} when sending ended, caught up "
            + (f"{store['catch_up_s']:.2f} s later" if store["catch_up_s"] is not None else "not within the drain"),
        ]
    procs = [("parent", report.parent), *((f"host {h.get('host', '?')}", h) for h in report.hosts)]
    for label, p in procs:
        name = "host 0 (in the parent)" if label == "host 0" and is_memory(c.url) else label
        gc_note = ""
        if "gc_max_pause_ms_by_gen" in p:
            gc_note = (f", longest GC pause while sending {float(p['gc_max_pause_ms']):.1f} ms (gen 0 / 1 / 2: "
                       + " / ".join(f"{float(t):.1f}" for t in p["gc_max_pause_ms_by_gen"]) + " ms in "
                       + " / ".join(f"{int(n):,}" for n in p["gc_collections_by_gen"]) + " collections"
                       + (", CPU " + " / ".join(f"{float(t):.1f}" for t in p["gc_max_cpu_ms_by_gen"]) + " ms"
                          if "gc_max_cpu_ms_by_gen" in p else "") + "; "
                       f"{int(p['gc_tracked']):,} objects tracked outside the frozen set)")
        elif "gc_max_pause_ms" in p:
            gc_note = (f", longest GC pause while sending {float(p['gc_max_pause_ms']):.1f} ms "
                       f"({int(p['gc_collections']):,} collections)")
        lines.append(f"  {name:11} RSS {_mib(p.get('rss_kib'))} (peak {_mib(p.get('hwm_kib'))}), "
                     f"{int(p.get('sockets', 0))} sockets{gc_note}"
                     + (f"; {p['close_error']}" if p.get("close_error") else ""))
    if report.broker:
        lines.append("  broker      " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.broker.items()))
    lines += [f"  note        {n}" for n in report.notes]
    lines.append(f"  verdict     {report.verdict}")
    return "\n".join(lines)


def configs(url: str, scenarios: tuple[int, ...], agents: int | None, msgs_per_hour: float | None,
            **options: Any) -> list[SimConfig]:
    """The runs asked for: one per scenario, or one custom squad; raises ConfigError on bad options."""
    if scenarios and (agents is not None or msgs_per_hour is not None):
        raise ConfigError("give --scenario or --agents with --msgs-per-hour, not both")
    if not scenarios and (agents is None or msgs_per_hour is None):
        raise ConfigError("give --scenario 1..5, or --agents N with --msgs-per-hour M")
    if scenarios:
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ConfigError(f"unknown scenario {unknown[0]}: expected 1..5")
        return [SimConfig(url=url, scenario=s, agents=SCENARIOS[s][0], msgs_per_hour=SCENARIOS[s][1], **options)
                for s in scenarios]
    assert agents is not None and msgs_per_hour is not None
    return [SimConfig(url=url, agents=agents, msgs_per_hour=msgs_per_hour, **options)]


if __name__ == "__main__":
    from squadbus.cli.simulate import simulate as command

    command(sys.argv[1:], prog_name="python -m squadbus.benchmarks.simulate")
