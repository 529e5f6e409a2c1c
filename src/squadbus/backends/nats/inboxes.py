"""Agents' inboxes with no JetStream consumer per agent (docs/design/inboxes.md, N2).

An agent's direct messages stay where they are, in the stream under ``agent.message.<agent>``;
its position is a **cursor** (the stream sequence of its last acked direct message) kept in the
KV bucket ``<stream>-inboxes`` (a stream, not a consumer). One :class:`InboxHub` per backend
serves every open agent:

* **bells**: after the PubAck of a direct message the publisher rings
  ``_squadbus.bell.<stream>.<agent>`` (core NATS, empty, outside the stream's ``agent.>`` so never
  stored); the hub holds one core subscription per open agent (routed by interest: only the
  hosting process hears it). nats-py gives every subscription a queue, an iterator and, with a
  callback, a task (~5 KiB); here a bell is handled as nats-py's reader hands it over
  (:class:`_Bell`), so an open agent's subscription is ~0.5 KiB and no task (10,000 measured);
* **reads**: on a bell the driver asks ``$JS.API.DIRECT.GET.<stream>`` for
  ``{"seq": cursor + 1, "next_by_subj": subject}`` with a reply subject naming the agent; every
  reply comes back through one subscription. One delivery of an agent is out at a time; an ack
  advances the cursor and reads the next one; a nack re-reads the same message after its delay
  (``attempt`` + 1) before anything newer; ``term`` (dead-lettered) acks;
* **cursor records** ``c.<agent>`` = ``"<cursor> <seq out> <its attempt>"`` (the bucket's reads and
  writes are :mod:`.inbox_bucket`): published (no PubAck awaited) before a delivery is handed out,
  so a message handed out and never settled (its host died) comes back to the next opener as
  attempt + 1; after an ack saved coalesced by one flusher (every changed record pipelined, PubAcks
  checked): a crash re-delivers what was acked but not saved yet (at-least-once);
* **leases**: ``l.<agent>`` = the holding hub's id, taken with a revision-checked put (create);
  each hub keeps ``h.<hub>`` fresh every ``ttl / 3`` (``ttl`` = the smallest ``ack_wait`` of its
  agents). A second open of an agent held by another process waits; it takes over (revision-
  checked) once the holder closed (lease deleted) or its ``h.<hub>`` key stopped changing for
  ``ttl`` (holder died), then reads from the saved cursor;
* **sweep**: every ``claim_interval`` (default ``min(ack_wait / 2, 5 s)``), in chunks spread over
  the interval, a read of every idle agent (covers bells lost in a reconnect or never rung, a
  publisher of an older version, a reply lost), lease attempts of waiting agents, the hub's
  liveness key. After a reconnect every open agent is read once.

**Upgrade**: an agent with no cursor record whose per-inbox durable consumer of an earlier version
(``durable_name("inbox-<agent>", subject)``) exists starts from that consumer's ack floor, so what it
had not acked is delivered; the cursor is saved, then the consumer is deleted (freeing the stream's
consumer budget). Attempts of those messages start again at 1.

Costs: per open agent one core subscription, one lease put and one cursor get at open and at
close; per message one direct get and two KV puts (hand-out, ack; acks of a backlog coalesce with
the next hand-out's). Per backend no JetStream consumer, one
KV bucket, the backend's one connection, 3 tasks (driver, flusher, sweep) beside nats-py's one for
the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import socket
from collections.abc import Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub

from squadbus.backends.nats.inbox_bucket import InboxBucket, WrongLast
from squadbus.backends.nats.translate import translate
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, RawHandler, durable_name, invoke
from squadbus.core.dispatch import DLQ_ATTEMPTS, DLQ_GROUP, DLQ_ORIGINAL_ID, DLQ_REASON, DLQ_SUBJECT, dead_letter_of
from squadbus.core.envelope import Message, decode, new_id, utcnow
from squadbus.core.errors import Closed, MalformedMessage, SquadbusError
from squadbus.core.inbox_source import InboxHolder

if TYPE_CHECKING:
    from squadbus.backends.nats.backend import NatsBackend

logger = logging.getLogger("squadbus.backends.nats.inboxes")

BELL_PREFIX = "_squadbus.bell"
_FLUSH_DELAY = 0.05
"""Seconds the flusher waits after a change so an agent's hand-out and ack land in one put."""
_SWEEP_CHUNK = 200
_SWEEP_READS = 500.0
"""At most this many sweep reads per second (10,000 agents: a pass every 20 s); bells do the work."""
_PARALLEL = 256
"""KV requests in flight at once while opening or closing many agents."""
_OPS_PER_BATCH = 1000
_MALFORMED_CONTENT_LIMIT = 64 * 1024


