"""The publishing side: one AIOKafkaProducer shared by every publish of a backend.

Each :meth:`KafkaPublisher.publish` hands its record to the producer with
``send()`` (not ``send_and_wait`` per record with a linger: with aiokafka any
``linger_ms`` makes an awaited per-message send ~17x slower) and awaits the
broker's acknowledgement. Batching comes from concurrency: records added
while a request is in flight are sent together in the next one, so many
concurrent publishers share round trips while every publish still returns
only after the broker acknowledged its own record (``acks="all"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from squadbus.backends.kafka._driver import (
    AIOKafkaProducer,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    NodeNotReadyError,
    RequestTimedOutError,
)
from squadbus.backends.kafka.partitioner import KeyPartitioner
from squadbus.backends.kafka.settings import Idempotence, KafkaSettings
from squadbus.backends.kafka.topics import TopicLayout
from squadbus.core.envelope import Message, encode
from squadbus.core.errors import BackendError, BackendTimeout, ConfigError, ConnectionLost, PublishFailed

logger = logging.getLogger("squadbus.backends.kafka")

SUBJECT_HEADER = "squadbus-subject"
ID_HEADER = "squadbus-id"


def record_key(message: Message) -> bytes:
    """The partitioning key: the execution id (order per execution), else the subject."""
    execution = message.task_execution_id
    return (str(execution) if execution is not None else message.subject).encode()


def record_headers(message: Message) -> list[tuple[str, bytes]]:
    """Kafka headers: the subject and id (for cheap filtering), then the envelope's headers."""
    headers = [(SUBJECT_HEADER, message.subject.encode()), (ID_HEADER, str(message.id).encode())]
    headers.extend((name, value.encode()) for name, value in message.headers.items())
    return headers


def translate(exc: BaseException, what: str) -> BackendError:
    """The squadbus error for a driver error ``exc`` raised while doing ``what``."""
    if isinstance(exc, (KafkaConnectionError, NodeNotReadyError, NoBrokersAvailable)):
        return ConnectionLost(f"{what}: cannot reach the Kafka broker: {exc}")
    if isinstance(exc, (KafkaTimeoutError, RequestTimedOutError, TimeoutError)):
        return BackendTimeout(f"{what}: the Kafka broker did not answer in time: {exc}")
    return PublishFailed(f"{what}: {type(exc).__name__}: {exc}")


class KafkaPublisher:
    """Publishes messages to the layout's topics; see the module docstring."""

    def __init__(self, settings: KafkaSettings, layout: TopicLayout) -> None:
        self._settings = settings
        self._layout = layout
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = KeyPartitioner()
        self.idempotent = False

    def _make(self, idempotent: bool) -> AIOKafkaProducer:
        s = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=list(s.bootstrap_servers),
            client_id=s.client_id,
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=0,
            partitioner=self._partitioner,
            max_batch_size=s.max_batch_bytes,
            request_timeout_ms=int(s.publish_timeout * 1000),
        )

    async def start(self) -> None:
        """Connect the producer; with ``idempotence=auto`` fall back when the broker refuses."""
        mode = self._settings.idempotence
        if mode is not Idempotence.OFF:
            producer = self._make(True)
            try:
                await producer.start()
            except KafkaConnectionError:
                await producer.stop()
                raise
            except KafkaError as exc:
                await producer.stop()
                if mode is Idempotence.ON:
                    raise ConfigError(f"the broker refused an idempotent producer (idempotence=on): {exc}") from exc
                logger.warning(
                    "the Kafka broker refused an idempotent producer (%s: %s); publishing without "
                    "idempotence: a producer retry may duplicate a record, the store dedupes by id",
                    type(exc).__name__, exc,
                )
            else:
                self._producer, self.idempotent = producer, True
                return
        producer = self._make(False)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer, self.idempotent = producer, False

    async def publish(self, message: Message) -> None:
        """Send ``message`` and return once the broker acknowledged it.

        Raises ConnectionLost, BackendTimeout (after ``publish_timeout``; the
        record may still have been stored: publish again with the same id)
        or PublishFailed.
        """
        producer = self._producer
        if producer is None:
            raise ConnectionLost("the Kafka producer is not started")
        topic = self._layout.topic_for(message.subject)
        # No asyncio.timeout here (it costs a timer per message): the producer's
        # request_timeout_ms (= publish_timeout) bounds the metadata wait, the
        # buffer wait and the acknowledgement.
        try:
            ack = await producer.send(topic, encode(message), key=record_key(message), headers=record_headers(message))
            await ack
        except (KafkaError, TimeoutError) as exc:
            raise translate(exc, f"publish of {message.id} to {topic}") from exc

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Store every message, in order per partition, then return once the broker acknowledged all.

        The records go straight into per-partition batches (aiokafka's ``create_batch`` /
        ``send_batch``), placed by the same partitioner as :meth:`publish`: no future, metadata
        wait and accumulator lookup per record as ``send()`` has. A full batch is submitted and a new
        one started; aiokafka queues a partition's batches in order. Raises the first failure
        translated (see :meth:`publish`); records of the other messages may still have been stored.
        """
        producer = self._producer
        if producer is None:
            raise ConnectionLost("the Kafka producer is not started")
        what = f"publish of a batch of {len(messages)}"
        open_batches: dict[tuple[str, int], Any] = {}
        partitions: dict[str, list[int]] = {}
        acks: list[asyncio.Future[Any]] = []
        try:
            for message in messages:
                topic = self._layout.topic_for(message.subject)
                ids = partitions.get(topic)
                if ids is None:
                    ids = partitions[topic] = sorted(await producer.partitions_for(topic))
                key = record_key(message)
                partition = self._partitioner(key, ids, ids)
                value, headers = encode(message), record_headers(message)
                place = (topic, partition)
                batch = open_batches.get(place)
                if batch is None:
                    batch = open_batches[place] = producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                    # Full: submit it (in order after the partition's earlier batches), start the next.
                    acks.append(await self._submit(producer, batch, place))
                    batch = open_batches[place] = producer.create_batch()
                    if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                        raise PublishFailed(f"message {message.id} does not fit in a batch of "
                                            f"max_batch_bytes={self._settings.max_batch_bytes}")
            for place, batch in open_batches.items():
                acks.append(await self._submit(producer, batch, place))
        except (KafkaError, TimeoutError) as exc:
            await asyncio.gather(*acks, return_exceptions=True)
            raise translate(exc, what) from exc
        except BaseException:
            await asyncio.gather(*acks, return_exceptions=True)
            raise
        outcomes = await asyncio.gather(*acks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, KafkaError | TimeoutError):
                raise translate(outcome, what) from outcome
            if isinstance(outcome, BaseException):
                raise outcome

    @staticmethod
    async def _submit(producer: AIOKafkaProducer, batch: Any, place: tuple[str, int]) -> asyncio.Future[Any]:
        batch.close()  # exactly these records: concurrent send() calls start their own batch
        future: asyncio.Future[Any] = await producer.send_batch(batch, place[0], partition=place[1])
        return future

    async def partitions(self, topic: str) -> list[int]:
        """The partition ids of ``topic``, sorted."""
        producer = self._producer
        if producer is None:
            raise ConnectionLost("the Kafka producer is not started")
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                found = await producer.partitions_for(topic)
        except (KafkaError, TimeoutError) as exc:
            raise translate(exc, f"metadata of {topic}") from exc
        return sorted(found)

    async def stop(self) -> None:
        """Flush what is in flight and disconnect. Idempotent."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
