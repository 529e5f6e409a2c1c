"""``squadbus verify``: compare what two sides of a migration hold, message id by message id.

Each side is a bus URL (``redis://``, ``rediss://``, ``nats://``, ``tls://``, ``kafka://``) or a
history store URL (``sqlite+aiosqlite:///PATH``, ``postgresql://...``). ``memory://`` lives inside
one process and ``dual://`` is two sides at once, so both are refused: name each side on its own.

Both sides' ends are noted first (a snapshot), then each is read from the start of its retention
(or ``--since``) up to that end, with no consumer group and without waiting for anything new, so
verify always terminates:

* Redis: ``XRANGE`` in pages over every partition stream, up to the stream's last entry id at start;
* NATS: one temporary in-memory consumer without acks, filtered by the pattern, up to the stream's
  last sequence at start; deleted at the end (the server drops it after 30 s idle if verify dies);
* Kafka: one consumer without a group, assigned to every partition of the topics the pattern can
  match, up to the end offsets at start;
* a store: pages of the history whose ``created_at`` is before verify started.

Connecting is what any squadbus process does (NATS and Kafka create their stream or topics when
missing; the Redis trimmer is left off). Dead letters (``agent.dlq.>``) are left out unless the
pattern names them: each side writes its own and the bridge does not copy them. Ids are compared
per ``task_execution_id`` (``none`` for messages without one); within an execution the ids both
sides hold must come in the same order (not checked for ``none``, which has no order across
partitions). Duplicates of an id on one side are counted, not a difference (Kafka keeps repeats;
the db-writer drops them). Exit 0: same ids, same order; 1: they differ; 2: usage or connection
error, one line. A side still being written shows its newest messages as missing on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import click

from squadbus.cli.history import parse_time, sqlite_path
from squadbus.cli.serve import redact
from squadbus.core import subjects
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import MalformedMessage, SquadbusError
from squadbus.core.registry import open_backend, scheme_of

EXIT_MATCH = 0
EXIT_DIFFER = 1
EXIT_USAGE = 2

_STORE_SCHEMES = ("sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg")
_BUS_SCHEMES = ("redis", "rediss", "nats", "tls", "kafka")
_PAGE = 1000
_ANY_SIZE = 1 << 62  # read whatever a side holds, whatever size limit its writers had
_CLOCK_SLACK = timedelta(seconds=60)  # broker timestamps and created_at come from different clocks
_STALL = 15.0  # seconds a side may give nothing while short of its end before verify gives up


class VerifyError(Exception):
    """A usage or connection error: one line, exit 2."""


class Reader(Protocol):
    """One side: ``snapshot()`` notes where it ends now, ``messages()`` reads up to there."""

    async def snapshot(self) -> None: ...

    def messages(self) -> AsyncIterator[Message | None]: ...


def _decode(data: bytes | None) -> Message | None:
    if data is None:
        return None
    try:
        return decode(data, max_content_bytes=_ANY_SIZE)
    except MalformedMessage:
        return None


@dataclasses.dataclass
class Holdings:
    """What one side holds: ids per execution in the side's order (first copy of each id)."""

    by_execution: dict[UUID | None, dict[UUID, None]] = dataclasses.field(default_factory=dict)
    execution_of: dict[UUID, UUID | None] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    unreadable: int = 0

    def add(self, message: Message) -> None:
        if message.id in self.execution_of:
            self.duplicates += 1
            return
        self.execution_of[message.id] = message.task_execution_id
        self.by_execution.setdefault(message.task_execution_id, {})[message.id] = None


@dataclasses.dataclass
class Report:
    """The comparison of two sides; ``matches`` when nothing is missing, extra or out of order."""

    source: Holdings
    destination: Holdings
    missing: dict[UUID | None, list[UUID]]
    extra: dict[UUID | None, list[UUID]]
    order: dict[UUID, int]  # execution -> first index (among ids on both sides) where the order differs

    @property
    def matches(self) -> bool:
        return not (self.missing or self.extra or self.order)


def compare(source: Holdings, destination: Holdings) -> Report:
    """Missing (on the source only), extra (on the destination only) and order, per execution."""
    missing: dict[UUID | None, list[UUID]] = {}
    extra: dict[UUID | None, list[UUID]] = {}
    order: dict[UUID, int] = {}
    for execution, ids in source.by_execution.items():
        gone = [i for i in ids if i not in destination.execution_of]
        if gone:
            missing[execution] = gone
    for execution, ids in destination.by_execution.items():
        added = [i for i in ids if i not in source.execution_of]
        if added:
            extra[execution] = added
        theirs = source.by_execution.get(execution)
        if execution is None or theirs is None:
            continue
        mine = [i for i in ids if i in theirs]
        theirs_common = [i for i in theirs if i in ids]
        if mine != theirs_common:
            order[execution] = next(n for n, (a, b) in enumerate(zip(mine, theirs_common, strict=True)) if a != b)
    return Report(source, destination, missing, extra, order)


