"""A consumer process for kill -9 fault tests, the same on every backend.

Usage: python -m squadbus.testing.crash_consumer URL GROUP SUBJECT OUTFILE

Joins GROUP on SUBJECT with a slow handler; writes "start <id>" before and
"done <id>" after each message (flushed), until it is killed.
"""

from __future__ import annotations

import asyncio
import sys

from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus

MODULE = "squadbus.testing.crash_consumer"
"""What to pass to ``python -m`` to run this consumer."""


async def main(url: str, group: str, subject: str, outfile: str) -> None:
    with open(outfile, "a", buffering=1) as out:  # noqa: ASYNC230 - line-buffered log, tiny writes

        async def handler(delivery: Delivery) -> None:
            out.write(f"start {delivery.message.id}\n")
            await asyncio.sleep(0.05)
            out.write(f"done {delivery.message.id}\n")

        async with Bus.from_url(url) as bus:
            options = ConsumerOptions(batch_size=50, ack_wait=1.0)
            await bus.subscribe(subject, handler, group=group, options=options)
            out.write("ready\n")
            await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
