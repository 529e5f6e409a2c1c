"""The subject matcher against an independent model (Hypothesis) and the subject scheme."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from squadbus.core import subjects
from squadbus.core.errors import ConfigError, InvalidSubject

token = st.sampled_from(["agent", "message", "dev-1", "x", "broadcast", "domain", "a_b", "ü"])
subject_tokens = st.lists(token, min_size=1, max_size=6)
pattern_token = st.one_of(token, st.just("*"))


@st.composite
def patterns(draw: st.DrawFn) -> list[str]:
    tokens = draw(st.lists(pattern_token, min_size=1, max_size=6))
    if draw(st.booleans()):
        tokens = [*tokens[:-1], ">"] if len(tokens) > 1 or draw(st.booleans()) else tokens
    return tokens


def model(pattern: list[str], subject: list[str]) -> bool:
    """NATS semantics, written recursively and independently of the implementation."""
    if not pattern:
        return not subject
    head, rest = pattern[0], pattern[1:]
    if head == ">":
        return len(subject) >= 1
    if not subject:
        return False
    return (head == "*" or head == subject[0]) and model(rest, subject[1:])


@given(patterns(), subject_tokens)
def test_matcher_agrees_with_model(pattern: list[str], subject: list[str]) -> None:
    p, s = ".".join(pattern), ".".join(subject)
    subjects.validate_pattern(p)
    subjects.validate_subject(s)
    assert subjects.matches(p, s) == model(pattern, subject)


@given(subject_tokens)
def test_literal_pattern_matches_only_itself(subject: list[str]) -> None:
    s = ".".join(subject)
    assert subjects.matches(s, s)
    assert not subjects.matches(s, s + ".more")
    assert subjects.matches(s + ".>", s + ".more")
    assert not subjects.matches(s + ".>", s)


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("agent.>", "agent.message.dev-1", True),
        ("agent.>", "agent", False),
        ("agent.message.*", "agent.message.dev-1", True),
        ("agent.message.*", "agent.message.domain.dev", False),
        ("agent.message.domain.*", "agent.message.domain.dev", True),
        ("*.message.>", "agent.message.broadcast", True),
        ("agent.*.broadcast", "agent.message.broadcast", True),
    ],
)
def test_examples(pattern: str, subject: str, expected: bool) -> None:
    assert subjects.matches(pattern, subject) is expected


@pytest.mark.parametrize("bad", ["", "agent..x", ".agent", "agent.", "agent.*", "agent.>", "a b.c", "agent.x>"])
def test_publish_subject_rejects(bad: str) -> None:
    with pytest.raises(InvalidSubject):
        subjects.validate_subject(bad)


@pytest.mark.parametrize("bad", ["", "agent..x", "agent.>.x", "a b", "agent.x*"])
def test_pattern_rejects(bad: str) -> None:
    with pytest.raises(InvalidSubject):
        subjects.validate_pattern(bad)


def test_scheme() -> None:
    assert subjects.direct("dev-1") == "agent.message.dev-1"
    assert subjects.domain("marketing") == "agent.message.domain.marketing"
    assert subjects.dead_letter("db-writer") == "agent.dlq.db-writer"
    with pytest.raises(InvalidSubject):
        subjects.direct("broadcast")
    with pytest.raises(InvalidSubject):
        subjects.direct("dev.1")


@pytest.mark.parametrize("pattern", ["agent.>", "agent.message.*", "agent.*.dev-1"])
def test_squad_pattern_accepts(pattern: str) -> None:
    assert subjects.validate_squad_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["_INBOX.>", ">", "*.>", "*.message.dev-1", "agent"])
def test_squad_pattern_rejects_what_is_not_under_agent(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"outside the squad's subjects agent\.>"):
        subjects.validate_squad_pattern(pattern)


def test_squad_pattern_rejects_malformed() -> None:
    with pytest.raises(InvalidSubject):
        subjects.validate_squad_pattern("agent..x")


def test_is_broadcast_names_the_squad_and_domain_broadcasts_only() -> None:
    assert subjects.is_broadcast(subjects.BROADCAST)
    assert subjects.is_broadcast(subjects.domain("dev")) and subjects.is_broadcast("agent.message.domain.dev.x")
    for other in ("agent.message.dev-1", "agent.message.domain", "agent.message.domainx", "agent.reply.t.r",
                  "agent.dlq.writer", "agent.message.broadcast.x"):
        assert not subjects.is_broadcast(other), other
