"""A consumer process for the kill -9 test: ``python consumer_child.py URL AGENT GROUP OUT HANG_BATCH``.

It subscribes ``agent.message.AGENT`` in GROUP with ``Bus.subscribe_batch``
(batches of up to 10, the db-writer's path), appends every message id of a
batch to OUT when the batch starts, and hangs forever inside batch number
HANG_BATCH (1-based), so the parent can kill it with offsets of that batch
still uncommitted.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


async def main(url: str, agent: str, group: str, out: str, hang_batch: int) -> None:
    batches = 0

    async def process(deliveries: Sequence[Delivery]) -> None:
        nonlocal batches
        batches += 1
        _append(out, "".join(f"{batches} {d.message.id}\n" for d in deliveries))
        if batches == hang_batch:
            await asyncio.Event().wait()

    async with Bus.from_url(url) as bus:
        await bus.subscribe_batch(subjects.direct(agent), process, group=group, max_batch=10, max_wait=0.01,
                                  options=ConsumerOptions(ack_wait=60))
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