# ---- readers -------------------------------------------------------------------------------------


class RedisReader:
    """``XRANGE`` over every partition stream up to its last entry at the snapshot."""

    def __init__(self, backend: Any, pattern: str, since: datetime | None) -> None:
        self.backend, self.pattern, self.since = backend, pattern, since
        self.ends: dict[str, str] = {}

    async def snapshot(self) -> None:
        from squadbus.backends.redis._driver import FAILURES, call, translate

        client = self.backend._client  # no public read-everything call on RedisBackend yet
        for stream in self.backend.layout.partition_streams():
            try:
                async with asyncio.timeout(_STALL):  # the client has no socket timeout of its own
                    last = await call(client, "XREVRANGE", stream, "+", "-", "COUNT", 1)
            except FAILURES as exc:
                raise translate(exc, f"read the end of {stream}") from exc
            if last:
                self.ends[stream] = last[0][0].decode()

    async def messages(self) -> AsyncIterator[Message | None]:
        from squadbus.backends.redis._driver import FAILURES, call, translate

        client = self.backend._client
        floor = "-"
        if self.since is not None:
            floor = f"{max(0, int((self.since - _CLOCK_SLACK).timestamp() * 1000))}-0"
        for stream, end in self.ends.items():
            start = floor
            while True:
                try:
                    async with asyncio.timeout(_STALL):
                        page = await call(client, "XRANGE", stream, start, end, "COUNT", _PAGE)
                except FAILURES as exc:
                    raise translate(exc, f"read {stream}") from exc
                for _, fields in page:
                    subject = fields.get(b"s", b"").decode()
                    if subject and not subjects.matches(self.pattern, subject):
                        continue
                    message = _decode(fields.get(b"m"))
                    if message is None or subject or subjects.matches(self.pattern, message.subject):
                        yield message
                if len(page) < _PAGE:
                    break
                start = "(" + page[-1][0].decode()


