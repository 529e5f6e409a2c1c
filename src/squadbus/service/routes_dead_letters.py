"""``/v1/dead-letters``: list the dead letters the keeper kept, re-drive or discard them.

Reading is for viewer and admin tokens; re-driving and discarding for admin
tokens only (403 otherwise). Dead letters come from the store's dead-letter
table (:mod:`squadbus.store.dead_letters`), filled by the dead-letter keeper
worker (:mod:`squadbus.workers.dead_letters`), which runs wherever the
db-writer runs.

**Re-drive** publishes the original message again to its original subject,
so every group on that subject gets it, the dead letter's group included. It
goes out under a **new id**: backends drop a repeated id within their dedupe
window (Redis, NATS, RabbitMQ: 120 s by default) and the db-writer keeps one
row per id, so a re-drive under the original id could silently reach nobody.
The new message keeps the original's sender, recipient, execution, content,
type, metadata and headers (less the ``dlq-*`` ones), and says what it is in
three headers: ``redriven-from`` (the original id), ``redrive-of`` (the dead
letter's id) and ``redriven-by`` (the admin token's name). The dead letter
leaves ``dead`` before the publish (compare-and-set, so two admins re-drive
it once) and goes back to ``dead`` if the publish fails (503).

Every re-drive and discard is appended to the audit log (the audit-logger's
file of this process) as ``{"logged_at", "action", "by", "role", ...}``;
the re-driven message itself also passes through the audit-logger like any
message, with its ``redriven-by`` header.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status

from squadbus.core import subjects
from squadbus.core.envelope import Message, new_id, utcnow
from squadbus.core.errors import BackendError, InvalidSubject, SquadbusError
from squadbus.service.auth import Credentials, Principal, Role, identify, overseer
from squadbus.service.routes_executions import CURSOR
from squadbus.service.routes_messages import ERRORS
from squadbus.service.schemas import (
    TOKEN_PATTERN,
    DeadLetterList,
    DeadLetterOut,
    DeadLetterSummary,
    ErrorOut,
    MessageOut,
    RedrivenOut,
    RedriveOut,
    SkippedOut,
)
from squadbus.service.state import Service, ServiceDep
from squadbus.store.base import StoredMessage
from squadbus.store.dead_letters import (
    MAX_DEAD_LETTER_LIMIT,
    DeadLetter,
    DeadLetterQuery,
    DeadLetterState,
    KeepsDeadLetters,
)
from squadbus.workers.audit import AuditFile

logger = logging.getLogger("squadbus.service.dead_letters")

router = APIRouter(prefix="/v1", tags=["dead letters"])

REDRIVE_OF = "redrive-of"
REDRIVEN_FROM = "redriven-from"
REDRIVEN_BY = "redriven-by"
MAX_GROUP_REDRIVE = 10_000
"""Dead letters one group re-drive publishes at most (the answer says how many; call again for more)."""

LIST_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS,
    501: {"model": ErrorOut, "description": "This store does not keep dead letters"},
}
ACTION_ERRORS: dict[int | str, dict[str, object]] = {
    **LIST_ERRORS,
    404: {"model": ErrorOut, "description": "No such dead letter"},
    409: {"model": ErrorOut, "description": "Already re-driven or discarded, or not re-drivable"},
}
GROUP = Query(min_length=1, max_length=200, pattern=TOKEN_PATTERN, description="Consumer group")


async def admin(request: Request, credentials: Credentials) -> Principal:
    """An admin caller (viewer and agent tokens get 403)."""
    who = identify(request, credentials)
    if who.role is not Role.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"{who.role.value} tokens cannot re-drive or discard dead letters (admin only)")
    return who


def _keeper(service: Service) -> KeepsDeadLetters:
    store = service.store
    if not isinstance(store, KeepsDeadLetters):
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, f"{type(store).__name__} does not keep dead letters")
    return store


def why_not_redrivable(dead: DeadLetter) -> str | None:
    """None when ``dead`` can be published again to its original subject, else the reason."""
    subject = dead.facts.original_subject
    if not subject:
        return "its original subject is unknown"
    try:
        subjects.validate_scheme(subject)
    except InvalidSubject:
        return f"its original subject {subject!r} is not a squad subject"
    if subject.startswith(subjects.DLQ_PREFIX + "."):
        return "its original subject is itself a dead-letter subject"
    try:
        UUID(dead.facts.original_id or "")
    except ValueError:
        return "the original was not a squadbus message (a record the backend could not read)"
    return None


def dead_letter_out(dead: DeadLetter) -> DeadLetterOut:
    """The API view of a kept dead letter."""
    m, f = dead.message, dead.facts
    row = StoredMessage(seq=0, stored_at=dead.stored_at, message=m)
    return DeadLetterOut(
        id=m.id, group=f.group, reason=f.reason, attempts=f.attempts, original_subject=f.original_subject,
        original_id=f.original_id, dead_at=m.created_at, stored_at=dead.stored_at, state=dead.state.value,
        settled_at=dead.settled_at, settled_by=dead.settled_by, redriven_as=dead.redriven_as,
        redrivable=why_not_redrivable(dead) is None,
        message=MessageOut.of(row).model_copy(update={"seq": None, "stored_at": None}),
    )


def redrive_message(dead: DeadLetter, by: str) -> Message:
    """The message a re-drive publishes (see the module docstring)."""
    original, facts = dead.message, dead.facts
    headers = {k: v for k, v in original.headers.items() if not k.startswith("dlq-")}
    headers.update({REDRIVE_OF: str(original.id), REDRIVEN_FROM: str(facts.original_id), REDRIVEN_BY: by})
    return original.evolve(id=new_id(), subject=facts.original_subject, created_at=utcnow(), headers=headers)


_encoder = msgspec.json.Encoder()


async def audit(service: Service, who: Principal, action: str, **details: Any) -> None:
    """Append one admin action to the audit log; a failure is logged (the action is done) and not raised."""
    opts = service.options
    path = opts.audit_path or service.settings.audit_path
    record = {"logged_at": datetime.now(UTC).isoformat(), "action": action, "by": who.name,
              "role": who.role.value, **details}
    line = _encoder.encode(record) + b"\n"
    try:
        await asyncio.to_thread(AuditFile(path, max_bytes=opts.audit_max_bytes, max_files=opts.audit_max_files)
                                .append, [line])
    except OSError:
        logger.exception("could not append %s by %s to the audit log %s", action, who.name, path)
    logger.warning("%s by %s (%s): %s", action, who.name, who.role.value, details)


async def _redrive(service: Service, store: KeepsDeadLetters, dead: DeadLetter, who: Principal) -> RedrivenOut:
    """Publish ``dead`` again (409 when settled or not re-drivable, 503 when the publish fails)."""
    if dead.state is not DeadLetterState.DEAD:
        raise HTTPException(status.HTTP_409_CONFLICT, _settled_text(dead))
    why = why_not_redrivable(dead)
    if why is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"dead letter {dead.message.id} cannot be re-driven: {why}")
    message = redrive_message(dead, who.name)
    if not await store.settle_dead_letter(dead.message.id, DeadLetterState.REDRIVEN, by=who.name,
                                          redriven_as=message.id):
        again = await store.get_dead_letter(dead.message.id)
        raise HTTPException(status.HTTP_409_CONFLICT, _settled_text(again or dead))
    try:
        message = await service.bus.publish(message)
    except SquadbusError:
        await store.reopen_dead_letter(dead.message.id, message.id)
        raise
    service.metrics.record_published(message.message_type)
    try:
        rows = await service.writer.write([message])
    except BackendError:
        logger.warning("re-driven message %s published, not written through: the db-writer stores it", message.id)
    else:
        service.hub.offer(rows)
    await audit(service, who, "dead-letter-redrive", dead_letter_id=str(dead.message.id), group=dead.facts.group,
                original_id=dead.facts.original_id, redriven_as=str(message.id), subject=message.subject)
    return RedrivenOut(dead_letter_id=dead.message.id, redriven_as=message.id, subject=message.subject)


def _settled_text(dead: DeadLetter) -> str:
    if dead.state is DeadLetterState.REDRIVEN:
        return f"dead letter {dead.message.id} was already re-driven as {dead.redriven_as} by {dead.settled_by}"
    if dead.state is DeadLetterState.DISCARDED:
        return f"dead letter {dead.message.id} was discarded by {dead.settled_by}"
    return f"dead letter {dead.message.id} changed meanwhile; reload and try again"


async def _found(store: KeepsDeadLetters, message_id: UUID) -> DeadLetter:
    dead = await store.get_dead_letter(message_id)
    if dead is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {message_id}")
    return dead


@router.get("/dead-letters", responses=LIST_ERRORS, summary="List dead letters, newest first")
async def list_dead_letters(
    service: ServiceDep,
    who: Annotated[Principal, Depends(overseer)],
    group: Annotated[str | None, GROUP] = None,
    state: Annotated[str, Query(pattern="^(dead|redriven|discarded|all)$",
                                description="dead (default: waiting), redriven, discarded or all")] = "dead",
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page, unchanged (opaque)",
                                        max_length=64, pattern=CURSOR)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_DEAD_LETTER_LIMIT)] = 50,
) -> DeadLetterList:
    """Dead letters with their reason, attempts, original subject and state (viewer and admin tokens)."""
    query = DeadLetterQuery(group=group, state=None if state == "all" else DeadLetterState(state),
                            cursor=cursor, limit=limit)
    page = await _keeper(service).list_dead_letters(query)
    return DeadLetterList(items=[dead_letter_out(d) for d in page.items], next_cursor=page.next_cursor)


@router.get("/dead-letters:summary", responses=LIST_ERRORS, summary="Count recent dead letters by group")
async def dead_letter_summary(
    service: ServiceDep,
    who: Annotated[Principal, Depends(overseer)],
    minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60, description="How far back (default: the last hour)")] = 60,
) -> DeadLetterSummary:
    """How many dead letters died in the last ``minutes``, by group (viewer and admin tokens)."""
    since = utcnow() - timedelta(minutes=minutes)
    counts = await _keeper(service).dead_letter_counts(since)
    return DeadLetterSummary(since=since, total=sum(counts.values()), by_group=counts)


@router.post("/dead-letters/{message_id}:redrive", responses=ACTION_ERRORS, summary="Re-drive one dead letter")
async def redrive_one(
    message_id: UUID, service: ServiceDep, who: Annotated[Principal, Depends(admin)]
) -> RedriveOut:
    """Publish the dead letter's original message again to its original subject, under a new id (admin only)."""
    store = _keeper(service)
    return RedriveOut(redriven=[await _redrive(service, store, await _found(store, message_id), who)])


