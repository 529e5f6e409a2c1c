"""RabbitMQ ack_wait: how long a delivery whose handler hangs takes to reach another member of its group.

    python bench/bench_rabbitmq_ack_wait.py [--trials 10] [--ack-wait 1.0] [--url amqp://...]

Each trial: a group of two members (two Buses); member A's handler hangs on the first message it gets;
the time from that handler starting to member B's handler getting the same message is recorded. The
watchdog looks every ack_wait / 4, so the expected range is ack_wait to 1.25 x ack_wait, plus the
channel close and the redelivery. Without ``--url`` a private node is started in a temp dir.
Prints min / p50 / max and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

from squadbus.benchmarks.stats import Environment, percentile
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus
from squadbus.testing.servers.rabbitmq import RabbitServer


async def trial(url: str, ack_wait: float) -> float:
    agent, group = f"ackw-{secrets.token_hex(4)}", f"ackw-{secrets.token_hex(4)}"
    options = ConsumerOptions(ack_wait=ack_wait, start=StartFrom.NEW)
    loop = asyncio.get_running_loop()
    hung_at: asyncio.Future[float] = loop.create_future()
    at_b: asyncio.Future[float] = loop.create_future()
    release = asyncio.Event()

    async def member_a(delivery: Delivery) -> None:
        if not hung_at.done():
            hung_at.set_result(time.perf_counter())
            await release.wait()

    async def member_b(delivery: Delivery) -> None:
        if not at_b.done():
            at_b.set_result(time.perf_counter())

    async with Bus.from_url(url) as sender, Bus.from_url(url, close_timeout=1) as a_bus, \
            Bus.from_url(url) as b_bus:
        await a_bus.subscribe(subjects.direct(agent), member_a, group=group, options=options)
        await sender.send("pm", agent, "hangs at A")
        start = await asyncio.wait_for(hung_at, 30)
        await b_bus.subscribe(subjects.direct(agent), member_b, group=group, options=options)
        end = await asyncio.wait_for(at_b, ack_wait * 2 + 30)
        release.set()
    return end - start


async def run(url: str, trials: int, ack_wait: float) -> list[float]:
    return [await trial(url, ack_wait) for _ in range(trials)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--ack-wait", type=float, default=1.0)
    parser.add_argument("--url", help="an existing node (default: a private node in a temp dir)")
    args = parser.parse_args()
    if args.url:
        seconds = asyncio.run(run(args.url, args.trials, args.ack_wait))
    else:
        with tempfile.TemporaryDirectory(prefix="squadbus-bench-rabbitmq-") as tmp, RabbitServer(Path(tmp)) as server:
            seconds = asyncio.run(run(f"{server.url}?namespace=bench", args.trials, args.ack_wait))
    ordered = sorted(seconds)
    out = sys.stdout
    out.write(f"ack_wait {args.ack_wait:g} s, {args.trials} trials: hung at A -> at B "
              f"min {ordered[0]:.3f} s, p50 {percentile(ordered, 0.5):.3f} s, max {ordered[-1]:.3f} s\n")
    document = {"ack_wait": args.ack_wait, "trials": args.trials, "seconds": [round(s, 4) for s in seconds],
                "environment": Environment.current().as_dict()}
    out.write(json.dumps(document, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
