"""One readable line per message, for ``squadbus tail`` and ``squadbus history``.

A line reads::

    14:03:08.001 3f2a9c1e#7 dev-1 → reviewer [request] ?9b1c0d2e review my work on: build the…

* the time the message was created, local ``HH:MM:SS.mmm`` (the date first when
  it is not today), or ISO 8601 in UTC with ``--utc``;
* the execution's first 8 hex digits and, when known, the message's seq in it
  (``-`` for a message outside any execution);
* ``sender → recipient`` for a direct message, ``sender → #domain`` for a domain
  broadcast, ``sender → *`` for a squad broadcast;
* the message type as a tag, coloured by a stable colour per type;
* ``?<id>`` on a request (it carries ``reply_to``) and ``↩<id>`` on the reply to
  it (the request's id, first 8 hex digits), so the two can be paired by eye;
* the content on one line: line breaks shown as ``⏎``, tabs as a space.

Text from a message never reaches the terminal raw: control and format
characters (escape sequences, bidi overrides, zero-width characters) are shown
as ``\\x1b``, ``\\u202e``…, so an agent cannot move the cursor, clear the screen
or recolour what follows. On a terminal the line is cut to its width (by display
width: a wide CJK character counts two columns) with ``…``; into a pipe or a file
the whole content is printed, on one line.

Colour: ``--color auto`` (the default) colours only when stdout is a terminal and
``NO_COLOR`` is unset or empty (https://no-color.org); ``always`` and ``never``
decide regardless.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any, TypeVar

import click

from squadbus.core import envelope, subjects
from squadbus.core.bus import CORRELATION_ID, REPLY_TO
from squadbus.core.envelope import Message

COLOR_CHOICES = ("auto", "always", "never")
TYPE_PALETTE = ("cyan", "green", "yellow", "magenta", "blue", "bright_cyan", "bright_green", "bright_magenta",
                "bright_blue", "bright_yellow")
"""Colours of type tags; a type always gets the same one (CRC-32 of its name), in every process."""
NEWLINE = "⏎"
ELLIPSIS = "…"
SHORT = 8
"""Hex digits shown of an execution or message id."""

_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_WIDE = frozenset({"W", "F"})
_F = TypeVar("_F", bound=Callable[..., Any])


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean(text: str) -> str:
    """``text`` safe to print on one terminal line: breaks as ⏎, tabs and other spaces as a space, other
    control, format and surrogate characters escaped (``\\x1b``)."""
    if text.isprintable():
        return text
    out: list[str] = []
    previous = ""
    for char in text:
        if char in _BREAKS:
            if not (char == "\n" and previous == "\r"):  # CR LF is one line break
                out.append(NEWLINE)
        elif char.isprintable():
            out.append(char)
        elif char == "\t" or unicodedata.category(char) == "Zs":
            out.append(" ")
        elif unicodedata.category(char) in ("Cn", "Co"):  # unassigned or private use: inert, shown as is
            out.append(char)
        else:
            out.append(_escape(char))
        previous = char
    return "".join(out)


def char_width(char: str) -> int:
    """Columns ``char`` takes on a terminal: 0 for a combining mark, 2 for a wide East Asian character."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in _WIDE else 1


def display_width(text: str) -> int:
    """Columns ``text`` (already :func:`clean`) takes on a terminal."""
    return len(text) if text.isascii() else sum(map(char_width, text))


def cut(text: str, width: int) -> str:
    """``text`` if it fits in ``width`` columns, else its start and ``…`` within ``width`` columns."""
    return text if display_width(text) <= width else _clip(text, width)


def _clip(text: str, width: int) -> str:
    # The start of text and an ellipsis, in width columns at most (never half a wide character).
    if width < 1:
        return ""
    used = 0
    for index, char in enumerate(text):
        used += char_width(char)
        if used > width - 1:
            return text[:index] + ELLIPSIS
    return text + ELLIPSIS


def type_colour(message_type: str) -> str:
    """The colour of a message type's tag: the same for a type in every run."""
    return TYPE_PALETTE[zlib.crc32(message_type.encode("utf-8", "surrogatepass")) % len(TYPE_PALETTE)]


