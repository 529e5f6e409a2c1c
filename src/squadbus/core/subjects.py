"""Subject syntax, builders and the one wildcard matcher (NATS semantics).

A subject is dot-separated tokens, e.g. ``agent.message.dev-1``. A pattern may
also use ``*`` (exactly one token) and ``>`` (one or more tokens, last only).
Tokens are non-empty, printable and contain no whitespace, no dots and no
wildcard characters except as a whole wildcard token in a pattern. "Printable"
is Unicode's: no control, format (bidi overrides, zero-width), surrogate,
private-use, unassigned or separator characters, so an agent id cannot display
as another one. Readable letters of any script are allowed.

The scheme every backend uses:

* direct message:       ``agent.message.<recipient_id>``
* domain broadcast:     ``agent.message.domain.<domain>``
* squad broadcast:      ``agent.message.broadcast``
* reply to a request:   ``agent.reply.<token>.<request_id>``
* dead letters:         ``agent.dlq.<group>``
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from squadbus.core.errors import ConfigError, InvalidSubject

ROOT = "agent"
MESSAGE_PREFIX = "agent.message"
BROADCAST = "agent.message.broadcast"
DOMAIN_PREFIX = "agent.message.domain"
_DOMAIN_DOT = DOMAIN_PREFIX + "."
REPLY_PREFIX = "agent.reply"
DLQ_PREFIX = "agent.dlq"
ALL = "agent.>"

# Words that would make a direct subject look like a broadcast subject.
RESERVED_AGENT_IDS = frozenset({"broadcast", "domain"})
_SYNTAX_CHARS = frozenset(".*>")
MAX_SUBJECT_LENGTH = 512
# Validation is pure, so results are memoised: agents reuse a few thousand subjects.
_CACHE_SIZE = 65_536


def _is_plain(token: str) -> bool:
    # str.isprintable() is False for Unicode's "Other" (Cc, Cf, Cs, Co, Cn) and "Separator" (Z*)
    # categories except the ASCII space, which is refused separately: the one definition of the
    # characters a token may hold.
    return token.isprintable() and " " not in token and _SYNTAX_CHARS.isdisjoint(token)


@lru_cache(maxsize=_CACHE_SIZE)
def validate_token(token: str, *, what: str = "token") -> str:
    """Return ``token`` if it can stand as one subject token, else raise InvalidSubject."""
    if not isinstance(token, str) or not token:
        raise InvalidSubject(f"{what} must be a non-empty string, got {token!r}")
    if not _is_plain(token):
        raise InvalidSubject(
            f"{what} {token!r} may not contain whitespace, control or invisible characters, '.', '*' or '>'"
        )
    return token


def _split(subject: str, *, what: str) -> list[str]:
    if not isinstance(subject, str) or not subject:
        raise InvalidSubject(f"{what} must be a non-empty string, got {subject!r}")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidSubject(f"{what} is longer than {MAX_SUBJECT_LENGTH} characters")
    tokens = subject.split(".")
    if "" in tokens:
        raise InvalidSubject(f"{what} {subject!r} has an empty token")
    return tokens


@lru_cache(maxsize=_CACHE_SIZE)
def validate_subject(subject: str) -> str:
    """Return ``subject`` if it is a valid publish subject (no wildcards), else raise."""
    for token in _split(subject, what="subject"):
        if not _is_plain(token):
            raise InvalidSubject(f"subject {subject!r}: token {token!r} is not allowed when publishing")
    return subject


@lru_cache(maxsize=_CACHE_SIZE)
def validate_scheme(subject: str) -> str:
    """Return ``subject`` if it is a valid publish subject under ``agent.``, else raise InvalidSubject.

    Every backend stores exactly ``agent.>`` (NATS: the stream's subjects); a
    subject outside it would be stored by some backends and not by others.
    """
    validate_subject(subject)
    if not subject.startswith(ROOT + "."):
        raise InvalidSubject(f"subject {subject!r} is outside the squadbus scheme {ALL!r}")
    return subject


@lru_cache(maxsize=_CACHE_SIZE)
def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise InvalidSubject."""
    tokens = _split(pattern, what="pattern")
    for i, token in enumerate(tokens):
        if token == ">":
            if i != len(tokens) - 1:
                raise InvalidSubject(f"pattern {pattern!r}: '>' must be the last token")
        elif token != "*" and not _is_plain(token):
            raise InvalidSubject(f"pattern {pattern!r}: token {token!r} is not allowed")
    return pattern


def validate_squad_pattern(pattern: str) -> str:
    """Return ``pattern`` if it is valid and names squad subjects only (its first token is ``agent``).

    Raises InvalidSubject for a malformed pattern and ConfigError for one not
    inside :data:`ALL` (``_INBOX.>``, ``>``, ``*.message.x``): what a backend
    subscribing in its squad stream or exchange refuses.
    """
    validate_pattern(pattern)
    if not matches(ALL, pattern.replace("*", "x").replace(">", "x")):
        raise ConfigError(f"pattern {pattern!r} is outside the squad's subjects {ALL}")
    return pattern


def is_literal(pattern: str) -> bool:
    """True when the pattern has no wildcard token."""
    return "*" not in pattern and ">" not in pattern


def matches(pattern: str, subject: str) -> bool:
    """True when ``subject`` matches ``pattern`` under NATS wildcard rules.

    Both arguments are assumed valid (see :func:`validate_pattern` and
    :func:`validate_subject`).
    """
    if pattern == subject:
        return True
    p = pattern.split(".")
    s = subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if token != "*" and token != s[i]:
            return False
    return len(p) == len(s)


def overlaps(patterns: Iterable[str], subject: str) -> bool:
    """True when any of ``patterns`` matches ``subject``."""
    return any(matches(p, subject) for p in patterns)


@lru_cache(maxsize=_CACHE_SIZE)
def direct(recipient_id: str) -> str:
    """Subject of a direct message to one agent."""
    validate_token(recipient_id, what="recipient_id")
    if recipient_id in RESERVED_AGENT_IDS:
        raise InvalidSubject(f"agent id {recipient_id!r} is reserved")
    return f"{MESSAGE_PREFIX}.{recipient_id}"


def domain(name: str) -> str:
    """Subject of a broadcast to every agent of one domain."""
    return f"{DOMAIN_PREFIX}.{validate_token(name, what='domain')}"


def is_broadcast(subject: str) -> bool:
    """True for a squad broadcast subject or a domain broadcast subject (``agent.message.domain.<...>``)."""
    return subject == BROADCAST or subject.startswith(_DOMAIN_DOT)


def reply(token: str, request_id: str) -> str:
    """Subject a reply to ``request_id`` is published on."""
    return f"{REPLY_PREFIX}.{validate_token(token, what='reply token')}.{request_id}"


def dead_letter(group: str) -> str:
    """Subject dead letters of consumer group ``group`` go to."""
    return f"{DLQ_PREFIX}.{validate_token(group, what='group')}"
