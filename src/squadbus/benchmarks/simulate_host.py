"""A host process of ``squadbus simulate``: opens its agents' inboxes, sends their messages, logs what happens.

Run by the parent as ``python -m squadbus.benchmarks.simulate_host '<HostPlan as JSON>'``
(or, on ``memory://``, as a :class:`Host` inside the parent's own process).

Protocol with the parent (one JSON object per line on stdout, one command per line on stdin):

* the host prints ``{"t": "status", ...}`` every half second, ``{"t": "opened", ...}``
  once its inboxes are open (or opening failed or timed out: ``error`` says why),
  ``{"t": "sent", ...}`` when its sending window and its requests are over, and
  ``{"t": "final", ...}`` after ``stop``; ``{"t": "error", ...}`` if it cannot start;
* the parent writes ``go <t0> <duration>`` (send from wall-clock ``t0`` for
  ``duration`` seconds) and ``stop`` (close the inboxes and the Bus, report, exit).
  End of stdin (the parent died) is a ``stop``.

Every message sent and every delivery is one line of the plan's event log
(read by the parent at the end, see :mod:`squadbus.benchmarks.simulate`):
``S <id> <kind> <target> <sent_at> <persisted 0|1>`` for a message sent (a
request is logged before it is sent, and ``X <id>`` follows if sending it
failed), ``D <id> <agent> <latency µs>`` for a delivery. Latency is
``time.time()`` at delivery minus ``time.time()`` just before the send (carried in
the message's metadata): every process runs on one machine, so one clock.
A delivery's line is written later than it arrives: the receipt is kept in three
lists (the message, the agent, the latency) and a task of the host formats and
writes them every :data:`FLUSH_INTERVAL` s, and once more when the host stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from squadbus.benchmarks.loops import ASYNCIO, run
from squadbus.benchmarks.simulate_squad import (
    DIRECT,
    DOMAIN,
    KINDS,
    REPLY,
    REQUEST,
    SQUAD,
    Agent,
    Squad,
    places_by_partition,
)
from squadbus.core.backend import Delivery
from squadbus.core.bus import REPLY_TO, Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import RequestTimeout
from squadbus.core.inbox import Inbox
from squadbus.core.placement import host_url

MODULE = "squadbus.benchmarks.simulate_host"
"""What the parent passes to ``python -m`` to start a host."""

CONTENT = "Status update: the build is green, the next step is waiting on review. " * 3
MAX_IN_FLIGHT = 10_000
"""Sends (and requests waiting for their reply) a host keeps going at once before it falls behind the rate."""
ITERATOR = "iterator"
"""Each agent is a task looping ``async for delivery in inbox`` (the default)."""
HANDLER = "handler"
"""Each agent's inbox is opened with a plain-function handler, called inline as a delivery arrives: no task per
agent (``bus.inbox(agent, handler=...)``)."""
RECEIVE_MODES = (ITERATOR, HANDLER)
"""How the simulated agents take their deliveries (``--receive``)."""
FLUSH_INTERVAL = 0.15
"""Seconds between two writes of the deliveries received (their ``D`` lines) to the event log."""
FLUSH_CHUNK = 1_000
"""Lines formatted in one go by the periodic write before it lets the loop run (~0.3-0.5 ms here): a squad
broadcast's 10,000 receipts are not formatted in one block that would hold up the deliveries behind it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPlan:
    """What one host does: which agents, how fast, where to log."""

    url: str
    run_id: str
    agents: int
    processes: int
    host: int
    rate_per_agent: float
    """Messages per second each agent sends (the scenario's msgs/h × speed-up / 3600)."""
    log_path: str
    open_timeout: float = 60.0
    open_concurrency: int = 64
    request_timeout: float = 5.0
    connect_timeout: float = 10.0
    close_timeout: float = 10.0
    seed: int = 0
    loop: str = ASYNCIO
    """The host process's event loop (``squadbus.benchmarks.loops``)."""
    receive: str = ITERATOR
    """How the agents take their deliveries: :data:`ITERATOR` or :data:`HANDLER`."""

    def to_json(self) -> str:
        """The plan as the one argument of the host process."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HostPlan:
        """The plan from :meth:`to_json`."""
        return cls(**json.loads(text))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc`` on one line, at most ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rss_kib(pid: int | str = "self") -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a process in KiB (0, 0 where /proc is not readable)."""
    rss = hwm = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def socket_count(pid: int | str = "self") -> int:
    """How many sockets process ``pid`` has open (its file descriptors that are sockets)."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    count += 1
    return count


class GcPauses:
    """The longest pause of Python's cyclic GC in this process, per generation, measured with ``gc.callbacks``.

    A pause is wall-clock time (what the event loop waits); beside it, the CPU time of this thread
    during the same collection (``time.thread_time``): on a loaded machine the wall time also holds
    the time the process waited for a core, which the CPU time leaves out.
    Hosts :meth:`reset` it once their inboxes are open: the pauses reported are those while the squad runs.
    """

    def __init__(self) -> None:
        self.longest = [0.0, 0.0, 0.0]
        self.longest_cpu = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0
        self._started_cpu = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def figures(self) -> dict[str, Any]:
        """The longest pause (ms) and the collection count so far, overall and per generation (0, 1, 2), the
        longest CPU time of a collection per generation, the objects the collector tracks outside what
        ``gc.freeze()`` froze, and that ``gc.freeze()`` was called."""
        return {"gc_max_pause_ms": round(max(self.longest) * 1e3, 3), "gc_collections": sum(self.collections),
                "gc_max_pause_ms_by_gen": [round(t * 1e3, 3) for t in self.longest],
                "gc_max_cpu_ms_by_gen": [round(t * 1e3, 3) for t in self.longest_cpu],
                "gc_collections_by_gen": list(self.collections),
                "gc_tracked": len(gc.get_objects()), "gc_frozen_objects": gc.get_freeze_count(), "gc_frozen": True}

    def reset(self) -> None:
        """Forget the pauses so far."""
        self.longest = [0.0, 0.0, 0.0]
        self.longest_cpu = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_cpu = time.thread_time()
            self._started = time.perf_counter()
        elif self._started:
            wall = time.perf_counter() - self._started
            cpu = time.thread_time() - self._started_cpu
            generation = info["generation"]
            self.longest[generation] = max(self.longest[generation], wall)
            self.longest_cpu[generation] = max(self.longest_cpu[generation], cpu)
            self.collections[generation] += 1


@dataclass(slots=True)
class HostFigures:
    """Counters of one host, reported to the parent."""

    host: int
    agents: int
    opened: int = 0
    open_seconds: float = 0.0
    open_error: str = ""
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    expected: int = 0
    persisted: int = 0
    delivered: int = 0
    send_errors: int = 0
    first_send_error: str = ""
    request_timeouts: int = 0
    stale: int = 0
    behind: int = 0
    handler_errors: int = 0
    first_handler_error: str = ""
    close_error: str = ""


class Host:
    """The agents of one host process over ``bus``: open their inboxes, send their messages, answer requests."""

    def __init__(self, bus: Bus, plan: HostPlan, squad: Squad, log: TextIO) -> None:
        self.bus = bus
        self.plan = plan
        self.squad = squad
        self.local: list[Agent] = squad.hosted_by(plan.host, plan.processes, plan.url)
        self.figures = HostFigures(host=plan.host, agents=len(self.local))
        self._log = log
        self._rng = random.Random(plan.seed * 1_000 + plan.host)
        self._inboxes: list[Inbox] = []
        self._serving: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        # Replies to requests started by agents with a handler: a strong reference until each ends.
        self._replying: set[asyncio.Task[None]] = set()
        self._executions: dict[str, str] = {}
        # The deliveries received and not yet written to the log, one entry per delivery in each list: three
        # appends cost less on the hot path than a tuple per delivery, and add nothing for the GC to track.
        # Emptied in place (the agents' handlers hold these lists), counted in figures.delivered by status().
        self._received: list[Message] = []
        self._received_by: list[str] = []
        self._latencies: list[float] = []
        # The last message a handler agent received, its send time and whether it is a request (_handler_of).
        self._last_delivered: list[Any] = [None, 0.0, False]
        self._written = 0
        self._logged: tuple[Message | None, str] = (None, "")
        self._writer: asyncio.Task[None] | None = None

    # ---- opening ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open every local agent's inbox (squad and domain broadcasts too), ``open_concurrency`` at a time.

        Stops at the first failure or after ``open_timeout``; ``figures.open_error`` then says why.
        Freezes the GC's view of everything allocated so far (``gc.freeze()``) once done. With
        ``plan.receive == HANDLER`` each inbox gets a handler (:meth:`_handler_of`) and no agent has a task.
        """
        started = time.perf_counter()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_received_forever())
        gate = asyncio.Semaphore(self.plan.open_concurrency)
        with_handler = self.plan.receive == HANDLER

        async def open_one(agent: Agent) -> None:
            async with gate:
                handler = self._handler_of(agent) if with_handler else None
                inbox = self.bus.inbox(agent.id, domains=(agent.domain,), handler=handler)
                await inbox.open()
                self._inboxes.append(inbox)
                self.figures.opened += 1
                if not with_handler:
                    self._serving.append(asyncio.create_task(self._serve(agent, inbox)))

        tasks = [asyncio.create_task(open_one(agent)) for agent in self.local]
        try:
            async with asyncio.timeout(self.plan.open_timeout):
                for next_done in asyncio.as_completed(tasks):
                    try:
                        await next_done
                    except Exception as exc:  # any failure ends the open phase; it is reported, not hidden
                        self.figures.open_error = one_line(exc)
                        break
        except TimeoutError:
            self.figures.open_error = f"open timeout after {self.plan.open_timeout:g} s"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.figures.open_seconds = time.perf_counter() - started
        gc.collect()
        gc.freeze()

    # ---- receiving --------------------------------------------------------------------------

    async def _serve(self, agent: Agent, inbox: Inbox) -> None:
        async for delivery in inbox:
            try:
                message = delivery.message
                meta = message.metadata
                if meta.get("sim") != self.plan.run_id:
                    self.figures.stale += 1  # left on the broker by an earlier run
                else:
                    self._delivered(message, agent.id, float(meta["t"]))
                    if message.headers.get(REPLY_TO):
                        await self._answer(message, agent.id)
                await delivery.ack()
            except Exception as exc:  # counted and reported; the delivery is settled by the inbox (redelivered)
                self._handler_error(exc)

    def _handler_of(self, agent: Agent) -> Callable[[Delivery], None]:
        """The plain-function handler of ``agent``'s inbox: what :meth:`_serve` does for a delivery, with the
        reply to a request started as a task (the handler is called inline and must not wait)."""
        run_id, figures, agent_id, now = self.plan.run_id, self.figures, agent.id, time.time
        received, received_by, latencies = self._received, self._received_by, self._latencies
        last = self._last_delivered  # shared by the host's agents: a broadcast's copies share one Message

        def on_delivery(delivery: Delivery) -> None:
            try:
                message = delivery.message
                if message is not last[0]:  # its send time and kind read once per message, not per copy
                    meta = message.metadata
                    if meta.get("sim") != run_id:
                        figures.stale += 1  # left on the broker by an earlier run; acked
                        return
                    last[:] = message, float(meta["t"]), bool(message.headers.get(REPLY_TO))
                # _delivered, inline: called for every copy of a squad broadcast, its cost is in the later
                # copies' latency.
                latencies.append(now() - last[1])
                received.append(message)
                received_by.append(agent_id)
                if last[2]:
                    task = asyncio.create_task(self._answer_counted(message, agent_id))
                    self._replying.add(task)
                    task.add_done_callback(self._replying.discard)
            except Exception as exc:  # counted, and raised: the inbox fails the delivery (redelivered)
                self._handler_error(exc)
                raise

        return on_delivery

    async def _answer(self, request: Message, agent_id: str) -> None:
        sent_at = time.time()
        reply = await self.bus.reply(
            request, agent_id, "Done.", metadata={"sim": self.plan.run_id, "t": sent_at, "k": REPLY}
        )
        # Stored on every backend: Bus.reply also logs a reply sent to a native reply address.
        self._sent(reply.id, REPLY, str(request.sender_id), sent_at, True)

    async def _answer_counted(self, request: Message, agent_id: str) -> None:
        try:
            await self._answer(request, agent_id)
        except Exception as exc:  # counted and reported (the request was acked: it times out at its sender)
            self._handler_error(exc)

    def _handler_error(self, exc: Exception) -> None:
        self.figures.handler_errors += 1
        self.figures.first_handler_error = self.figures.first_handler_error or one_line(exc)

    def _delivered(self, message: Message, agent_id: str, sent_at: float) -> None:
        # The harness's own cost per delivery is part of every later copy's latency: only the receipt here,
        # the line is formatted and written by _write_received.
        self._latencies.append(time.time() - sent_at)
        self._received.append(message)
        self._received_by.append(agent_id)

    def _write_received(self, limit: int | None = None) -> None:
        """Write the ``D`` lines of the first ``limit`` deliveries received and not yet written (all: None)."""
        received, received_by, latencies = self._received, self._received_by, self._latencies
        count = len(received) if limit is None else min(limit, len(received))
        lines = []
        logged, logged_id = self._logged
        for i in range(count):
            message = received[i]
            if message is not logged:  # a broadcast's copies on a host share one Message: its id once
                logged, logged_id = message, str(message.id)
            lines.append(f"D {logged_id} {received_by[i]} {max(1, round(latencies[i] * 1e6))}\n")
        self._logged = (logged, logged_id)
        del received[:count], received_by[:count], latencies[:count]
        self._written += count
        self._log.write("".join(lines))

    async def _write_received_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            while self._received:
                self._write_received(FLUSH_CHUNK)
                await asyncio.sleep(0)

    def _sent(self, message_id: object, kind: str, target: str, sent_at: float, persisted: bool) -> None:
        self._log.write(f"S {message_id} {kind} {target} {sent_at:.6f} {int(persisted)}\n")
        self.figures.sent[kind] += 1
        self.figures.expected += self.squad.expected(kind, target)
        self.figures.persisted += int(persisted)

    # ---- sending ----------------------------------------------------------------------------

    async def send_for(self, t0: float, duration: float) -> None:
        """Send the local agents' messages at their rate from wall-clock ``t0`` for ``duration`` s (open loop),
        then wait (up to the request timeout and 5 s) for sends and requests still going."""
        rate = self.plan.rate_per_agent * len(self.local)
        end = t0 + duration
        if rate > 0:
            interval = 1.0 / rate
            k = 0
            while (target := t0 + k * interval) < end:
                delay = target - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(self._in_flight) >= MAX_IN_FLIGHT:
                    self.figures.behind += 1
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                sender = self._rng.choice(self.local)
                kind, to = self.squad.next_message(sender, self._rng)
                task = asyncio.create_task(self._send(sender, kind, to))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                k += 1
        if (left := end - time.time()) > 0:
            await asyncio.sleep(left)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=self.plan.request_timeout + 5.0)

    def _execution(self, sender: Agent) -> str:
        """One task execution per sending agent (order is kept per execution on every backend)."""
        execution = self._executions.get(sender.id)
        if execution is None:
            execution = self._executions[sender.id] = str(uuid.uuid5(uuid.NAMESPACE_URL, self.plan.run_id + sender.id))
        return execution

    async def _send(self, sender: Agent, kind: str, to: str) -> None:
        bus = self.bus
        sent_at = time.time()
        meta = {"sim": self.plan.run_id, "t": sent_at, "k": kind}
        execution = self._execution(sender)
        try:
            if kind == REQUEST:
                request_id = uuid.uuid4()
                self._sent(request_id, kind, to, sent_at, True)
                try:
                    reply = await bus.request(sender.id, to, CONTENT, "request", timeout=self.plan.request_timeout,
                                              task_execution_id=execution, metadata=meta, id=request_id)
                except RequestTimeout:
                    self.figures.request_timeouts += 1
                    return
                except Exception:
                    self._log.write(f"X {request_id}\n")
                    self.figures.sent[kind] -= 1
                    self.figures.expected -= 1
                    self.figures.persisted -= 1
                    raise
                self._delivered(reply, sender.id, float(reply.metadata["t"]))
                return
            if kind == DIRECT:
                message = await bus.send(sender.id, to, CONTENT, "task", task_execution_id=execution, metadata=meta)
            elif kind == DOMAIN:
                message = await bus.broadcast(sender.id, CONTENT, "announcement", domain=to,
                                              task_execution_id=execution, metadata=meta)
            elif kind == SQUAD:
                message = await bus.broadcast(sender.id, CONTENT, "announcement", task_execution_id=execution,
                                              metadata=meta)
            else:
                raise ValueError(f"unknown kind {kind!r}")
            self._sent(message.id, kind, to, sent_at, True)
        except Exception as exc:  # counted and reported: a failed send makes the scenario not held
            self.figures.send_errors += 1
            self.figures.first_send_error = self.figures.first_send_error or one_line(exc)

    # ---- stopping ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """Cancel sends still going, close the inboxes (bounded by ``close_timeout``), flush the log."""
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        try:
            async with asyncio.timeout(self.plan.close_timeout):
                await asyncio.gather(*(inbox.close() for inbox in self._inboxes))
        except Exception as exc:  # reported: a close that fails or hangs is one of the findings
            self.figures.close_error = one_line(exc) if not isinstance(exc, TimeoutError) else (
                f"closing the inboxes took over {self.plan.close_timeout:g} s")
        for task in (*self._serving, *self._replying):
            task.cancel()
        await asyncio.gather(*self._serving, *self._replying, return_exceptions=True)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        self._write_received()
        self._log.flush()

    def status(self) -> dict[str, Any]:
        """The figures as plain values."""
        self.figures.delivered = self._written + len(self._received)
        return asdict(self.figures)


