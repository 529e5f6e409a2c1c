"""An unreachable broker is one typed error naming the URL and the cause, with no driver log noise.

No server is needed: each backend connects to a loopback port nobody listens on.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from squadbus.core.bus import Bus
from squadbus.core.errors import ConnectionLost, SquadbusError
from squadbus.testing.servers.process import free_port

# (URL with a password where the scheme takes one, the same URL as an error may show it)
URLS = {
    "nats": ("nats://alice:s3cret@127.0.0.1:{port}?connect_timeout=1", "nats://127.0.0.1:{port}"),
    "kafka": ("kafka://127.0.0.1:{port}?connect_timeout=1", "kafka://127.0.0.1:{port}"),
    "redis": ("redis://alice:s3cret@127.0.0.1:{port}/0?connect_timeout=1", "redis://alice:***@127.0.0.1:{port}/0"),
}


@pytest.mark.parametrize("backend", sorted(URLS))
def test_cli_prints_one_line_naming_the_url_and_the_cause(backend: str) -> None:
    port = free_port()
    url, shown = (u.format(port=port) for u in URLS[backend])
    result = subprocess.run(
        [sys.executable, "-m", "squadbus", "--url", url, "send", "pm", "dev-1", "hi"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"squadbus: error: cannot connect to {shown}: "), line
    assert "refused" in line.lower(), line
    assert "s3cret" not in line


@pytest.mark.parametrize("backend", sorted(URLS))
async def test_bus_start_raises_connection_lost_from_the_driver_error(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    url, shown = (u.format(port=port) for u in URLS[backend])
    caplog.set_level(logging.DEBUG)
    bus = Bus.from_url(url)
    with pytest.raises(ConnectionLost) as info:
        await bus.start()
    await bus.close()
    assert str(info.value).startswith(f"cannot connect to {shown}: ")
    assert "refused" in str(info.value).lower()
    cause = info.value.__cause__
    assert cause is not None and not isinstance(cause, SquadbusError), repr(cause)
    noise = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert noise == [], noise
