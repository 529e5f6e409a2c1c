"""``squadbus tail``: print the squad's messages matching a subject pattern as they are sent."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from squadbus.cli.api import ApiClient
from squadbus.cli.errors import CliError, run
from squadbus.cli.format import LineFormat, from_api, line, output_options
from squadbus.cli.target import service_or_bus, settings_of
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus
from squadbus.core.errors import InvalidSubject, SquadbusError
from squadbus.core.settings import Settings

_SCOPES = frozenset({subjects.ROOT, "*", ">"})


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is valid and can match a squad subject (they all start with ``agent.``)."""
    try:
        subjects.validate_pattern(pattern)
    except InvalidSubject as exc:
        raise click.BadParameter(str(exc), param_hint="PATTERN") from None
    if pattern.split(".", 1)[0] not in _SCOPES:
        raise click.BadParameter(f"pattern {pattern!r} matches nothing: every squad subject is under agent. "
                                 "(e.g. 'agent.>', 'agent.message.dev-1')", param_hint="PATTERN")
    return pattern


def tail_service(client: ApiClient, pattern: str, count: int, from_start: bool, fmt: LineFormat | None = None) -> None:
    """Follow ``GET /v1/events`` of a service, printing each message as a line (``fmt``) or, with ``fmt`` None,
    its JSON (as the REST API shows it)."""
    seen = 0
    started = False
    for event in client.events(pattern, start="earliest" if from_start else "new"):
        if event.event == "start":
            verb = "resumed" if started else "following"
            click.echo(f"squadbus tail: {verb} {pattern!r} at {client.base_url} (Ctrl-C to stop)", err=True)
            started = True
        elif event.event == "gap":
            click.echo(f"squadbus tail: positions {event.data['from_position']}..{event.data['to_position']} "
                       "were removed by retention", err=True)
        elif event.event == "message":
            if fmt is None:
                click.echo(json.dumps(event.data, ensure_ascii=False))
            else:
                message, seq = from_api(event.data)
                click.echo(line(message, fmt, seq=seq), color=fmt.color)
            seen += 1
            if count and seen >= count:
                return


def show_delivery(delivery: Delivery, fmt: LineFormat | None) -> None:
    """Print one delivery as a line (``fmt``) or, with ``fmt`` None, as JSON with its attempt."""
    if fmt is None:
        click.echo(json.dumps({**delivery.message.to_dict(), "attempt": delivery.attempt}, default=str))
    else:
        click.echo(line(delivery.message, fmt, attempt=delivery.attempt), color=fmt.color)


async def tail_bus(settings: Settings, pattern: str, count: int, group: str | None, from_start: bool,
                   fmt: LineFormat | None = None) -> None:
    """Subscribe on the bus itself (a broker every process shares), printing each delivery (:func:`show_delivery`)."""
    done = asyncio.Event()
    seen = 0

    async def show(delivery: Delivery) -> None:
        nonlocal seen
        show_delivery(delivery, fmt)
        seen += 1
        if count and seen >= count:
            done.set()

    async with Bus.from_settings(settings) as bus:
        start = StartFrom.EARLIEST if from_start else StartFrom.NEW
        await bus.subscribe(pattern, show, group=group, options=ConsumerOptions(start=start))
        click.echo(f"squadbus tail: following {pattern!r} on {bus.backend.name} (Ctrl-C to stop)", err=True)
        await done.wait()


@click.command()
@click.argument("pattern", default="agent.>")
@click.option("--count", type=int, default=0, help="Stop after this many messages (0 = until interrupted).")
@click.option("--group", default=None, help="Join this consumer group instead of a private live tail (broker URLs).")
@click.option("--from-start", is_flag=True,
              help="Start from the earliest retained message (with --group, or through a service).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per message: the REST API's fields (on a broker URL: the envelope and attempt).")
@output_options
@click.pass_context
def tail(ctx: click.Context, pattern: str, count: int, group: str | None, from_start: bool, as_json: bool,
         color: str, utc: bool, no_color: str | None) -> None:
    """Print messages matching PATTERN as they are sent (NATS wildcards: '*' one token, '>' the rest).

    One line per message: time, execution, sender → recipient (#domain, * for the squad), [type], content;
    --json prints JSON lines instead.

    Through a service (--api, SQUADBUS_API, or the local one on memory://) it follows GET /v1/events and
    resumes where it stopped if the connection drops; on a broker URL it subscribes on the bus.
    """
    check_pattern(pattern)
    fmt = None if as_json else LineFormat.for_stream(sys.stdout, color, no_color=no_color, utc=utc)
    try:
        client = service_or_bus(ctx, "tail")
        if client is not None:
            if group is not None:
                raise click.UsageError("--group needs a broker URL (--url): a service's event stream has no "
                                       "consumer groups")
            try:
                tail_service(client, pattern, count, from_start, fmt)
            except KeyboardInterrupt:
                raise SystemExit(130) from None
            return
    except SquadbusError as exc:
        raise CliError(str(exc)) from None
    run(tail_bus(settings_of(ctx), pattern, count, group, from_start, fmt))
