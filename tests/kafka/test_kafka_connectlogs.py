"""aiokafka's warnings during a connect: held back on failure, logged after a success, others untouched."""

from __future__ import annotations

import asyncio
import logging

import pytest

from squadbus.backends.kafka.connectlogs import ConnectLogs

DRIVER = logging.getLogger("aiokafka")
CHILD = logging.getLogger("aiokafka.conn")


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")]


async def test_a_failed_connect_holds_the_warnings_and_names_the_last(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeError), ConnectLogs() as held:
        DRIVER.debug("Attempting to bootstrap")
        DRIVER.error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, ConnectionRefusedError(111, "refused"))
        CHILD.warning("closed")
        raise RuntimeError("connect failed")
    assert _logged(caplog) == ["Attempting to bootstrap"]
    assert held.cause() == "closed"
    assert [r.getMessage() for r in held.records] == ['Unable connect to "127.0.0.1:1": [Errno 111] refused', "closed"]
    DRIVER.error("after the connect")
    assert _logged(caplog)[-1] == "after the connect"


async def test_a_record_names_its_exception_argument() -> None:
    with pytest.raises(RuntimeError), ConnectLogs() as held:
        DRIVER.error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, ConnectionRefusedError(111, "refused"))
        raise RuntimeError("connect failed")
    assert held.cause() == "ConnectionRefusedError: [Errno 111] refused"


async def test_a_connect_that_succeeded_logs_what_it_held(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with ConnectLogs():
        DRIVER.error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, ConnectionRefusedError(111, "refused"))
        assert _logged(caplog) == []
    assert _logged(caplog) == ['Unable connect to "127.0.0.1:1": [Errno 111] refused']


async def test_other_tasks_log_as_usual_during_a_connect(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def elsewhere() -> None:
        DRIVER.warning("a running consumer's warning")

    with pytest.raises(RuntimeError), ConnectLogs():
        await asyncio.create_task(elsewhere())
        raise RuntimeError("connect failed")
    assert _logged(caplog) == ["a running consumer's warning"]
