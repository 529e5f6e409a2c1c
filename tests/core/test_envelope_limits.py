"""Hostile envelopes are refused before anything is published: deep or huge metadata, numbers JSON
cannot carry, agent ids that display as something else. Every path builds or checks through the
same functions (build for send, validate for publish, decode for what comes off a broker)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import msgspec
import pytest

from squadbus.core import envelope, subjects
from squadbus.core.bus import Bus
from squadbus.core.envelope import MAX_METADATA_BYTES, MAX_METADATA_DEPTH
from squadbus.core.errors import InvalidMessage, InvalidSubject, MalformedMessage


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def build(**fields: Any) -> envelope.Message:
    args: dict[str, Any] = {"subject": "agent.message.dev-1", "sender_id": "pm", "recipient_id": "dev-1",
                            "content": "hi"}
    return envelope.build(**(args | fields))


def test_metadata_at_the_depth_limit_is_accepted_one_deeper_is_refused() -> None:
    assert build(metadata=nested(MAX_METADATA_DEPTH)).metadata
    with pytest.raises(InvalidMessage, match="nested"):
        build(metadata=nested(MAX_METADATA_DEPTH + 1))
    with pytest.raises(InvalidMessage, match="nested"):
        build(metadata={"list": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})


@pytest.mark.parametrize("depth", [256, 900])
def test_deep_metadata_seen_in_the_wild_is_refused_on_every_path(depth: int) -> None:
    deep = nested(depth)
    with pytest.raises(InvalidMessage):
        build(metadata=deep)
    with pytest.raises(InvalidMessage):  # a ready-made message, as Bus.publish gets it
        envelope.validate(msgspec.structs.replace(build(), metadata=deep))


def test_metadata_larger_than_the_limit_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="metadata"):
        build(metadata={"blob": "x" * (MAX_METADATA_BYTES + 1)})


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_in_metadata_are_refused_not_stored_as_null(number: float) -> None:
    with pytest.raises(InvalidMessage, match="finite"):
        build(metadata={"score": [1.0, {"x": number}]})


def test_wire_bytes_with_deep_or_non_finite_metadata_are_malformed() -> None:
    good = json.loads(envelope.encode(build()))
    for metadata in (nested(MAX_METADATA_DEPTH + 1), {"x": 1e400}):
        raw = json.dumps({**good, "metadata": metadata}).encode()
        with pytest.raises(MalformedMessage):
            envelope.decode(raw)


@pytest.mark.parametrize("agent", [
    "pm\u202e1-ved",     # right-to-left override: displays as another agent
    "dev\u00a01",        # no-break space
    "dev\u20281",        # line separator
    "dev\x07",           # control character
    "dev\u200b1",        # zero-width space
    "dev\ud8001",        # lone surrogate
])
def test_agent_ids_that_display_as_something_else_are_refused(agent: str) -> None:
    with pytest.raises(InvalidSubject):
        subjects.validate_token(agent, what="agent_id")
    with pytest.raises(InvalidMessage):
        build(sender_id=agent)
    with pytest.raises(InvalidMessage):
        build(subject=f"agent.message.{agent}", recipient_id=agent)


def test_readable_unicode_agent_ids_stay_allowed() -> None:
    for agent in ("développeur-1", "開発者", "agent_7", "ops:eu-west"):
        assert build(sender_id=agent).sender_id == agent


async def test_bus_send_refuses_deep_metadata_and_publishes_nothing() -> None:
    async with Bus.from_url("memory://") as bus:
        seen: list[envelope.Message] = []

        async def keep(delivery: Any) -> None:
            seen.append(delivery.message)

        await bus.subscribe("agent.>", keep)
        with pytest.raises(InvalidMessage):
            await bus.send("pm", "dev-1", "hi", metadata=nested(300))
        await bus.send("pm", "dev-1", "after")
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert [m.content for m in seen] == ["after"]


@pytest.mark.parametrize("field", ["content", "message_type", "header"])
def test_text_with_no_utf8_form_is_refused_where_it_is_built(field: str) -> None:
    # A lone surrogate passed envelope.build and failed later, in a publisher's batch (Redis, Kafka: the
    # other senders' messages of that batch failed with it) or as a raw UnicodeEncodeError.
    bad = "half \ud800 of a pair"
    with pytest.raises(InvalidMessage, match="lone surrogate"):
        fields: dict[str, Any] = {"content": "x", field: bad} if field != "header" else {"headers": {"trace": bad}}
        envelope.build(subject="agent.message.dev", sender_id="pm", **{"content": "x", **fields})
    unchecked = msgspec.structs.replace(build(), content=bad)  # made without build(): refused on encode
    with pytest.raises(InvalidMessage):
        envelope.validate(unchecked)
    with pytest.raises(InvalidMessage):
        envelope.encode(unchecked)
    wire = envelope.encode(build(content="x")).replace(b'"content":"x"', b'"content":"\\ud800"')
    with pytest.raises(MalformedMessage):  # a lone surrogate escaped in JSON bytes: malformed when read
        envelope.decode(wire)
    readable = "naïve 開発 🚀"
    assert envelope.build(subject="agent.message.dev", sender_id="pm", content=readable).content == readable
