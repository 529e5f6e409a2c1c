"""RabbitMQ group figures (DescribesGroups) against a real node: the ready count of each group's quorum
queue, found through the group registry stream by any process; what AMQP cannot tell is None."""

from __future__ import annotations

import uuid

import pytest

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.core.backend import ConsumerOptions, DescribesGroups, StartFrom
from squadbus.core.bus import Bus
from squadbus.testing.conformance import Collector, eventually
from tests.core.group_scenario import WAITING, figures_of, scenario, wait_for_figures
from tests.service.conftest import MakeApp, asgi, make_app, options, store_url  # noqa: F401 (fixtures)
from tests.service.test_metrics_groups import labels, scrape

pytestmark = pytest.mark.rabbitmq


async def test_a_running_group_reports_what_waits_behind_its_held_handlers(rabbitmq_url: str) -> None:
    async with Bus.from_url(rabbitmq_url) as bus, scenario(bus, "workers") as pattern:
        backend = bus.backend
        assert isinstance(backend, DescribesGroups)
        # acked and dead-lettered ones are gone, the held ones are unacked (not ready): WAITING are ready
        got = await wait_for_figures(backend, "workers", lambda f: f.lag == WAITING)
        assert (got.subject, got.pending, got.dead_letters, got.redeliveries) == (pattern, None, None, None)


async def test_another_process_sees_a_group_it_has_no_member_of(rabbitmq_url: str) -> None:
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g:{uuid.uuid4().hex[:6]}"
    async with Bus.from_url(rabbitmq_url) as owner, Bus.from_url(rabbitmq_url) as watcher:
        got = Collector()
        sub = await owner.subscribe(f"agent.message.{agent}", got, group=group,
                                    options=ConsumerOptions(start=StartFrom.NEW))
        first = await owner.send("pm", agent, "read")
        await eventually(lambda: first.id in got.ids, 20, "the first message")
        await sub.close()
        for i in range(5):
            await owner.send("pm", agent, f"waiting-{i}")
        # the owner has no member left either: both find the group in the registry stream
        for bus in (watcher, owner):
            assert isinstance(bus.backend, DescribesGroups)
            (seen,) = await figures_of(bus.backend, group)
            assert (seen.subject, seen.lag, seen.pending) == (f"agent.message.{agent}", 5, None)


async def test_a_deleted_group_queue_is_left_out(rabbitmq_url: str) -> None:
    async with Bus.from_url(rabbitmq_url) as bus:
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        sub = await bus.subscribe("agent.message.gone", Collector(), group="gone")
        (queue,) = [q for q, _, _ in backend.local_groups()]
        await sub.close()
        assert [f.group for f in await backend.group_figures()] == ["gone"]
        channel = await backend.connection.channel()
        await channel.queue_delete(queue)
        await channel.close()
        assert await backend.group_figures() == []


async def test_metrics_shows_a_rabbitmq_groups_lag(make_app: MakeApp, rabbitmq_url: str) -> None:  # noqa: F811
    async with Bus.from_url(rabbitmq_url) as bus, asgi(make_app(bus=bus, workers=())) as api, \
            scenario(bus, "workers") as pattern:
        assert isinstance(bus.backend, DescribesGroups)
        await wait_for_figures(bus.backend, "workers", lambda f: f.lag == WAITING)
        got = await scrape(api)
    assert got[("squadbus_group_figures_up", ())] == 1
    assert got[("squadbus_group_lag", labels(group="workers", subject=pattern))] == WAITING
    assert not any(name == "squadbus_group_pending" for name, _ in got), "RabbitMQ cannot tell: no sample"