@router.post("/dead-letters:redrive", responses=LIST_ERRORS, summary="Re-drive every dead letter of a group")
async def redrive_group(
    service: ServiceDep,
    who: Annotated[Principal, Depends(admin)],
    group: Annotated[str, GROUP],
) -> RedriveOut:
    """Re-drive each ``dead`` dead letter of ``group``, oldest first, up to 10,000 per call (admin only).

    Dead letters that cannot be re-driven, or that another admin settled
    meanwhile, are listed in ``skipped`` with the reason.
    """
    store = _keeper(service)
    waiting: list[DeadLetter] = []
    cursor: str | None = None
    while len(waiting) < MAX_GROUP_REDRIVE:
        page = await store.list_dead_letters(DeadLetterQuery(group=group, cursor=cursor,
                                                             limit=MAX_DEAD_LETTER_LIMIT))
        waiting.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    out = RedriveOut(redriven=[], skipped=[])
    for dead in reversed(waiting[:MAX_GROUP_REDRIVE]):  # oldest first: the order they died in
        try:
            out.redriven.append(await _redrive(service, store, dead, who))
        except HTTPException as exc:
            out.skipped.append(SkippedOut(dead_letter_id=dead.message.id, reason=str(exc.detail)))
    return out


@router.post("/dead-letters/{message_id}:discard", responses=ACTION_ERRORS, summary="Discard one dead letter")
async def discard_one(
    message_id: UUID, service: ServiceDep, who: Annotated[Principal, Depends(admin)]
) -> DeadLetterOut:
    """Mark the dead letter discarded: it leaves the list of waiting dead letters (admin only)."""
    store = _keeper(service)
    dead = await _found(store, message_id)
    if not await store.settle_dead_letter(message_id, DeadLetterState.DISCARDED, by=who.name):
        raise HTTPException(status.HTTP_409_CONFLICT, _settled_text(await _found(store, message_id)))
    await audit(service, who, "dead-letter-discard", dead_letter_id=str(message_id), group=dead.facts.group,
                original_id=dead.facts.original_id)
    return dead_letter_out(await _found(store, message_id))
