"""``squadbus demo``: a small squad talking over the embedded bus, printed as it happens."""

from __future__ import annotations

import asyncio
import uuid

import click

from squadbus.core.bus import Bus
from squadbus.core.errors import SquadbusError
from squadbus.core.inbox import Inbox


async def run_demo(url: str) -> list[str]:
    """Run the example squad on ``url``; returns the conversation lines it printed."""
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        click.echo(line)

    execution = uuid.uuid4()
    async with Bus.from_url(url) as bus:
        # Inboxes open first so the squad broadcast reaches everyone.
        inboxes = {name: await bus.inbox(name, domains=["dev"]).open() for name in ("dev-1", "dev-2")}
        reviewer = await bus.inbox("reviewer").open()

        async def developer(name: str, inbox: Inbox) -> None:
            async for delivery in inbox:
                m = delivery.message
                say(f"  {m.sender_id} -> {name} [{m.message_type}] {m.content}")
                if m.message_type == "task":
                    verdict = await bus.request(name, "reviewer", f"review my work on: {m.content}", timeout=5,
                                                task_execution_id=execution)
                    say(f"  reviewer -> {name} [reply] {verdict.content}")
                    await bus.send(name, "pm", f"done: {m.content}", "status", task_execution_id=execution)
                await delivery.ack()

        async def review() -> None:
            async for delivery in reviewer:
                if "reply_to" in delivery.message.headers:
                    await bus.reply(delivery.message, "reviewer", "approved, ship it")
                await delivery.ack()

        workers = [asyncio.create_task(developer(n, i)) for n, i in inboxes.items()]
        workers.append(asyncio.create_task(review()))
        say(f"execution {execution} on {bus.backend.name}")
        await bus.broadcast("pm", "kick-off: we ship the login page today", "announcement",
                            task_execution_id=execution)
        await bus.broadcast("pm", "dev stand-up in 5 minutes", "announcement", domain="dev",
                            task_execution_id=execution)
        async with bus.inbox("pm", broadcasts=False) as pm:
            for dev, job in (("dev-1", "build the login form"), ("dev-2", "add the session API")):
                await bus.send("pm", dev, job, "task", task_execution_id=execution)
            for _ in range(2):
                status = await pm.get(timeout=10)
                say(f"  {status.message.sender_id} -> pm [{status.message.message_type}] {status.message.content}")
                await status.ack()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for inbox in (*inboxes.values(), reviewer):
            await inbox.close()
        say("squad done")
    return lines


@click.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run an example squad (a PM, two developers, a reviewer) and print the conversation."""
    settings = ctx.obj
    try:
        asyncio.run(run_demo(settings.url))
    except (SquadbusError, TimeoutError) as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        raise SystemExit(1) from None
