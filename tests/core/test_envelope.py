"""The envelope codec: round trips (Hypothesis), validation, malformed input."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from squadbus.core import envelope
from squadbus.core.errors import InvalidMessage, InvalidSubject, MalformedMessage, MessageTooLarge

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=20),
                         st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
agent_ids = st.text(alphabet=st.characters(blacklist_characters=".*>", blacklist_categories=("C", "Z")),
                    min_size=1, max_size=16)


@given(
    sender=agent_ids, recipient=st.one_of(st.none(), agent_ids), content=st.text(max_size=200),
    metadata=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    headers=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    execution=st.one_of(st.none(), st.uuids()),
    created=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                         timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))])),
)
def test_round_trip(sender: str, recipient: str | None, content: str, metadata: dict[str, object],
                    headers: dict[str, str], execution: uuid.UUID | None, created: datetime) -> None:
    message = envelope.build(subject="agent.message.broadcast", sender_id=sender, recipient_id=recipient,
                             content=content, metadata=metadata, headers=headers, task_execution_id=execution,
                             created_at=created)
    decoded = envelope.decode(envelope.encode(message))
    assert decoded == message
    assert decoded.created_at == created


@pytest.mark.parametrize("sender", ["a", uuid.UUID(int=7)])  # every name text (one memoised check), or not
@pytest.mark.parametrize(
    ("names", "error"),
    [
        ({"subject": "agent.*"}, "subject"),
        ({"subject": 7}, "subject"),
        ({"sender_id": "a b"}, "sender_id"),
        ({"sender_id": 7}, "sender_id"),
        ({"recipient_id": "b.c"}, "recipient_id"),
        ({"domain": "d.e"}, "domain"),
        ({"domain": 7}, "domain"),
    ],
)
def test_build_refuses_a_bad_name_wherever_it_is(sender: object, names: dict[str, object], error: str) -> None:
    fields: dict[str, object] = {"subject": "agent.x", "sender_id": sender, "recipient_id": "b", "domain": "d",
                                 "content": "c", **names}
    with pytest.raises(InvalidMessage, match=error):
        envelope.build(**fields)  # type: ignore[arg-type]
    # the first bad name is the one named, as the fields are read: subject, sender, recipient, domain
    with pytest.raises(InvalidSubject, match="subject"):
        envelope.build(**{**fields, "subject": "agent.>"})  # type: ignore[arg-type]


def test_build_keeps_the_names_it_was_given() -> None:
    m = envelope.build(subject="agent.message.b", sender_id="a", recipient_id="b", domain="d", content="c")
    assert (m.subject, m.sender_id, m.recipient_id, m.domain) == ("agent.message.b", "a", "b", "d")
    m = envelope.build(subject="agent.message.b", sender_id=uuid.UUID(int=1), recipient_id=uuid.UUID(int=2),
                       content="c")
    assert (m.sender_id, m.recipient_id) == (str(uuid.UUID(int=1)), str(uuid.UUID(int=2)))


def test_defaults_and_ids() -> None:
    m = envelope.build(subject="agent.message.dev-1", sender_id=uuid.UUID(int=7), content="hi")
    assert m.id.version == 4
    assert m.sender_id == str(uuid.UUID(int=7))
    assert m.created_at.tzinfo is not None
    assert m.metadata == {} and m.headers == {}
    assert len({envelope.new_id() for _ in range(10_000)}) == 10_000


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b"null", b'{"id": "not-a-uuid"}', b'{"id": "5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70"}',
     b"\xff\xfe", b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent..x","sender_id":"a",'
     b'"content":"c","created_at":"2026-01-01T00:00:00Z"}',
     b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent.x","sender_id":"a",'
     b'"content":"c","created_at":"2026-01-01T00:00:00"}',
     b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent.x","sender_id":"a",'
     b'"content":"c","metadata":[1],"created_at":"2026-01-01T00:00:00Z"}',
     # Checked by the decoder's field types, not by validate(): an empty message_type, a header
     # value that is not a string, a sender that is not a valid agent name, a domain with a dot.
     b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent.x","sender_id":"a",'
     b'"content":"c","message_type":"","created_at":"2026-01-01T00:00:00Z"}',
     b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent.x","sender_id":"a",'
     b'"content":"c","headers":{"k":1},"created_at":"2026-01-01T00:00:00Z"}',
     b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent.x","sender_id":"a b",'
     b'"content":"c","created_at":"2026-01-01T00:00:00Z"}',
     b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent.x","sender_id":"a",'
     b'"domain":"d.e","content":"c","created_at":"2026-01-01T00:00:00Z"}',
     b'{"id":"5f0c8a4e-3d0b-4c2c-9b0e-2a3c4d5e6f70","subject":"agent.x","sender_id":"a",'
     b'"recipient_id":7,"content":"c","created_at":"2026-01-01T00:00:00Z"}'],
)
def test_malformed_input_raises_typed_error(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        envelope.decode(data)


def test_size_limit() -> None:
    limit = 1024
    envelope.build(subject="agent.x", sender_id="a", content="x" * limit, max_content_bytes=limit)
    with pytest.raises(MessageTooLarge):
        envelope.build(subject="agent.x", sender_id="a", content="x" * (limit + 1), max_content_bytes=limit)
    with pytest.raises(MessageTooLarge):  # 4-byte characters count as bytes, not characters
        envelope.build(subject="agent.x", sender_id="a", content="😀" * 300, max_content_bytes=limit)
    big = envelope.build(subject="agent.x", sender_id="a", content="x" * (limit + 1), max_content_bytes=limit + 1)
    with pytest.raises(MessageTooLarge):
        envelope.decode(envelope.encode(big), max_content_bytes=limit)


def test_validation_errors() -> None:
    with pytest.raises(InvalidSubject):
        envelope.build(subject="agent.*", sender_id="a", content="c")
    with pytest.raises(InvalidMessage, match="metadata"):
        envelope.build(subject="agent.x", sender_id="a", content="c", metadata=[1])  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="JSON"):
        envelope.build(subject="agent.x", sender_id="a", content="c", metadata={"x": object()})
    with pytest.raises(InvalidMessage, match="UUID"):
        envelope.build(subject="agent.x", sender_id="a", content="c", id="nope")
    with pytest.raises(InvalidMessage, match="timezone"):
        envelope.build(subject="agent.x", sender_id="a", content="c", created_at=datetime(2026, 1, 1))
    with pytest.raises(InvalidMessage):
        envelope.build(subject="agent.x", sender_id="a", content=b"bytes")  # type: ignore[arg-type]
    m = envelope.build(subject="agent.x", sender_id="a", content="c")
    with pytest.raises(InvalidSubject):
        m.evolve(subject="agent..y")


def test_validate_checks_hand_made_messages() -> None:
    """A Message built directly (not by build or decode) is not type-checked by msgspec: validate is."""
    good = envelope.build(subject="agent.x", sender_id="a", recipient_id="b", domain="d", content="c")
    assert envelope.validate(good) is good
    now = datetime.now(UTC)
    bad: list[tuple[envelope.Message, type[Exception]]] = [
        (envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id="a b", content="c", created_at=now),
         InvalidSubject),
        (envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id=7, content="c",  # type: ignore[arg-type]
                          created_at=now), InvalidMessage),
        (envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id="a", recipient_id="b.c", content="c",
                          created_at=now), InvalidSubject),
        (envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id="a", content="c", message_type="",
                          created_at=now), InvalidMessage),
        (envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id="a", content="c",
                          headers={"k": 1}, created_at=now), InvalidMessage),  # type: ignore[dict-item]
        (envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id="a", content="c",
                          metadata=[1], created_at=now), InvalidMessage),  # type: ignore[arg-type]
        (envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id="a", content="c",
                          created_at=datetime(2026, 1, 1)), InvalidMessage),
    ]
    for message, error in bad:
        with pytest.raises(error):
            envelope.validate(message)
    # A UUID agent id is accepted as its string form, as build() accepts it.
    uuid_sender = envelope.Message(id=uuid.uuid4(), subject="agent.x", sender_id=uuid.UUID(int=3),  # type: ignore[arg-type]
                                   content="c", created_at=now)
    assert envelope.validate(uuid_sender) is uuid_sender
