"""A group member in a process of its own for fault runs: writes a ledger line per completed delivery.

Usage: python -m squadbus.testing.ledger_consumer URL GROUP PATTERN OUTFILE NAME ACK_WAIT

Handles each delivery in ~10 ms (an agent's work), writes
:func:`~squadbus.testing.ledger.completion_line` when it returns, writes
``ready`` once subscribed, and runs until it is killed or stopped.
"""

from __future__ import annotations

import asyncio
import sys

from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing.ledger import completion_line

MODULE = "squadbus.testing.ledger_consumer"


async def main(url: str, group: str, pattern: str, outfile: str, name: str, ack_wait: float) -> None:
    with open(outfile, "a", buffering=1) as out:  # noqa: ASYNC230 - line-buffered log, tiny writes

        async def handler(delivery: Delivery) -> None:
            await asyncio.sleep(0.01)
            out.write(completion_line(delivery.message, name, delivery.attempt))

        async with Bus.from_url(url) as bus:
            await bus.subscribe(pattern, handler, group=group, options=ConsumerOptions(ack_wait=ack_wait))
            out.write("ready\n")
            await asyncio.Event().wait()


if __name__ == "__main__":
    url_arg, group_arg, pattern_arg, outfile_arg, name_arg, ack_wait_arg = sys.argv[1:]
    asyncio.run(main(url_arg, group_arg, pattern_arg, outfile_arg, name_arg, float(ack_wait_arg)))
