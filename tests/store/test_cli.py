"""``squadbus history`` and ``squadbus retention`` through click's CliRunner, on a SQLite file."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from squadbus.cli.main import main
from squadbus.store import StoredMessage, open_store
from tests.store.suite import msg


@pytest.fixture
def seeded(sqlite_url: str) -> tuple[str, uuid.UUID, list[StoredMessage]]:
    execution = uuid.uuid4()
    t0 = datetime.now(UTC) - timedelta(hours=3)
    batch = [
        msg("pm", "dev-1", execution=execution, message_type="task", content="build login", created_at=t0),
        msg("dev-1", "pm", execution=execution, message_type="status", content="done",
            created_at=t0 + timedelta(hours=2, minutes=30)),
        msg("qa", None, content="release today", created_at=t0 + timedelta(hours=2, minutes=45)),
    ] + [msg("bot", "pm", execution=execution, content=f"tick {i}") for i in range(5)]

    async def seed() -> list[StoredMessage]:
        async with open_store(sqlite_url) as store:
            return await store.write(batch)

    return sqlite_url, execution, asyncio.run(seed())


def invoke(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={"SQUADBUS_STORE_URL": url}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_history_filters_and_json(seeded: tuple[str, uuid.UUID, list[StoredMessage]]) -> None:
    url, execution, stored = seeded
    code, out, _ = invoke(url, "history", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["message"]["id"] for r in rows] == [str(s.message.id) for s in stored]
    assert rows[0]["seq"] == 1
    assert rows[0]["message"]["content"] == "build login"

    code, out, _ = invoke(url, "history", "--execution", str(execution), "--agent", "pm", "--type", "status")
    assert code == 0
    [line] = out.splitlines()
    assert "dev-1 → pm [status] done" in line
    assert f"{str(execution)[:8]}#2" in line

    code, out, _ = invoke(url, "history", "--agent", "qa")
    assert out.splitlines()[0].endswith(" - qa → * [message] release today")

    code, out, _ = invoke(url, "history", "--since", "1h", "--until", datetime.now(UTC).isoformat(), "--json")
    assert [json.loads(line)["message"]["content"] for line in out.splitlines()] == (
        ["done", "release today"] + [f"tick {i}" for i in range(5)]
    )


def test_history_limit_and_cursor(seeded: tuple[str, uuid.UUID, list[StoredMessage]]) -> None:
    url, _, _ = seeded
    code, out, err = invoke(url, "history", "--agent", "bot", "--limit", "3", "--json")
    assert code == 0
    assert len(out.splitlines()) == 3
    assert "--cursor " in err
    cursor = err.split("--cursor ", 1)[1].split()[0]
    code, out, err = invoke(url, "history", "--agent", "bot", "--cursor", cursor, "--json")
    assert [json.loads(line)["message"]["content"] for line in out.splitlines()] == ["tick 3", "tick 4"]
    assert "--cursor" not in err
    assert err.startswith("history: from the store sqlite+aiosqlite:///")


def test_history_bad_input(seeded: tuple[str, uuid.UUID, list[StoredMessage]]) -> None:
    sqlite_url, _, _ = seeded
    code, _, err = invoke(sqlite_url, "history", "--execution", "not-a-uuid")
    assert code == 2
    assert "not a UUID" in err
    code, _, err = invoke(sqlite_url, "history", "--since", "yesterday-ish")
    assert code == 2
    code, _, err = invoke(sqlite_url, "history", "--cursor", "garbage")
    assert code == 1
    assert err.splitlines()[-1].startswith("squadbus: error: invalid cursor")
    code, _, err = invoke(sqlite_url, "history", "--store", "mysql://nope")
    assert code == 1
    assert "unknown store URL" in err


def test_retention(seeded: tuple[str, uuid.UUID, list[StoredMessage]]) -> None:
    url, _, _ = seeded
    code, out, _ = invoke(url, "retention", "--older-than-days", "1")
    assert code == 0
    assert out.startswith("deleted 0 messages")
    code, out, _ = invoke(url, "retention", "--older-than-days", "0")
    assert out.startswith("deleted 8 messages")
    code, out, _ = invoke(url, "history")
    assert out == ""
    code, _, err = invoke(url, "retention")
    assert code == 2
    assert "--older-than-days" in err


def test_retention_on_a_missing_store_deletes_nothing_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here" / "history.db"
    code, out, err = invoke(f"sqlite+aiosqlite:///{path}", "retention", "--older-than-days", "1")
    assert code == 0, err
    assert out.startswith("deleted 0 messages: no history at")
    assert not path.exists() and not path.parent.exists()