class NatsReader:
    """One AckNone in-memory consumer filtered by the pattern, up to the stream's last sequence."""

    def __init__(self, backend: Any, pattern: str, since: datetime | None) -> None:
        self.backend, self.pattern, self.since = backend, pattern, since
        self.first = self.last = 0

    async def snapshot(self) -> None:
        from squadbus.backends.nats.translate import translate

        stream = self.backend.settings.stream
        try:
            info = await self.backend.js.stream_info(stream)
        except Exception as exc:
            raise translate(exc, f"stream info of {stream}") from exc
        self.first, self.last = info.state.first_seq, info.state.last_seq

    async def messages(self) -> AsyncIterator[Message | None]:
        import nats.errors
        from nats.js import api

        from squadbus.backends.nats.translate import translate

        if self.last == 0 or self.first > self.last:
            return
        js, stream = self.backend.js, self.backend.settings.stream
        name = f"verify-{secrets.token_hex(8)}"
        config = api.ConsumerConfig(
            name=name, ack_policy=api.AckPolicy.NONE, filter_subject=self.pattern, mem_storage=True,
            num_replicas=1, inactive_threshold=30.0, deliver_policy=api.DeliverPolicy.ALL,
        )
        if self.since is not None:
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = self.since - _CLOCK_SLACK
        try:
            await js.add_consumer(stream, config)
            sub = await js.pull_subscribe_bind(name, stream=stream)
            pending = (await js.consumer_info(stream, name)).num_pending
        except Exception as exc:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)
            raise translate(exc, f"create a reader on {stream}") from exc
        try:
            seq, idle = 0, 0.0
            if not pending:
                return
            while seq < self.last:
                try:
                    msgs = await sub.fetch(_PAGE, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    idle += 1.0
                    if idle >= _STALL:
                        raise VerifyError(f"nats: no message after sequence {seq} of {self.last} "
                                          f"for {_STALL:g} s") from None
                    continue
                except nats.errors.Error as exc:
                    raise translate(exc, f"read {stream}") from exc
                idle = 0.0
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    if seq > self.last:
                        break
                    yield _decode(msg.data)
                if msgs and msgs[-1].metadata.num_pending == 0:
                    break  # nothing else matches the filter (up to now)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)


class KafkaReader:
    """A consumer without a group on every partition of the pattern's topics, up to the end offsets."""

    def __init__(self, backend: Any, pattern: str, since: datetime | None) -> None:
        self.backend, self.pattern, self.since = backend, pattern, since
        self.consumer: Any = None
        self.ends: dict[Any, int] = {}

    async def snapshot(self) -> None:
        from squadbus.backends.kafka._driver import AIOKafkaConsumer, KafkaError, TopicPartition
        from squadbus.backends.kafka.ends import high_watermarks
        from squadbus.backends.kafka.producer import translate

        s, layout = self.backend.settings, self.backend.layout
        topics = [t for t in layout.topics_for(self.pattern) if t != layout.dlq or _names_dlq(self.pattern)]
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=list(s.bootstrap_servers), client_id=s.client_id, group_id=None,
            enable_auto_commit=False, fetch_max_wait_ms=s.fetch_max_wait_ms,
        )
        try:
            async with asyncio.timeout(s.connect_timeout):
                await self.consumer.start()
                known = await self.consumer.topics()
                tps = [TopicPartition(t, p) for t in topics if t in known
                       for p in sorted(self.consumer.partitions_for_topic(t) or ())]
                if not tps:
                    return
                starts = await self.consumer.beginning_offsets(tps)
                self.ends = await high_watermarks(self.consumer, tps, beginnings=starts)  # tansu: see .ends
                if self.since is not None:
                    stamp = int((self.since - _CLOCK_SLACK).timestamp() * 1000)
                    found = await self.consumer.offsets_for_times(dict.fromkeys(tps, stamp))
                    starts = {tp: self.ends[tp] if found[tp] is None else max(starts[tp], found[tp].offset)
                              for tp in tps}
        except (KafkaError, TimeoutError) as exc:
            raise translate(exc, "read the end offsets") from exc
        for tp, start in starts.items():
            self.consumer.seek(tp, start)
        self.ends = {tp: end for tp, end in self.ends.items() if starts[tp] < end}
        self.consumer.pause(*(tp for tp in tps if tp not in self.ends))

    async def messages(self) -> AsyncIterator[Message | None]:
        from squadbus.backends.kafka._driver import KafkaError
        from squadbus.backends.kafka.producer import translate

        left = dict(self.ends)
        idle = 0.0
        try:
            while left:
                batch = await self.consumer.getmany(*left, timeout_ms=1000, max_records=_PAGE)
                idle = 0.0 if batch else idle + 1.0
                if idle >= _STALL:
                    raise VerifyError(f"kafka: no record for {_STALL:g} s while short of the end offsets "
                                      f"{ {str(tp): end for tp, end in left.items()} }")
                for tp, records in batch.items():
                    for record in records:
                        if record.offset >= left.get(tp, 0):
                            break
                        message = _decode(record.value)
                        if message is None or subjects.matches(self.pattern, message.subject):
                            yield message
                for tp in list(left):
                    if await self.consumer.position(tp) >= left[tp]:
                        self.consumer.pause(tp)
                        del left[tp]
        except KafkaError as exc:
            raise translate(exc, "read records") from exc

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


class StoreReader:
    """Pages of a history store whose ``created_at`` is before verify started, in stored order."""

    def __init__(self, store: Any, pattern: str, since: datetime | None) -> None:
        self.store, self.pattern, self.since = store, pattern, since
        self.until = datetime.now(UTC)

    async def snapshot(self) -> None:
        self.until = datetime.now(UTC)

    async def messages(self) -> AsyncIterator[Message | None]:
        from squadbus.store import HistoryQuery

        cursor: str | None = None
        while True:
            page = await self.store.query(HistoryQuery(since=self.since, until=self.until, cursor=cursor,
                                                       limit=_PAGE))
            for row in page.items:
                if subjects.matches(self.pattern, row.message.subject):
                    yield row.message
            cursor = page.next_cursor
            if cursor is None:
                return


def _names_dlq(pattern: str) -> bool:
    return pattern.startswith(subjects.DLQ_PREFIX + ".")


# ---- sides ---------------------------------------------------------------------------------------