def bell_subject(stream: str, agent_id: str) -> str:
    """The core-NATS subject rung after a direct message to ``agent_id`` is stored in ``stream``."""
    return f"{BELL_PREFIX}.{stream}.{agent_id}"


def bell_of(stream: str, subject: str) -> str | None:
    """The bell to ring for a message stored on ``subject``; None unless it is an agent's direct subject."""
    head = subjects.MESSAGE_PREFIX + "."
    if not subject.startswith(head):
        return None
    agent = subject[len(head):]
    if "." in agent or agent in subjects.RESERVED_AGENT_IDS:
        return None
    return bell_subject(stream, agent)


class _Bell:
    """Stands in for a nats-py subscription's pending queue: nats-py's reader puts a bell here and
    the hub handles it at once, so a subscription per agent costs no queue and no task."""

    __slots__ = ("_agent",)

    def __init__(self, agent: _Agent) -> None:
        self._agent = agent

    def put_nowait(self, _msg: Msg) -> None:
        self._agent.hub.rang(self._agent)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


class _Agent:
    """One open agent: its holders (the first is served), cursor, lease and the delivery it has out."""

    __slots__ = ("active", "again", "agent_id", "asked_at", "bell", "busy", "closing", "cursor", "held", "holders",
                 "hub", "lease", "out_attempt", "out_seq", "subject", "timer")

    def __init__(self, hub: InboxHub, agent_id: str) -> None:
        self.hub = hub
        self.agent_id = agent_id
        self.subject = subjects.direct(agent_id)
        self.holders: list[InboxHolder[_Agent]] = []
        self.bell: NatsSub | None = None
        self.cursor = 0  # stream seq of the last acked message
        self.out_seq = 0  # the last message handed out and its attempt (saved with the cursor)
        self.out_attempt = 0
        self.held = 0  # seq of the delivery out now (0: none)
        self.lease = 0  # KV seq of our lease (0: not held)
        self.active = False  # lease held and cursor loaded: reading
        self.busy = False  # a direct get in flight
        self.again = False  # a bell rang while busy
        self.asked_at = 0.0
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None  # a nacked delivery's redelivery

    @property
    def options(self) -> ConsumerOptions:
        return self.holders[0].options if self.holders else ConsumerOptions()

    @property
    def group(self) -> str:
        return self.holders[0].group if self.holders else f"inbox-{self.agent_id}"

    def record(self) -> bytes:
        return f"{self.cursor} {self.out_seq} {self.out_attempt}".encode()


class InboxDelivery(Delivery):
    """A delivery of an agent's direct message; settling moves the agent's cursor (or not)."""

    __slots__ = ("_agent", "_seq")

    def __init__(self, message: Message, attempt: int, group: str, agent: _Agent, seq: int) -> None:
        super().__init__(message, attempt=attempt, group=group)
        self._agent = agent
        self._seq = seq

    def _ack(self) -> None:
        self._agent.hub.acked(self._agent, self._seq)

    def _nack(self, delay: float) -> None:
        self._agent.hub.nacked(self._agent, self._seq, delay)