def stamp(moment: datetime, *, utc: bool, today: date | None = None) -> str:
    """``HH:MM:SS.mmm`` local (the date first when not ``today``, default the local today), or UTC ISO 8601."""
    if utc:
        return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    local = moment.astimezone()
    clock = f"{local:%H:%M:%S}.{local.microsecond // 1000:03d}"
    return clock if local.date() == (today or date.today()) else f"{local.date().isoformat()} {clock}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LineFormat:
    """How message lines are printed: with colours or not, cut to ``width`` columns (None: never cut), in UTC
    or local time; ``today`` fixes the day whose dates are left out (None: the current local day)."""

    color: bool = False
    width: int | None = None
    utc: bool = False
    today: date | None = None

    @classmethod
    def for_stream(cls, stream: IO[str], color: str = "auto", *, no_color: str | None = None,
                   utc: bool = False) -> LineFormat:
        """The format for printing to ``stream``: cut and coloured (``color`` auto) only on a terminal;
        ``no_color`` is the value of NO_COLOR."""
        if color not in COLOR_CHOICES:
            raise ValueError(f"color must be one of {COLOR_CHOICES}, got {color!r}")
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty and isatty())
        coloured = color == "always" or (color == "auto" and tty and not no_color)
        width = shutil.get_terminal_size().columns if tty else None
        return cls(color=coloured, width=width, utc=utc)

    def style(self, text: str, **styles: Any) -> str:
        """``text`` with click styles when colours are on."""
        return click.style(text, **styles) if self.color and styles else text


def _target(message: Message) -> str:
    if message.recipient_id is not None:
        return clean(message.recipient_id)
    if message.domain is not None:
        return f"#{clean(message.domain)}"
    return "*"


def _short(value: object) -> str:
    return clean(str(value).replace("-", "")[:SHORT])


def _pairing(message: Message) -> str | None:
    correlation = message.headers.get(CORRELATION_ID)
    if correlation is None and message.subject.startswith(f"{subjects.REPLY_PREFIX}."):
        correlation = message.subject.rsplit(".", 1)[-1]
    if correlation is not None:
        return f"↩{_short(correlation)}"
    if REPLY_TO in message.headers:
        return f"?{_short(message.id)}"
    return None


def line(message: Message, fmt: LineFormat, *, seq: int | None = None, attempt: int | None = None) -> str:
    """One readable line for ``message`` (module docstring); ``seq`` its seq in its execution, ``attempt`` its
    delivery attempt (shown from 2)."""
    execution = "-" if message.task_execution_id is None else _short(message.task_execution_id)
    if seq is not None and message.task_execution_id is not None:
        execution += f"#{seq}"
    parts: list[tuple[str, dict[str, Any]]] = [
        (stamp(message.created_at, utc=fmt.utc, today=fmt.today), {}),
        (execution, {"dim": True}),
        (clean(message.sender_id), {"bold": True}),
        ("→", {"dim": True}),
        (_target(message), {}),
        (f"[{clean(message.message_type)}]", {"fg": type_colour(message.message_type), "bold": True}),
    ]
    pairing = _pairing(message)
    if pairing is not None:
        parts.append((pairing, {"fg": "bright_black"}))
    if attempt is not None and attempt > 1:
        parts.append((f"(attempt {attempt})", {"fg": "yellow"}))
    content = clean(message.content)
    if content:
        parts.append((content, {}))
    return " ".join(fmt.style(text, **styles) for text, styles in _fit(parts, fmt.width)).replace(
        NEWLINE, fmt.style(NEWLINE, dim=True))


def _fit(parts: list[tuple[str, dict[str, Any]]], width: int | None) -> list[tuple[str, dict[str, Any]]]:
    # The parts that fit in width columns (with a space between two), the last one cut with an ellipsis:
    # the content as a rule, the head itself on a terminal too narrow for it.
    if width is None:
        return parts
    fitted: list[tuple[str, dict[str, Any]]] = []
    used = -1
    for text, styles in parts:
        room = width - used - 1
        if display_width(text) <= room:
            fitted.append((text, styles))
            used += 1 + display_width(text)
            continue
        if room > 0:
            fitted.append((_clip(text, room), styles))
        elif fitted:  # no room left even for the ellipsis: it replaces the end of the last part
            last, last_styles = fitted[-1]
            fitted[-1] = (_clip(last, display_width(last)), last_styles)
        break
    return fitted


def from_api(item: Mapping[str, Any]) -> tuple[Message, int | None]:
    """The message of a REST API or ``/v1/events`` object, and its seq (None when it has none)."""
    fields = {k: v for k, v in item.items() if k not in ("seq", "stored_at")}
    message = envelope.decode(json.dumps(fields, default=str).encode(), max_content_bytes=1 << 62)
    seq = item.get("seq")
    return message, seq if isinstance(seq, int) else None


def output_options(command: _F) -> _F:
    """``--color``, ``--utc`` and NO_COLOR, for a command that prints message lines.

    NO_COLOR comes in through a hidden option's ``envvar``: click reads it like the
    environment variables of other options (an empty value counts as unset, as the
    convention says).
    """
    command = click.option("--no-color-env", "no_color", envvar="NO_COLOR", hidden=True, default=None)(command)
    command = click.option("--utc", is_flag=True,
                           help="Times as ISO 8601 in UTC (default: local HH:MM:SS.mmm, with the date if not today).")(
        command)
    return click.option("--color", type=click.Choice(COLOR_CHOICES), default="auto", show_default=True,
                        help="Colour the lines: auto = on a terminal when NO_COLOR is unset.")(command)
