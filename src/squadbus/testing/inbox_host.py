"""A host process of a squad for the inbox conformance cases: it opens the inboxes of the agents it hosts.

Usage: python -m squadbus.testing.inbox_host URL OUTFILE ACK_WAIT MODE AGENT [AGENT ...]

Opens ``bus.inbox(agent, broadcasts=False)`` for each agent, writes ``ready``,
then one line ``<agent> <message id> <attempt>`` per delivery (flushed).
MODE ``ack`` acks each delivery; ``hold`` keeps every delivery unsettled (a
host that dies mid-work, killed by the test with SIGKILL).
"""

from __future__ import annotations

import asyncio
import sys

from squadbus.core.backend import ConsumerOptions
from squadbus.core.bus import Bus
from squadbus.core.inbox import Inbox

MODULE = "squadbus.testing.inbox_host"
"""What to pass to ``python -m`` to run a host."""


async def main(url: str, outfile: str, ack_wait: float, mode: str, agents: list[str]) -> None:
    with open(outfile, "a", buffering=1) as out:  # noqa: ASYNC230 - line-buffered log, tiny writes

        async def work(inbox: Inbox) -> None:
            async for delivery in inbox:
                out.write(f"{inbox.agent_id} {delivery.message.id} {delivery.attempt}\n")
                if mode == "ack":
                    await delivery.ack()
                else:
                    await asyncio.Event().wait()  # holds it until the process is killed

        async with Bus.from_url(url) as bus:
            options = ConsumerOptions(ack_wait=ack_wait)
            inboxes = [bus.inbox(agent, broadcasts=False, options=options) for agent in agents]
            await asyncio.gather(*(inbox.open() for inbox in inboxes))
            out.write("ready\n")
            await asyncio.gather(*(work(inbox) for inbox in inboxes))


if __name__ == "__main__":
    url_arg, outfile_arg, ack_wait_arg, mode_arg, *agent_args = sys.argv[1:]
    asyncio.run(main(url_arg, outfile_arg, float(ack_wait_arg), mode_arg, agent_args))
