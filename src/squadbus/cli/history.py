"""``squadbus history``: query the history from the command line (the filters of GET /v1/messages).

It reads ``--store`` if given; else a service's API (``--api``, ``SQUADBUS_API``,
or on ``memory://`` the local service when one answers) unless a store is
configured (``SQUADBUS_STORE_URL``); else the default store of the data
directory. It says on stderr what it reads, and never creates a SQLite file
to read from it.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from squadbus.cli.api import ApiClient
from squadbus.cli.errors import CliError, run
from squadbus.cli.format import LineFormat, from_api, line, output_options
from squadbus.cli.target import find_service, local_api, settings_of
from squadbus.core.errors import SquadbusError
from squadbus.core.settings import Settings
from squadbus.store import HistoryQuery, StoredMessage, open_store
from squadbus.store.base import MAX_LIMIT

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def store_url_of(ctx: click.Context, override: str | None) -> str:
    """``--store`` if given, else the store URL of the group's Settings (SQUADBUS_STORE_URL)."""
    if override:
        return override
    settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()
    return settings.store_url


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite store URL (None for another engine or an in-memory database)."""
    if not url.split("://", 1)[0].lower().startswith("sqlite"):
        return None
    from squadbus.store.sqlite import SqliteSettings

    settings = SqliteSettings.from_url(url)
    return None if settings.in_memory else settings.path


def parse_time(value: str | None, option: str, now: datetime) -> datetime | None:
    """ISO 8601 (naive means UTC) or a relative age such as ``90s``, ``15m``, ``2h``, ``7d`` (before now)."""
    if value is None:
        return None
    match = _RELATIVE.match(value.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        message = f"{value!r} is neither ISO 8601 nor an age like 15m, 2h, 7d"
        raise click.BadParameter(message, param_hint=option) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _from_api(item: dict[str, Any]) -> StoredMessage:
    message, _ = from_api(item)
    return StoredMessage(seq=item["seq"], stored_at=datetime.fromisoformat(item["stored_at"]), message=message)


def _print(row: StoredMessage, fmt: LineFormat | None) -> None:
    if fmt is None:
        click.echo(_json(row))
    else:
        click.echo(line(row.message, fmt, seq=row.seq), color=fmt.color)


def _api_query(q: HistoryQuery) -> dict[str, object]:
    return {
        "task_execution_id": q.task_execution_id, "agent_id": q.agent_id, "message_type": q.message_type,
        "since": q.since.isoformat() if q.since else None, "until": q.until.isoformat() if q.until else None,
        "cursor": q.cursor, "limit": q.limit,
    }


def _json(row: StoredMessage) -> str:
    return json.dumps(
        {"seq": row.seq, "stored_at": row.stored_at.isoformat(), "message": row.message.to_dict()},
        ensure_ascii=False,
    )


@click.command()
@click.option("--execution", "execution", default=None, help="Only this task_execution_id (UUID).")
@click.option("--agent", default=None, help="Only messages sent or received by this agent.")
@click.option("--type", "message_type", default=None, help="Only this message_type.")
@click.option("--since", default=None, help="created_at >= this (ISO 8601, or an age: 15m, 2h, 7d).")
@click.option("--until", default=None, help="created_at < this (ISO 8601, or an age).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Most rows to print.")
@click.option("--cursor", default=None, help="Continue after a previous run (printed on stderr when there is more).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: seq, stored_at, message.")
@click.option("--store", "store_url", default=None,
              help="Read this store URL (default: a service, else SQUADBUS_STORE_URL or the data directory's).")
@output_options
@click.pass_context
def history(
    ctx: click.Context, execution: str | None, agent: str | None, message_type: str | None, since: str | None,
    until: str | None, limit: int, cursor: str | None, as_json: bool, store_url: str | None, color: str,
    utc: bool, no_color: str | None,
) -> None:
    """Print stored messages, oldest first, one line each: time, execution#seq, sender → recipient
    (#domain, * for the squad), [type], content; --json prints JSON lines instead."""
    try:
        execution_id = uuid.UUID(execution) if execution else None
    except ValueError:
        raise click.BadParameter(f"{execution!r} is not a UUID", param_hint="--execution") from None
    now = datetime.now(UTC)
    query = HistoryQuery(
        task_execution_id=execution_id, agent_id=agent, message_type=message_type,
        since=parse_time(since, "--since", now), until=parse_time(until, "--until", now), cursor=cursor,
        limit=min(limit, MAX_LIMIT),
    )
    fmt = None if as_json else LineFormat.for_stream(sys.stdout, color, no_color=no_color, utc=utc)
    settings = settings_of(ctx)
    client = find_service(ctx) if not store_url and (settings.api_url or settings.default_store) else None
    if client is not None:
        click.echo(f"history: from the service at {client.base_url}", err=True)
        try:
            more = _print_pages(query, limit, fmt, client=client)
        except SquadbusError as exc:
            raise CliError(str(exc)) from None
    else:
        url = store_url_of(ctx, store_url)
        _must_exist(url, settings, ctx)
        from squadbus.cli.serve import redact

        click.echo(f"history: from the store {redact(url)}", err=True)
        more = run(_print_store(url, query, limit, fmt))
    if more is not None:
        click.echo(f"more rows: rerun with --cursor {more}", err=True)


def _must_exist(url: str, settings: Settings, ctx: click.Context) -> None:
    try:
        path = sqlite_path(url)
    except SquadbusError as exc:
        raise CliError(str(exc)) from None
    if path is not None and not Path(path).exists():
        where = f" and no squadbus service answers at {local_api(ctx)}" if settings.default_store else ""
        raise CliError(f"no history at {Path(path).absolute()}: nothing has been stored there{where}; "
                       "read another with --store URL or a service with --api URL")


def _next(q: HistoryQuery, cursor: str, remaining: int) -> HistoryQuery:
    return HistoryQuery(
        task_execution_id=q.task_execution_id, agent_id=q.agent_id, message_type=q.message_type,
        since=q.since, until=q.until, cursor=cursor, limit=min(remaining, MAX_LIMIT),
    )


def _print_pages(q: HistoryQuery, limit: int, fmt: LineFormat | None, *, client: ApiClient) -> str | None:
    printed = 0
    while True:
        page = client.history(_api_query(q))
        for item in page["items"]:
            _print(_from_api(item), fmt)
        printed += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None or printed >= limit:
            return cursor if isinstance(cursor, str) else None
        q = _next(q, cursor, limit - printed)


async def _print_store(url: str, q: HistoryQuery, limit: int, fmt: LineFormat | None) -> str | None:
    printed = 0
    async with open_store(url) as store:
        while True:
            page = await store.query(q)
            for row in page.items:
                _print(row, fmt)
            printed += len(page.items)
            if page.next_cursor is None or printed >= limit:
                return page.next_cursor
            q = _next(q, page.next_cursor, limit - printed)
