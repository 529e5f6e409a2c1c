"""``squadbus plan``: the backend it picks and why, from the design's triggers, measured capacities and a
live ``squadbus serve`` (the command function run with CliRunner)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from squadbus.cli.api import ApiClient
from squadbus.cli.plan import MEASURED, plan
from tests.cli.conftest import Served, closed_port_url


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(plan, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _plan(*args: str) -> dict[str, Any]:
    code, stdout, stderr = _run(*args, "--json")
    assert code == 0, stdout + stderr
    document: dict[str, Any] = json.loads(stdout)
    return document


def test_the_guides_first_scenario_stays_in_process_with_sqlite() -> None:
    document = _plan("--agents", "100", "--msgs-per-hour", "10")
    assert document["backend"] == "memory" and document["crossed"] == []
    assert document["msgs_per_hour"] == 1000 and document["msgs_per_day"] == 24_000
    code, stdout, _ = _run("--agents", "100", "--msgs-per-hour", "10")
    assert code == 0
    assert "run: in-process (memory://) + SQLite history" in stdout and "crossed: none" in stdout


def test_five_thousand_agents_move_to_a_broker_with_the_reason_and_every_trigger_crossed() -> None:
    document = _plan("--agents", "5000", "--msgs-per-hour", "10")
    assert document["backend"] in ("nats", "redis")
    assert document["crossed"] == ["agents > 1,000", "msgs/s > 10", "msgs/day > 50,000"]
    assert "agents > 1,000 (5,000)" in document["reason"] and "deploy NATS" in document["reason"]
    costs = document["costs"]
    assert costs["redis"]["managed"].startswith("$80") and costs["nats"]["self_hosted"].startswith("$50")
    assert costs["kafka"]["managed"].startswith("$300") and "guide" in costs["kafka"]["source"]
    code, stdout, _ = _run("--agents", "5000", "--msgs-per-hour", "10")
    assert code == 0 and "CROSSED agents > 1,000" in stdout and "Cost Analysis" in stdout


def test_only_the_rate_trigger() -> None:
    document = _plan("--agents", "800", "--msgs-per-hour", "60")  # 13.3 msgs/s, 1.15M msgs/day
    assert document["crossed"] == ["msgs/s > 10", "msgs/day > 50,000"]
    assert document["backend"] != "memory"


def _bench_file(path: Path, backend: str, msgs_per_s: float) -> str:
    line = {"msgs_per_s": msgs_per_s, "lost": 0, "received": 10, "sent": 10}
    path.write_text(json.dumps({"backend": backend, "mode": "max", "rate": None,
                                "broker": {"name": backend, "version": "1.0"},
                                "runs": [{"squadbus": line, "raw": line}]}))
    return str(path)


def test_measured_capacities_from_bench_files_decide_between_brokers(tmp_path: Path) -> None:
    slow_nats = _bench_file(tmp_path / "nats.json", "nats", 150)
    fast_redis = _bench_file(tmp_path / "redis.json", "redis", 40_000)
    # 5,000 x 50 msgs/h = 69.4 msgs/s average, x3 headroom = 208 msgs/s: more than NATS measured here
    document = _plan("--agents", "5000", "--msgs-per-hour", "50", "--bench", slow_nats, "--bench", fast_redis)
    assert document["backend"] == "redis"
    nats = document["capacities"]["nats"]
    assert nats["msgs_per_s"] == 150 and "nats.json" in nats["source"]
    assert document["capacities"]["kafka"] == {"msgs_per_s": MEASURED["kafka"].msgs_per_s,
                                               "source": MEASURED["kafka"].source}
    assert "NATS did not measure enough" in document["reason"]


def test_without_a_squad_or_a_service_it_is_one_line() -> None:
    code, stdout, stderr = _run("--agents", "10")
    assert code == 1 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("squadbus: error:") and "--msgs-per-hour" in line


def test_a_service_that_does_not_answer_is_one_line() -> None:
    code, stdout, stderr = _run("--from", closed_port_url(), "--sample", "0.1")
    assert code == 1 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("squadbus: error: no squadbus service answers")


def test_live_figures_from_a_running_service(served: Served) -> None:
    client = ApiClient(served.url)
    execution = str(uuid.uuid4())
    for i in range(30):
        client.send({"sender_id": f"agent-{i % 6}", "recipient_id": "pm", "content": f"status {i}",
                     "task_execution_id": execution})
    document = _plan("--from", served.url, "--sample", "0.3")
    live = document["live"]
    assert live["agents_total"] == 7 and live["agents_active"] == 7  # six senders and pm
    assert live["messages_last_hour"] == 30 and live["hour_complete"] is True
    assert live["peak_msgs_per_s"] > 0 and live["peak_minute"]
    assert live["backend"] == "memory"
    assert document["agents"] == 7 and document["msgs_per_hour"] == 30
    assert document["backend"] == "memory" and document["crossed"] == []
    # the planned squad from the options, the live peak still counted for the rate trigger
    document = _plan("--from", served.url, "--sample", "0.1", "--agents", "2000", "--msgs-per-hour", "1")
    assert document["crossed"] == ["agents > 1,000"] and document["backend"] != "memory"
    code, stdout, _ = _run("--from", served.url, "--sample", "0.1")
    assert code == 0 and "7 active in the last hour" in stdout and "messages in the last hour: 30" in stdout


def test_rabbitmq_is_picked_from_an_amqp_bench_file_when_the_others_measured_too_little(tmp_path: Path) -> None:
    files = [_bench_file(tmp_path / f"{b}.json", b, 100) for b in ("nats", "redis", "kafka")]
    rabbit = _bench_file(tmp_path / "rabbit.json", "amqp", 5_000)
    document = _plan("--agents", "5000", "--msgs-per-hour", "50", *(f for path in [*files, rabbit]
                                                                     for f in ("--bench", path)))
    assert document["backend"] == "rabbitmq"
    assert document["capacities"]["rabbitmq"]["msgs_per_s"] == 5_000
    assert "RabbitMQ did" in document["reason"]
    assert "Comparison Matrix" in document["costs"]["rabbitmq"]["range"]


def test_rabbitmq_has_a_built_in_capacity_and_cost_line() -> None:
    document = _plan("--agents", "5000", "--msgs-per-hour", "50")
    assert document["capacities"]["rabbitmq"] == {"msgs_per_s": MEASURED["rabbitmq"].msgs_per_s,
                                                  "source": MEASURED["rabbitmq"].source}
    assert document["backend"] != "rabbitmq"  # the guide ranks it last
