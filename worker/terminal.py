"""Text that is safe to show on an operator's terminal.

Event names, distinct ids, stored errors, worker names and whatever a server
answered are data, not output: printed raw, a newline forges a table row, and an
escape sequence clears the screen or sets the window title. :func:`printable` is the
one function every human-readable output of the worker passes such text through
(``status`` and ``dead`` tables, log lines, one-line errors); the JSON outputs need
none, since ``json.dumps`` escapes every control character itself.
"""

from __future__ import annotations

import unicodedata

__all__ = ["DEFAULT_LIMIT", "has_control_characters", "json_terminal_safe", "printable"]

#: Longest text (in characters, after escaping) :func:`printable` returns by default.
DEFAULT_LIMIT = 200
_ELLIPSIS = "..."
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control, format (bidi overrides, zero-width characters), lone surrogates (bytes
# that were not UTF-8), line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if unicodedata.category(char) not in _UNSAFE_CATEGORIES:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def json_terminal_safe(text: str) -> str:
    """JSON text with every character :func:`printable` would escape written as a JSON
    ``\\u`` escape instead: the same JSON value, safe to print (a terminal sees no
    escape sequence, bidi override or line separator). For JSON lines on stdout."""
    if text.isascii() and "\x7f" not in text:
        return text  # JSON already escapes the C0 controls; nothing else is unsafe
    out: list[str] = []
    for char in text:
        if char in _NAMED or unicodedata.category(char) not in _UNSAFE_CATEGORIES:
            out.append(char)
            continue
        code = ord(char)
        if code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:  # a UTF-16 surrogate pair, as JSON spells characters beyond the BMP
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return "".join(out)


def has_control_characters(text: str) -> bool:
    """Whether :func:`printable` would escape anything in ``text`` but backslashes."""
    if text.isascii() and text.isprintable():
        return False
    return any(_escape_char(c) != c for c in text if c != "\\")


def printable(value: object, limit: int | None = DEFAULT_LIMIT, *, newlines: bool = False) -> str:
    """``value`` as text with every control character escaped (``\\n``, ``\\x1b``,
    ``\\u202e``; a backslash becomes ``\\\\``), cut to ``limit`` characters with
    ``...`` at the end when longer (``None``: no limit). An escape is never cut in half.

    With ``newlines``, line breaks are kept as they are (for a traceback), and every
    other character is escaped as usual. ``None`` is the empty string.
    """
    text = "" if value is None else value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        if limit is None or len(text) <= limit:
            return text
        return text[: max(0, limit - len(_ELLIPSIS))] + _ELLIPSIS[:limit]
    pieces: list[str] = []
    length = 0
    for char in text:
        piece = char if newlines and char == "\n" else _escape_char(char)
        pieces.append(piece)
        length += len(piece)
        if limit is not None and length > limit:
            break
    if limit is None or length <= limit:
        return "".join(pieces)
    room = max(0, limit - len(_ELLIPSIS))
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > room:
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + _ELLIPSIS[:limit]


def age(seconds: float) -> str:
    """A duration as people read it in a status line: ``45s``, ``12m``, ``3h05m``,
    ``2d04h`` (a negative one, from clocks that disagree, as ``0s``)."""
    seconds = int(max(seconds, 0))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"