def process_figures(pid: int | str = "self") -> dict[str, int]:
    """PID, RSS, peak RSS (KiB) and open sockets of a process."""
    rss, hwm = rss_kib(pid)
    return {"pid": os.getpid() if pid == "self" else int(pid), "rss_kib": rss, "hwm_kib": hwm,
            "sockets": socket_count(pid)}


# ---- the child process ----------------------------------------------------------------------


async def _child(plan: HostPlan, emit: Callable[[dict[str, Any]], None]) -> int:
    squad = Squad(plan.agents)
    try:
        url = plan.url
        if places_by_partition(url):  # the host's slot: it reads the inbox partitions of its agents
            url = host_url(url, plan.host, plan.processes)
        bus = Bus.from_url(url)
        await asyncio.wait_for(bus.start(), plan.connect_timeout)
    except Exception as exc:  # reported to the parent as one line
        emit({"t": "error", "error": f"host {plan.host} cannot connect: {one_line(exc)}"})
        return 2
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    with open(plan.log_path, "a", buffering=1 << 16) as log, GcPauses() as pauses:  # noqa: ASYNC230 - opened once
        host = Host(bus, plan, squad, log)

        async def report() -> None:
            while True:
                await asyncio.sleep(0.5)
                emit({"t": "status", **host.status()})

        reporter = asyncio.create_task(report())
        try:
            await host.open()
            pauses.reset()
            emit({"t": "opened", **host.status(), **process_figures()})
            while line := (await commands.readline()).decode().split():
                if line[0] == "go":
                    pauses.reset()
                    await host.send_for(float(line[1]), float(line[2]))
                    emit({"t": "sent", **host.status(), **process_figures(), **pauses.figures()})
                elif line[0] == "stop":
                    break
        finally:
            reporter.cancel()
            await host.stop()
            try:
                async with asyncio.timeout(plan.close_timeout):
                    await bus.close()
            except Exception as exc:  # reported: a Bus that cannot close is a finding, the parent kills us anyway
                host.figures.close_error = host.figures.close_error or (
                    one_line(exc) if not isinstance(exc, TimeoutError)
                    else f"closing the bus took over {plan.close_timeout:g} s")
            emit({"t": "final", **host.status()})  # process figures stay those of the end of sending
    return 0


def main(argv: list[str]) -> int:
    """Run one host from its plan (``argv[0]``, JSON); the exit status is 2 when it cannot start."""
    plan = HostPlan.from_json(argv[0])

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    return run(_child(plan, emit), plan.loop)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # no lingering driver threads or atexit hooks: the parent is waiting for this exit