class _Op:
    __slots__ = ("agent", "future", "kind")

    def __init__(self, kind: str, agent: _Agent) -> None:
        self.kind = kind
        self.agent = agent
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class InboxHub:
    """Every open inbox of one NATS backend instance; see the module docstring."""

    def __init__(self, backend: NatsBackend) -> None:
        self._backend = backend
        self._settings = settings = backend.settings
        self._nc = backend.nc
        self._js = backend.js
        self._stream = settings.stream
        self._kv = InboxBucket(backend.nc, backend.js, settings)
        self._get_subject = f"$JS.API.DIRECT.GET.{settings.stream}"
        host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
        self.hub_id = f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self._agents: dict[str, _Agent] = {}
        self._reads: set[_Agent] = set()
        self._dirty: set[_Agent] = set()
        self._waiting: set[_Agent] = set()
        self._watched: dict[str, tuple[int, float]] = {}  # other hubs' liveness: (KV seq, first seen)
        self._wake = asyncio.Event()
        self._flush_wake = asyncio.Event()

        self._ops: list[_Op] = []
        self._control: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        self._replies: NatsSub | None = None
        self._reply_prefix = ""
        self._starting = asyncio.Lock()
        self._ready = False
        self._ttl = 30.0
        self._closed = False
        self.delivered = 0
        self._refusals = 0

    @property
    def open_agents(self) -> int:
        """Agents with an open inbox here."""
        return len(self._agents)

    # ---- opening and closing -------------------------------------------------------------------

    async def open(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> InboxHolder[_Agent]:
        """Serve ``agent_id``'s inbox to ``handler`` (see ``MultiplexesInboxes.open_inbox``)."""
        if self._closed:
            raise Closed("nats backend is closed")
        subjects.validate_token(agent_id, what="agent_id")
        agent = self._agents.get(agent_id)
        if agent is not None and not agent.closing:
            holder = InboxHolder(self, agent, handler, group, options)
            agent.holders.append(holder)  # served once the holders before it close
            return holder
        agent = _Agent(self, agent_id)
        holder = InboxHolder(self, agent, handler, group, options)
        agent.holders.append(holder)
        self._agents[agent_id] = agent
        try:
            await self._start()
            # The bell first: a message stored after the first read below rings it.
            try:
                agent.bell = await self._nc.subscribe(bell_subject(self._stream, agent_id))
            except nats.errors.Error as exc:
                raise translate(exc, f"subscribe the bell of {agent_id}") from exc
            agent.bell._pending_queue = _Bell(agent)  # type: ignore[assignment]  # see _Bell
            # Never iterated: without it a subscription is ~0.5 KiB instead of ~4 KiB (its queue and future).
            agent.bell._message_iterator = None
            await self._run(_Op("open", agent))
        except BaseException:
            agent.closing = True
            if self._agents.get(agent_id) is agent:
                del self._agents[agent_id]
            await self._unsubscribe([agent])
            raise
        return holder

    async def close_holder(self, holder: InboxHolder[_Agent]) -> None:
        """Close one open of an agent; the last one out saves its cursor and gives up its lease."""
        if not holder.leave():
            return
        agent = holder.agent
        if agent.holders:
            if agent.held == 0 and agent.timer is None:
                self._read(agent)  # the next holder is served from now on
            return
        if agent.closing:
            return
        agent.closing = True
        self._waiting.discard(agent)
        if self._agents.get(agent.agent_id) is agent:
            del self._agents[agent.agent_id]
        if agent.timer is not None:
            agent.timer.cancel()
            agent.timer = None
        if self._closed:
            return
        await self._run(_Op("close", agent))

    async def _run(self, op: _Op) -> None:
        self._ops.append(op)
        if self._control is None:
            self._control = asyncio.get_running_loop().create_task(self._control_loop(), name="squadbus-inbox-ops")
        await asyncio.shield(op.future)

    async def _control_loop(self) -> None:
        try:
            while self._ops:
                kind = self._ops[0].kind
                batch: list[_Op] = []
                while self._ops and self._ops[0].kind == kind and len(batch) < _OPS_PER_BATCH:
                    batch.append(self._ops.pop(0))
                agents = [op.agent for op in batch]
                error: BaseException | None = None
                try:
                    if self._closed:
                        raise Closed("nats backend is closed")
                    async with asyncio.timeout(self._settings.publish_timeout * 2):
                        if kind == "open":
                            await self._open_batch(agents)
                        else:
                            await self._close_batch(agents)
                except Exception as exc:
                    what = f"{kind} of {len(agents)} inboxes"
                    error = exc if isinstance(exc, SquadbusError) else translate(exc, what)
                    if kind == "close":
                        logger.warning("closing %d inboxes: %s (their leases lapse after ack_wait)", len(agents), exc)
                        error = None
                for op in batch:
                    if not op.future.done():
                        if error is None:
                            op.future.set_result(None)
                        else:
                            op.future.set_exception(error)
        finally:
            self._control = None

    async def _open_batch(self, agents: list[_Agent]) -> None:
        self._update_ttl()
        mine = self.hub_id.encode()
        created = await self._kv.put_many([(f"l.{a.agent_id}", mine, 0, None) for a in agents])
        for agent, outcome in zip(agents, created, strict=True):
            if isinstance(outcome, SquadbusError):
                raise outcome
            if not isinstance(outcome, WrongLast):
                agent.lease = outcome
        # Held already (by another hub, a closed one, or ours before a reopen): the slow way.
        leased = await self._gather(self._acquire(a) if not a.lease else _true() for a in agents)
        taken = [a for a, ok in zip(agents, leased, strict=True) if ok and not a.closing]
        for agent, ok in zip(agents, leased, strict=True):
            if not ok and not agent.closing:
                self._waiting.add(agent)
        await self._activate(taken)

    async def _activate(self, agents: list[_Agent]) -> None:
        """Load the cursors of agents whose lease was just taken, then start reading them."""
        if not agents:
            return
        records = await self._gather(self._kv.last(f"c.{a.agent_id}") for a in agents)
        fresh: list[_Agent] = []
        for agent, record in zip(agents, records, strict=True):
            if record is None or record[2]:
                fresh.append(agent)
                continue
            parts = record[1].split()
            agent.cursor = int(parts[0])
            if len(parts) >= 3:
                agent.out_seq, agent.out_attempt = int(parts[1]), int(parts[2])
        if fresh:
            await self._upgrade(fresh)
        for agent in agents:
            if not agent.closing:
                agent.active = True
                self._read(agent)

    async def _upgrade(self, agents: list[_Agent]) -> None:
        """Agents without a cursor: start from the ack floor of an earlier version's per-inbox consumer."""
        names = await self._consumer_names()
        for agent in agents:
            consumer = durable_name(agent.group, agent.subject)
            if consumer not in names:
                continue
            try:
                info = await self._js.consumer_info(self._stream, consumer)
            except nats.js.errors.NotFoundError:
                continue
            except Exception as exc:
                raise translate(exc, f"look up consumer {consumer}") from exc
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            agent.cursor = floor or 0
            await self._kv.put(f"c.{agent.agent_id}", agent.record())
            try:
                await self._js.delete_consumer(self._stream, consumer)
            except Exception as exc:  # the cursor is saved: the consumer only costs budget
                logger.warning("inbox of %s: could not delete its earlier consumer %s: %s", agent.agent_id,
                               consumer, exc)
            logger.info("inbox of %s: took over from consumer %s at stream seq %d (%d unacked)", agent.agent_id,
                        consumer, agent.cursor, info.num_ack_pending or 0)

    async def _consumer_names(self) -> set[str]:
        names: set[str] = set()
        offset = 0
        while True:
            try:
                reply = await self._nc.request(f"$JS.API.CONSUMER.NAMES.{self._stream}",
                                               json.dumps({"offset": offset}).encode(),
                                               timeout=self._settings.connect_timeout)
            except (nats.errors.Error, TimeoutError) as exc:
                raise translate(exc, "list consumers") from exc
            body = json.loads(reply.data)
            page = body.get("consumers") or []
            names.update(page)
            offset += len(page)
            if not page or offset >= body.get("total", 0):
                return names

    async def _close_batch(self, agents: list[_Agent]) -> None:
        await self._unsubscribe(agents)
        leased = [a for a in agents if a.lease]
        if not leased:
            return
        for agent in leased:
            self._dirty.discard(agent)
        # In order on one connection: each cursor is stored before its lease is given up.
        puts: list[tuple[str, bytes, int | None, dict[str, str] | None]] = [
            (f"c.{a.agent_id}", a.record(), None, None) for a in leased]
        puts += [(f"l.{a.agent_id}", b"", a.lease, {"KV-Operation": "DEL"}) for a in leased]
        for agent in leased:
            agent.lease = 0
        outcomes = await self._kv.put_many(puts)
        failed = [o for o in outcomes if isinstance(o, SquadbusError)]  # WrongLast: taken over meanwhile
        if failed:
            raise failed[0]

    async def _unsubscribe(self, agents: Iterable[_Agent]) -> None:
        for agent in agents:
            bell, agent.bell = agent.bell, None
            if bell is not None and not self._nc.is_closed:
                with contextlib.suppress(nats.errors.Error):
                    await bell.unsubscribe()

    async def _gather(self, jobs: Iterable[Coroutine[Any, Any, Any]]) -> list[Any]:
        limit = asyncio.Semaphore(_PARALLEL)

        async def one(job: Coroutine[Any, Any, Any]) -> Any:
            async with limit:
                return await job

        return list(await asyncio.gather(*(one(job) for job in jobs)))

    # ---- leases ----------------------------------------------------------------------------------

    async def _acquire(self, agent: _Agent) -> bool:
        """Take ``agent``'s lease: free, ours, or its holder's hub gone quiet. False if held elsewhere."""
        key = f"l.{agent.agent_id}"
        mine = self.hub_id.encode()
        try:
            agent.lease = await self._kv.put(key, mine, expect=0)
            return True
        except WrongLast:
            pass
        last = await self._kv.last(key)
        if last is not None:
            _, holder, deleted = last
            if not (deleted or holder == mine or await self._lapsed(holder.decode())):
                return False
        try:
            agent.lease = await self._kv.put(key, mine, expect=last[0] if last is not None else 0)
        except WrongLast:
            return False  # another opener was quicker
        if last is not None and not last[2] and last[1] != mine:
            logger.info("inbox of %s: took over from %s, whose lease lapsed", agent.agent_id, last[1].decode())
        return True

    async def _lapsed(self, hub: str) -> bool:
        """True when hub ``hub`` is closed or stopped renewing ``h.<hub>`` for its ttl."""
        last = await self._kv.entry(f"h.{hub}")
        if last is None:
            return True
        seq, value, deleted, stamp = last
        if deleted:
            return True
        try:
            ttl = float(value)
        except ValueError:
            ttl = 30.0
        now = asyncio.get_running_loop().time()
        seen = self._watched.get(hub)
        if seen is None or seen[0] != seq:
            self._watched[hub] = (seq, now)
            seen = (seq, now)
        # Unchanged for ttl on our clock, or (different clocks) far older than ttl by the server's.
        age = (dt.datetime.now(dt.UTC) - stamp).total_seconds() if stamp is not None else 0.0
        return now - seen[1] > ttl or age > 2 * ttl + 1

    def _update_ttl(self) -> None:
        self._ttl = min((a.options.ack_wait for a in self._agents.values()), default=30.0)

    async def _renew(self) -> None:
        await self._kv.put(f"h.{self.hub_id}", f"{self._ttl:g}".encode())

    # ---- KV and stream requests --------------------------------------------------------------------

    # ---- the background tasks --------------------------------------------------------------------

    async def _start(self) -> None:
        if self._ready:
            return
        async with self._starting:
            if self._ready:
                return
            await self._kv.start()
            self._reply_prefix = self._nc.new_inbox()
            self._replies = await self._nc.subscribe(self._reply_prefix + ".*", cb=self._on_reply)
            self._update_ttl()
            await self._renew()
            self._start_tasks()
            self._ready = True

    def _start_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._supervise(self._drive, "driver"), name="squadbus-inbox-driver"),
            loop.create_task(self._supervise(self._flush, "flusher"), name="squadbus-inbox-flusher"),

            loop.create_task(self._supervise(self._sweep, "sweep"), name="squadbus-inbox-sweep"),
        ]

    async def _supervise(self, run: Any, name: str) -> None:
        while not self._closed:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("nats inboxes: %s failed unexpectedly; restarting it in 1s", name)
                self._wake.set()
                await asyncio.sleep(1.0)

    def rang(self, agent: _Agent) -> None:
        """A bell of ``agent`` rang (called from nats-py's reader)."""
        if agent.busy:
            agent.again = True
        else:
            self._read(agent)

    def _read(self, agent: _Agent) -> None:
        self._reads.add(agent)
        self._wake.set()

    @staticmethod
    def _idle(agent: _Agent) -> bool:
        return (agent.active and not agent.closing and not agent.busy and agent.held == 0 and agent.timer is None
                and bool(agent.holders))

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            reads, self._reads = self._reads, set()
            for agent in reads:
                if not self._idle(agent):
                    continue
                agent.busy = True
                agent.again = False
                agent.asked_at = loop.time()
                body = b'{"seq":%d,"next_by_subj":"%s"}' % (agent.cursor + 1, agent.subject.encode())
                try:
                    await self._nc.publish(self._get_subject, body, reply=f"{self._reply_prefix}.{agent.agent_id}")
                except nats.errors.Error as exc:
                    agent.busy = False
                    logger.debug("inboxes: read of %s failed (%s); the sweep reads it again", agent.agent_id, exc)

    async def _on_reply(self, msg: Msg) -> None:
        agent = self._agents.get(msg.subject[len(self._reply_prefix) + 1:])
        if agent is None or not agent.busy:
            return  # closed meanwhile, or a late reply the sweep already asked again for
        agent.busy = False
        headers = msg.headers or {}
        status = headers.get("Status")
        if status:
            if status != "404":
                # 503: no direct get on the stream (allow_direct off) or no leader; once per hub, not per read.
                logger.log(logging.DEBUG if self._refusals else logging.WARNING,
                           "inbox of %s: read refused (%s %s); the sweep reads it again", agent.agent_id, status,
                           headers.get("Description", ""))
                self._refusals += 1
            elif agent.again:
                self._read(agent)
            return
        if agent.closing or not agent.active or agent.held or agent.timer is not None:
            return
        seq = int(headers["Nats-Sequence"])
        attempt = agent.out_attempt + 1 if seq == agent.out_seq else 1
        agent.out_seq, agent.out_attempt, agent.held = seq, attempt, seq
        # The hand-out record goes on the wire before anything the handler does (nats-py's flusher
        # runs before the handler's task): a delivery never settled because its host died comes
        # back to the next opener as attempt + 1. No PubAck wanted; the ack's record is acked.
        try:
            await self._nc.publish(f"{self._kv.prefix}c.{agent.agent_id}", agent.record())
        except nats.errors.Error as exc:
            logger.debug("inboxes: hand-out record of %s not sent (%s)", agent.agent_id, exc)
        self._give(agent, msg, seq, attempt)

    def _give(self, agent: _Agent, msg: Msg, seq: int, attempt: int) -> None:
        options = agent.options
        try:
            message = decode(msg.data)
        except MalformedMessage as exc:
            self._spawn(self._dead_letter_malformed(agent, msg, seq, attempt, exc))
            return
        delivery = InboxDelivery(message, attempt, agent.group, agent, seq)
        if attempt > options.max_deliver + self._settings.max_deliver_margin:
            # Handed out that often and never settled (its holders died): stop, as JetStream would.
            self._spawn(self._dead_letter(agent, delivery, f"delivered {attempt - 1} times and never settled"))
            return
        if agent.closing or not agent.holders:
            agent.held = 0
            return
        self.delivered += 1
        self._spawn(invoke(agent.holders[0].handler, delivery, options))

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _dead_letter(self, agent: _Agent, delivery: InboxDelivery, reason: str) -> None:
        try:
            await self._backend.publish(dead_letter_of(delivery, reason))
        except SquadbusError as exc:
            logger.error("inbox of %s: could not dead-letter %s (%s); retrying later", agent.agent_id,
                         delivery.message.id, exc)
            await delivery.nack(delivery_backoff(agent, delivery.attempt))
            return
        logger.warning("inbox of %s: dead-lettered %s: %s", agent.agent_id, delivery.message.id, reason)
        await delivery.term()

    async def _dead_letter_malformed(self, agent: _Agent, msg: Msg, seq: int, attempt: int,
                                     exc: MalformedMessage) -> None:
        group = agent.group
        original_id = (msg.headers or {}).get("Nats-Msg-Id") or f"stream-seq-{seq}"
        text = bytes(msg.data[:_MALFORMED_CONTENT_LIMIT]).decode("utf-8", "replace")
        dead = Message(
            id=new_id(), subject=subjects.dead_letter(group), sender_id="squadbus-nats", content=text,
            message_type="malformed",
            metadata={"stream_seq": seq, "size": len(msg.data), "truncated": len(msg.data) > len(text)},
            created_at=utcnow(),
            headers={DLQ_REASON: f"malformed payload: {exc}"[:1000], DLQ_GROUP: group, DLQ_ATTEMPTS: str(attempt),
                     DLQ_SUBJECT: agent.subject, DLQ_ORIGINAL_ID: original_id},
        )
        try:
            await self._backend.publish(dead)
        except SquadbusError:
            logger.exception("inbox of %s: could not dead-letter malformed message at seq %d; will retry",
                             agent.agent_id, seq)
            self.nacked(agent, seq, delivery_backoff(agent, attempt))
            return
        logger.warning("inbox of %s: dead-lettered malformed message at stream seq %d: %s", agent.agent_id, seq, exc)
        self.acked(agent, seq)

    # ---- settlement ----------------------------------------------------------------------------------

    def acked(self, agent: _Agent, seq: int) -> None:
        """The delivery of stream seq ``seq`` was acked (or dead-lettered): advance, read the next one."""
        if agent.held != seq:
            return
        agent.held = 0
        agent.cursor = max(agent.cursor, seq)
        self._changed(agent)
        if not agent.closing:
            self._read(agent)

    def nacked(self, agent: _Agent, seq: int, delay: float) -> None:
        """Read the same message again after ``delay``; nothing newer is read meanwhile."""
        if agent.held != seq:
            return
        agent.held = 0
        if agent.closing:
            return
        if agent.timer is not None:
            agent.timer.cancel()
        agent.timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._retry, agent)

    def _retry(self, agent: _Agent) -> None:
        agent.timer = None
        if not agent.closing:
            self._read(agent)

    def _changed(self, agent: _Agent) -> None:
        self._dirty.add(agent)
        self._flush_wake.set()

    async def _flush(self) -> None:
        """Save changed cursor records, coalesced: every change of an agent within a flush is one put."""
        while True:
            await self._flush_wake.wait()
            await asyncio.sleep(_FLUSH_DELAY)
            self._flush_wake.clear()
            dirty, self._dirty = self._dirty, set()
            dirty = {a for a in dirty if a.lease}
            if not dirty:
                continue
            agents = list(dirty)
            outcomes: list[Any]
            try:
                outcomes = await self._kv.put_many([(f"c.{a.agent_id}", a.record(), None, None) for a in agents])
            except SquadbusError as exc:
                outcomes = [exc] * len(agents)
            failed = [a for a, outcome in zip(agents, outcomes, strict=True) if isinstance(outcome, BaseException)]
            if failed:
                logger.warning("inboxes: could not save %d cursors; retrying", len(failed))
                self._dirty.update(failed)
                await asyncio.sleep(0.5)
                self._flush_wake.set()

    def _sweep_interval(self) -> float:
        configured = self._settings.claim_interval
        return configured if configured is not None else min(self._ttl / 2, 5.0)

    async def _sweep(self) -> None:
        """Renew this hub's liveness, retry waiting leases (every interval) and read idle agents in
        steps of ``_SWEEP_CHUNK``, a full pass per interval but at most ``_SWEEP_READS`` reads/s."""
        loop = asyncio.get_running_loop()
        next_renew = next_leases = 0.0
        pending: list[_Agent] = []
        while True:
            self._update_ttl()
            interval = self._sweep_interval()
            now = loop.time()
            if now >= next_renew:
                next_renew = now + self._ttl / 3
                try:
                    await self._renew()
                except SquadbusError as exc:
                    logger.warning("inboxes: could not renew this hub's liveness: %s", exc)
            if now >= next_leases:
                next_leases = now + interval
                waiting = [a for a in self._waiting if not a.closing]
                if waiting:
                    await self._retry_leases(waiting)
            if not pending:
                pending = list(self._agents.values())
            step, pending = pending[:_SWEEP_CHUNK], pending[_SWEEP_CHUNK:]
            now = loop.time()
            for agent in step:
                if agent.busy and now - agent.asked_at > self._settings.publish_timeout:
                    agent.busy = False  # the reply was lost
                if self._idle(agent):
                    self._read(agent)
            steps = max(1, -(-len(self._agents) // _SWEEP_CHUNK))
            pause = max(interval / steps, len(step) / _SWEEP_READS)
            await asyncio.sleep(min(pause, self._ttl / 3, interval))

    async def _retry_leases(self, agents: Sequence[_Agent]) -> None:
        try:
            leased = await self._gather(self._acquire(a) for a in agents)
        except SquadbusError as exc:
            logger.warning("inboxes: lease check of %d waiting agents failed: %s", len(agents), exc)
            return
        taken = [a for a, ok in zip(agents, leased, strict=True) if ok and not a.closing]
        for agent in taken:
            self._waiting.discard(agent)
        try:
            await self._activate(taken)
        except SquadbusError as exc:
            logger.warning("inboxes: could not load the cursors of %d agents: %s; retrying", len(taken), exc)
            self._waiting.update(taken)

    def reconnected(self) -> None:
        """Bells rung while the connection was down are lost: read every open agent once."""
        for agent in self._agents.values():
            agent.busy = False
            if self._idle(agent):
                self._reads.add(agent)
        self._wake.set()

    # ---- closing the hub -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving every agent, save cursors, give up leases. Idempotent."""
        if self._closed:
            return
        agents = list(self._agents.values())
        for agent in agents:
            agent.closing = True
            if agent.timer is not None:
                agent.timer.cancel()
                agent.timer = None
        self._agents.clear()
        if self._control is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._control), self._settings.publish_timeout)
        self._closed = True
        tasks = [*self._background, *self._handling]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self._ready or self._nc.is_closed:
            return
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                await self._close_batch(agents)
                await self._kv.put(f"h.{self.hub_id}", b"", headers={"KV-Operation": "DEL"})
        except (SquadbusError, TimeoutError) as exc:
            logger.warning("inboxes: could not save cursors and leases on close (%s); they lapse after ack_wait", exc)
        if self._replies is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._replies.unsubscribe()
        await self._kv.close()


async def _true() -> bool:
    return True


def delivery_backoff(agent: _Agent, attempt: int) -> float:
    """The agent's backoff after attempt ``attempt``."""
    return agent.options.backoff(attempt)
