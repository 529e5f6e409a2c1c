"""squadbus: the messaging layer for a squad of AI agents.

Start with :class:`Bus`::

    async with Bus.from_url("memory://") as bus:
        await bus.send("pm", "dev-1", "Build the login page", "task")
"""

from squadbus.core.backend import Backend, ConsumerOptions, Delivery, SlowConsumerPolicy, StartFrom, Subscription
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import (
    BackendError,
    BackendTimeout,
    Closed,
    ConfigError,
    ConnectionLost,
    InvalidMessage,
    InvalidSubject,
    MalformedMessage,
    MessageTooLarge,
    Nack,
    PublishFailed,
    ReceiveTimeout,
    Reject,
    RequestTimeout,
    Retry,
    SquadbusError,
)
from squadbus.core.inbox import Inbox
from squadbus.core.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendError", "BackendTimeout", "Bus", "Closed", "ConfigError", "ConnectionLost",
    "ConsumerOptions", "Delivery", "Inbox", "InvalidMessage", "InvalidSubject", "MalformedMessage", "Message",
    "MessageTooLarge", "Nack", "PublishFailed", "ReceiveTimeout", "Reject", "RequestTimeout", "Retry", "Settings",
    "SlowConsumerPolicy", "SquadbusError", "StartFrom", "Subscription", "__version__",
]
