"""The status page's rendering: escaping, bounds, secrets, privacy, charts, commands."""

from __future__ import annotations

import datetime
import re
import socket
import threading
from html.parser import HTMLParser
from typing import Any

import pytest

from worker.metrics import ProbeServer, WorkerMetrics
from worker.settings import Settings, SettingsError
from worker.statuspage import BacklogHistory, PageData, Privacy, SinkView, render
from worker.statuspage.page import StatusPage, group_commands
from worker.statuspage.privacy import HIDDEN, property_names
from worker.statuspage.render import chart
from worker.storage.base import Backlog, DatabaseUnavailable, LedgerRow

NOW = 1_800_000_000.0
KEY = "phc_PLANTEDsecretKEY0123456789"
PASSWORD = "s3cret-PASSWORD"
HOSTILE = '<script>alert("x")</script>\x1b]0;title\x07&\u202e'


class _Text(HTMLParser):
    """The page's text and its tags, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Text:
    parser = _Text()
    parser.feed(page)
    return parser


def group(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "status": "dead",
        "error": "400: event rejected",
        "count": 3,
        "first_at": "2027-01-15T08:00:00.000000+00:00",
        "last_at": "2027-01-15T08:10:00.000000+00:00",
        "last_age_seconds": 754.6,
        "ids": [4, 5, 9],
        "names": 1,
        "name": "signed_up",
        "dead_of_name": 3,
        "example_id": 9,
        "event": "signed_up",
        "distinct_id": "alice@example.com",
        "properties": {"email": "alice@example.com", "plan": "pro"},
        "attempts": 24,
    }
    base.update(overrides)
    return base


def data(**overrides: Any) -> PageData:
    values: dict[str, Any] = {
        "generated_at": NOW,
        "worker_id": "host:1",
        "sink": SinkView(state="ok", key_state="verified"),
        "backlog": Backlog(pending=12, due=7, retrying=2, dead=3, oldest_pending_age_seconds=95),
        "groups": [group()],
        "top_pending": [("page_viewed", 12)],
    }
    values.update(overrides)
    return PageData(**values)


def test_hostile_event_names_errors_and_workers_are_escaped_and_bounded() -> None:
    page = render(
        data(
            worker_id=HOSTILE,
            groups=[group(error=HOSTILE * 50, event=HOSTILE, name=HOSTILE, names=1, count=80)],
            top_pending=[(HOSTILE, 1)],
            sink=SinkView(state="backing_off", last_error=HOSTILE, key_state="verified"),
            workers=[{"worker": HOSTILE, "host": HOSTILE, "state": "ok", "reason": HOSTILE}],
        )
    )
    parsed = parse(page)
    assert "script" not in parsed.tags
    assert "<script" not in page and "\x1b" not in page and "\u202e" not in page
    assert "\x07" not in page
    text = "".join(parsed.text)
    assert '<script>alert("x")</script>' in text  # shown as text, not run
    assert "\\x1b]0;title\\x07" in text
    # An error is cut: the 50 copies do not all reach the page.
    assert text.count("alert") < 50


def test_no_secret_reaches_the_page() -> None:
    leak = f"POST https://user:{PASSWORD}@proxy/batch/ answered 401 for key {KEY}"
    page = render(
        data(
            worker_id=f"w {KEY}",
            sink=SinkView(
                state="unauthorized",
                last_error=leak,
                key_state="rejected",
                key_reason=f"key {KEY} password={PASSWORD}",
                key_allows_sending=False,
            ),
            groups=[group(error=leak, event=f"e {KEY}", properties={"k": KEY})],
            backlog=None,
            backlog_problem=f"connection to postgresql://u:{PASSWORD}@db failed",
        ),
        secrets=(KEY, PASSWORD),
    )
    assert KEY not in page
    assert PASSWORD not in page
    assert "***" in page


def test_a_secret_cut_short_by_the_stored_error_bound_is_masked_too() -> None:
    cut = ("x" * 190 + f" key {KEY}")[:200]  # the store keeps 200 characters
    page = render(data(groups=[group(error=cut)]), secrets=(KEY,))
    assert KEY[:6] not in page
    assert "key ***" in page


def test_property_values_are_hidden_unless_named_and_distinct_ids_hashed() -> None:
    page = render(data())
    assert "alice@example.com" not in page
    assert HIDDEN in page and "email" in page and "plan" in page
    shown = render(data(privacy=Privacy(frozenset({"plan"}), show_distinct_ids=True)))
    assert "&quot;pro&quot;" in shown
    assert "alice@example.com" in shown  # the distinct id, shown by choice
    assert shown.count("alice@example.com") == 1  # the email property stays hidden
    many = render(data(groups=[group(properties={f"p{i:02d}": i for i in range(25)})]))
    assert "p19" in many and "p20" not in many and "and 5 more" in many
    every = render(data(privacy=Privacy(None)))
    assert every.count("alice@example.com") == 1  # the property; the id is hashed


def test_a_hashed_distinct_id_is_stable_per_worker_and_differs_between_workers() -> None:
    one, other = Privacy(), Privacy()
    assert one.distinct_id("alice") == one.distinct_id("alice")
    assert one.distinct_id("alice") != one.distinct_id("bob")
    assert one.distinct_id("alice") != other.distinct_id("alice")
    assert "alice" not in one.distinct_id("alice")


def test_privacy_settings_come_from_variables_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert property_names(None) == frozenset()
    assert property_names("*") is None
    assert property_names(" plan , $browser ") == frozenset({"plan", "$browser"})
    monkeypatch.setenv("OUTBOX_STATUS_PROPERTIES", "plan,$browser")
    monkeypatch.setenv("OUTBOX_STATUS_DISTINCT_IDS", "SHOWN")
    settings = Settings.from_env()
    privacy = Privacy.from_settings(settings)
    assert privacy.shown_properties == frozenset({"plan", "$browser"})
    assert privacy.show_distinct_ids
    assert Settings.from_env(flags={"status_distinct_ids": "hashed"}).status_distinct_ids == (
        "hashed"
    )
    default = Privacy.from_settings(Settings())
    assert default.shown_properties == frozenset() and not default.show_distinct_ids


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_STATUS_DISTINCT_IDS", "plain"),
        ("OUTBOX_STATUS_PROPERTIES", "a,,b"),
        ("OUTBOX_STATUS_PROPERTIES", "a\x1bb"),
        ("OUTBOX_STATUS_PAGE", "maybe"),
    ],
)
def test_a_bad_status_setting_is_one_line_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        Settings.from_env()
    assert info.value.setting == variable
    assert str(info.value).startswith(variable)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_retry_and_purge_commands_for_a_dead_group() -> None:
    small = group_commands(group(), dead_total=3)
    assert small[0].command == "outbox-worker retry --id 4 --id 5 --id 9"
    assert small[1].command == "outbox-worker purge --dead --older-than 754s"
    named = group_commands(group(count=80, dead_of_name=95, name="it's"), dead_total=200)
    assert named[0].command == "outbox-worker retry --event 'it'\"'\"'s'"
    assert "15 with other errors" in named[0].note
    mixed = group_commands(group(count=80, names=2), dead_total=200)
    assert mixed[0].command == "outbox-worker retry --all" and "200" in mixed[0].note
    # A retrying group is pending: nothing to run.
    assert group_commands(group(status="pending"), dead_total=3) == []


def test_sink_state_and_pause_are_explained() -> None:
    page = render(
        data(
            sink=SinkView(
                state="rate_limited",
                last_error="429 Too Many Requests",
                paused_until=NOW + 90,
                key_state="verified",
            )
        )
    )
    text = "".join(parse(page).text)
    assert "rate_limited" in text and "PostHog answered 429" in text
    assert "paused until 2027-01-15 08:01:30 UTC" in text
    assert "429 Too Many Requests" in text


def test_charts_are_inline_svg_from_the_last_hour_of_samples() -> None:
    clock = [NOW - 7200]
    history = BacklogHistory(15.0, clock=lambda: clock[0])
    for minute in range(120):
        clock[0] = NOW - 7200 + minute * 60
        history.record(Backlog(minute, minute // 2, 0, 1, float(minute)))
    samples = history.samples(NOW)
    assert len(samples) == 60 and samples[0].pending == 60
    svg = chart(samples, (("pending", "#000"),), NOW, title="t")
    assert svg.startswith("<svg") and svg.count("<polyline") == 1
    assert "200" in svg  # the axis is a round number at or above the peak (119)
    page = render(data(history=samples))
    assert page.count("<svg") == 2
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from outside


def test_the_ring_buffer_does_not_grow() -> None:
    history = BacklogHistory(15.0, clock=lambda: NOW)
    for _ in range(10_000):
        history.record(Backlog(1, 1, 1, 1, 1.0))
    assert len(history.samples(NOW)) < 400


class _Broken:
    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise DatabaseUnavailable(f"could not connect to postgresql://u:{PASSWORD}@db")

        return fail


class _Sink:
    sink_state = "ok"
    last_error = None

    def pause_remaining(self) -> float:
        return 0.0


class _Key:
    state = "verified"
    reason = ""
    enabled = True

    def allows_sending(self) -> bool:
        return True


def test_the_page_says_why_each_section_is_missing_when_the_database_is_down() -> None:
    page = StatusPage(
        _Broken(),
        _Sink(),
        _Key(),
        BacklogHistory(15.0),
        Privacy(),
        worker_id="w",
        secrets=(PASSWORD,),
    ).html()
    text = page.decode()
    assert text.count("could not read") == 6
    assert PASSWORD not in text
    assert "sending normally" in text


def _answer(port: int, path: str, method: str = "GET") -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.decode(), body


def test_the_probe_server_answers_status_only_when_given_a_page() -> None:
    calls: list[str] = []

    def page() -> bytes:
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("a bug")
        return b"<!DOCTYPE html><p>page</p>"

    server = ProbeServer(WorkerMetrics(), lambda: (True, "ok"), 0, status_page=page)
    plain = ProbeServer(WorkerMetrics(), lambda: (True, "ok"), 0)
    server.start()
    plain.start()
    try:
        head, body = _answer(server.port, "/status")
        assert head.startswith("HTTP/1.1 200 ") and body == b"<!DOCTYPE html><p>page</p>"
        assert "Content-Type: text/html; charset=utf-8" in head
        assert "Content-Security-Policy: default-src 'none'" in head
        assert "Cache-Control: no-store" in head
        assert calls[0].startswith("outbox-probes-handler")  # off the event loop
        head, body = _answer(server.port, "/status", "HEAD")
        assert head.startswith("HTTP/1.1 200 ") and body == b""
        head, _ = _answer(server.port, "/status")
        assert head.startswith("HTTP/1.1 500 ")
        assert _answer(server.port, "/healthz")[1] == b"ok\n"  # still serving
        assert _answer(plain.port, "/status")[0].startswith("HTTP/1.1 404 ")
        assert "Content-Security-Policy" not in _answer(server.port, "/metrics")[0]
    finally:
        server.stop()
        plain.stop()


def test_one_load_at_a_time() -> None:
    entered, release = threading.Event(), threading.Event()

    class _Slow(_Broken):
        def backlog_capped(self, cap: int = 0) -> Backlog:
            entered.set()
            release.wait(10)
            return Backlog(1, 1, 0, 0, 1.0)

    status = StatusPage(_Slow(), _Sink(), _Key(), BacklogHistory(15.0), Privacy(), worker_id="w")
    first: list[bytes] = []
    thread = threading.Thread(target=lambda: first.append(status.html()))
    thread.start()
    assert entered.wait(10)
    assert b"still reading the database" in status.html()
    release.set()
    thread.join(10)
    assert b"posthog-outbox status" in first[0]


def test_the_ledger_section_shows_the_last_seven_days_escaped_and_bounded() -> None:
    day = datetime.date(2027, 1, 15)
    rows = [LedgerRow(day, HOSTILE, "posthog", 1_234, 5, 2)] + [
        LedgerRow(day - datetime.timedelta(days=d % 7), f"event_{d:03d}", "metrics", 1, 0, 0)
        for d in range(60)
    ]
    page = render(data(ledger=rows))
    section = page.split('<section id="ledger">')[1].split("</section>")[0]
    parsed = parse(section)
    text = "".join(parsed.text)
    assert "Ledger (last 7 days)" in page
    assert "script" not in parsed.tags and "\x1b" not in section and "\u202e" not in section
    assert '<script>alert("x")</script>' in text
    assert "1,294" in text  # delivered in all: 1,234 and 60 of 1
    assert section.count('class="ledger-row"') == 50
    assert "and 11 more rows" in text and "outbox-worker ledger --since 7d" in text
    # Newest day first: the 15th (the hostile row's) before the 14th; the oldest day's
    # rows are the ones left out.
    assert text.index("2027-01-15") < text.index("2027-01-14")
    assert "2027-01-09" not in text
    empty = render(data(ledger=[]))
    assert "Nothing delivered, dead or purged in these days." in empty


def test_the_page_reads_the_ledger_of_the_last_seven_utc_days() -> None:
    asked: list[datetime.date] = []

    class _Store(_Broken):
        def ledger(self, since: datetime.date, event: str | None = None) -> list[LedgerRow]:
            asked.append(since)
            return [LedgerRow(since, "signed_up", "posthog", 3, 0, 0)]

    page = StatusPage(
        _Store(), _Sink(), _Key(), BacklogHistory(15.0), Privacy(), worker_id="w", clock=lambda: NOW
    ).html()
    today = datetime.datetime.fromtimestamp(NOW, datetime.UTC).date()
    assert asked == [today - datetime.timedelta(days=6)]
    assert b"signed_up" in page and page.decode().count("could not read") == 5