def check_side(flag: str, url: str) -> None:
    """Refuse, before connecting anything, a URL verify cannot read and a SQLite file that does not
    exist (opening it would create an empty one)."""
    try:
        scheme = scheme_of(url)
        path = sqlite_path(url)
    except SquadbusError as exc:
        raise VerifyError(f"{flag}: {exc}") from None
    if scheme not in _BUS_SCHEMES + _STORE_SCHEMES:
        raise VerifyError(f"{flag}: cannot verify {scheme}:// (use redis://, nats://, kafka:// or a store URL); "
                          "memory:// lives inside one process and dual:// is two sides: name each")
    if path is not None and not Path(path).exists():
        raise VerifyError(f"{flag}: no history at {Path(path).absolute()}: nothing has been stored there")


@contextlib.asynccontextmanager
async def open_side(url: str, pattern: str, since: datetime | None) -> AsyncIterator[Reader]:
    """Connect to one side and yield its reader; the connection is closed afterwards."""
    scheme = scheme_of(url)
    if scheme in _STORE_SCHEMES:
        from squadbus.store import open_store

        async with open_store(url) as store:
            yield StoreReader(store, pattern, since)
        return
    if scheme in ("redis", "rediss"):
        from squadbus.backends.redis import RedisBackend, RedisSettings

        # Verify reads; it does not trim (a backend with retention settings would start a trimmer).
        settings = dataclasses.replace(RedisSettings.from_url(url), maxlen=None, subject_maxlen=None, max_age=None)
        backend: Any = RedisBackend(settings)
    else:
        backend = open_backend(url)
    reader: Any = {"redis": RedisReader, "rediss": RedisReader, "nats": NatsReader, "tls": NatsReader,
                   "kafka": KafkaReader}[scheme](backend, pattern, since)
    try:
        await backend.connect()
        yield reader
    finally:
        if isinstance(reader, KafkaReader):
            await reader.close()
        await backend.close()


async def _read(flag: str, reader: Reader, pattern: str, since: datetime | None) -> Holdings:
    """Everything ``reader`` yields that ``pattern`` and ``since`` select, by execution; None (bytes
    that are not an envelope) is counted. Errors become one VerifyError naming the side."""
    held = Holdings()
    skip_dlq = not _names_dlq(pattern)
    try:
        async for message in reader.messages():
            if message is None:
                held.unreadable += 1
            elif skip_dlq and message.subject.startswith(subjects.DLQ_PREFIX + "."):
                continue
            elif since is None or message.created_at >= since:
                held.add(message)
    except (SquadbusError, OSError) as exc:
        raise VerifyError(f"{flag}: {exc}") from None
    return held


async def verify_sides(source_url: str, destination_url: str, pattern: str, since: datetime | None) -> Report:
    """Snapshot both ends (source first), read both sides at once, compare."""
    sides = (("--from", source_url), ("--to", destination_url))
    async with contextlib.AsyncExitStack() as stack:
        readers = []
        for flag, url in sides:
            try:
                readers.append(await stack.enter_async_context(open_side(url, pattern, since)))
            except (VerifyError, SquadbusError, OSError, ImportError) as exc:
                raise VerifyError(f"{flag}: {exc}") from None
        for (flag, _), reader in zip(sides, readers, strict=True):  # both connected: snapshots close together
            try:
                await reader.snapshot()
            except (SquadbusError, OSError) as exc:
                raise VerifyError(f"{flag}: {exc}") from None
        try:
            async with asyncio.TaskGroup() as group:  # one side failing stops the other
                tasks = [group.create_task(_read(flag, reader, pattern, since))
                         for (flag, _), reader in zip(sides, readers, strict=True)]
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None
    return compare(tasks[0].result(), tasks[1].result())


# ---- output --------------------------------------------------------------------------------------


def _name(execution: UUID | None) -> str:
    return "none" if execution is None else str(execution)


def _count(side: dict[UUID | None, list[UUID]]) -> int:
    return sum(len(ids) for ids in side.values())


def _capped(side: dict[UUID | None, list[UUID]], show: int) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for execution, ids in side.items():
        for i in ids:
            if len(out) >= show:
                return out
            out.append({"execution": _name(execution), "id": str(i)})
    return out


def as_json(report: Report, show: int) -> dict[str, Any]:
    """The report as one JSON object (id lists capped at ``show``)."""
    s, d = report.source, report.destination
    executions = set(s.by_execution) | set(d.by_execution)
    return {
        "match": report.matches,
        "executions": len(executions),
        "from": {"messages": len(s.execution_of), "duplicates": s.duplicates, "unreadable": s.unreadable},
        "to": {"messages": len(d.execution_of), "duplicates": d.duplicates, "unreadable": d.unreadable},
        "missing": {"count": _count(report.missing), "ids": _capped(report.missing, show)},
        "extra": {"count": _count(report.extra), "ids": _capped(report.extra, show)},
        "order": {"count": len(report.order),
                  "executions": [{"execution": str(e), "first_difference": n}
                                 for e, n in list(report.order.items())[:show]]},
    }


