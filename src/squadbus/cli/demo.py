"""``squadbus demo``: a small squad (a PM, two developers, a reviewer) talking, printed in send order.

The agents always run in this process. One tap subscribed to ``agent.>``
sees every message in the order the bus took them, and is the only thing that
prints, so the conversation reads in the order it happened.

With a service (``--api``, ``SQUADBUS_API``, or on ``memory://`` the local
service when one answers), the agents talk on a private ``memory://`` bus and
the tap publishes every message through the service's API, in that order and
with the same id, before printing it: the conversation lands in the service's
history and on its dashboard. Without one they talk on the ``--url`` bus (on a
broker, a service attached to it stores them through its db-writer). A request's
reply travels there as a direct message to the requester (the API has no
reply subjects), with the same id, type and content. Without a service on
``memory://`` the demo says in one line that nothing reached one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import click

from squadbus.cli.errors import CliError
from squadbus.cli.send import api_body
from squadbus.cli.target import find_service, is_memory, local_api, settings_of
from squadbus.core import subjects
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import SquadbusError
from squadbus.core.inbox import Inbox
from squadbus.core.tasks import cancel_and_wait

Mirror = Callable[[Message], Awaitable[None]]
WRAP_UP = "that's the login page shipped, thanks all"


def conversation_line(message: Message) -> str:
    """How the demo prints one message: ``  sender -> recipient [type] content``."""
    to = message.recipient_id or (f"domain:{message.domain}" if message.domain else "*")
    return f"  {message.sender_id} -> {to} [{message.message_type}] {message.content}"


async def run_demo(url: str, mirror: Mirror | None = None, *, where: str = "") -> list[str]:
    """Run the example squad on ``url``, each message printed (and mirrored first) in send order.

    Returns the lines printed.
    """
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        click.echo(line)

    execution = uuid.uuid4()
    seen: asyncio.Queue[Message] = asyncio.Queue()

    async def tap(delivery: Delivery) -> None:
        await seen.put(delivery.message)

    async def narrate() -> None:
        while True:
            message = await seen.get()
            if message.task_execution_id != execution:
                continue
            if mirror is not None:
                await mirror(message)
            say(conversation_line(message))
            if message.content == WRAP_UP:
                return

    async with Bus.from_url(url) as bus:
        await bus.subscribe(subjects.ALL, tap)
        # Inboxes open first so the squad broadcast reaches everyone.
        inboxes = {name: await bus.inbox(name, domains=["dev"]).open() for name in ("dev-1", "dev-2")}
        reviewer = await bus.inbox("reviewer").open()

        async def developer(name: str, inbox: Inbox) -> None:
            async for delivery in inbox:
                m = delivery.message
                if m.message_type == "task":
                    await bus.request(name, "reviewer", f"review my work on: {m.content}", timeout=5,
                                      task_execution_id=execution)
                    await bus.send(name, "pm", f"done: {m.content}", "status", task_execution_id=execution)
                await delivery.ack()

        async def review() -> None:
            async for delivery in reviewer:
                if "reply_to" in delivery.message.headers:
                    await bus.reply(delivery.message, "reviewer", "approved, ship it")
                await delivery.ack()

        say(f"execution {execution} on {bus.backend.name}{where}")
        narrator = asyncio.create_task(narrate())
        workers = [asyncio.create_task(developer(n, i)) for n, i in inboxes.items()]
        workers.append(asyncio.create_task(review()))
        try:
            await bus.broadcast("pm", "kick-off: we ship the login page today", "announcement",
                                task_execution_id=execution)
            await bus.broadcast("pm", "dev stand-up in 5 minutes", "announcement", domain="dev",
                                task_execution_id=execution)
            async with bus.inbox("pm", broadcasts=False) as pm:
                for dev, job in (("dev-1", "build the login form"), ("dev-2", "add the session API")):
                    await bus.send("pm", dev, job, "task", task_execution_id=execution)
                for _ in range(2):
                    status = await pm.get(timeout=10)
                    await status.ack()
            await bus.broadcast("pm", WRAP_UP, "announcement", task_execution_id=execution)
            await asyncio.wait_for(narrator, timeout=30)
        finally:
            await cancel_and_wait(*workers, narrator)  # an agent that failed on its own raises here
            for inbox in (*inboxes.values(), reviewer):
                await inbox.close()
        say("squad done")
    return lines


@click.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run an example squad (a PM, two developers, a reviewer) and print the conversation.

    With a service (--api, SQUADBUS_API, or the local one on memory://) every message also goes
    through its API, so the conversation is in its history and on its dashboard.
    """
    settings = settings_of(ctx)
    try:
        client = find_service(ctx)
        if client is None:
            asyncio.run(run_demo(settings.url))
            if is_memory(settings.url):
                click.echo(f"squadbus demo: nothing reached a service: this squad lived inside this process "
                           f"(no squadbus service answers at {local_api(ctx)}; start one with `make run`, or "
                           "pass --api URL)", err=True)
            return

        async def mirror(message: Message) -> None:
            await asyncio.to_thread(client.send, api_body(message))

        lines = asyncio.run(run_demo("memory://", mirror, where=f", every message sent through {client.base_url}"))
        execution = lines[0].split()[1]
        click.echo(f"see it: squadbus history --execution {execution}; dashboard {client.base_url}/", err=True)
    except (SquadbusError, TimeoutError) as exc:
        raise CliError(str(exc) or type(exc).__name__) from None
