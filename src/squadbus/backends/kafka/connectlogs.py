"""aiokafka's warnings while the backend connects, held back and reported in the connect error.

aiokafka logs each failed bootstrap attempt at ERROR (``Unable connect to
"host:port": [Errno 111] ...``) and then raises an error that no longer says
why (``Unable to bootstrap from [...]``). While the backend's first connect
runs, :class:`ConnectLogs` takes the WARNING-and-above records that aiokafka
emits *in the connecting task* off the log and keeps them, so a failed
connect is one error naming the cause and nothing else; after a connect that
succeeded (one of several brokers down, say) they are logged as they would
have been. Records from other tasks (other backends, running consumers) and
records below WARNING pass as usual, and nothing is held once the connect is
over.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

DRIVER_LOGGER = "aiokafka"


class ConnectLogs(logging.Filter):
    """A filter on every aiokafka logger for the duration of a ``with`` block in one task."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._task: asyncio.Task[object] | None = None
        self._loggers: list[logging.Logger] = []

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep (and drop from the log) a WARNING+ record emitted by the connecting task."""
        if record.levelno < logging.WARNING:
            return True
        try:
            current = asyncio.current_task()
        except RuntimeError:  # logged from a thread without an event loop
            return True
        if current is None or current is not self._task:
            return True
        self.records.append(record)
        return False

    def cause(self) -> str | None:
        """The last held record as ``ExceptionType: message`` (its exception argument if it has one)."""
        if not self.records:
            return None
        record = self.records[-1]
        args = record.args if isinstance(record.args, tuple) else ()
        error = next((arg for arg in reversed(args) if isinstance(arg, BaseException)), None)
        if error is None:
            return record.getMessage()
        name, text = type(error).__name__, str(error)
        return text if text.startswith(name) else f"{name}: {text}"  # aiokafka's errors name themselves

    def __enter__(self) -> ConnectLogs:
        self._task = asyncio.current_task()
        manager = logging.Logger.manager
        names = [name for name in manager.loggerDict if name == DRIVER_LOGGER or name.startswith(f"{DRIVER_LOGGER}.")]
        self._loggers = [logging.getLogger(name) for name in names]
        for logger in self._loggers:
            logger.addFilter(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for logger in self._loggers:
            logger.removeFilter(self)
        self._loggers = []
        if exc_type is None:
            for record in self.records:
                logging.getLogger(record.name).handle(record)
