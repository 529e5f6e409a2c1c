"""``squadbus bench`` on amqp:// against the session's RabbitMQ node: squadbus beside raw aio-pika, the
node's version and what a confirm means; what the bench created is removed. Figures are never asserted."""

from __future__ import annotations

import json

import pytest

from squadbus.testing.servers.rabbitmq import RabbitServer
from tests.cli.test_bench_cli import _check_line, _one_line_error, _run

pytestmark = pytest.mark.rabbitmq


def test_rabbitmq_beside_aio_pika_with_the_node_version(rabbitmq_server: RabbitServer, rabbitmq_url: str) -> None:
    code, stdout, stderr = _run("--url", rabbitmq_url, "--rate", "200", "--duration", "0.3", "--senders", "10",
                                "--json", "-")
    assert code == 0, stdout + stderr
    document = json.loads(stdout)
    broker = document["broker"]
    assert broker["name"] == "RabbitMQ" and broker["version"][0].isdigit()
    assert "profile=durable" in broker["durability"]
    [run] = document["runs"]
    _check_line(run["raw"], senders=10)
    _check_line(run["squadbus"], senders=10)
    assert run["raw"]["side"].startswith("aio-pika") and run["squadbus"]["side"].startswith("squadbus")
    queues = rabbitmq_server.ctl("list_queues", "name", "--quiet").split()
    assert [q for q in queues if q.startswith(("bench-", "raw-"))] == [], "the bench removes what it declared"


def test_no_suite_on_amqp_is_one_line(rabbitmq_url: str) -> None:
    _one_line_error(*_run("--url", rabbitmq_url, "--suite"), "--suite", "bench_rabbitmq.py")
