"""The Redis benchmark runs end to end on a real server (small counts: its code, not its numbers)."""

from __future__ import annotations

import asyncio
import math

import pytest

from squadbus.benchmarks import redis as redis_bench
from squadbus.testing.servers.redis import RedisServer

pytestmark = pytest.mark.redis


async def test_bench_runs_every_line_and_reports_per_round_ratios(redis_server: RedisServer) -> None:
    results = await redis_bench.run(url=redis_server.url, count=600, rate=400, rounds=2)
    assert [r.count for r in results] == [600] * 6 + [600, 600]
    raw, ours, many, batches, raw_env, raw_conc, raw_lat, our_lat = results
    for line in (ours, many, batches):
        assert line.ratio is not None and line.ratio > 0
        assert "median of rounds" in line.notes
    assert raw.ratio is None and raw_env.ratio is None and raw_conc.ratio is None
    assert "squadbus Bus.send / this" in raw_conc.notes
    assert len(raw_lat.latencies_ms) == len(our_lat.latencies_ms) == 600
    facts = redis_bench.summary(results)
    assert facts["throughput_ratio"] == round(many.ratio, 3)
    assert facts["concurrent_send_ratio"] == round(ours.ratio, 3)
    assert facts["concurrent_send_same_pattern_ratio"] == round(ours.throughput / raw_conc.throughput, 3)
    assert not any(math.isnan(v) for v in facts.values())
    # every line cleaned up after itself
    client = redis_bench._raw_client(redis_server.url)
    try:
        assert [key async for key in client.scan_iter(match="bench*")] == []
    finally:
        await client.aclose()


async def test_the_raw_client_waits_for_a_connection_when_many_sends_are_in_flight(redis_server: RedisServer) -> None:
    """An open-loop run behind schedule has hundreds of raw sends in flight; redis-py 8's default pool
    refused the 101st with MaxConnectionsError (CI: the latency line then waited for them until the
    test's timeout)."""
    client = redis_bench._raw_client(redis_server.url)
    try:
        replies = await asyncio.gather(*(client.execute_command("XADD", "bench-many", "*", "i", i)
                                         for i in range(400)))
        assert len(set(replies)) == 400
        assert await client.xlen("bench-many") == 400
    finally:
        await client.delete("bench-many")
        await client.aclose()


async def test_the_concurrent_pair_runs_alone_and_reports_its_ratio(redis_server: RedisServer) -> None:
    ours, raw_conc = await redis_bench.run_concurrent(url=redis_server.url, count=300, rounds=2)
    assert (ours.count, raw_conc.count) == (300, 300)
    assert ours.ratio is not None and ours.ratio > 0 and "median of rounds" in ours.notes
    assert raw_conc.ratio is None
