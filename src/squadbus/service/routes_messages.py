"""``/v1/messages``: send (one or a batch, idempotent by id) and query history.

How a POST and the db-writer share the work, so each row is written once:

1. the request is validated into an envelope (422/413 before anything is sent);
2. ``store.get(id)``: if the id is already stored, that message is returned
   (200) and nothing is published again: this is the idempotent replay. A
   request holds its client-set ids (:class:`~.id_claims.IdClaims`) from
   this lookup until its write, so two requests of one process racing on one
   id run one after the other: the second gets 200 (same sender) or 409
   (another), as if sent later, and publishes nothing;
3. a client-set id not stored yet is **claimed in the store** for this
   message (:class:`~squadbus.store.base.ClaimsIds`: atomic, so replicas
   sharing the store agree; concurrent requests share one transaction, each
   decided on its own, see :func:`claim_in_store`). An id claimed for another sender's
   message is a 409 and nothing is published. An id claimed for another
   message of the same sender is answered as in step 2 once that message is
   stored (200), and is a 409 while it is not yet. The same message claimed
   earlier (a concurrent retry, or a retry after a crash or a failed
   publish) goes on: claims are never released, a message can always claim
   its id again, and no other message can take it until retention removes
   the claim with the messages;
4. the message is then **published** (a publish failure is a 503 with
   nothing stored: retrying with the same id is safe), then **written
   through** to the store, which assigns its ``seq`` (201). The db-writer
   consumes the same message from the bus and its write is a no-op
   (``ON CONFLICT DO NOTHING`` by id), so the row exists once, whoever wins;
5. if the store write fails after the publish, the answer is 202 with
   ``seq: null``: the message is on the bus and the db-writer stores it;
6. the write returns the row stored under each id: when a concurrent retry
   of the same message stored it first, the answer is 200 with that row;
   when it holds another sender's message (only possible with a store
   without claims, or one written outside this service), the answer is 409.

Publishing before writing means a message is never in the history without
having been sent; writing through gives the caller its ``seq`` and makes the
message readable (and idempotent) at once, before the db-writer's batch.

With tracing on, a request's W3C ``traceparent`` is continued: the publish
spans are its children (see :mod:`squadbus.core.tracing`).
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from pydantic import BeforeValidator

from squadbus.core import envelope, subjects
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, InvalidMessage, MessageTooLarge
from squadbus.core.tracing import continue_trace
from squadbus.service.auth import Principal, check_sender, reader, sender
from squadbus.service.errors import LocatedInvalid
from squadbus.service.id_claims import fingerprint
from squadbus.service.schemas import BatchIn, BatchOut, ErrorOut, MessageIn, MessageOut, MessagePage, SnapshotOut
from squadbus.service.state import Service, ServiceDep
from squadbus.store.base import ClaimsIds, HistoryQuery, IdClaim, StoredMessage

router = APIRouter(prefix="/v1", tags=["messages"])

ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "Missing or unknown bearer token"},
    403: {"model": ErrorOut, "description": "The token may not do this"},
    503: {"model": ErrorOut, "description": "Bus or store unavailable; retrying with the same id is safe"},
}
SEND_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS,
    409: {"model": ErrorOut, "description": "The id is already used by another sender's message, or by another "
                                            "message of this sender that is not stored yet"},
    413: {"model": ErrorOut, "description": "Request body or message content too large"},
}


def _iso_only(value: object) -> object:
    # pydantic also reads numbers as Unix times; the API documents RFC 3339 date-times only
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("expected an RFC 3339 date-time such as 2025-01-31T12:00:00Z, not a number")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_only)]


def to_message(body: MessageIn, service: Service, *, loc: tuple[str | int, ...] = ("body",)) -> Message:
    """Build and validate the envelope of ``body`` (raises InvalidMessage, located for a 422)."""
    if body.recipient_id is None:
        subject = subjects.BROADCAST if body.domain is None else subjects.domain(body.domain)
    else:
        subject = subjects.direct(body.recipient_id)
    try:
        message = envelope.build(
            subject=subject, sender_id=body.sender_id, recipient_id=body.recipient_id, content=body.content,
            message_type=body.message_type, domain=body.domain, task_execution_id=body.task_execution_id,
            metadata=body.metadata, id=body.id, max_content_bytes=service.settings.max_content_bytes,
        )
        envelope.encode(message)
    except MessageTooLarge:
        raise
    except InvalidMessage as exc:
        raise LocatedInvalid(str(exc), loc) from exc
    except (UnicodeEncodeError, TypeError, ValueError) as exc:
        raise LocatedInvalid(f"message cannot be encoded as JSON: {exc}", loc) from exc
    return message


def _check_existing(existing: StoredMessage, message: Message) -> None:
    if existing.message.sender_id != message.sender_id:
        raise HTTPException(status.HTTP_409_CONFLICT, f"id {message.id} is already used by another sender")


def _client_ids(bodies: list[MessageIn], messages: list[Message]) -> list[UUID]:
    # a server-made id is new by construction: only client-set ids can collide
    return [m.id for body, m in zip(bodies, messages, strict=True) if body.id is not None]


async def claim_in_store(service: Service, messages: list[Message]) -> dict[UUID, StoredMessage]:
    """Claim the (distinct, client-set) ids of ``messages`` in the store (step 3 of the module docstring).

    On return every id is claimed for its message, except those returned: ids
    another message of the same sender holds and has stored, mapped to that
    stored row (answered as in step 2). Raises 409 for an id held by another
    sender's message, or by another message of the same sender not stored
    yet. A store that does not claim ids (not ``ClaimsIds``) returns at once.
    Concurrent requests' claims share one store transaction
    (:meth:`~.group_commit.GroupWriter.claim`), each request's decided on
    its own, so another request's refusal never refuses this one.
    """
    store = service.store
    found: dict[UUID, StoredMessage] = {}
    if not isinstance(store, ClaimsIds):
        return found
    pending = messages
    while pending:
        wanted = [IdClaim(m.id, m.sender_id, fingerprint(m)) for m in pending]
        holders = await service.writer.claim(wanted)
        taken = [m for m, w, h in zip(pending, wanted, holders, strict=True) if h.fingerprint != w.fingerprint]
        if not taken:
            return found
        # nothing was claimed: refuse, or answer the same sender's taken ids from the store and claim the rest
        for m, h in zip(pending, holders, strict=True):
            if h.sender_id != m.sender_id:
                raise HTTPException(status.HTTP_409_CONFLICT, f"id {m.id} is already used by another sender")
        for m in taken:
            row = await store.get(m.id)
            if row is None:
                raise HTTPException(
                    status.HTTP_409_CONFLICT,
                    f"id {m.id} is already used by another message of this sender, not stored yet",
                )
            found[m.id] = row
        pending = [m for m in pending if m.id not in found]
    return found


async def send_all(service: Service, messages: list[Message], request: Request) -> list[MessageOut]:
    """Publish ``messages`` in order (continuing ``request``'s trace), then write them through.

    Raises 409 when the store already held another sender's message under one
    of the ids (step 6 of the module docstring).
    """
    with continue_trace(service.bus.tracer, request.headers), service.metrics.timed_publish():
        messages = list(await service.bus.publish_many(messages))  # as published: with trace headers
    for message in messages:
        service.metrics.record_published(message.message_type)
    try:
        rows = await service.writer.write(messages)
    except BackendError:
        return [_unstored(m) for m in messages]
    service.metrics.record_stored(rows, "http")
    service.hub.offer(rows)
    for row, message in zip(rows, messages, strict=True):
        _check_existing(row, message)
    return [MessageOut.of(row) for row in rows]


def _unstored(message: Message) -> MessageOut:
    m = message
    return MessageOut(
        id=m.id, subject=m.subject, sender_id=m.sender_id, recipient_id=m.recipient_id, domain=m.domain,
        content=m.content, message_type=m.message_type, task_execution_id=m.task_execution_id,
        metadata=m.metadata, headers=m.headers, created_at=m.created_at, seq=None, stored_at=None,
    )


@router.post(
    "/messages",
    status_code=status.HTTP_201_CREATED,
    responses={
        **SEND_ERRORS,
        200: {"model": MessageOut, "description": "Already sent earlier with this id: the same message"},
        202: {"model": MessageOut, "description": "Published; the store write failed and the db-writer will do it"},
    },
    summary="Send a message (idempotent by id)",
)
async def post_message(
    body: MessageIn, request: Request, response: Response, service: ServiceDep,
    who: Annotated[Principal, Depends(sender)],
) -> MessageOut:
    """Send one message. With a client-set ``id``, repeating the request returns the stored message."""
    check_sender(who, body.sender_id)
    message = to_message(body, service)
    async with service.claims.hold(_client_ids([body], [message])):
        # a server-made id cannot be stored yet: only a client-set id needs the lookup
        existing = None if body.id is None else await service.store.get(message.id)
        if existing is None and body.id is not None:
            existing = (await claim_in_store(service, [message])).get(message.id)
        if existing is not None:
            _check_existing(existing, message)
            response.status_code = status.HTTP_200_OK
            return MessageOut.of(existing)
        [out] = await send_all(service, [message], request)
    if out.seq is None:
        response.status_code = status.HTTP_202_ACCEPTED
    elif out.created_at != message.created_at or out.content != message.content:
        response.status_code = status.HTTP_200_OK  # a replica stored this sender's message first
    return out


@router.post("/messages:batch", responses=SEND_ERRORS, summary="Send up to 500 messages")
async def post_batch(
    body: BatchIn, request: Request, service: ServiceDep, who: Annotated[Principal, Depends(sender)]
) -> BatchOut:
    """Send a batch in order; every message is validated and authorised before any is sent.

    Messages whose id is already stored (or repeated in the batch) are not sent
    again; the result lists one message per input, in input order.
    """
    messages: list[Message] = []
    for index, item in enumerate(body.messages):
        check_sender(who, item.sender_id)
        messages.append(to_message(item, service, loc=("body", "messages", index)))
    found: dict[UUID, MessageOut] = {}
    fresh: list[Message] = []
    fresh_ids: set[UUID] = set()
    client_ids = _client_ids(body.messages, messages)
    async with service.claims.hold(client_ids):
        for index, message in enumerate(messages):
            if message.id in found or message.id in fresh_ids:
                continue
            existing = None if body.messages[index].id is None else await service.store.get(message.id)
            if existing is not None:
                _check_existing(existing, message)
                found[message.id] = MessageOut.of(existing)
            else:
                fresh.append(message)
                fresh_ids.add(message.id)
        claimed = set(client_ids)
        stored = await claim_in_store(service, [m for m in fresh if m.id in claimed])
        for message in fresh:
            if message.id in stored:
                _check_existing(stored[message.id], message)
                found[message.id] = MessageOut.of(stored[message.id])
        fresh = [m for m in fresh if m.id not in stored]
        if fresh:
            for out in await send_all(service, fresh, request):
                found[out.id] = out
    return BatchOut(items=[found[m.id] for m in messages])


@router.get("/messages", responses=ERRORS, summary="Query history")
async def list_messages(
    service: ServiceDep,
    who: Annotated[Principal, Depends(reader)],
    task_execution_id: UUID | None = None,
    agent_id: Annotated[str | None, Query(description="Sender or recipient", min_length=1, max_length=200)] = None,
    message_type: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    since: Annotated[IsoDateTime | None, Query(description="created_at >= since (with a timezone)")] = None,
    until: Annotated[IsoDateTime | None, Query(description="created_at < until (with a timezone)")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page, unchanged (opaque, "
                                                    "unpadded base64url)", max_length=64,
                                        pattern=r"^[A-Za-z0-9_-]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> MessagePage:
    """Messages matching every filter given, oldest first, with their seq and server ``stored_at``."""
    query = HistoryQuery(
        task_execution_id=task_execution_id, agent_id=agent_id, message_type=message_type,
        since=since, until=until, cursor=cursor, limit=limit,
    )
    query.validate()
    page = await service.store.query(query)
    return MessagePage(items=[MessageOut.of(row) for row in page.items], next_cursor=page.next_cursor)


@router.get(
    "/messages/{message_id}",
    responses={**ERRORS, 404: {"model": ErrorOut, "description": "No such message"}},
    summary="One message",
)
async def get_message(
    message_id: UUID, service: ServiceDep, who: Annotated[Principal, Depends(reader)]
) -> MessageOut:
    """The stored message with this id."""
    row = await service.store.get(message_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no message {message_id}")
    return MessageOut.of(row)


@router.get("/executions/{execution_id}", responses=ERRORS, summary="Execution snapshot", tags=["executions"])
async def get_execution(
    execution_id: UUID, service: ServiceDep, who: Annotated[Principal, Depends(reader)]
) -> SnapshotOut:
    """Message count, seq range and agents of one execution (zeros when it has no messages)."""
    return SnapshotOut.of(await service.store.snapshot(execution_id))
