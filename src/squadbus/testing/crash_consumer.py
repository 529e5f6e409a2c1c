"""A consumer process for kill -9 fault tests, the same on every backend.

Usage: python -m squadbus.testing.crash_consumer URL GROUP SUBJECT OUTFILE

Joins GROUP on SUBJECT with a slow handler; writes "start <id>" before and
"done <id>" after each message (flushed), until it is killed.
:func:`kill_mid_batch` runs it from a test and kills it with SIGKILL.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

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


async def kill_mid_batch(
    url: str, group: str, subject: str, log: Path, *, timeout: float
) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """Run this consumer in a process, SIGKILL it once it has started 10 messages, and return the
    ids it started and the ids it finished (it dies holding read, unacknowledged messages)."""
    from squadbus.testing.conformance import eventually  # here: the consumer process needs no pytest

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", MODULE, url, group, subject, str(log))
    try:
        def started() -> int:
            return (log.read_text() if log.exists() else "").count("start ")

        await eventually(lambda: started() >= 10, timeout, "the consumer process to start a batch")
    finally:
        proc.kill()
        await proc.wait()
    lines = log.read_text().splitlines()  # noqa: ASYNC240 - a small local log, read once
    return (
        {uuid.UUID(line.split()[1]) for line in lines if line.startswith("start ")},
        {uuid.UUID(line.split()[1]) for line in lines if line.startswith("done ")},
    )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
