"""printable(): what reaches the operator's terminal from event data is escaped and bounded."""

from __future__ import annotations

import json

import pytest

from worker.terminal import DEFAULT_LIMIT, has_control_characters, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("signup", "signup"),
        ("a\nb", "a\\nb"),
        ("a\r\n| forged | row |", "a\\r\\n| forged | row |"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("tab\there", "tab\\there"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b31m", "csi\\x9b31m"),  # a C1 control
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),  # a bidi override
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("line\u2028sep", "line\\u2028sep"),
        ("bytes\udcff", "bytes\\udcff"),  # an undecodable byte from surrogateescape
        ("back\\slash", "back\\\\slash"),  # so an escape in the data cannot pose as ours
        ("ünïcode 名前 🎉", "ünïcode 名前 🎉"),
        (None, ""),
        (42, "42"),
    ],
)
def test_control_characters_are_escaped(raw: object, shown: str) -> None:
    assert printable(raw) == shown


def test_length_is_bounded_and_an_escape_is_never_cut() -> None:
    assert len(printable("x" * 10_000)) == DEFAULT_LIMIT
    assert printable("x" * 10_000).endswith("...")
    assert printable("abcdef", 5) == "ab..."
    cut = printable("a" + "\x1b" * 50, 10)
    assert cut == "a\\x1b..." and len(cut) <= 10
    assert printable("short", 5) == "short"
    assert len(printable("\x1b" * 10_000, None)) == 40_000


def test_newlines_may_be_kept_for_tracebacks() -> None:
    assert printable("line 1\nline\x1b 2", None, newlines=True) == "line 1\nline\\x1b 2"


def test_has_control_characters() -> None:
    assert not has_control_characters("plain text, ünïcode\\")
    assert has_control_characters("a\nb")
    assert has_control_characters("a\u202eb")


def test_json_lines_keep_their_value_and_lose_every_terminal_escape() -> None:
    import io

    from worker.sinks import Outbound, StdoutSink
    from worker.terminal import json_terminal_safe

    hostile = '\x1b]0;owned\x07 \x1b[2J \x7f \x85 \u202e \u2028 \U000e0041 é 🚀 \\ "'
    event = {"event": hostile, "distinct_id": "u", "properties": {"k": hostile}}
    stream = io.StringIO()
    # As PostgreSQL renders jsonb: non-ASCII characters raw, C0 controls escaped.
    StdoutSink(stream).send([Outbound(json.dumps(event, ensure_ascii=False))])
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == event  # the same event
    assert not has_control_characters(line[:-1].replace("\\", ""))
    assert "é 🚀" in line  # printable text stays as it is
    assert json_terminal_safe('{"a": "plain"}') == '{"a": "plain"}'
