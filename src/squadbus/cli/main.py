"""The ``squadbus`` command: one clear line and a non-zero exit on error, never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from squadbus import __version__
from squadbus.cli.bench import bench
from squadbus.cli.bridge import bridge
from squadbus.cli.demo import demo
from squadbus.cli.history import history
from squadbus.cli.retention import retention
from squadbus.cli.serve import serve
from squadbus.cli.worker import worker
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus
from squadbus.core.errors import SquadbusError
from squadbus.core.settings import Settings

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; turn squadbus and OS errors into one line on stderr and exit 1."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (SquadbusError, OSError, ImportError) as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        raise SystemExit(EXIT_ERROR) from None


def settings_from(ctx: click.Context) -> Settings:
    """The Settings object built by the ``main`` group (env + --url)."""
    settings: Settings = ctx.obj
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar=None, default=None, help="Backend URL (default: SQUADBUS_URL, MESSAGE_BUS or memory://).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, url: str | None, verbose: int) -> None:
    """squadbus: messaging for a squad of AI agents (not the AWS agent-squad project)."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env()
        ctx.obj = settings.with_url(url) if url else settings
    except SquadbusError as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)


@main.command()
def version() -> None:
    """Print the squadbus version."""
    click.echo(f"squadbus {__version__}")


@main.command()
@click.argument("sender")
@click.argument("recipient")
@click.argument("content")
@click.option("--type", "message_type", default="message", show_default=True, help="message_type of the message.")
@click.option("--execution", "task_execution_id", default=None, help="task_execution_id (UUID).")
@click.option("--metadata", default=None, help="Metadata as a JSON object.")
@click.option("--id", "message_id", default=None, help="Client-set message id (UUID), the idempotency key.")
@click.pass_context
def send(
    ctx: click.Context, sender: str, recipient: str, content: str, message_type: str,
    task_execution_id: str | None, metadata: str | None, message_id: str | None,
) -> None:
    """Send CONTENT from SENDER to RECIPIENT ('*' broadcasts to the squad, 'domain:NAME' to a domain)."""
    try:
        meta = json.loads(metadata) if metadata else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg}", param_hint="--metadata") from None
    settings = settings_from(ctx)

    async def go() -> None:
        async with Bus.from_settings(settings) as bus:
            domain = recipient.removeprefix("domain:") if recipient.startswith("domain:") else None
            to = None if recipient == "*" or domain else recipient
            message = await bus.send(
                sender, to, content, message_type, domain=domain,
                task_execution_id=task_execution_id, metadata=meta, id=message_id,
            )
            click.echo(json.dumps({"id": str(message.id), "subject": message.subject}))

    run(go())


@main.command()
@click.argument("pattern", default="agent.>")
@click.option("--count", type=int, default=0, help="Stop after this many messages (0 = until interrupted).")
@click.option("--group", default=None, help="Join this consumer group instead of a private live tail.")
@click.option("--from-start", is_flag=True, help="With --group: start from the earliest retained message.")
@click.pass_context
def tail(ctx: click.Context, pattern: str, count: int, group: str | None, from_start: bool) -> None:
    """Print messages matching PATTERN as JSON lines (NATS wildcards: '*' one token, '>' the rest)."""
    settings = settings_from(ctx)

    async def go() -> None:
        done = asyncio.Event()
        seen = 0

        async def show(delivery: Delivery) -> None:
            nonlocal seen
            click.echo(json.dumps({**delivery.message.to_dict(), "attempt": delivery.attempt}, default=str))
            seen += 1
            if count and seen >= count:
                done.set()

        async with Bus.from_settings(settings) as bus:
            start = StartFrom.EARLIEST if from_start else StartFrom.NEW
            await bus.subscribe(pattern, show, group=group, options=ConsumerOptions(start=start))
            await done.wait()

    run(go())


main.add_command(demo)
main.add_command(bench)
main.add_command(bridge)
main.add_command(history)
main.add_command(retention)
main.add_command(serve)
main.add_command(worker)

