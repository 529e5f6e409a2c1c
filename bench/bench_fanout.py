"""A squad broadcast reaching every open inbox of one host: the cost per copy and the wait for the last.

Each agent is a task in the loop agent code is written as (``async for delivery in inbox: async with
delivery: ...``); a PM broadcasts to the squad ``--rounds`` times, one round after the previous one
was acked by every agent. Reported per host size: CPU per copy (the process's CPU time over all
rounds / copies), every copy's latency from the send to the agent's loop (p50 / p99 / p99.9 / max),
the time to the last copy per round (median, worst), the longest GC pause per generation
(``gc.callbacks``) after ``gc.freeze()`` and the objects the collector tracks outside the frozen set at
the end. Beside it, the guide's MessageBus (benchmarks/guide_bus.py: callbacks inline, no inbox)
delivering the same broadcast in the same run, as the floor one Python loop can do.

With ``--receive handler`` the agents are inboxes with a plain-function handler
(``bus.inbox(agent, handler=...)``): the Bus calls it inline for each copy, no task per agent. Both
(``--receive iterator handler``, the default) are measured in the same run, one after the other.

Run: python bench/bench_fanout.py [--agents 2500 10000] [--rounds 15] [--url memory://] [--loop asyncio|uvloop]
                                  [--receive iterator handler]

This is what bounds `squadbus simulate --scenario 5` on one machine: a host of N agents hands a
squad broadcast to its last agent about N x (CPU per copy) after the first.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from uuid import uuid4

from squadbus.benchmarks.guide_bus import GuideMessageBus
from squadbus.benchmarks.loops import DEFAULT_LOOP, LOOPS, run
from squadbus.benchmarks.stats import Environment
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.inbox import Inbox


class GcPauses:
    """The longest collection per generation while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.longest = [0.0, 0.0, 0.0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            generation = info["generation"]
            self.longest[generation] = max(self.longest[generation], time.perf_counter() - self._start)


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def squadbus_round_trip(url: str, agents: int, rounds: int, receive: str) -> dict[str, float]:
    async with Bus.from_url(url) as bus:
        latencies: list[float] = []
        state = {"sent": 0.0, "left": 0}
        everyone = asyncio.Event()

        def on_message(delivery: Delivery) -> None:  # the body of each agent's loop, or its handler
            latencies.append(time.perf_counter() - state["sent"])
            state["left"] -= 1
            if state["left"] == 0:
                everyone.set()

        handler = on_message if receive == "handler" else None
        inboxes = [bus.inbox(f"agent-{i}", handler=handler) for i in range(agents)]
        for first in range(0, agents, 500):
            await asyncio.gather(*(inbox.open() for inbox in inboxes[first:first + 500]))

        async def agent(inbox: Inbox) -> None:
            async for delivery in inbox:
                async with delivery:
                    on_message(delivery)

        tasks = [asyncio.create_task(agent(inbox)) for inbox in inboxes] if handler is None else []
        await asyncio.sleep(0.2)
        gc.collect()
        gc.freeze()
        pauses = GcPauses()
        gc.callbacks.append(pauses)
        lasts: list[float] = []
        cpu = time.process_time()
        try:
            for _ in range(rounds):
                everyone.clear()
                state["left"] = agents
                state["sent"] = time.perf_counter()
                await bus.broadcast("pm", "all hands")
                await everyone.wait()
                lasts.append(time.perf_counter() - state["sent"])
        finally:
            cpu = time.process_time() - cpu
            tracked = len(gc.get_objects())
            gc.callbacks.remove(pauses)
            gc.unfreeze()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ordered = sorted(latencies)
        return {
            "cpu_us_per_copy": cpu / (rounds * agents) * 1e6,
            "p50_ms": percentile(ordered, 0.5) * 1e3, "p99_ms": percentile(ordered, 0.99) * 1e3,
            "p999_ms": percentile(ordered, 0.999) * 1e3, "max_ms": ordered[-1] * 1e3,
            "last_median_ms": statistics.median(lasts) * 1e3, "last_worst_ms": max(lasts) * 1e3,
            "gc_longest_ms": max(pauses.longest) * 1e3, "gc_by_gen_ms": [t * 1e3 for t in pauses.longest],
            "gc_tracked": tracked,
        }


async def guide_round_trip(agents: int, rounds: int) -> dict[str, float]:
    bus = GuideMessageBus()
    state = {"left": 0}
    everyone = asyncio.Event()

    async def on_message(_message: object) -> None:
        state["left"] -= 1
        if state["left"] == 0:
            everyone.set()

    pm = uuid4()
    for _ in range(agents):
        agent = uuid4()
        bus.register(agent)
        bus.subscribe(agent, on_message)
    lasts: list[float] = []
    cpu = time.process_time()
    for _ in range(rounds):
        everyone.clear()
        state["left"] = agents
        started = time.perf_counter()
        await bus.send_message(pm, None, "all hands", "broadcast")
        await everyone.wait()
        lasts.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    return {"cpu_us_per_copy": cpu / (rounds * agents) * 1e6,
            "last_median_ms": statistics.median(lasts) * 1e3, "last_worst_ms": max(lasts) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, nargs="+", default=[2500, 10000])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--url", default="memory://")
    parser.add_argument("--receive", nargs="+", choices=("iterator", "handler"), default=["iterator", "handler"],
                        help="agents as tasks iterating their inbox, or inboxes with a plain-function handler")
    parser.add_argument("--loop", choices=LOOPS, default=DEFAULT_LOOP,
                        help="event loop (default asyncio, as squadbus simulate)")
    args = parser.parse_args()
    env = Environment.current().as_dict()
    sys.stdout.write(f"{args.url}, {args.rounds} squad broadcasts per size, {args.loop} loop; {env}\n")
    for agents in args.agents:
        for receive in args.receive:
            ours = run(squadbus_round_trip(args.url, agents, args.rounds, receive), args.loop)
            sys.stdout.write(
                f"{agents:>6} inboxes  squadbus, {receive:<8}: {ours['cpu_us_per_copy']:5.1f} us CPU/copy, "
                f"copy latency p50 {ours['p50_ms']:.1f} p99 {ours['p99_ms']:.1f} p99.9 {ours['p999_ms']:.1f} "
                f"max {ours['max_ms']:.1f} ms, "
                f"last copy median {ours['last_median_ms']:.1f} worst {ours['last_worst_ms']:.1f} ms, "
                f"longest GC pause {ours['gc_longest_ms']:.1f} ms (gen 0/1/2 "
                + "/".join(f"{t:.1f}" for t in ours["gc_by_gen_ms"])
                + f"), {ours['gc_tracked']:,} objects tracked outside the frozen set\n")
        guide = run(guide_round_trip(agents, args.rounds), args.loop)
        sys.stdout.write(
            f"{'':>15}guide MessageBus: {guide['cpu_us_per_copy']:5.1f} us CPU/copy, last copy median "
            f"{guide['last_median_ms']:.1f} worst {guide['last_worst_ms']:.1f} ms\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
