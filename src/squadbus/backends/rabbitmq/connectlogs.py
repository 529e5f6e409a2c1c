"""The driver's warnings while the backend first connects, held back so a failed connect is one error.

aiormq logs each failed attempt at ERROR (``error when creating transport``)
and then raises; the backend raises ConnectionLost naming the URL and the
cause, so those records would only say it twice. While the first connect
runs, :class:`ConnectLogs` takes the WARNING-and-above records aiormq and
aio-pika emit *in that connect* (the connecting task and the tasks it starts,
told apart by a context variable) off the log. After a connect that
succeeded they are logged as they would have been; records from other
connections and records below WARNING pass as usual.
"""

from __future__ import annotations

import contextvars
import logging
from types import TracebackType

DRIVER_LOGGERS = ("aiormq", "aio_pika")

_connecting: contextvars.ContextVar[ConnectLogs | None] = contextvars.ContextVar("squadbus_rabbitmq_connecting",
                                                                                 default=None)


class ConnectLogs(logging.Filter):
    """A filter on the driver's loggers for the duration of a ``with`` block (and the tasks it starts)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._loggers: list[logging.Logger] = []
        self._token: contextvars.Token[ConnectLogs | None] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep (and drop from the log) a WARNING+ record emitted by this connect."""
        if record.levelno < logging.WARNING or _connecting.get() is not self:
            return True
        self.records.append(record)
        return False

    def release(self) -> None:
        """Log the held records after all (the connect succeeded: they were worth seeing)."""
        records, self.records = self.records, []
        for record in records:
            logging.getLogger(record.name).handle(record)

    def __enter__(self) -> ConnectLogs:
        self._token = _connecting.set(self)
        manager = logging.Logger.manager
        names = [name for name in manager.loggerDict
                 if any(name == root or name.startswith(f"{root}.") for root in DRIVER_LOGGERS)]
        self._loggers = [logging.getLogger(name) for name in names]
        for logger in self._loggers:
            logger.addFilter(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for logger in self._loggers:
            logger.removeFilter(self)
        if self._token is not None:
            _connecting.reset(self._token)
