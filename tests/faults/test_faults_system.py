"""Faults of the system around the brokers, checked by the ledger (issue 17): the history store under the
db-writer, the HTTP service under SSE viewers, a NATS cluster node, the secondary of ``dual://`` and the
bridge, each killed or taken away while a producer sends at a steady rate.

Each case starts what it hurts (private servers and processes), stops it by PID, runs one round in
``make test`` and ``SQUADBUS_FAULT_ROUNDS`` rounds under ``make faults``, and appends its reports to
``SQUADBUS_FAULTS_REPORT`` (see :mod:`squadbus.testing.ledger`). A "completion" here is what the far end
holds: a row in the store, an event a viewer read, a message read back from the destination; read-backs
are recorded in the order read, so the ledger's order check is the order stored.

Pass everywhere: nothing acknowledged lost, nothing the sender was told failed delivered; then per case
what the contract promises (once per id after the db-writer, on the SSE stream and on the spooled
secondary; per-execution order where the far end keeps one).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from squadbus.backends.dual import DualBackend
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, ReadsAll
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.testing.ledger import Completion, Ledger, Report, Sent, append_report
from squadbus.testing.servers.nats import NatsCluster, NatsServer
from squadbus.testing.servers.postgres import PostgresServer, running_postgres
from squadbus.testing.servers.process import ServerUnavailable, free_port, port_open
from squadbus.testing.servers.redis import RedisServer

ROUNDS = int(os.environ.get("SQUADBUS_FAULT_ROUNDS", "1"))
REPORT = Path(os.environ["SQUADBUS_FAULTS_REPORT"]) if os.environ.get("SQUADBUS_FAULTS_REPORT") else None
WAIT = 60.0
SQUADBUS = str(Path(sys.executable).parent / "squadbus")
REDIS_OPTIONS = "profile=durable&publish_timeout=1&block=0.5"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60 + 90 * ROUNDS)]


# ---- helpers (the first three would sit well in squadbus.testing.ledger) ---------------------------


def _report(report: Report) -> Report:
    append_report(REPORT, report)
    print(report.as_row())  # shown with -s / -rA: the figures of docs/reliability.md
    return report


def _read_back(ledger: Ledger, ids: list[uuid.UUID], consumer: str) -> None:
    """Record what the far end holds, in the order it holds it, as completions (time = order read)."""
    for message_id in ids:
        ledger.completions.append(Completion(message_id, consumer, 1, time.time()))


def _combined(fault: str, backend: str, ledger: Ledger, readers: dict[str, list[uuid.UUID]]) -> Report:
    """One report for several readers that should each see everything (SSE viewers): each reader is
    checked alone, then lost, duplicates and order violations are summed and delivered is the least."""
    reports = []
    for name, ids in readers.items():
        alone = Ledger()
        alone.sent = ledger.sent
        _read_back(alone, ids, name)
        reports.append(alone.check(fault, backend))
    first = reports[0]
    first.delivered = min(r.delivered for r in reports)
    first.lost = sum(r.lost for r in reports)
    first.lost_ids = [i for r in reports for i in r.lost_ids]
    first.duplicates = sum(r.duplicates for r in reports)
    first.order_violations = sum(r.order_violations for r in reports)
    first.unknown_delivered = max(r.unknown_delivered for r in reports)
    first.failed_delivered = max(r.failed_delivered for r in reports)
    first.notes = f"{len(readers)} viewers; lost, duplicates and order violations summed over them"
    return first


async def _until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str,
                 every: float = 0.1) -> None:
    """Wait until ``check()`` (sync or async) is true, errors counting as false (the far end may be
    coming back); fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(Exception):
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


async def _steady(send: Callable[[int], Awaitable[object]], *, count: int, rate: float) -> None:
    """``count`` sends on a fixed schedule of ``rate`` per second (a send that blocked is caught up after)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        await send(i)
        delay = start + (i + 1) / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


async def _produce(bus: Bus, ledger: Ledger, agent: str, executions: list[uuid.UUID], *, count: int, rate: float,
                   producer: str = "p") -> None:
    await _steady(lambda i: ledger.send(bus, producer, agent, executions[i % len(executions)]),
                  count=count, rate=rate)


async def _read_all(url: str, pattern: str) -> list[Message]:
    """Everything ``url`` retains under ``pattern``, read once (per-execution order as stored)."""
    async with Bus.from_url(url) as bus:
        backend = bus.backend
        assert isinstance(backend, ReadsAll)
        async with contextlib.aclosing(backend.read_all(pattern)) as messages:
            return [m async for m in messages]


def _warnings(log: Path, limit: int = 40) -> str:
    """A child's WARNING and ERROR lines (the tail of the log may not reach back to the fault)."""
    if not log.exists():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "WARNING" in line or "ERROR" in line]
    return "\n".join(lines[-limit:])


