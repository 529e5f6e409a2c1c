"""``squadbus verify`` without brokers: the comparison, history stores on both sides, one-line errors.

The runs against Redis, NATS and Kafka are in tests/redis/test_verify_brokers.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from squadbus.cli.verify import Holdings, compare
from squadbus.core.envelope import Message
from squadbus.store import open_store
from squadbus.testing.servers.process import free_port
from tests.cli.conftest import clean_env, run_cli
from tests.store.suite import msg


def _held(messages: list[Message]) -> Holdings:
    held = Holdings()
    for message in messages:
        held.add(message)
    return held


def test_compare_reports_missing_extra_order_and_ignores_duplicates() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    source = [msg(execution=a, content=f"a{i}") for i in range(5)] + [msg(execution=b), msg(), msg()]
    only_there = msg(execution=b)
    swapped = [source[0], source[2], source[1], source[3]]  # a: a4 missing, a1/a2 swapped
    destination = [*swapped, source[3], source[5], source[6], only_there]  # a3 twice; 'none': one missing
    report = compare(_held(source), _held(destination))
    assert report.missing == {a: [source[4].id], None: [source[7].id]}
    assert report.extra == {b: [only_there.id]}
    assert report.order == {a: 1}
    assert report.destination.duplicates == 1
    assert not report.matches


def test_compare_same_ids_same_order_matches_even_with_duplicates() -> None:
    e = uuid.uuid4()
    messages = [msg(execution=e, content=str(i)) for i in range(3)] + [msg()]
    report = compare(_held(messages), _held([*messages, messages[1]]))
    assert report.matches
    assert (report.missing, report.extra, report.order) == ({}, {}, {})


def test_order_is_not_checked_for_messages_without_execution() -> None:
    one, two = msg(), msg()
    assert compare(_held([one, two]), _held([two, one])).matches


async def _store(path: Path, messages: list[Message]) -> str:
    url = f"sqlite+aiosqlite:///{path}"
    async with open_store(url) as store:
        await store.write(messages)
    return url


def test_two_stores_match_then_differ_by_exactly_the_ids(tmp_path: Path) -> None:
    executions = [uuid.uuid4() for _ in range(3)]
    old = datetime.now(UTC) - timedelta(hours=2)
    early = [msg(execution=executions[0], content="early", created_at=old)]
    messages = [msg(execution=executions[i % 3], content=f"m{i}") for i in range(30)] + [msg(), msg(recipient=None)]
    dropped = {messages[4].id, messages[17].id, messages[31].id}
    extra = msg(execution=executions[1], content="only on the destination")
    full = asyncio.run(_store(tmp_path / "a.db", early + messages))
    same = asyncio.run(_store(tmp_path / "b.db", early + messages))
    partial = asyncio.run(_store(tmp_path / "c.db", [m for m in messages if m.id not in dropped] + [extra]))
    env = clean_env(tmp_path / "data")

    ok = run_cli(["verify", "--from", full, "--to", same], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "messages" in ok.stdout and "33" in ok.stdout and ok.stdout.rstrip().endswith("match")

    differ = run_cli(["verify", "--from", full, "--to", partial, "--json"], env)
    assert differ.returncode == 1, differ.stderr
    report = json.loads(differ.stdout)
    missing = {uuid.UUID(item["id"]) for item in report["missing"]["ids"]}
    assert missing == dropped | {early[0].id}
    assert report["missing"]["count"] == 4
    assert [item["id"] for item in report["extra"]["ids"]] == [str(extra.id)]
    assert report["from"]["messages"] == 33 and report["to"]["messages"] == 30

    text = run_cli(["verify", "--from", full, "--to", partial, "--show", "2"], env)
    assert text.returncode == 1
    assert "missing on the destination: 4" in text.stdout and "... and 2 more" in text.stdout
    assert str(extra.id) in text.stdout

    recent = run_cli(["verify", "--from", full, "--to", partial, "--since", "1h", "--json"], env)
    assert json.loads(recent.stdout)["missing"]["count"] == 3, "the 2-hour-old message is left out"

    direct = run_cli(["verify", "--from", full, "--to", partial, "--pattern", "agent.message.broadcast",
                      "--json"], env)
    report = json.loads(direct.stdout)
    assert report["missing"]["ids"] == [{"execution": "none", "id": str(messages[31].id)}]
    assert report["extra"]["count"] == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--from", "memory://", "--to", "redis://127.0.0.1:6379/0"], "verify: --from: cannot verify memory://"),
        (["--from", "redis://127.0.0.1:6379/0", "--to", "dual://memory://|memory://"], "verify: --to: cannot verify dual://"),
        (["--from", "redis://x", "--to", "redis://y", "--since", "yesterday"], "verify: Invalid value for --since"),
        (["--from", "redis://x", "--to", "redis://y", "--pattern", "foo.>"], "verify: --pattern 'foo.>' is outside"),
        (["--from", "sqlite+aiosqlite:////nonexistent/h.db", "--to", "redis://y"], "verify: --from: no history at"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_cli(["verify", *args], clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""


@pytest.mark.parametrize("scheme", ["redis", "nats", "kafka"])
def test_a_broker_that_is_down_is_one_line_and_exit_2(tmp_path: Path, scheme: str) -> None:
    down = f"{scheme}://127.0.0.1:{free_port()}"
    store = asyncio.run(_store(tmp_path / "a.db", [msg()]))
    result = run_cli(["verify", "--from", store, "--to", down], clean_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"verify: --to: cannot connect to {down}"), result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
