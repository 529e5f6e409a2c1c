"""The README's example runs as printed and the README keeps its promises to newcomers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    start = text.index("```python\n") + len("```python\n")
    return text[start:text.index("```", start)]


def test_example_is_about_thirty_lines_and_runs(tmp_path: Path) -> None:
    code = _example()
    assert len(code.strip().splitlines()) <= 32
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    lines = set(result.stdout.splitlines())
    assert lines == {
        "dev-1 got task: build the login form",
        "dev-1 got broadcast: stand-up in 5 minutes",
        "pm got: done (approved)",
    }


def test_first_lines_give_the_two_commands_and_the_disclaimer() -> None:
    text = README.read_text()
    head = text.splitlines()[:6]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make check") for line in head)
    assert "not** the AWS project named *agent-squad*" in text
