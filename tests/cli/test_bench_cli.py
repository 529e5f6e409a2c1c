"""``squadbus bench``: what it reports on memory:// and a real redis-server, and its one-line refusals.

The command function runs in-process with CliRunner and small loads. What it
reports is checked, never how fast: timings on a shared machine are not assertions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from squadbus.cli.bench import bench, parse_size, redacted
from squadbus.testing.servers.process import free_port
from squadbus.testing.servers.redis import RedisServer

FIGURES = ("p50", "p99", "p99.9", "p99.99", "max")
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(bench, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _check_line(line: dict[str, Any], *, senders: int) -> None:
    assert line["senders"] == senders
    assert line["sent"] == line["acked"] == line["received"] > 0
    assert line["lost"] == 0 and line["duplicates"] == 0
    assert line["msgs_per_s"] > 0
    for latency in ("publish_ack_ms", "end_to_end_ms", "sender_lag_ms"):
        figures = line[latency]
        assert figures["count"] == line["sent"], latency
        for name in FIGURES:
            assert figures[name] is not None and figures[name] >= 0, (latency, name)
    assert line["end_to_end_ms"]["max"] >= line["end_to_end_ms"]["p50"]
    assert "join_s" in line["one_time_s"]
    assert line["timeline"] and {"t_s", "msgs_per_s", "e2e_p99_ms"} <= set(line["timeline"][0])
    assert line["broker"]["version"] and line["broker"]["durability"]


def test_memory_open_loop_reports_every_figure_the_raw_line_the_ratio_and_a_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, stdout, stderr = _run("--url", "memory://", "--rate", "400", "--duration", "0.3", "--senders", "8",
                                "--senders", "1", "--json", str(out), "--plot", str(png), "--progress")
    assert code == 0, stdout + stderr
    document = json.loads(out.read_text())
    assert document["mode"] == "rate" and document["rate"] == 400 and document["size_bytes"] == 1024
    assert document["broker"]["name"].startswith("memory") and "not durable" in document["broker"]["durability"]
    assert [run["senders"] for run in document["runs"]] == [8, 1]
    for run in document["runs"]:
        _check_line(run["raw"], senders=run["senders"])
        _check_line(run["squadbus"], senders=run["senders"])
        assert run["raw"]["side"].startswith("asyncio.Queue")
        assert run["squadbus"]["side"].startswith("squadbus")
        assert run["ratio"]["throughput"] > 0 and run["ratio"]["e2e_p99"] is not None
    # the table names the broker and prints the ratio; the bar went to stderr
    assert "ratio squadbus/raw: throughput" in stdout and "broker: memory" in stdout
    assert "[#" in stderr
    assert png.read_bytes()[:8] == PNG


def test_max_mode_with_a_count_and_json_on_stdout_stays_clean() -> None:
    code, stdout, _ = _run("--url", "memory://", "--max", "--count", "300", "--senders", "4", "--size", "256B",
                           "--json", "-", "--progress")
    assert code == 0
    document = json.loads(stdout)  # the progress bar never reaches stdout
    assert document["mode"] == "max" and document["count"] == 300 and document["size_bytes"] == 256
    [run] = document["runs"]
    for side in ("raw", "squadbus"):
        assert run[side]["sent"] == run[side]["received"] == 300
        assert run[side]["offered_rate"] is None


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer("fast")
    try:
        server.start()
        yield server.url
    finally:
        server.cleanup()


def test_redis_beside_redis_py_with_the_server_version_and_profile(redis_url: str) -> None:
    code, stdout, stderr = _run("--url", redis_url, "--rate", "300", "--duration", "0.3", "--senders", "10",
                                "--json", "-")
    assert code == 0, stdout + stderr
    document = json.loads(stdout)
    broker = document["broker"]
    assert broker["name"] == "redis" and broker["version"][0].isdigit()
    assert "profile=fast" in broker["durability"] and "appendonly=off" in broker["durability"]
    [run] = document["runs"]
    _check_line(run["raw"], senders=10)
    _check_line(run["squadbus"], senders=10)
    assert run["raw"]["side"].startswith("redis-py") and "XREADGROUP" in run["raw"]["side"]
    assert run["squadbus"]["broker"] == run["raw"]["broker"] == broker
    assert set(run["ratio"]) == {"throughput", "e2e_p50", "e2e_p99"}
    assert "connect_s" in run["squadbus"]["one_time_s"] and "subscribe_s" in run["raw"]["one_time_s"]


def _one_line_error(code: int, stdout: str, stderr: str, *words: str) -> None:
    assert code == 1
    assert stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("squadbus: error:")
    for word in words:
        assert word in line, line


def test_a_url_without_a_benchmark_is_one_line() -> None:
    _one_line_error(*_run("--url", "nope://x"), "nope://x")


def test_a_down_server_is_one_line() -> None:
    _one_line_error(*_run("--url", f"redis://127.0.0.1:{free_port()}/0", "--duration", "0.2"))


def test_rate_and_max_together_are_refused() -> None:
    _one_line_error(*_run("--url", "memory://", "--rate", "10", "--max"), "--max")


def test_sizes() -> None:
    assert parse_size("1KiB") == 1024 and parse_size("512") == 512 and parse_size("4kB") == 4000
    with pytest.raises(ValueError):
        parse_size("lots")
    _one_line_error(*_run("--url", "memory://", "--size", "8"), "--size")


def test_the_report_never_shows_a_password() -> None:
    assert redacted("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted("nats://bob:pw@h:4222?profile=fast") == "nats://bob:***@h:4222?profile=fast"
    assert redacted("memory://") == "memory://"
