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

With ``ordered_groups`` a group's consumer has the ``pinned_client`` priority
policy (ADR-42, nats-server 2.11+; :class:`PinnedConsumerConfig`): the server
hands messages to one member (the one whose pulls carry the pin id it gave
out) and pins another only after ``priority_timeout`` without a pull from it.
``priority_timeout`` is ``2 * ack_wait``: a dead member's unacknowledged
messages have passed their ack wait by then, so they are redelivered (first)
to the new member before any later message (measured on 2.15.1: a shorter
timeout lets the new member get later messages while the dead one's are still
waiting out their ack wait). A live member pulls at least every
``ack_wait / 2`` (subscriber.py) to keep its pin. An existing consumer whose
policy does not match the setting is a ConfigError (a consumer cannot change
policy: delete it to change).
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass

import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext

from squadbus.backends.nats.settings import NatsSettings
from squadbus.backends.nats.translate import translate
from squadbus.core.backend import ConsumerOptions, StartFrom, durable_name
from squadbus.core.errors import BackendTimeout, ConfigError

logger = logging.getLogger("squadbus.backends.nats")

PRIORITY_GROUP = "squadbus"
"""The one priority group of an ordered group's consumer (pull requests name it)."""
PINNED = "pinned_client"


@dataclass
class PinnedConsumerConfig(api.ConsumerConfig):
    """A ConsumerConfig with the ADR-42 priority fields nats-py does not know yet (sent as they are)."""

    priority_groups: list[str] | None = None
    priority_policy: str | None = None
    priority_timeout: int | None = None
    """Nanoseconds."""


def pin_timeout(options: ConsumerOptions) -> float:
    """Seconds without a pull from the pinned member before the server pins another."""
    return 2 * options.ack_wait


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
    if group is not None and settings.ordered_groups:
        config = PinnedConsumerConfig(
            **{name: getattr(config, name) for name in config.__dataclass_fields__},
            priority_groups=[PRIORITY_GROUP], priority_policy=PINNED,
            priority_timeout=int(pin_timeout(options) * 1e9),
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
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:
            raise translate(exc, f"look up consumer {name}") from exc
        else:
            await _check_policy(js, stream, config)
            return
    try:
        await js.add_consumer(stream, config)
    except nats.js.errors.APIError as exc:
        # Another member may have created it a moment ago with other options.
        try:
            await js.consumer_info(stream, name)
        except Exception:
            raise translate(exc, f"create consumer {name}") from exc
        await _check_policy(js, stream, config)
    except Exception as exc:
        raise translate(exc, f"create consumer {name}") from exc


async def _check_policy(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> None:
    """Raise ConfigError when an existing group consumer's priority policy is not the one asked for."""
    wanted = isinstance(config, PinnedConsumerConfig)
    prefix = getattr(js, "_prefix", "$JS.API")
    try:
        reply = await js._nc.request(f"{prefix}.CONSUMER.INFO.{stream}.{config.name}", b"", timeout=5)
        policy = json.loads(reply.data).get("config", {}).get("priority_policy")
    except Exception as exc:
        raise translate(exc, f"look up consumer {config.name}") from exc
    if (policy == PINNED) != wanted:
        raise ConfigError(
            f"consumer {config.name} exists {'with' if policy == PINNED else 'without'} the pinned_client policy "
            f"but ordered_groups={'true' if wanted else 'false'}: use the group's setting, or delete the consumer"
        )


async def consumer_exists(js: JetStreamContext, stream: str, name: str) -> bool:
    """True when the consumer is known to the server; raises BackendError when it cannot tell."""
    try:
        await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        return False
    except Exception as exc:
        raise translate(exc, f"look up consumer {name}") from exc
    return True
