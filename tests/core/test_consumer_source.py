"""The core consumer keeps its source typed (``Consumer[S].source``) and, for a source with a ``runtime``
attribute (``RuntimeHolder``), sets it to itself: the backends close a subscription through it."""

from __future__ import annotations

from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.consumer import Consumer, RuntimeHolder
from tests.core.test_consumer import _ListSource


class _HeldSource(_ListSource):
    def __init__(self) -> None:
        super().__init__()
        self.runtime: Consumer[_HeldSource] | None = None


async def _nothing(delivery: Delivery) -> None:
    return None


async def test_a_source_with_a_runtime_attribute_gets_its_consumer() -> None:
    source = _HeldSource()
    consumer = Consumer(source, ConsumerOptions(), handler=_nothing)
    assert consumer.source is source
    assert isinstance(source, RuntimeHolder)
    assert source.runtime is consumer


async def test_a_source_without_one_is_left_as_it_is() -> None:
    source = _ListSource()
    consumer = Consumer(source, ConsumerOptions(), handler=_nothing)
    assert consumer.source is source
    assert not isinstance(source, RuntimeHolder)
    assert not hasattr(source, "runtime")
