"""``squadbus verify``: compare what two sides of a migration hold, message id by message id.

Each side is a bus URL (``redis://``, ``rediss://``, ``nats://``, ``tls://``, ``kafka://``, ``amqp://``) or a
history store URL (``sqlite+aiosqlite:///PATH``, ``postgresql://...``). ``memory://`` lives inside
one process and ``dual://`` is two sides at once, so both are refused: name each side on its own.

Once both sides are connected, both are read at once, each from the start of its retention (or
``--since``) up to where it ended when its read began (a snapshot), with no consumer group and
without waiting for anything new, so verify always terminates. A bus is read through its
:class:`~squadbus.core.backend.ReadsAll` (how each broker does it: the backends' ``read_all``
modules); a store as pages of the history whose ``created_at`` is before its read began.

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
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import click

from squadbus.cli.history import parse_time, sqlite_path
from squadbus.cli.serve import redact
from squadbus.core import subjects
from squadbus.core.backend import Backend, ReadsAll
from squadbus.core.envelope import Message
from squadbus.core.errors import SquadbusError
from squadbus.core.registry import open_backend, scheme_of

EXIT_MATCH = 0
EXIT_DIFFER = 1
EXIT_USAGE = 2

_STORE_SCHEMES = ("sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg")
_BUS_SCHEMES = ("redis", "rediss", "nats", "tls", "kafka", "amqp", "amqps")
_PAGE = 1000


class VerifyError(Exception):
    """A usage or connection error: one line, exit 2."""


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

    def count_unreadable(self, data: bytes) -> None:
        """A record that is not a squadbus envelope."""
        self.unreadable += 1


Side = Callable[[Holdings], AsyncGenerator[Message, None]]
"""How to read one side, counting its unreadable records in the given Holdings."""


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


# ---- sides ---------------------------------------------------------------------------------------


async def _store_messages(store: Any, pattern: str, since: datetime | None) -> AsyncGenerator[Message, None]:
    """Pages of a history store whose ``created_at`` is before the first page (the snapshot), in stored order."""
    from squadbus.store import HistoryQuery

    until = datetime.now(UTC)
    cursor: str | None = None
    while True:
        page = await store.query(HistoryQuery(since=since, until=until, cursor=cursor, limit=_PAGE))
        for row in page.items:
            if subjects.matches(pattern, row.message.subject):
                yield row.message
        cursor = page.next_cursor
        if cursor is None:
            return


def _names_dlq(pattern: str) -> bool:
    return pattern.startswith(subjects.DLQ_PREFIX + ".")


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
async def open_side(url: str, pattern: str, since: datetime | None) -> AsyncIterator[Side]:
    """Connect to one side and yield how to read it; the connection is closed afterwards."""
    scheme = scheme_of(url)
    if scheme in _STORE_SCHEMES:
        from squadbus.store import open_store

        async with open_store(url) as store:
            yield lambda held: _store_messages(store, pattern, since)
        return
    if scheme in ("redis", "rediss"):
        from squadbus.backends.redis import RedisBackend, RedisSettings

        # Verify reads; it does not trim (a backend with retention settings would start a trimmer).
        settings = dataclasses.replace(RedisSettings.from_url(url), maxlen=None, subject_maxlen=None, max_age=None)
        backend: Backend = RedisBackend(settings)
    else:
        backend = open_backend(url)
    if not isinstance(backend, ReadsAll):
        raise VerifyError(f"the {backend.name} backend cannot read everything it holds")
    try:
        await backend.connect()
        yield lambda held: backend.read_all(pattern, since=since, on_unreadable=held.count_unreadable)
    finally:
        await backend.close()


async def _read(flag: str, side: Side, pattern: str, since: datetime | None) -> Holdings:
    """Everything ``side`` yields that ``pattern`` and ``since`` select, by execution; records that are
    not envelopes are counted. Errors become one VerifyError naming the side."""
    held = Holdings()
    skip_dlq = not _names_dlq(pattern)
    try:
        async with contextlib.aclosing(side(held)) as messages:
            async for message in messages:
                if skip_dlq and message.subject.startswith(subjects.DLQ_PREFIX + "."):
                    continue
                if since is None or message.created_at >= since:
                    held.add(message)
    except (SquadbusError, OSError) as exc:
        raise VerifyError(f"{flag}: {exc}") from None
    return held


async def verify_sides(source_url: str, destination_url: str, pattern: str, since: datetime | None) -> Report:
    """Connect both sides, then read both at once, each up to where it ended when its read began."""
    sides = (("--from", source_url), ("--to", destination_url))
    async with contextlib.AsyncExitStack() as stack:
        opened = []
        for flag, url in sides:
            try:
                opened.append(await stack.enter_async_context(open_side(url, pattern, since)))
            except (VerifyError, SquadbusError, OSError, ImportError) as exc:
                raise VerifyError(f"{flag}: {exc}") from None
        try:  # both connected: the two snapshots are taken close together; one side failing stops the other
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(_read(flag, side, pattern, since))
                         for (flag, _), side in zip(sides, opened, strict=True)]
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