def as_text(report: Report, show: int, title: str) -> str:
    """The report as a short table."""
    s, d = report.source, report.destination
    executions = set(s.by_execution) | set(d.by_execution)
    lines = [title, f"{'':22}{'from':>10}{'to':>10}",
             f"{'executions':22}{len(s.by_execution):>10}{len(d.by_execution):>10}",
             f"{'messages':22}{len(s.execution_of):>10}{len(d.execution_of):>10}",
             f"{'duplicate copies':22}{s.duplicates:>10}{d.duplicates:>10}"]
    if s.unreadable or d.unreadable:
        lines.append(f"{'unreadable':22}{s.unreadable:>10}{d.unreadable:>10}")
    differing = sorted(set(report.missing) | set(report.extra) | set(report.order), key=_name)
    lines.append(f"executions checked {len(executions)}, differing {len(differing)}")
    if differing:
        lines.append(f"  {'execution':36}  {'from':>7} {'to':>7} {'missing':>7} {'extra':>7}  order")
        for execution in differing[:show]:
            first = report.order.get(execution) if execution is not None else None
            lines.append(
                f"  {_name(execution):36}  {len(s.by_execution.get(execution, ())):>7} "
                f"{len(d.by_execution.get(execution, ())):>7} {len(report.missing.get(execution, ())):>7} "
                f"{len(report.extra.get(execution, ())):>7}  {'' if first is None else f'differs at {first}'}")
        if len(differing) > show:
            lines.append(f"  ... and {len(differing) - show} more executions")
    for what, side in (("missing on the destination", report.missing), ("extra on the destination", report.extra)):
        total = _count(side)
        lines.append(f"{what}: {total}")
        for item in _capped(side, show):
            lines.append(f"  {item['id']}  execution {item['execution']}")
        if total > show:
            lines.append(f"  ... and {total - show} more")
    lines.append("match" if report.matches else "differ")
    return "\n".join(lines)


async def _run(source_url: str, destination_url: str, pattern: str, since: datetime | None) -> Report:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
    return await verify_sides(source_url, destination_url, pattern, since)


@click.command()
@click.option("--from", "source_url", required=True, help="The side messages come from (bus or store URL).")
@click.option("--to", "destination_url", required=True, help="The side they should all be on.")
@click.option("--since", default=None, help="Only messages created at or after this (ISO 8601, or an age: 15m, 2h).")
@click.option("--pattern", default=subjects.ALL, show_default=True, help="Only subjects matching this pattern.")
@click.option("--show", default=20, show_default=True, type=click.IntRange(min=0),
              help="Most ids and executions listed in each part of the report.")
@click.option("--json", "json_output", is_flag=True, help="One JSON object instead of the table.")
def verify(source_url: str, destination_url: str, since: str | None, pattern: str, show: int,
           json_output: bool) -> None:
    """Compare two sides of a migration: ids per execution, missing and extra, order.

    Reads each side up to where it ended when verify started (never waits for new messages) and
    creates no consumer group. Exit 0 when they match, 1 when they differ, 2 on a usage or
    connection error.
    """
    try:
        subjects.validate_pattern(pattern)
        if not pattern.startswith(subjects.ROOT + "."):
            raise VerifyError(f"--pattern {pattern!r} is outside {subjects.ALL!r}, where squadbus keeps messages")
        moment = parse_time(since, "--since", datetime.now(UTC))
        check_side("--from", source_url)
        check_side("--to", destination_url)
        report = asyncio.run(_run(source_url, destination_url, pattern, moment))
    except (VerifyError, SquadbusError, click.BadParameter) as exc:
        message = exc.format_message() if isinstance(exc, click.BadParameter) else str(exc)
        click.echo(f"verify: {' '.join(message.split())}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise SystemExit(130) from None
    if json_output:
        click.echo(json.dumps(as_json(report, show)))
    else:
        title = f"verify {pattern}{f' since {moment.isoformat()}' if moment else ''}: " \
                f"{redact(source_url)} -> {redact(destination_url)}"
        click.echo(as_text(report, show, title))
    raise SystemExit(EXIT_MATCH if report.matches else EXIT_DIFFER)
