"""decode() remembers the names it validated (a memo per subject and per agent/domain token): every name of
every message is still checked, whatever the names decoded before it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from squadbus.core import envelope
from squadbus.core.errors import MalformedMessage


def wire(**names: str | None) -> bytes:
    """The wire bytes of a message with these names, valid or not (made without build's checks)."""
    fields: dict[str, str | None] = {"subject": "agent.message.dev-1", "sender_id": "pm", "recipient_id": "dev-1",
                                     "domain": "dev"} | names
    return envelope.encode(envelope.Message(
        id=uuid.uuid4(), content="hi", created_at=datetime.now(UTC), **fields,  # type: ignore[arg-type]
    ))


@pytest.mark.parametrize(
    ("names", "why"),
    [({"subject": "agent.message.*"}, "subject"),
     ({"sender_id": "p m"}, "sender_id"),
     ({"recipient_id": "dev.1"}, "recipient_id"),
     ({"domain": "d>"}, "domain"),
     ({"sender_id": "dev"}, None),  # a known domain token is a valid agent id too
     ({"recipient_id": None, "domain": None}, None)],
)
def test_each_name_is_checked_after_valid_ones_were_decoded(names: dict[str, str | None], why: str | None) -> None:
    for _ in range(3):  # the valid names are remembered
        assert envelope.decode(wire()).recipient_id == "dev-1"
    for _ in range(2):  # a bad name is never remembered
        if why is None:
            assert envelope.decode(wire(**names)).content == "hi"
        else:
            with pytest.raises(MalformedMessage, match=why):
                envelope.decode(wire(**names))


def test_a_full_memo_is_emptied_and_names_are_still_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envelope, "_KNOWN_KEPT", 2)
    for i in range(5):
        assert envelope.decode(wire(subject=f"agent.message.a{i}", sender_id=f"s{i}")).sender_id == f"s{i}"
    assert len(envelope._known_subjects) <= 2
    assert len(envelope._known_tokens) <= 2 + 3  # emptied at the limit, then one message's names added
    with pytest.raises(MalformedMessage, match="sender_id"):
        envelope.decode(wire(sender_id="s 9"))
    assert envelope.decode(wire()).domain == "dev"
