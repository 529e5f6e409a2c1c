"""One squad across processes: ``squadbus serve`` in one child, the CLI in others, as a user runs them.

The CLI reaches the served squad through its HTTP API: given by ``SQUADBUS_API`` (or ``--api``), or,
on ``memory://``, found at the local default address (here ``--local-api``, so the test needs no port 8000).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

from tests.cli.conftest import SQUADBUS, LineReader, Served, clean_env, run_cli, serving

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def conversation_line(item: dict[str, object]) -> str:
    """How ``squadbus demo`` prints one message."""
    to = item["recipient_id"] or (f"domain:{item['domain']}" if item["domain"] else "*")
    return f"  {item['sender_id']} -> {to} [{item['message_type']}] {item['content']}"


def test_send_reaches_the_served_history(served: Served, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "client-data", SQUADBUS_API=served.url)
    execution = str(uuid.uuid4())
    sent = run_cli(["send", "pm", "dev-1", "hi", "--execution", execution], env)
    assert sent.returncode == 0, sent.stderr
    message_id = json.loads(sent.stdout)["id"]

    assert [(m["id"], m["content"]) for m in served.history(task_execution_id=execution)] == [(message_id, "hi")]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = subprocess.run([*SQUADBUS, "history", "--execution", execution, "--json"], env=env, cwd=elsewhere,
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line)["message"]["id"] for line in shown.stdout.splitlines()] == [message_id]
    assert served.url in shown.stderr
    assert list(elsewhere.iterdir()) == []
    assert not (tmp_path / "client-data").exists()


def test_a_tail_started_before_a_send_prints_it(served: Served, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "client-data", SQUADBUS_API=served.url)
    tail = subprocess.Popen([*SQUADBUS, "tail", "agent.message.>", "--count", "1", "--json"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tail.stdout is not None and tail.stderr is not None
    err, out = LineReader(tail.stderr), LineReader(tail.stdout)
    try:
        ready = err.next(timeout=30)
        assert ready is not None and served.url in ready, ready
        sent = run_cli(["send", "pm", "*", "all hands"], env)  # no execution: it must appear too
        assert sent.returncode == 0, sent.stderr
        line = out.next(timeout=30)
        assert line is not None
        shown = json.loads(line)
        assert shown["id"] == json.loads(sent.stdout)["id"]
        assert (shown["sender_id"], shown["subject"], shown["content"]) == ("pm", "agent.message.broadcast",
                                                                           "all hands")
        assert tail.wait(timeout=30) == 0
    finally:
        tail.kill()
        tail.wait()
        for reader, pipe in ((err, tail.stderr), (out, tail.stdout)):
            reader.join()
            pipe.close()


def test_memory_url_finds_the_local_service(served: Served, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "client-data")
    sent = run_cli(["--local-api", served.url, "send", "pm", "dev-1", "found you"], env)
    assert sent.returncode == 0, sent.stderr
    assert [m["content"] for m in served.history(agent_id="dev-1")] == ["found you"]


def test_demo_conversation_reaches_the_service_in_order(served: Served, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "client-data", SQUADBUS_API=served.url)
    demo = run_cli(["demo"], env)
    assert demo.returncode == 0, demo.stderr
    execution = UUID_RE.search(demo.stdout.splitlines()[0])
    assert execution is not None, demo.stdout
    printed = [line for line in demo.stdout.splitlines() if line.startswith("  ")]
    stored = served.history(task_execution_id=execution.group(0))
    assert len(stored) >= 10
    assert [conversation_line(m) for m in stored] == printed


def test_stdin_content_and_allow_empty_reach_the_service(served: Served, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "client-data", SQUADBUS_API=served.url)
    big = "line one\n" + "x" * 300_000 + "\nlast line\n"
    sent = run_cli(["send", "pm", "dev-1", "-", "--type", "report"], env, stdin=big)
    assert sent.returncode == 0, sent.stderr
    empty = run_cli(["send", "pm", "dev-1", "", "--allow-empty", "--type", "ping"], env)
    assert empty.returncode == 0, empty.stderr
    stored = {m["message_type"]: m["content"] for m in served.history(agent_id="dev-1")}
    assert stored == {"report": big, "ping": ""}


def test_tokens_come_from_squadbus_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [
        {"token": "pm-secret-token", "role": "agent", "agent_id": "pm"},
        {"token": "board-secret-token", "role": "viewer"},
    ]}))
    with serving(tmp_path, "--tokens-file", str(tokens)) as secured:
        anonymous = clean_env(tmp_path / "client-data")
        refused = run_cli(["--local-api", secured.url, "send", "pm", "dev-1", "no token"], anonymous)
        assert refused.returncode == 1
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith("squadbus: error:") and "401" in line

        as_pm = clean_env(tmp_path / "client-data", SQUADBUS_API=secured.url, SQUADBUS_TOKEN="pm-secret-token")
        assert run_cli(["send", "pm", "dev-1", "with a token"], as_pm).returncode == 0
        impostor = run_cli(["send", "dev-1", "pm", "not me"], as_pm)
        assert impostor.returncode == 1 and "403" in impostor.stderr
        squad_wide = run_cli(["tail", "--count", "1"], as_pm, timeout=30)
        assert squad_wide.returncode == 1 and "403" in squad_wide.stderr

        as_board = clean_env(tmp_path / "client-data", SQUADBUS_API=secured.url,
                             SQUADBUS_TOKEN="board-secret-token")
        shown = run_cli(["history", "--json"], as_board)
        assert shown.returncode == 0, shown.stderr
        assert [json.loads(line)["message"]["content"] for line in shown.stdout.splitlines()] == ["with a token"]
        replay = run_cli(["tail", "--from-start", "--count", "1"], as_board, timeout=30)
        assert replay.returncode == 0, replay.stderr
        [shown] = replay.stdout.splitlines()  # the readable line (not a terminal: whole, no colour)
        assert shown.endswith(" - pm → dev-1 [message] with a token"), shown
