"""Redis group figures (XINFO GROUPS) against a real redis-server, by calling the function directly.

Most tests call :func:`squadbus.backends.redis.group_figures.group_figures`
with the backend's client and key layout; the last ones go through
``RedisBackend.group_figures`` (DescribesGroups), which names this process's groups.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from squadbus.backends.redis import RedisBackend, RedisSettings
from squadbus.backends.redis._driver import call
from squadbus.backends.redis.group_figures import group_figures
from squadbus.core.backend import GroupFigures, durable_name
from squadbus.core.bus import Bus
from squadbus.core.errors import BackendError
from squadbus.testing.servers.redis import RedisServer
from tests.core.group_scenario import DEAD, HELD, PUBLISHED, WAITING, scenario, wait_for_figures

pytestmark = pytest.mark.redis


class Described:
    """A DescribesGroups over the function, as RedisBackend.group_figures will be."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    async def group_figures(self) -> Sequence[GroupFigures]:
        client, _ = self.backend._require()
        return await group_figures(client, self.backend.layout)


async def test_exact_lag_and_pending_of_a_literal_group(redis_url: str) -> None:
    # N published, M acked, K read and not acked: lag N-M-K, pending K
    n, m, k = 10, 4, 3
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    async with Bus(backend) as bus:
        for i in range(n):
            await bus.send("pm", "dev-1", f"m{i}")
        pattern = "agent.message.dev-1"
        stream, name = backend.layout.subject_stream(pattern), durable_name("readers", pattern)
        client, _ = backend._require()
        await call(client, "XGROUP", "CREATE", stream, name, "0")
        await call(client, "HSET", backend.layout.groups, name, pattern)
        reply = await call(client, "XREADGROUP", "GROUP", name, "c1", "COUNT", m + k, "STREAMS", stream, ">")
        entries = dict(reply)[stream.encode()] if isinstance(reply, dict) else reply[0][1]
        assert len(entries) == m + k
        assert await call(client, "XACK", stream, name, *[entry_id for entry_id, _ in entries[:m]]) == m
        (got,) = await group_figures(client, backend.layout)
        assert (got.group, got.subject, got.lag, got.pending, got.dead_letters, got.redeliveries) == (
            "readers", pattern, n - m - k, k, 0, None)


async def test_a_wildcard_group_sums_its_partition_streams(redis_url: str) -> None:
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    async with Bus(backend) as bus:
        pattern = "agent.message.>"
        name = durable_name("all", pattern)
        client, _ = backend._require()
        for stream in backend.layout.partition_streams():
            await call(client, "XGROUP", "CREATE", stream, name, "0", "MKSTREAM")
        await call(client, "HSET", backend.layout.groups, name, pattern)
        for i in range(12):
            await bus.send("pm", f"agent-{i}", "hi", task_execution_id=uuid.uuid4())
        (got,) = await group_figures(client, backend.layout)
        assert (got.group, got.lag, got.pending) == ("all", 12, 0)


async def test_a_running_group_with_dead_letters(redis_url: str) -> None:
    # members read ahead into a local queue, so only the sum is exact: lag + pending = not settled
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    async with Bus(backend) as bus, scenario(bus, "workers") as pattern:
        described = Described(backend)
        got = await wait_for_figures(
            described, "workers",
            lambda f: f.pending is not None and f.pending >= HELD and f.dead_letters == DEAD
            and f.lag is not None and f.lag + f.pending == HELD + WAITING,
        )
        assert got.subject == pattern
        assert 0 <= got.lag <= WAITING < PUBLISHED


async def test_names_given_here_win_over_durable_names(redis_url: str) -> None:
    backend = RedisBackend(RedisSettings.from_url(redis_url))
    async with Bus(backend) as bus:
        await bus.subscribe("agent.message.x", _noop, group="a:b")
        client, _ = backend._require()
        (plain,) = await group_figures(client, backend.layout)
        assert plain.group == "a_b"
        (given,) = await group_figures(client, backend.layout,
                                       named={durable_name("a:b", "agent.message.x"): "a:b"})
        assert given.group == "a:b"


async def test_the_backend_describes_its_groups_by_their_own_names(redis_url: str) -> None:
    from squadbus.core.backend import DescribesGroups

    backend = RedisBackend(RedisSettings.from_url(redis_url))
    assert isinstance(backend, DescribesGroups)
    group = f"a:{uuid.uuid4().hex[:6]}"
    async with Bus(backend) as bus:
        await bus.subscribe("agent.message.y", _noop, group=group)
        mine = [f for f in await backend.group_figures() if f.subject == "agent.message.y"]
    assert [f.group for f in mine] == [group]


async def test_redis_down_raises_a_backend_error() -> None:
    with RedisServer("fast") as server:
        backend = RedisBackend(RedisSettings.from_url(server.url))
        await backend.connect()
        try:
            client, _ = backend._require()
            server.stop()
            with pytest.raises(BackendError):
                await group_figures(client, backend.layout)
        finally:
            await backend.close()


async def _noop(*_: object) -> None:
    return None
