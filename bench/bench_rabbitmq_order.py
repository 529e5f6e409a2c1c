"""Per-execution order across two members of one RabbitMQ group, with and without single active consumer.

    .venv/bin/python bench/bench_rabbitmq_order.py [--messages 400] [--executions 20] [--runs 3]

Two Buses in one process join one group (``max_in_flight=1`` each, the default prefetch); a third
sends ``--messages`` messages round-robin over ``--executions`` executions, in bursts of 50 concurrent
sends (written in order on its publish channel). Each
handler sleeps 0-4 ms (random) and records the execution and index it handled. Reported per run:
executions whose handling order differs from publish order, handled pairs out of order, the share
of the busier member, and the time from the first send to the last message handled. Starts its own
private node in a temp dir and stops it by PID. Prints one JSON line per run and setting.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing.servers.rabbitmq import RabbitServer

BURST = 50


async def one_run(url: str, messages: int, executions: int, rng: random.Random) -> dict[str, object]:
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    ids = [uuid.uuid4() for _ in range(executions)]
    handled: list[tuple[str, uuid.UUID | None, int]] = []
    done = asyncio.Event()

    def member(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            await asyncio.sleep(rng.uniform(0, 0.004))
            handled.append((name, delivery.message.task_execution_id, int(delivery.message.content)))
            if len(handled) >= messages:
                done.set()
        return handle

    options = ConsumerOptions(max_in_flight=1)
    async with Bus.from_url(url) as a, Bus.from_url(url) as b, Bus.from_url(url) as producer:
        await a.subscribe(f"agent.message.{agent}", member("a"), group=group, options=options)
        await b.subscribe(f"agent.message.{agent}", member("b"), group=group, options=options)
        started = time.perf_counter()
        for first in range(0, messages, BURST):  # a burst's sends are written in order on one channel
            await asyncio.gather(*(producer.send("pm", agent, str(i), task_execution_id=ids[i % executions])
                                   for i in range(first, min(first + BURST, messages))))
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - started
    broken, inversions = 0, 0
    for execution in ids:
        order = [i for _, e, i in handled if e == execution]
        pairs = sum(1 for x, y in itertools.pairwise(order) if y < x)
        inversions += pairs
        broken += pairs > 0
    share = max(Counter(name for name, _, _ in handled).values()) / len(handled)
    return {"executions_out_of_order": broken, "of": executions, "pairs_out_of_order": inversions,
            "busier_member_share": round(share, 3), "seconds": round(elapsed, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--executions", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as directory, RabbitServer(directory) as server:
        for _ in range(args.runs):
            for sac in (False, True):
                url = f"{server.url}?namespace=o{uuid.uuid4().hex[:8]}&single_active_consumer={str(sac).lower()}"
                result = await one_run(url, args.messages, args.executions, rng)
                print(json.dumps({"single_active_consumer": sac, **result}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
