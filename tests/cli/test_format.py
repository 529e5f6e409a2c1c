"""The readable message line of ``squadbus tail`` and ``squadbus history``: each kind of message, cutting to
the terminal width, escaping what an agent sends, colour rules, and ``--json`` left as it was."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from squadbus.cli.format import (
    TYPE_PALETTE,
    LineFormat,
    clean,
    cut,
    display_width,
    from_api,
    line,
    stamp,
    type_colour,
)
from squadbus.cli.main import main
from squadbus.cli.tail import show_delivery
from squadbus.core import envelope
from squadbus.core.backend import Delivery
from squadbus.core.envelope import Message
from squadbus.store import open_store
from tests.cli.conftest import SQUADBUS, clean_env

EXECUTION = uuid.UUID("3f2a9c1e-0000-4000-8000-000000000001")
REQUEST_ID = uuid.UUID("9b1c0d2e-0000-4000-8000-000000000002")
HOSTILE = "evil\x1b[2J\nsecond line"
HOSTILE_ID = uuid.UUID("e7110000-0000-4000-8000-000000000003")
AT = datetime(2025, 3, 14, 9, 26, 53, 589_000, tzinfo=UTC)
PLAIN = LineFormat(utc=True)
ESC = "\x1b"


def build(subject: str, sender: str = "pm", content: str = "hello", **fields: Any) -> Message:
    fields.setdefault("task_execution_id", EXECUTION)
    fields.setdefault("created_at", AT)
    return envelope.build(subject=subject, sender_id=sender, content=content, **fields)


def direct(content: str = "build the login form", **fields: Any) -> Message:
    fields.setdefault("message_type", "task")
    return build("agent.message.dev-1", content=content, recipient_id="dev-1", **fields)


def request() -> Message:
    return build("agent.message.reviewer", "dev-1", "review my work", recipient_id="reviewer", id=REQUEST_ID,
                 message_type="request", headers={"reply_to": f"agent.reply.abc123.{REQUEST_ID}"})


def reply() -> Message:
    return build(f"agent.reply.abc123.{REQUEST_ID}", "reviewer", "approved, ship it", recipient_id="dev-1",
                 message_type="reply", headers={"correlation_id": str(REQUEST_ID)})


# ---- each kind of message -------------------------------------------------------------------


def test_direct_message() -> None:
    assert line(direct(), PLAIN, seq=4) == "2025-03-14T09:26:53.589Z 3f2a9c1e#4 pm → dev-1 [task] build the login form"


def test_domain_and_squad_broadcasts() -> None:
    domain = build("agent.message.domain.dev", domain="dev", content="stand-up at 10", message_type="announce")
    squad = build("agent.message.broadcast", content="kick-off", task_execution_id=None)
    assert line(domain, PLAIN).endswith(" 3f2a9c1e pm → #dev [announce] stand-up at 10")
    assert line(squad, PLAIN, seq=9).endswith(" - pm → * [message] kick-off")  # no execution: no seq either


def test_a_request_and_its_reply_carry_the_same_short_id() -> None:
    assert line(request(), PLAIN).endswith(" dev-1 → reviewer [request] ?9b1c0d2e review my work")
    assert line(reply(), PLAIN).endswith(" reviewer → dev-1 [reply] ↩9b1c0d2e approved, ship it")
    # a reply whose publisher set no correlation header is still known by its subject
    bare = build(f"agent.reply.abc123.{REQUEST_ID}", "reviewer", "ok", recipient_id="dev-1", message_type="reply")
    assert "[reply] ↩9b1c0d2e ok" in line(bare, PLAIN)


def test_a_redelivery_shows_its_attempt() -> None:
    assert "[task] (attempt 3) build" in line(direct(), PLAIN, attempt=3)
    assert "attempt" not in line(direct(), PLAIN, attempt=1)


def test_local_time_leaves_out_todays_date_only() -> None:
    local = AT.astimezone()
    clock = f"{local:%H:%M:%S}.589"
    assert stamp(AT, utc=False, today=local.date()) == clock
    assert stamp(AT, utc=False, today=local.date() + timedelta(days=1)) == f"{local.date().isoformat()} {clock}"
    assert line(direct(), LineFormat(today=local.date())).startswith(f"{clock} 3f2a9c1e ")
    assert stamp(datetime.now(UTC), utc=False).count(":") == 2  # today by default: no date


def test_empty_content_ends_the_line_at_the_tag() -> None:
    assert line(direct(""), PLAIN).endswith("pm → dev-1 [task]")


# ---- content on one line, cut to the terminal ------------------------------------------------


def test_line_breaks_and_tabs_stay_on_one_line() -> None:
    shown = line(direct("one\ntwo\r\nthree\rfour\u2028five\tsix"), PLAIN)
    assert "\n" not in shown and "\r" not in shown and "\t" not in shown
    assert shown.endswith("[task] one⏎two⏎three⏎four⏎five six")


def test_long_content_is_cut_to_the_width_with_an_ellipsis() -> None:
    long = direct("word " * 100)
    for width in (60, 80, 133):
        shown = line(long, LineFormat(utc=True, width=width))
        assert display_width(shown) == width and shown.endswith("…"), (width, shown)
    assert line(direct("short"), LineFormat(utc=True, width=80)).endswith("[task] short")
    assert "…" not in line(long, PLAIN)  # not a terminal: the whole content


def test_wide_characters_are_cut_by_display_width() -> None:
    assert display_width("東京abc") == 7
    assert display_width("e\u0301") == 1  # a combining accent takes no column
    assert cut("東京東京", 5) == "東京…"  # 4 columns + the ellipsis; half a character is never printed
    assert cut("東京東京", 4) == "東…"
    assert cut("東京", 4) == "東京"
    shown = line(direct("東京の新しいログイン画面を作ってください" * 5), LineFormat(utc=True, width=71))
    assert display_width(shown) in (70, 71) and shown.endswith("…")


def test_colours_do_not_count_toward_the_width() -> None:
    shown = line(direct("word " * 100), LineFormat(utc=True, width=80, color=True))
    assert ESC in shown
    assert display_width(click.unstyle(shown)) == 80


# ---- nothing an agent sends reaches the terminal raw -----------------------------------------


@pytest.mark.parametrize("color", [False, True])
def test_control_characters_are_escaped(color: bool) -> None:
    hostile = "clear\x1b[2Jthe\x1b]0;pwned\x07screen\x08\x00 \u202eevil\u200b"
    shown = line(direct(hostile, message_type="x\x1b[31m"), LineFormat(utc=True, color=color))
    assert "\\x1b[2J" in shown and "\\x1b]0;pwned\\x07" in shown and "\\x08\\x00" in shown
    assert "\\u202e" in shown and "\\u200b" in shown and "[x\\x1b[31m]" in shown
    assert "\x1b[2J" not in shown and "\x07" not in shown and "\u202e" not in shown
    if color:  # every escape sequence left is one of ours: a colour, bold, dim or reset
        assert set(click.unstyle(shown)) & {ESC, "\x07", "\x08", "\x00"} == set()
    else:
        assert ESC not in shown


def test_clean_keeps_printable_text_as_is() -> None:
    text = "naïve café 東京 🚀 done: ok → next"
    assert clean(text) is text
    assert clean("a\u00a0b\u3000c") == "a b c"  # other spaces become a plain space


# ---- colour rules ----------------------------------------------------------------------------


def test_a_type_keeps_its_colour() -> None:
    assert type_colour("task") == "bright_yellow"  # CRC-32, not hash(): the same in every process
    assert {type_colour(t) for t in ("task", "status", "request", "reply", "announce")} <= set(TYPE_PALETTE)
    assert "\x1b[93m\x1b[1m[task]" in line(direct(), LineFormat(color=True, utc=True))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "choice", "no_color", "coloured"), [
    (Terminal(), "auto", None, True),
    (Terminal(), "auto", "1", False),
    (Terminal(), "never", None, False),
    (Terminal(), "always", "1", True),  # the flag beats the environment
    (io.StringIO(), "auto", None, False),
    (io.StringIO(), "always", None, True),
])
def test_when_lines_are_coloured(stream: io.StringIO, choice: str, no_color: str | None, coloured: bool) -> None:
    fmt = LineFormat.for_stream(stream, choice, no_color=no_color)
    assert fmt.color is coloured
    assert (fmt.width is not None) is isinstance(stream, Terminal)  # cut on a terminal only


# ---- the commands ----------------------------------------------------------------------------


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"
    messages = [direct(), request(), reply(), direct(HOSTILE, id=HOSTILE_ID)]

    async def seed() -> None:
        async with open_store(url) as store:
            await store.write(messages)

    asyncio.run(seed())
    return url


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, ["--url", "redis://127.0.0.1:1/0", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_history_prints_readable_lines(store_url: str) -> None:
    result = invoke("history", "--store", store_url, "--utc")
    assert result.stdout.splitlines() == [
        "2025-03-14T09:26:53.589Z 3f2a9c1e#1 pm → dev-1 [task] build the login form",
        "2025-03-14T09:26:53.589Z 3f2a9c1e#2 dev-1 → reviewer [request] ?9b1c0d2e review my work",
        "2025-03-14T09:26:53.589Z 3f2a9c1e#3 reviewer → dev-1 [reply] ↩9b1c0d2e approved, ship it",
        "2025-03-14T09:26:53.589Z 3f2a9c1e#4 pm → dev-1 [task] evil\\x1b[2J⏎second line",
    ]
    assert result.stderr.startswith("history: from the store sqlite+aiosqlite:///")


def test_history_colours_on_request_only(store_url: str) -> None:
    assert ESC not in invoke("history", "--store", store_url).stdout  # not a terminal
    coloured = invoke("history", "--store", store_url, "--color", "always", env={"NO_COLOR": "1"}).stdout
    assert "\x1b[1mpm\x1b[0m" in coloured and "\x1b[2J" not in coloured
    assert ESC not in invoke("history", "--store", store_url, "--color", "never").stdout


def test_history_json_is_unchanged(store_url: str) -> None:
    result = invoke("history", "--store", store_url, "--json", "--color", "always")
    rows = [json.loads(text) for text in result.stdout.splitlines()]
    assert [list(row) for row in rows] == [["seq", "stored_at", "message"]] * 4
    assert rows[3]["message"] == json.loads(json.dumps(direct(HOSTILE, id=HOSTILE_ID).to_dict()))
    assert "\\u001b[2J\\nsecond line" in result.stdout and ESC not in result.stdout


def test_tail_on_a_broker_prints_a_line_or_the_json_of_before(capsys: pytest.CaptureFixture[str]) -> None:
    message = direct("hi\nthere")
    show_delivery(Delivery(message, attempt=2), PLAIN)
    assert capsys.readouterr().out == "2025-03-14T09:26:53.589Z 3f2a9c1e pm → dev-1 [task] (attempt 2) hi⏎there\n"
    show_delivery(Delivery(message, attempt=2), None)
    assert capsys.readouterr().out == json.dumps({**message.to_dict(), "attempt": 2}, default=str) + "\n"


def test_a_service_event_reads_as_its_message() -> None:
    message = reply()
    data = {**json.loads(json.dumps(message.to_dict())), "seq": 7, "stored_at": AT.isoformat()}
    assert from_api(data) == (message, 7)


# ---- on a real terminal ----------------------------------------------------------------------


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    leader, follower = pty.openpty()
    try:
        yield leader, follower
    finally:
        for fd in (leader, follower):
            os.close(fd)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO once the child has closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.mark.parametrize("no_color", [None, "1"])
def test_history_on_a_terminal_is_cut_and_coloured_unless_no_color(
    store_url: str, tmp_path: Path, terminal: tuple[int, int], no_color: str | None,
) -> None:
    leader, follower = terminal
    env = clean_env(tmp_path / "data", COLUMNS="60", NO_COLOR=no_color or "")
    proc = subprocess.Popen([*SQUADBUS, "--url", "redis://127.0.0.1:1/0", "history", "--store", store_url],
                            env=env, stdout=follower, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.wait(timeout=60) == 0
        os.set_blocking(leader, False)
        out = _read_all(leader)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    lines = out.replace("\r\n", "\n").splitlines()
    assert len(lines) == 4
    assert (ESC in out) is (no_color is None)
    assert "\x1b[2J" not in out
    shown = [click.unstyle(text) for text in lines]
    assert all(display_width(text) <= 60 and text.endswith("…") for text in shown), shown
    first = shown[0]
    assert first.startswith(f"{AT.astimezone().date().isoformat()} ")  # not from today: dated
    assert "pm → dev-1 [task] build" in first and first.endswith("…")


def test_a_terminal_too_narrow_for_the_head_still_gets_one_line() -> None:
    for width in range(1, 60):
        shown = line(reply(), LineFormat(utc=True, width=width, color=True))
        assert display_width(click.unstyle(shown)) <= width and click.unstyle(shown).endswith("…"), (width, shown)
