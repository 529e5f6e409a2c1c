"""The command line: clear one-line errors, non-zero exits, and the demo squad."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from squadbus.cli.main import main


def test_version() -> None:
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0
    assert result.output.startswith("squadbus ")


def test_send_on_a_broker_url_checks_input_before_connecting() -> None:
    # redis on port 1 is never reached: the bad recipient fails first, in one line
    result = CliRunner().invoke(main, ["--url", "redis://127.0.0.1:1/0", "send", "pm", "bad.agent", "hello"])
    assert result.exit_code == 1
    assert result.output.startswith("squadbus: error:") and "bad.agent" in result.output


def test_errors_are_one_line_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "squadbus", "--url", "memory://", "--local-api", "http://127.0.0.1:1", "send", "pm",
         "bad.agent", "hi"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("squadbus: error:")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_env_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["version"], env={"MESSAGE_BUS": "carrier-pigeon"})
    assert result.exit_code == 2
    assert "MESSAGE_BUS" in result.output


def test_bad_metadata_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["send", "pm", "dev-1", "x", "--metadata", "[1"])
    assert result.exit_code == 2
    assert "not JSON" in result.output


def test_demo_runs_the_squad() -> None:
    result = subprocess.run([sys.executable, "-m", "squadbus", "--url", "memory://", "--local-api",
                             "http://127.0.0.1:1", "demo"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "squad done"
    assert "  dev-1 -> pm [status] done: build the login form" in lines
    assert "  dev-2 -> pm [status] done: add the session API" in lines
    assert sum("[reply] approved, ship it" in line for line in lines) == 2
    assert sum("kick-off" in line for line in lines) == 1  # a broadcast is one message, printed once


def test_bench_reports_squadbus_beside_the_raw_baseline() -> None:
    result = CliRunner().invoke(
        main, ["bench", "--url", "memory://", "--suite", "--count", "2000", "--rate", "2000", "--json"])
    assert result.exit_code == 0, result.output
    names = {row["name"]: row for row in json.loads(result.output)["results"]}
    assert "raw asyncio.Queue (no envelope)" in names
    ours = names["squadbus memory direct (1 agents)"]
    assert ours["count"] == 2000 and ours["msgs_per_s"] > 0
    latency = names["squadbus memory open loop 2000/s"]
    assert latency["p50_ms"] <= latency["p99_ms"] <= latency["p999_ms"]


def test_bench_without_a_benchmark_for_the_url_is_one_line() -> None:
    result = CliRunner().invoke(main, ["bench", "--url", "dual://memory://|memory://"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("squadbus: error: no benchmark for")
