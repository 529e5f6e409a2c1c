"""A consumer process for the kill -9 test: ``python consumer_child.py URL AGENT GROUP OUT HANG_BATCH``.

It subscribes ``agent.message.AGENT`` in GROUP with a batched handler
(max_in_flight 10), appends every message id of a batch to OUT when the batch
starts, and hangs forever inside batch number HANG_BATCH (1-based), so the
parent can kill it with offsets of that batch still uncommitted.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions
from squadbus.core.batching import batched
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


async def main(url: str, agent: str, group: str, out: str, hang_batch: int) -> None:
    batches = 0

    async def process(messages: Sequence[Message]) -> None:
        nonlocal batches
        batches += 1
        _append(out, "".join(f"{batches} {m.id}\n" for m in messages))
        if batches == hang_batch:
            await asyncio.Event().wait()

    async with Bus.from_url(url) as bus:
        options = ConsumerOptions(max_in_flight=10, ack_wait=60)
        await bus.subscribe(subjects.direct(agent), batched(process, max_batch=10, max_wait=0.01),
                            group=group, options=options)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
