"""Agents' inboxes over a fixed set of Redis connections per backend (docs/design/inboxes.md, R2).

An agent's direct messages are in its subject stream ``<prefix>:s:agent.message.<agent>``, read by
its inbox's consumer group (``durable_name("inbox-<agent>", subject)``, the group a per-inbox
subscription used, so entries it left pending are delivered after an upgrade). Instead of one
blocking ``XREADGROUP`` per inbox, one :class:`InboxHub` per backend serves every open agent:

* **bells**: the publish script ``PUBLISH``es ``<prefix>:bell:<agent>`` (empty) once per call that stores direct
  messages to it; the hub holds one Pub/Sub connection subscribed to the bells of its open agents
  (:mod:`.bells`);
* **driver** (one task): for the agents whose bell rang, one pipelined round trip of non-blocking
  ``XREADGROUP ... COUNT 1 STREAMS <key> >`` (one command per agent: every agent has its own
  group); redeliveries (``XCLAIM``) and claim checks go in the same round trip. COUNT 1 because an
  agent has one delivery out at a time: an entry read ahead would sit in the pending list, to be
  touched and handed back on close, for a saving of one pipelined command per message;
* **sweep** (one task, round trips of its own so reads never wait behind it): every
  ``claim_interval``, in steps of 100 agents spread over the interval, the agents' leases renewed
  (below) and a check of each idle agent: ``XAUTOCLAIM`` of an entry idle longer than the agent's ``ack_wait``
  (a dead holder's, or one handed back), and ``XPENDING`` of the oldest pending entry. An agent
  with an entry still held elsewhere reads nothing new until it can claim it (per-agent order);
  an agent with nothing pending reads, which covers bells lost in a reconnect or never rung (a
  publisher of an older version). Entries held here are touched (``XCLAIM JUSTID``) every
  ``ack_wait / 3``, so a live holder keeps them however long its agent works;
* an ack is an ``XACK`` sent by the driver in front of that agent's next read (or claim check), in
  the same round trip: one round trip per message, and the check never sees an entry already acked
  as pending; ``attempt`` is Redis's delivery counter; a nack keeps the entry pending and re-claims
  it after the delay (``XCLAIM`` counts a delivery), before anything newer; closing agents hands
  their pending entries back as :func:`.group.release_pending` does (to ``RELEASED_CONSUMER``,
  claimable at once), pipelined over a whole batch of agents rather than a round trip per agent.

**One holder per agent**: a backend instance serves an agent only while it holds the agent's lease
``<prefix>:lease:<agent>`` (``SET NX PX``, renewed by the sweep, deleted on close). A second process
opening the same agent gets nothing until the lease lapses (holder closed, or died: after
``max(ack_wait, 3 claim intervals)``), then takes over and claims what the first left once it has
been idle ``ack_wait``. An agent whose oldest pending entry is still held elsewhere reads nothing new
until it can claim it, so per-agent order holds across a crash.

Opens and closes are batched by one short-lived task (``SUBSCRIBE`` of many bells, ``XGROUP
CREATE ... 0 MKSTREAM`` pipelined), so opening 10,000 agents costs no connection per agent.
Connections: the Pub/Sub one, plus at most 3 pooled ones in use at once (driver, sweep, opens and
closes); measured: 4 Redis clients per backend with 10,000 open inboxes, the publisher's included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from squadbus.backends.redis._driver import (
    FAILURES,
    PackedCommand,
    aioredis,
    entry_parts,
    execute_each,
    is_nogroup,
    translate,
)
from squadbus.backends.redis.bells import Bells
from squadbus.backends.redis.consumer import ConsumerContext, Entry, RawFields, RedisDelivery
from squadbus.backends.redis.group import RELEASED_CONSUMER, consumer_name, dead_letter_malformed
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, RawHandler, durable_name, invoke
from squadbus.core.backoff import RECONNECT, Backoff
from squadbus.core.envelope import decode
from squadbus.core.errors import Closed, MalformedMessage
from squadbus.core.inbox_source import InboxHolder

logger = logging.getLogger("squadbus.backends.redis.inboxes")

_PER_CALL = 1000
"""Agents served per driver round trip (reads, checks, redeliveries)."""
_SWEEP_CHUNK = 100
"""Agents checked per sweep step (200 commands, ~1 ms of Redis); steps are spread over the claim interval."""
_OPS_PER_BATCH = 1000
_RELEASE_IDLE_MS = 10**9

# KEYS[1] lease, ARGV[1] holder, ARGV[2] ttl ms: take it if free, renew it if ours; 1 if ours now.
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_UNLEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class _Agent:
    """One open agent: its keys, its holders (the first is served) and the one entry it has out."""

    __slots__ = ("agent_id", "blocked", "busy", "channel", "claimed", "closing", "entry", "holders", "hub",
                 "lease", "leased", "ready", "redis_group", "stream", "subject", "unacked")

    def __init__(self, hub: InboxHub, agent_id: str, group: str) -> None:
        layout = hub.ctx.layout
        self.hub = hub
        self.agent_id = agent_id
        self.subject = subjects.direct(agent_id)
        self.stream = layout.subject_stream(self.subject)
        self.redis_group = durable_name(group, self.subject)
        self.channel = layout.bell(agent_id).encode()
        self.lease = layout.lease(agent_id)
        self.leased = False  # this backend instance holds the agent's lease: it may read
        self.holders: list[InboxHolder[_Agent]] = []
        self.entry: Entry | None = None
        self.unacked: list[bytes] = []  # acked entries whose XACK the driver has not sent yet
        self.busy = False  # a read or check of this agent is in flight
        self.blocked = False  # its oldest pending entry is held elsewhere: read nothing new
        self.claimed = False  # the entry out was claimed: check for more pending ones before reading
        self.ready = False  # the open finished (group exists, bell subscribed)
        self.closing = False

    @property
    def options(self) -> ConsumerOptions:
        return self.holders[0].options if self.holders else ConsumerOptions()

    # EntryOwner: a RedisDelivery settles through these.

    def settle_ack(self, entry: Entry) -> None:
        self.hub.acked(self, entry)

    def settle_nack(self, entry: Entry, delay: float) -> None:
        self.hub.nacked(self, entry, delay)

    async def touch(self, entry: Entry) -> None:
        await self.hub.touch([(self, entry)])


class _Op:
    __slots__ = ("agent", "future", "kind")

    def __init__(self, kind: str, agent: _Agent) -> None:
        self.kind = kind
        self.agent = agent
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class InboxHub:
    """Every open inbox of one Redis backend instance; see the module docstring."""

    def __init__(self, ctx: ConsumerContext, *, commands: aioredis.Redis | None = None) -> None:
        self.ctx = ctx
        self._client = commands or ctx.client  # Bells' Pub/Sub connection blocks: from ctx.client
        self._consumer = consumer_name()
        self._agents: dict[str, _Agent] = {}
        self._acking: set[_Agent] = set()  # agents with XACKs to send
        self._reads: set[_Agent] = set()
        self._checks: set[_Agent] = set()
        self._retries: list[_Agent] = []
        self._wake = asyncio.Event()
        self._between_rounds = asyncio.Event()  # clear while the driver waits for Redis
        self._between_rounds.set()
        self._ops: list[_Op] = []
        self._control: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        self._bells = Bells(ctx.client, prefix=ctx.layout.bell(""), confirm_timeout=ctx.settings.connect_timeout,
                            on_ring=self._rung, on_reconnect=self._bells_back,
                            channels=lambda: [a.channel for a in self._agents.values()])
        self._failing = False
        self._closed = False

    @property
    def open_agents(self) -> int:
        """Agents with an open inbox here."""
        return len(self._agents)

    # ---- opening and closing ---------------------------------------------------------------------

    async def open(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> InboxHolder[_Agent]:
        """Serve ``agent_id``'s inbox to ``handler`` (see ``MultiplexesInboxes.open_inbox``)."""
        if self._closed:
            raise Closed("redis backend is closed")
        subjects.validate_token(agent_id, what="agent_id")
        agent = self._agents.get(agent_id)
        if agent is not None and not agent.closing:
            holder = InboxHolder(self, agent, handler, group, options)
            agent.holders.append(holder)  # served once the holders before it close
            return holder
        agent = _Agent(self, agent_id, group)
        holder = InboxHolder(self, agent, handler, group, options)
        agent.holders.append(holder)
        self._agents[agent_id] = agent
        try:
            await self._run(_Op("open", agent))
        except BaseException:
            agent.closing = True
            if self._agents.get(agent_id) is agent:
                del self._agents[agent_id]
            raise
        return holder

    async def close_holder(self, holder: InboxHolder[_Agent]) -> None:
        """Close one open of an agent; the last one out hands the agent's pending entries back."""
        if not holder.leave():
            return
        agent = holder.agent
        if agent.holders or agent.closing:
            return  # the next holder is served from now on
        agent.closing = True
        if self._agents.get(agent.agent_id) is agent:
            del self._agents[agent.agent_id]
        if agent.entry is not None and agent.entry.timer is not None:
            agent.entry.timer.cancel()
            agent.entry.timer = None
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
                if self._closed and kind == "open":  # closes still run: they hand entries and leases back
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(Closed("redis backend is closed"))
                    continue
                try:
                    async with asyncio.timeout(self.ctx.settings.publish_timeout * 2):
                        if kind == "open":
                            await self._open_batch(agents)
                        else:
                            await self._close_batch(agents)
                except Exception as exc:
                    error = translate(exc, f"{kind} of {len(agents)} inboxes") if isinstance(exc, FAILURES) else exc
                    if kind == "close":
                        logger.warning("closing %d inboxes: could not hand back their entries (%s); they are "
                                       "claimed after ack_wait", len(agents), exc)
                    for op in batch:
                        if not op.future.done():
                            if kind == "close":
                                op.future.set_result(None)
                            else:
                                op.future.set_exception(error)
                    continue
                for op in batch:
                    if not op.future.done():
                        op.future.set_result(None)
        finally:
            self._control = None

    async def _open_batch(self, agents: list[_Agent]) -> None:
        self._start()
        # The bell first: a message stored after the first read below rings it.
        await self._bells.subscribe([a.channel for a in agents])
        layout = self.ctx.layout
        commands: list[PackedCommand] = []
        for agent in agents:
            commands += (
                PackedCommand("XGROUP", "CREATE", agent.stream, agent.redis_group, "0", "MKSTREAM"),
                PackedCommand("HSET", layout.groups, agent.redis_group, agent.subject),
                PackedCommand("SADD", layout.registry, agent.stream),
                self._lease_command(agent),
            )
        replies = await execute_each(self._client, commands)
        for reply in replies:
            if isinstance(reply, Exception) and not str(reply).startswith("BUSYGROUP"):
                # The whole batch fails: give back the leases it took, or reopening waits for them.
                with contextlib.suppress(*FAILURES):
                    await execute_each(self._client, [
                        PackedCommand("EVAL", _UNLEASE_LUA, 1, a.lease, self._consumer)
                        for a, leased in zip(agents, replies[3::4], strict=True) if leased == 1])
                raise reply
        for agent, leased in zip(agents, replies[3::4], strict=True):
            if not agent.closing:
                agent.ready = True
                agent.leased = leased == 1
                if agent.leased:
                    self._checks.add(agent)
                else:
                    logger.info("inbox of %s is held by another process; waiting for its lease", agent.agent_id)
        self._wake.set()

    def _lease_command(self, agent: _Agent) -> PackedCommand:
        # Renewed once per sweep pass, which takes at most this agent's claim interval.
        ack_wait = agent.options.ack_wait
        configured = self.ctx.settings.claim_interval
        ttl = max(ack_wait, 3 * (configured if configured is not None else min(ack_wait / 2, 5.0)))
        return PackedCommand("EVAL", _LEASE_LUA, 1, agent.lease, self._consumer, int(ttl * 1000))

    async def _close_batch(self, agents: list[_Agent]) -> None:
        if not self._between_rounds.is_set():
            # A round trip in flight (a read, an ack of these agents): let it land before handing back.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ctx.settings.publish_timeout):
                    await self._between_rounds.wait()
        reopened = {a.channel for a in self._agents.values()}
        with contextlib.suppress(*FAILURES):  # a broken Pub/Sub connection is rebuilt without them
            await self._bells.unsubscribe([a.channel for a in agents if a.channel not in reopened])
        await self._release(agents)

    async def _release(self, agents: Sequence[_Agent]) -> None:
        """Hand every entry this hub holds for ``agents`` back to their groups, then drop our consumer."""
        me = self._consumer
        for first in range(0, len(agents), _PER_CALL):
            chunk = agents[first:first + _PER_CALL]
            acks = self._ack_commands(chunk)
            replies = await execute_each(self._client, [*acks, *(
                PackedCommand("XPENDING", a.stream, a.redis_group, "-", "+", 100, me) for a in chunk)])
            rows = replies[len(acks):]
            commands: list[PackedCommand] = []
            for agent, pending in zip(chunk, rows, strict=True):
                if isinstance(pending, Exception):
                    continue  # NOGROUP: nothing to hand back
                for entry_id, _, _, count in pending:
                    commands.append(PackedCommand("XCLAIM", agent.stream, agent.redis_group, RELEASED_CONSUMER, 0,
                                                  entry_id, "IDLE", _RELEASE_IDLE_MS, "RETRYCOUNT", count, "JUSTID"))
                if len(pending) < 100:  # more than an agent ever holds here; else left for XAUTOCLAIM
                    commands.append(PackedCommand("XGROUP", "DELCONSUMER", agent.stream, agent.redis_group, me))
                if agent.leased:
                    commands.append(PackedCommand("EVAL", _UNLEASE_LUA, 1, agent.lease, me))
            await execute_each(self._client, commands)

    # ---- bells -------------------------------------------------------------------------------------

    def _rung(self, agent_id: str) -> None:
        agent = self._agents.get(agent_id)
        if agent is not None and agent.ready:
            self._reads.add(agent)
            self._wake.set()

    def _bells_back(self) -> None:
        # Bells rung while the connection was down are lost: look at every agent (the gate keeps order).
        self._checks.update(a for a in self._agents.values() if a.ready)
        self._wake.set()

    # ---- the driver: reads, checks and redeliveries in one round trip ------------------------------

    def _start(self) -> None:
        if self._background:
            return
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._supervise(self._drive, "driver"), name="squadbus-inbox-driver"),
                            loop.create_task(self._supervise(self._sweep, "sweep"), name="squadbus-inbox-sweep")]

    async def _supervise(self, run: Any, name: str) -> None:
        while not self._closed:
            try:
                await run()
                return
            except Exception:
                logger.exception("inboxes: %s failed unexpectedly; restarting it in 1s", name)
                self._wake.set()
                await asyncio.sleep(1.0)

    @staticmethod
    def _idle(agent: _Agent) -> bool:
        return agent.ready and agent.leased and not agent.closing and not agent.busy and agent.entry is None

    def _ack_commands(self, agents: Iterable[_Agent]) -> list[PackedCommand]:
        """The XACKs ``agents`` owe, taken off them (put back with :meth:`_unsent` if they fail)."""
        commands = []
        for agent in agents:
            if agent.unacked:
                commands.append(PackedCommand("XACK", agent.stream, agent.redis_group, *agent.unacked))
                agent.unacked = []
            self._acking.discard(agent)
        return commands

    def _take(self) -> tuple[list[_Agent], list[_Agent], list[_Agent]]:
        retries, self._retries = self._retries[:_PER_CALL], self._retries[_PER_CALL:]
        retries = [a for a in retries if not a.closing and a.entry is not None]
        checks: list[_Agent] = []
        for agent in list(self._checks):
            if len(checks) + len(retries) >= _PER_CALL:
                break
            self._checks.discard(agent)
            if self._idle(agent):
                checks.append(agent)
        reads: list[_Agent] = []
        for agent in list(self._reads):
            if len(checks) + len(retries) + len(reads) >= _PER_CALL:
                break
            self._reads.discard(agent)
            if self._idle(agent) and not agent.blocked:
                reads.append(agent)
        if self._retries or self._checks or self._reads:
            self._wake.set()  # more than one round trip's worth
        return retries, checks, reads

    async def _drive(self) -> None:
        backoff = Backoff(RECONNECT)
        me = self._consumer
        while True:
            await self._wake.wait()
            self._wake.clear()
            retries, checks, reads = self._take()
            acking = list(self._acking)
            if not (retries or checks or reads or acking):
                continue
            owed = {agent: list(agent.unacked) for agent in acking}
            commands = self._ack_commands(acking)
            acks = len(commands)
            for agent in retries:
                assert agent.entry is not None
                entry_id = agent.entry.entry_id
                commands += (PackedCommand("XCLAIM", agent.stream, agent.redis_group, me, 0, entry_id),
                             PackedCommand("XPENDING", agent.stream, agent.redis_group, entry_id, entry_id, 1, me))
            for agent in checks:
                agent.busy = True
                commands += self._check_commands(agent)
            for agent in reads:
                agent.busy = True
                commands.append(PackedCommand("XREADGROUP", "GROUP", agent.redis_group, me, "COUNT", 1,
                                              "STREAMS", agent.stream, ">"))
            self._between_rounds.clear()
            try:
                async with asyncio.timeout(self.ctx.settings.publish_timeout):
                    replies = await execute_each(self._client, commands)
            except FAILURES as exc:
                for agent, ids in owed.items():
                    agent.unacked[:0] = ids
                    self._acking.add(agent)
                for agent in (*checks, *reads):
                    agent.busy = False
                self._retries += retries
                # A read Redis ran whose reply was lost left an entry pending here that nobody holds:
                # check those agents (the gate holds newer ones back until it is claimed) rather than read.
                self._checks.update(checks, reads)
                self.ctx.counters.read_errors += 1
                if not self._failing:
                    logger.warning("inboxes: reading failed, retrying with backoff: %r", exc)
                self._failing = True
                await backoff.sleep()
                self._wake.set()
                continue
            finally:
                self._between_rounds.set()
            if self._failing:
                self._failing = False
                logger.info("inboxes: reading from Redis again")
            backoff.reset()
            at = acks
            missing: list[_Agent] = []
            for agent in retries:
                self._redelivered(agent, replies[at], replies[at + 1])
                at += 2
            for agent in checks:
                agent.busy = False
                if not self._checked(agent, replies[at], replies[at + 1]):
                    missing.append(agent)
                at += 2
            for agent in reads:
                agent.busy = False
                if not self._read(agent, replies[at]):
                    missing.append(agent)
                at += 1
            if missing:
                await self._recreate(missing)

    def _check_commands(self, agent: _Agent) -> tuple[PackedCommand, PackedCommand]:
        """Claim the agent's oldest entry idle past its ack_wait; then its oldest pending entry (the gate)."""
        min_idle = int(agent.options.ack_wait * 1000)
        return (PackedCommand("XAUTOCLAIM", agent.stream, agent.redis_group, self._consumer, min_idle, "0-0",
                              "COUNT", 1),
                PackedCommand("XPENDING", agent.stream, agent.redis_group, "-", "+", 1))

    async def _check_round(self, step: list[_Agent]) -> None:
        """One sweep step, in a round trip of its own (reads do not wait behind it): renew or take the
        leases of ``step``, and check its idle agents."""
        live = [a for a in step if a.ready and not a.closing]
        agents = [a for a in live if self._idle(a) and not a.unacked]  # the driver acks and checks those
        if not live:
            return
        commands = [self._lease_command(a) for a in live]
        for agent in agents:
            agent.busy = True
            commands += self._check_commands(agent)
        try:
            async with asyncio.timeout(self.ctx.settings.publish_timeout):
                replies = await execute_each(self._client, commands)
        except FAILURES as exc:
            logger.debug("inboxes: sweep step failed: %r", exc)
            return
        finally:
            for agent in agents:
                agent.busy = False
        for agent, leased in zip(live, replies, strict=False):
            if isinstance(leased, Exception):
                continue  # unknown: unchanged until the next step
            if leased == 1 and not agent.leased:
                logger.info("inbox of %s: took over its lease", agent.agent_id)
                agent.leased = True
                self._checks.add(agent)
                self._wake.set()
            elif leased != 1 and agent.leased:
                logger.warning("inbox of %s: its lease is held by another process (this one stalled past it?); "
                               "reading nothing new for it", agent.agent_id)
                agent.leased = False
        at = len(live)
        missing = [agent for i, agent in enumerate(agents) if not self._checked(agent, replies[at + 2 * i],
                                                                                replies[at + 2 * i + 1])]
        if missing:
            await self._recreate(missing)

    def _redelivered(self, agent: _Agent, claimed: Any, pending: Any) -> None:
        entry = agent.entry
        if entry is None or agent.closing:
            return
        if isinstance(claimed, Exception) or isinstance(pending, Exception):
            logger.warning("inboxes: redelivery of %s to %s postponed to the sweep: %s", entry.message.id,
                           agent.agent_id, claimed if isinstance(claimed, Exception) else pending)
            agent.entry = None  # still pending here: the sweep claims it after ack_wait
            return
        if not claimed or claimed[0][1] is None:
            agent.entry = None
            self.ctx.counters.trimmed_unacked += 1
            logger.warning("inbox of %s: message %s was trimmed before it was acknowledged", agent.agent_id,
                           entry.message.id)
            self._reads.add(agent)
            self._wake.set()
            return
        entry.attempt = int(pending[0][3]) if pending else entry.attempt + 1
        self._hand(agent)

    def _checked(self, agent: _Agent, claim: Any, pending: Any) -> bool:
        """Sort out an agent's claim check; False when its group is missing."""
        for reply in (claim, pending):
            if isinstance(reply, Exception):
                if is_nogroup(reply):
                    return False
                logger.warning("inbox of %s: claim check failed: %s", agent.agent_id, reply)
                return True
        deleted = claim[2] if len(claim) > 2 else []
        if deleted:
            self._report_trimmed(agent, len(deleted))
        entries = claim[1]
        if entries:
            entry_id, raw = entries[0]
            attempt = int(pending[0][3]) if pending and pending[0][0] == entry_id else 2
            agent.blocked = False
            self.ctx.counters.claimed += 1
            self._accept(agent, entry_id, raw, attempt, claimed=True)
        elif pending:
            agent.blocked = True  # held by another holder (or a read of ours whose reply was lost)
        else:
            agent.blocked = False
            self._reads.add(agent)
            self._wake.set()
        return True

    def _read(self, agent: _Agent, reply: Any) -> bool:
        if isinstance(reply, Exception):
            if is_nogroup(reply):
                return False
            logger.warning("inbox of %s: read failed: %s", agent.agent_id, reply)
            return True
        if not reply:
            return True
        pairs = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
        for entries in pairs:
            for entry_id, raw in entries:
                self._accept(agent, entry_id, raw, 1, claimed=False)
        return True

    async def _recreate(self, agents: list[_Agent]) -> None:
        logger.warning("inboxes: the group of %d agents is missing (Redis lost data?); recreating", len(agents))
        commands = [PackedCommand("XGROUP", "CREATE", a.stream, a.redis_group, "0", "MKSTREAM") for a in agents]
        with contextlib.suppress(*FAILURES):
            await execute_each(self._client, commands)
        self._checks.update(agents)
        self._wake.set()

    def _accept(self, agent: _Agent, entry_id: bytes, raw: RawFields | None, attempt: int, *, claimed: bool) -> None:
        if agent.closing:
            return  # pending here: the close hands it back
        if raw is None:
            self._report_trimmed(agent, 1)
            self._ack(agent, entry_id)
            self._checks.add(agent)
            self._wake.set()
            return
        _, payload = entry_parts(raw)
        try:
            if payload is None:
                names = sorted(raw) if isinstance(raw, dict) else sorted(raw[::2])
                raise MalformedMessage(f"entry has no 'm' field (fields: {names!r})")
            message = decode(payload)
        except MalformedMessage as exc:
            self.ctx.counters.malformed += 1
            agent.busy = True  # nothing else for this agent until the dead letter is stored
            self._spawn(self._dead_letter(agent, entry_id, raw, str(exc)))
            return
        agent.entry = Entry(agent.stream, entry_id, message, attempt)
        agent.claimed = claimed
        self._hand(agent)

    async def _dead_letter(self, agent: _Agent, entry_id: bytes, raw: RawFields, reason: str) -> None:
        group = agent.holders[0].group if agent.holders else f"inbox-{agent.agent_id}"
        try:
            if await dead_letter_malformed(self.ctx.publish, group, agent.stream, entry_id, raw, reason):
                self._ack(agent, entry_id)
            # else pending here: the sweep claims it again after ack_wait
        finally:
            agent.busy = False
            self._checks.add(agent)
            self._wake.set()

    def _hand(self, agent: _Agent) -> None:
        entry = agent.entry
        if entry is None or not agent.holders:
            return
        holder = agent.holders[0]
        entry.handed = True
        self.ctx.counters.delivered += 1
        self._spawn(self._deliver(holder, RedisDelivery(entry, agent, holder.group)))

    @staticmethod
    async def _deliver(holder: InboxHolder[_Agent], delivery: RedisDelivery) -> None:
        await invoke(holder.handler, delivery, holder.options)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    def _report_trimmed(self, agent: _Agent, count: int) -> None:
        self.ctx.counters.trimmed_unacked += count
        logger.warning("inbox of %s: %d unacknowledged entries were trimmed before delivery completed",
                       agent.agent_id, count)

    # ---- settlement ----------------------------------------------------------------------------------

    def acked(self, agent: _Agent, entry: Entry) -> None:
        """An agent's delivery was acked (or dead-lettered): XACK, then its next message."""
        if agent.entry is entry:
            agent.entry = None
        self._ack(agent, entry.entry_id)
        if agent.closing:
            return
        # After a claimed entry, more may be pending from the same dead holder: check before reading.
        (self._checks if agent.claimed else self._reads).add(agent)
        agent.claimed = False
        self._wake.set()

    def _ack(self, agent: _Agent, entry_id: bytes) -> None:
        agent.unacked.append(entry_id)
        self._acking.add(agent)
        self._wake.set()

    def nacked(self, agent: _Agent, entry: Entry, delay: float) -> None:
        """Redeliver the entry after ``delay``; it stays pending here, nothing newer is read meanwhile."""
        entry.handed = False
        if agent.closing or agent.entry is not entry:
            return  # the close hands it back
        if delay <= 0:
            self._retry(agent, entry)
            return
        entry.timer = asyncio.get_running_loop().call_later(delay, self._retry, agent, entry)

    def _retry(self, agent: _Agent, entry: Entry) -> None:
        entry.timer = None
        if agent.closing or agent.entry is not entry:
            return
        self._retries.append(agent)
        self._wake.set()

    async def touch(self, held: Iterable[tuple[_Agent, Entry]]) -> None:
        """Reset the idle time of entries held here (``XCLAIM JUSTID``), so no one claims them."""
        commands = [PackedCommand("XCLAIM", e.stream, a.redis_group, self._consumer, 0, e.entry_id, "JUSTID")
                    for a, e in held]
        for first in range(0, len(commands), _PER_CALL):
            await execute_each(self._client, commands[first:first + _PER_CALL])

    # ---- the sweep -------------------------------------------------------------------------------------

    def _claim_interval(self, agents: Sequence[_Agent]) -> tuple[float, float]:
        ack_wait = min((a.options.ack_wait for a in agents), default=30.0)
        configured = self.ctx.settings.claim_interval
        interval = configured if configured is not None else min(ack_wait / 2, 5.0)
        return interval, min(interval, ack_wait / 3)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        next_touch = 0.0
        while True:
            agents = [a for a in self._agents.values() if a.ready]
            interval, touch_every = self._claim_interval(agents)
            if not agents:
                await asyncio.sleep(interval)
                continue
            steps = [agents[i:i + _SWEEP_CHUNK] for i in range(0, len(agents), _SWEEP_CHUNK)]
            for step in steps:
                await self._check_round(step)
                if loop.time() >= next_touch:
                    next_touch = loop.time() + touch_every
                    held = [(a, a.entry) for a in self._agents.values() if a.entry is not None and not a.closing]
                    try:
                        async with asyncio.timeout(self.ctx.settings.publish_timeout):
                            await self.touch(held)
                    except FAILURES as exc:
                        logger.warning("inboxes: could not extend ack_wait of %d held entries: %r", len(held), exc)
                await asyncio.sleep(min(interval / len(steps), touch_every))

    # ---- closing the hub ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving every agent, flush acks, hand back held entries. Idempotent."""
        if self._closed:
            return
        self._closed = True
        agents = list(self._agents.values())
        self._agents.clear()
        for agent in agents:
            agent.closing = True
            if agent.entry is not None and agent.entry.timer is not None:
                agent.entry.timer.cancel()
        tasks = [*self._background, *self._handling]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._control is not None:  # closes queued before this one run (opens fail)
            await asyncio.gather(self._control, return_exceptions=True)
        try:
            async with asyncio.timeout(self.ctx.settings.publish_timeout):
                await self._release(agents)
        except FAILURES as exc:
            logger.warning("inboxes: could not hand back held entries on close (%s); they are claimed after "
                           "ack_wait", exc)
        await self._bells.close()