def _tail(log: Path) -> str:
    """The end of a child's log, for a failure message."""
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


async def _spawn(argv: list[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL, cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


async def _kill9(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


async def _terminate(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> int:
    """SIGTERM by PID, SIGKILL if it does not exit in ``timeout``; the exit code."""
    if proc.returncode is None:
        proc.terminate()
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        await _kill9(proc)
        return -signal.SIGKILL


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private durable redis-server (AOF, fsync always), stopped by PID."""
    (tmp_path / "redis").mkdir()
    with RedisServer("durable", directory=tmp_path / "redis") as server:
        yield server


# ---- 1. kill -9 of PostgreSQL during db-writer batches ---------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """True while the process exists, zombie included (PostgreSQL's lock file check counts zombies)."""
    return Path(f"/proc/{pid}").exists()


def _crash_postgres(pg: PostgresServer) -> None:
    """``kill -9`` the postmaster and every process it started at once (as a machine crash would end
    them); a postmaster alone leaves its backends holding shared memory and a restart refuses to run."""
    pid = pg.pid()
    assert pid is not None and _alive(pid), "postgres is not running"
    os.kill(pid, signal.SIGSTOP)  # no backend forked between listing the children and killing them
    victims = [pid, *_children(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(v) for v in victims) or port_open(pg.port):
        assert time.monotonic() < deadline, "postgres processes survived SIGKILL"
        time.sleep(0.02)


def _restart_postgres(pg: PostgresServer) -> None:
    try:
        pg.start()
    except ServerUnavailable as exc:
        raise ServerUnavailable(f"{exc}\n{_tail(pg.log)}") from exc


@contextlib.contextmanager
def _private_postgres() -> Iterator[PostgresServer]:
    """A cluster of this test alone (it is crashed), in a temp dir the ``postgres`` user can reach."""
    with running_postgres() as pg:
        try:
            yield pg
        finally:
            pid = pg.pid()
            if pid is not None and not _alive(pid):
                (pg.data / "postmaster.pid").unlink(missing_ok=True)  # crashed last: nothing to stop


async def _stored(store_url: str, ids: list[uuid.UUID]) -> list[tuple[uuid.UUID, uuid.UUID, int]]:
    """(id, execution, seq) of every row holding one of ``ids``, per execution in seq order."""
    conn = await asyncpg.connect(store_url, timeout=2)
    try:
        rows = await conn.fetch("SELECT id, task_execution_id, seq FROM messages WHERE id = ANY($1::uuid[])"
                                " ORDER BY task_execution_id, seq", ids)
    finally:
        await conn.close()
    return [(r["id"], r["task_execution_id"], r["seq"]) for r in rows]


POSTGRES_DOWN = (
    1.0,
    # Before the db-writer retried in place until the store answered, a batch nacked after 5 s was
    # written after later ones: 5-6 rows after ~470 later sends of their executions, in 4 of 4 runs.
    7.0,
)


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.parametrize("down_for", POSTGRES_DOWN)
async def test_postgres_kill9_during_db_writer_batches(redis: RedisServer, tmp_path: Path, down_for: float) -> None:
    """A producer sends 100/s to Redis while ``squadbus worker db-writer`` writes batches to PostgreSQL;
    PostgreSQL (postmaster and backends) is killed with SIGKILL, down ``down_for`` seconds (7 s: longer
    than the db-writer's retries in place used to last before it nacked the batch), restarted on the
    same data directory. Then every acknowledged message is a row exactly once, and each
    execution's rows are in send order."""
    url = f"{redis.url}?{REDIS_OPTIONS}"
    with _private_postgres() as pg:
        conn = await asyncpg.connect(pg.url)
        try:
            await conn.execute('CREATE DATABASE "history"')
        finally:
            await conn.close()
        store_url = pg.url_for("history")
        log = tmp_path / "db-writer.log"
        worker = await _spawn([SQUADBUS, "-v", "worker", "db-writer", "--url", url, "--store", store_url], log,
                              env={"SQUADBUS_DATA_DIR": str(tmp_path)})
        try:
            await _until(lambda: (worker.returncode is not None or "running on" in log.read_text()),
                         WAIT, "the db-writer to start")
            assert worker.returncode is None, _tail(log)
            for _ in range(ROUNDS):
                report, misplaced = await _db_writer_round(url, pg, store_url, down_for, worker, log)
                assert report.lost == 0, report.lost_ids
                assert report.failed_delivered == 0, report.failed_delivered_errors
                assert report.duplicates == 0, "a message stored twice by the db-writer"
                assert report.order_violations == 0, (
                    f"rows out of send order: {misplaced[:10]}\nthe db-writer's warnings:\n{_warnings(log)}")
        finally:
            code = await _terminate(worker)
        assert code == 0, f"the db-writer exited with {code}:\n{_tail(log)}"


async def _db_writer_round(url: str, pg: PostgresServer, store_url: str, down: float,
                           worker: asyncio.subprocess.Process, log: Path) -> tuple[Report, list[str]]:
    """One round: the report, and each row stored after a row of a later send of its execution."""
    ledger, agent = Ledger(), f"agent-{uuid.uuid4().hex[:8]}"
    executions = [uuid.uuid4() for _ in range(4)]
    async with Bus.from_url(url) as bus:
        producing = asyncio.create_task(_produce(bus, ledger, agent, executions, count=900, rate=100))
        await _until(lambda: _any_stored(store_url, ledger), WAIT, "the db-writer to write batches")
        await asyncio.sleep(1.0)
        before = len(await _stored(store_url, list(ledger.sent)))
        await asyncio.to_thread(_crash_postgres, pg)
        await asyncio.sleep(down)
        restarting = time.monotonic()
        await asyncio.to_thread(_restart_postgres, pg)
        restart_s = time.monotonic() - restarting
        await producing
        acknowledged = sorted(ledger.acknowledged)

        async def all_stored() -> bool:
            return worker.returncode is not None or len(await _stored(store_url, acknowledged)) >= len(acknowledged)

        await _until(all_stored, WAIT, "every acknowledged message stored after the restart", every=0.5)
        assert worker.returncode is None, "the db-writer died"
        await asyncio.sleep(1.0)  # a late second write, if any, would be counted
    rows = await _stored(store_url, list(ledger.sent))
    _read_back(ledger, [message_id for message_id, _, _ in rows], "db-writer")
    misplaced, highest = [], dict[uuid.UUID, int]()
    for message_id, execution, seq in rows:
        sent = ledger.sent[message_id].seq
        if sent < highest.get(execution, -1):
            misplaced.append(f"{str(execution)[:8]}: send #{sent} stored as seq {seq}, after send "
                             f"#{highest[execution]}")
        highest[execution] = max(sent, highest.get(execution, -1))
    report = _report(ledger.check(
        f"PostgreSQL kill -9 (postmaster and backends) during db-writer batches, down {down:.0f} s",
        "redis (durable) + postgresql 15",
        notes=f"delivered = rows in the store, read in seq order; {before} stored before the crash; "
              f"pg_ctl start took {restart_s:.1f} s"))
    return report, misplaced


async def _any_stored(store_url: str, ledger: Ledger) -> bool:
    return len(await _stored(store_url, list(ledger.sent))) >= 50


# ---- 2. the service killed while SSE viewers are connected -----------------------------------------


class Service:
    """``squadbus serve`` as a child process on one port, restartable (the store and bus outlive it)."""

    def __init__(self, tmp_path: Path, bus_url: str) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.log = tmp_path / "serve.log"
        self.argv = [SQUADBUS, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--url", bus_url,
                     "--store", f"sqlite+aiosqlite:///{tmp_path / 'history.db'}", "--log-level", "warning"]
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {"SQUADBUS_DATA_DIR": str(self.dir)}
        self.proc = await _spawn(self.argv, self.log, env=env, cwd=self.dir)
        proc = self.proc
        await _until(lambda: (proc.returncode is not None or port_open(self.port)), WAIT, "the service")
        assert proc.returncode is None, _tail(self.log)

    async def kill9(self) -> None:
        if self.proc is not None:
            await _kill9(self.proc)

    async def stop(self) -> None:
        if self.proc is not None:
            await _terminate(self.proc)


@pytest.fixture
async def service(redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    monkeypatch.delenv("SQUADBUS_TOKENS_FILE", raising=False)  # open mode on loopback
    running = Service(tmp_path, f"{redis.url}?{REDIS_OPTIONS}")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def _post(client: httpx.AsyncClient, ledger: Ledger, execution: uuid.UUID, seq: int) -> None:
    """POST one message with a client-set id; 200/201/202 is acknowledged (202: on the bus, the
    db-writer stores it), a refused connection or a 503 failed (not sent), anything else unknown."""
    message_id, at = uuid.uuid4(), time.time()
    body = {"id": str(message_id), "sender_id": "pm", "recipient_id": "dev-1", "content": f"pm:{seq}",
            "task_execution_id": str(execution)}
    outcome, error = "unknown", ""
    try:
        response = await client.post("/v1/messages", json=body)
        if response.status_code in (200, 201, 202):
            outcome = "ok"
        else:
            outcome = "failed" if response.status_code == 503 else "unknown"
            error = f"HTTP {response.status_code}: {response.text[:200]}"
    except httpx.ConnectError as exc:
        outcome, error = "failed", f"{type(exc).__name__}: {exc}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    ledger.sent[message_id] = Sent(message_id, "pm", seq, execution, outcome, at, error)  # type: ignore[arg-type]


async def _view(base: str, execution: uuid.UUID, seen: list[tuple[int, uuid.UUID]], streams: list[int]) -> None:
    """Follow the execution's SSE stream (seq, id) into ``seen``, reconnecting with Last-Event-ID after
    0.2 s whenever it ends, until cancelled; each stream opened appends its first seq to ``streams``."""
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(5.0, read=30.0)) as client:
        while True:
            headers = {"Last-Event-ID": str(seen[-1][0])} if seen else {}
            try:
                async with client.stream("GET", f"/v1/executions/{execution}/events", headers=headers) as resp:
                    if resp.status_code != 200:
                        raise httpx.HTTPError(f"HTTP {resp.status_code}")
                    streams.append(seen[-1][0] if seen else 0)
                    kind, data, ident = "message", "", ""
                    async for line in resp.aiter_lines():
                        if line == "":
                            if kind == "message" and data:
                                seen.append((int(ident), uuid.UUID(_json_id(data))))
                            kind, data, ident = "message", "", ""
                        elif line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            data += line[6:]
                        elif line.startswith("id: "):
                            ident = line[4:]
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)


def _json_id(data: str) -> str:
    return str(json.loads(data)["id"])


@pytest.mark.redis
async def test_service_kill9_with_sse_viewers_connected(service: Service) -> None:
    """Two viewers follow one execution over SSE while a producer POSTs 50/s with client-set ids; the
    service (Redis durable bus, SQLite store) is killed with SIGKILL and started again. The viewers resume
    with Last-Event-ID and, with what they had, see every acknowledged message once, in seq order."""
    for _ in range(ROUNDS):
        report, readers, streams = await _service_round(service)
        assert all(len(opened) > 1 for opened in streams.values()), f"the kill cut every viewer: {streams}"
        assert report.lost == 0, report.lost_ids
        assert report.failed_delivered == 0, report.failed_delivered_errors
        assert report.duplicates == 0, "a viewer saw a message twice"
        for name, seqs in readers.items():
            assert seqs == list(range(1, len(seqs) + 1)), f"{name}: event ids not 1, 2, 3, ... once each"


async def _service_round(service: Service) -> tuple[Report, dict[str, list[int]], dict[str, list[int]]]:
    """One round: the report, each viewer's event ids, and the cursor each of its streams started at."""
    ledger, execution = Ledger(), uuid.uuid4()
    readers: dict[str, list[tuple[int, uuid.UUID]]] = {"viewer-1": [], "viewer-2": []}
    streams: dict[str, list[int]] = {name: [] for name in readers}
    viewers = [asyncio.create_task(_view(service.url, execution, readers[name], streams[name])) for name in readers]
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=5.0) as client:
            producing = asyncio.create_task(
                _steady(lambda i: _post(client, ledger, execution, i), count=300, rate=50))
            await asyncio.sleep(2.0)
            await service.kill9()
            await asyncio.sleep(0.5)
            await service.start()
            await producing
        acknowledged = ledger.acknowledged
        await _until(lambda: all(acknowledged <= {i for _, i in seen} for seen in readers.values()),
                     WAIT, "every viewer to see every acknowledged message")
        await asyncio.sleep(0.5)  # a repeat, if any, would be counted
    finally:
        for task in viewers:
            task.cancel()
        await asyncio.gather(*viewers, return_exceptions=True)
    report = _report(_combined("service kill -9 with 2 SSE viewers (Last-Event-ID resume), restart",
                               "service on redis (durable) + sqlite", ledger,
                               {name: [i for _, i in seen] for name, seen in readers.items()}))
    return report, {name: [s for s, _ in seen] for name, seen in readers.items()}, streams


# ---- 3. a 3-node NATS cluster losing and regaining the stream leader -------------------------------


@pytest.mark.nats
async def test_nats_cluster_stream_leader_kill9_and_restart(tmp_path: Path) -> None:
    """Four producers send 25/s each to an R3 stream on three nodes while an ordered group of two consumes;
    the stream leader is killed with SIGKILL after 2 s and restarted 4 s later (a new leader is elected
    meanwhile). Nothing acknowledged is lost, each execution stays in order."""
    with NatsCluster(tmp_path / "cluster") as cluster:
        for _ in range(ROUNDS):
            report = await _cluster_round(cluster)
            assert report.lost == 0, report.lost_ids
            assert report.failed_delivered == 0, report.failed_delivered_errors
            assert report.order_violations == 0, "the group is ordered (pinned_client): one member at a time"


async def _cluster_round(cluster: NatsCluster) -> Report:
    url = f"{cluster.url}?replicas=3&publish_timeout=3&ordered_groups=true"
    ledger, agent, group = Ledger(), f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    executions = [uuid.uuid4() for _ in range(8)]
    async with Bus.from_url(url) as producer, Bus.from_url(url) as first, Bus.from_url(url) as second:
        for name, member in (("member-1", first), ("member-2", second)):
            await member.subscribe(subjects.direct(agent), _completing(ledger, name), group=group,
                                   options=ConsumerOptions(ack_wait=5))
        await producer.send("load", agent, "warm-up")  # the stream exists: it has a leader
        leader = cluster.stream_leader(producer.backend.settings.stream)  # type: ignore[attr-defined]
        assert leader is not None
        producers = [asyncio.create_task(_produce(producer, ledger, agent, executions, count=250, rate=25,
                                                  producer=f"p{i}")) for i in range(4)]
        try:
            await asyncio.sleep(2.0)
            await asyncio.to_thread(leader.kill9)
            await asyncio.sleep(4.0)
        finally:
            await asyncio.to_thread(leader.start)
        await asyncio.gather(*producers)
        await _until(lambda: ledger.acknowledged <= ledger.done(), WAIT,
                     "every acknowledged message consumed after the leader came back")
        await asyncio.sleep(0.5)
    return _report(ledger.check("stream leader kill -9 in a 3-node cluster, restart after 4 s",
                                "nats cluster (R3, file, sync always, ordered groups)", notes="group of two members"))


def _completing(ledger: Ledger, name: str) -> Callable[[Delivery], Awaitable[None]]:
    async def handle(delivery: Delivery) -> None:
        await asyncio.sleep(0.005)
        ledger.completed(delivery.message, name, delivery.attempt)

    return handle


# ---- 4. the secondary of dual:// down for 5 s (and 20 s under make faults) -------------------------

DOWN_FOR = (5.0, 20.0) if ROUNDS > 1 else (5.0,)


@pytest.mark.redis
@pytest.mark.nats
@pytest.mark.parametrize("down_for", DOWN_FOR)
async def test_dual_secondary_down_with_spool(redis: RedisServer, tmp_path: Path, down_for: float) -> None:
    """``dual://redis|nats|secondary=spool``: a producer sends 100/s; NATS is killed with SIGKILL, stays
    down ``down_for`` seconds and comes back. Every send is ok (the primary decides), and NATS then holds
    every message once per id, in send order per execution."""
    with NatsServer(tmp_path / "nats") as nats:
        for round_no in range(ROUNDS):
            url = (f"dual://{redis.url}?{REDIS_OPTIONS}|{nats.url}?publish_timeout=1"
                   f"|secondary=spool&spool={tmp_path / f'spool-{round_no}.db'}")
            report, spooled, refused = await _dual_round(url, nats, down_for)
            assert spooled > 0, "sends during the outage should have been spooled"
            assert refused == 0
            assert report.acknowledged == report.sent, "every send ok while the secondary was down"
            assert report.lost == 0, report.lost_ids
            assert report.duplicates == 0, "a message twice on the secondary"
            assert report.order_violations == 0, "an execution out of send order on the secondary"


async def _dual_round(url: str, nats: NatsServer, down_for: float) -> tuple[Report, float, float]:
    ledger, agent = Ledger(), f"agent-{uuid.uuid4().hex[:8]}"
    executions = [uuid.uuid4() for _ in range(4)]
    rate = 100.0
    async with Bus.from_url(url) as bus:
        backend = bus.backend
        assert isinstance(backend, DualBackend)
        producing = asyncio.create_task(
            _produce(bus, ledger, agent, executions, count=int(rate * (down_for + 3)), rate=rate))
        try:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(nats.kill9)
            await asyncio.sleep(down_for)
            spooled = backend.figures()["dual_spool_depth"]
        finally:
            await asyncio.to_thread(nats.start)
        await producing
        await _until(lambda: not backend.figures()["dual_spool_depth"], WAIT,
                     "the spool to drain into the secondary")
        refused = backend.figures()["dual_spool_refused"]
    _read_back(ledger, [m.id for m in await _read_all(nats.url, subjects.direct(agent))], "nats")
    report = _report(ledger.check(
        f"dual:// secondary (nats) kill -9, down {down_for:.0f} s, secondary=spool",
        "dual: redis (durable), nats (file, sync always)",
        notes=f"delivered = read back from the secondary; spool depth {spooled:.0f} at the end of the outage"))
    return report, spooled, refused


# ---- 5. the bridge killed mid-way, Redis -> NATS ---------------------------------------------------


@pytest.mark.redis
@pytest.mark.nats
async def test_bridge_kill9_mid_way_redis_to_nats(redis: RedisServer, tmp_path: Path) -> None:
    """A producer sends 100/s to Redis over 4 executions while ``squadbus bridge`` copies to NATS; the
    bridge is killed with SIGKILL once it has copied 100 of them and started again 1 s later. Then NATS
    holds every acknowledged message, in send order per execution."""
    with NatsServer(tmp_path / "nats") as nats:
        for round_no in range(ROUNDS):
            report = await _bridge_round(f"{redis.url}?{REDIS_OPTIONS}", nats, f"bridge-{round_no}",
                                         tmp_path / f"bridge-{round_no}.log")
            assert report.lost == 0, report.lost_ids
            assert report.failed_delivered == 0, report.failed_delivered_errors
            assert report.order_violations == 0, "an execution out of send order in the destination"


async def _bridge_round(source: str, nats: NatsServer, group: str, log: Path) -> Report:
    argv = [SQUADBUS, "bridge", "--from", source, "--to", nats.url, "--group", group, "--from-start",
            "--ack-wait", "10"]
    ledger, agent = Ledger(), f"agent-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    executions = [uuid.uuid4() for _ in range(4)]

    async def copied(n: int) -> bool:
        return len(await _read_all(nats.url, pattern)) >= n

    bridge = await _spawn(argv, log)
    try:
        async with Bus.from_url(source) as bus:
            producing = asyncio.create_task(_produce(bus, ledger, agent, executions, count=800, rate=100))
            await _until(lambda: copied(100), WAIT, "the bridge to copy 100 messages", every=0.25)
            await _kill9(bridge)
            await asyncio.sleep(1.0)
            bridge = await _spawn(argv, log)
            await producing
            await _until(lambda: copied(len(ledger.acknowledged)), WAIT,
                         "the restarted bridge to copy every acknowledged message", every=0.5)
            await asyncio.sleep(1.0)  # a late second copy, if any, would be counted
    finally:
        code = await _terminate(bridge)
    assert code == 0, _tail(log)
    _read_back(ledger, [m.id for m in await _read_all(nats.url, pattern)], "nats")
    return _report(ledger.check("bridge kill -9 mid-way, restart after 1 s (take-over)",
                                "redis (durable) -> nats (file, sync always)",
                                notes="delivered = read back from the destination"))
