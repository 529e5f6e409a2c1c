"""``squadbus a2a join URL --as AGENT_ID``: a remote A2A agent answers as a squad member until SIGTERM/SIGINT.

Needs ``squadbus[a2a]``; the import happens when the command runs, so the
rest of the CLI works without the extra. See docs/a2a.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import replace

import click

from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.core.settings import Settings


async def run_join(url: str, agent_id: str, settings: Settings, *, headers: dict[str, str], attempts: int,
                   stop: asyncio.Event | None = None) -> None:
    """Join until ``stop`` is set (or SIGTERM/SIGINT arrives), then leave after the message in flight."""
    try:
        from squadbus.service.a2a.remote import RemoteMember
    except ImportError as exc:
        raise ConfigError(f"squadbus a2a needs the a2a extra: pip install 'squadbus[a2a]' ({exc})") from exc
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with Bus.from_settings(settings) as bus, RemoteMember(bus, agent_id, url, headers=headers,
                                                                    attempts=attempts) as member:
            click.echo(f"squadbus a2a: {url} answers as {agent_id} on {bus.backend.name}")
            await stop.wait()
        click.echo(f"squadbus a2a: {agent_id} left; {member.sent} messages sent, {member.failures} failures")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


@click.group()
def a2a() -> None:
    """A2A: remote A2A agents as squad members (the A2A edge itself runs in ``squadbus serve``)."""


@a2a.command()
@click.argument("url")
@click.option("--as", "agent_id", required=True, help="The squad agent id the remote agent answers as.")
@click.option("--header", "headers", multiple=True, metavar="NAME:VALUE",
              help="A header for every request to the remote agent (e.g. 'Authorization: Bearer …'); repeatable.")
@click.option("--attempts", default=5, show_default=True, type=click.IntRange(min=1),
              help="Attempts per message while the remote agent fails, then a dead letter.")
@click.option("--url", "backend_url", default=None, help="Backend URL (overrides SQUADBUS_URL).")
@click.pass_context
def join(ctx: click.Context, url: str, agent_id: str, headers: tuple[str, ...], attempts: int,
         backend_url: str | None) -> None:
    """Make the remote A2A agent at URL squad member AGENT_ID: messages to it go to URL, its answers come back."""
    from squadbus.cli.errors import run
    parsed: dict[str, str] = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{header!r} is not NAME:VALUE", param_hint="--header")
        parsed[name.strip()] = value.strip()
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()
    settings = replace(base, url=backend_url or base.url)
    run(run_join(url, agent_id, settings, headers=parsed, attempts=attempts))
