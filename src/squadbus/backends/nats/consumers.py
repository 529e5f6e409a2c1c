"""Consumer configurations: one durable pull consumer per group, an ephemeral one per fan-out subscription.

A group ``(group, pattern)`` is the durable consumer ``durable_name(group,
pattern)`` with ``filter_subject=pattern``; its members pull from it and
compete for messages. It is created by the first member with that member's
options (``start``, ``ack_wait``, ``max_deliver``, ``max_pending``); later
members join it as it is.

``max_deliver`` on the server is ``options.max_deliver + max_deliver_margin``:
squadbus dispatch dead-letters to ``agent.dlq.<group>`` when the attempt
that reaches ``options.max_deliver`` fails, so the server's own limit only
matters for deliveries that were never settled (the consumer crashed or hung
past ``ack_wait`` on every one of the last attempts). Then JetStream stops
redelivering and publishes its ``MAX_DELIVERIES`` advisory; the message stays
in the stream for replay. The margin keeps a crash on the last attempt from
silently skipping the dead letter.
"""

from __future__ import annotations

import logging
import secrets

import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext

from squadbus.backends.nats.settings import NatsSettings
from squadbus.backends.nats.translate import translate
from squadbus.core.backend import ConsumerOptions, StartFrom, durable_name
from squadbus.core.errors import BackendTimeout

logger = logging.getLogger("squadbus.backends.nats")


def consumer_config(
    pattern: str, group: str | None, options: ConsumerOptions, settings: NatsSettings
) -> api.ConsumerConfig:
    """The JetStream consumer config for a subscription (see the module docstring)."""
    config = api.ConsumerConfig(
        filter_subject=pattern,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=options.ack_wait,
        max_deliver=options.max_deliver + settings.max_deliver_margin,
        max_ack_pending=max(options.max_pending, options.max_in_flight, options.batch_size),
    )
    if group is None:
        config.name = f"eph-{secrets.token_hex(8)}"
        config.deliver_policy = api.DeliverPolicy.NEW
        config.inactive_threshold = max(30.0, 5 * settings.pull_expires)
        config.mem_storage = True
        config.num_replicas = 1
    else:
        config.name = config.durable_name = durable_name(group, pattern)
        config.deliver_policy = (
            api.DeliverPolicy.ALL if options.start is StartFrom.EARLIEST else api.DeliverPolicy.NEW
        )
    return config


async def ensure_consumer(
    js: JetStreamContext, stream: str, config: api.ConsumerConfig, *, attempts: int = 3
) -> None:
    """Create the consumer unless it exists (a durable is joined as it is).

    A call that times out is asked again, up to ``attempts`` times in all: on a busy cluster (a
    leader election, many replicated consumers being created) one create can take longer than one
    JetStream API timeout, and asking again is safe (a durable is looked up first, and creating
    the same config twice is idempotent).
    """
    for attempt in range(1, attempts + 1):
        try:
            await _ensure_once(js, stream, config)
            return
        except BackendTimeout as exc:
            if attempt == attempts:
                raise
            logger.warning("consumer %s: %s; asking again (%d of %d)", config.name, exc, attempt + 1, attempts)


async def _ensure_once(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> None:
    name = config.name
    assert name is not None
    if config.durable_name:
        try:
            await js.consumer_info(stream, name)
            return
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:
            raise translate(exc, f"look up consumer {name}") from exc
    try:
        await js.add_consumer(stream, config)
    except nats.js.errors.APIError as exc:
        # Another member may have created it a moment ago with other options.
        try:
            await js.consumer_info(stream, name)
        except Exception:
            raise translate(exc, f"create consumer {name}") from exc
    except Exception as exc:
        raise translate(exc, f"create consumer {name}") from exc


async def consumer_exists(js: JetStreamContext, stream: str, name: str) -> bool:
    """True when the consumer is known to the server; raises BackendError when it cannot tell."""
    try:
        await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        return False
    except Exception as exc:
        raise translate(exc, f"look up consumer {name}") from exc
    return True
