"""worker.reconcile without a database: reading PostHog's answers, the comparison and
its thresholds, --since, and the query API asked over real HTTP (CaptureServer)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from worker.reconcile import (
    MAX_ROWS,
    NOTE_DIFFERENCE,
    ReconcileError,
    Threshold,
    compare,
    count_query,
    fetch_counts,
    interpret,
    query_body,
    render_text,
    report_json,
    run_reconcile,
)
from worker.settings import Settings, SettingsError
from worker.testing import CaptureServer, Reply

TODAY = dt.date(2026, 12, 2)
YESTERDAY = TODAY - dt.timedelta(days=1)
KEY = "phx_reconcileTestKey0123456789"


@dataclass(frozen=True)
class Row:
    day: dt.date
    event: str
    destination: str
    delivered: int
    dead: int = 0
    purged: int = 0


class Ledger:
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.asked: list[tuple[dt.date, str | None]] = []

    def ledger(self, since: dt.date, event: str | None = None) -> list[Row]:
        self.asked.append((since, event))
        return [r for r in self.rows if r.day >= since and (event is None or r.event == event)]


def answer(results: list[list[object]], **extra: object) -> bytes:
    return json.dumps({"columns": ["event", "day", "total"], "results": results, **extra}).encode()


def read(status: int, body: bytes, headers: dict[str, str] | None = None) -> object:
    return interpret(
        status, body, headers or {}, where="https://ph/api", project_id=7, secrets=[KEY]
    )


# -- PostHog's answers ------------------------------------------------------------------


def test_a_200_answer_is_the_count_per_day_and_event() -> None:
    body = answer([["signed_up", "2026-12-01", 3], ["page_viewed", "2026-12-02", 0]])
    assert read(200, body) == {(YESTERDAY, "signed_up"): 3, (TODAY, "page_viewed"): 0}


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>", "not with JSON"),
        (b"[]", "not with a JSON object"),
        (json.dumps({"columns": []}).encode(), "no 'results' list"),
        (answer([["a", "2026-12-01"]]), "not [event, day, count]"),
        (answer([["a", "2026-12-01", "3"]]), "count is not a whole number"),
        (answer([["a", "2026-12-01", -1]]), "count is not a whole number"),
        (answer([["a", 20261201, 1]]), "event or day is not text"),
        (answer([["a", "yesterday", 1]]), "day that is not a date"),
        (answer([], hasMore=True), "cut at 0 rows"),
        (answer([["a", "2026-12-01", 1]] * MAX_ROWS), f"cut at {MAX_ROWS} rows"),
        (
            json.dumps({"columns": ["event", "n"], "results": []}).encode(),
            'columns ["event", "n"]',
        ),
        (json.dumps({"query_status": {"complete": False}}).encode(), "still running"),
    ],
)
def test_a_200_answer_reconcile_cannot_use_is_refused_saying_why(body: bytes, why: str) -> None:
    with pytest.raises(ReconcileError, match="answered 200, but") as info:
        read(200, body)
    assert why in str(info.value)


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (202, "did not finish the query"),
        (401, "did not accept OUTBOX_POSTHOG_PERSONAL_API_KEY (401: bad key *** \\x1b[2J)"),
        (403, "needs the query:read scope and access to project 7"),
        (404, "has no project 7 (404"),
        (400, "refused the query (400: bad key *** \\x1b[2J)"),
        (429, "rate-limiting queries (429: bad key *** \\x1b[2J); try again in 60 s"),
        (502, "answered 502: bad key ***"),
    ],
)
def test_an_error_answer_is_one_line_naming_it_without_the_key(status: int, says: str) -> None:
    body = json.dumps({"type": "x", "detail": f"bad key {KEY}\n\x1b[2J"}).encode()
    with pytest.raises(ReconcileError) as info:
        read(status, body, {"Retry-After": "60"})
    message = str(info.value)
    assert says in message, message
    assert message.startswith("PostHog at https://ph/api ")
    assert KEY not in message and "\n" not in message and "\x1b" not in message
    assert info.value.exit_status == 3


def test_a_redirect_names_where_it_points() -> None:
    with pytest.raises(ReconcileError, match=r"a redirect to https://eu\.posthog\.com/x"):
        read(301, b"", {"Location": "https://eu.posthog.com/x"})


def test_a_long_answer_is_cut() -> None:
    with pytest.raises(ReconcileError) as info:
        read(500, b"x" * 100_000)
    assert len(str(info.value)) < 600


# -- the comparison ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "difference", "delivered", "over"),
    [
        (Threshold(), 0, 10, False),
        (Threshold(), 1, 10, True),
        (Threshold(), -1, 10, True),
        (Threshold(absolute=5), 5, 10, False),
        (Threshold(absolute=5), -6, 10, True),
        (Threshold(percent=10), 10, 100, False),
        (Threshold(percent=10), -11, 100, True),
        (Threshold(percent=10), 1, 0, True),  # PostHog has events the outbox never delivered
        (Threshold(percent=10), 0, 0, False),
        (Threshold(absolute=5, percent=10), 6, 100, False),  # over 5, not over 10%
        (Threshold(absolute=5, percent=10), 11, 100, True),
        (Threshold(absolute=50, percent=10), 20, 100, False),  # over 10%, not over 50
    ],
)
def test_a_difference_passes_the_threshold_only_past_every_limit_given(
    threshold: Threshold, difference: int, delivered: int, over: bool
) -> None:
    assert threshold.passed_by(difference, delivered) is over


def test_the_comparison_puts_both_sides_per_day_and_event() -> None:
    rows = [
        Row(YESTERDAY, "signed_up", "posthog", 10, dead=2),
        Row(YESTERDAY, "runtime_ready", "metrics", 7),
        Row(TODAY, "signed_up", "posthog", 4),
        Row(TODAY - dt.timedelta(days=30), "old", "posthog", 1),  # before since
    ]
    counts = {(YESTERDAY, "signed_up"): 10, (TODAY, "signed_up"): 3, (TODAY, "extra"): 2}
    report = compare(
        rows,
        counts,
        since=TODAY - dt.timedelta(days=7),
        until=TODAY,
        today=TODAY,
        threshold=Threshold(),
    )
    assert [(x.day, x.event, x.delivered, x.posthog, x.difference) for x in report.lines] == [
        (YESTERDAY, "signed_up", 10, 10, 0),
        (TODAY, "extra", 0, 2, 2),
        (TODAY, "signed_up", 4, 3, -1),
    ]
    assert [x.today for x in report.lines] == [False, True, True]
    assert len(report.over) == 2
    assert report.metrics_only == (("runtime_ready", 7),)
    assert report.dead == 2


def test_the_output_explains_both_signs_today_and_metrics_only_events() -> None:
    rows = [Row(TODAY, "evil\x1b[2J\nname", "posthog", 3), Row(TODAY, "ops", "metrics", 1)]
    report = compare(
        rows, {}, since=YESTERDAY, until=TODAY, today=TODAY, threshold=Threshold(absolute=2)
    )
    text = "\n".join(render_text(report, project="project 7 at https://ph"))
    assert "\x1b" not in text and "evil\\x1b[2J\\nname" in text
    flat = " ".join(text.split())
    assert "re-sent duplicates" in flat and "Negative: PostHog holds fewer" in flat
    assert "Today (2026-12-02, UTC) is still moving" in flat
    assert "metrics-only events go to Prometheus, never to PostHog: ops (1)" in flat
    assert "1 of 1 rows pass the threshold (a difference of more than 2 events)" in flat
    document = report_json(report)
    assert document["rows"] == [
        {
            "day": "2026-12-02",
            "event": "evil\x1b[2J\nname",
            "delivered": 3,
            "posthog": 0,
            "difference": -3,
            "over_threshold": True,
            "still_moving": True,
        }
    ]
    assert document["notes"][0] == NOTE_DIFFERENCE
    assert document["metrics_only"] == [{"event": "ops", "delivered": 1}]


# -- asking PostHog (CaptureServer) -------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        server.query.personal_api_key = KEY
        server.query.project_id = 7
        yield server


def settings_for(srv: CaptureServer, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "posthog_host": srv.url,
        "posthog_personal_api_key": KEY,
        "posthog_project_id": 7,
        "request_timeout": 2.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def send(srv: CaptureServer, *names: str, day: dt.date = TODAY) -> None:
    batch = [
        {"event": n, "distinct_id": "u", "uuid": str(uuid.uuid4()), "timestamp": f"{day}T12:00:00Z"}
        for n in names
    ]
    assert requests.post(srv.url + "/batch/", json={"api_key": "phc_p", "batch": batch}).ok


def test_fetch_counts_asks_the_query_api_with_the_bearer_key(srv: CaptureServer) -> None:
    send(srv, "a", "a", "b")
    counts = fetch_counts(settings_for(srv), YESTERDAY, TODAY + dt.timedelta(days=1), ["a"])
    assert counts == {(TODAY, "a"): 2}
    [request] = [r for r in srv.requests if r.path.startswith("/api/")]
    assert request.path == "/api/projects/7/query/"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    [query] = srv.query.queries
    assert query.events == ("a",)


def test_run_reconcile_asks_only_for_the_events_the_outbox_delivered(srv: CaptureServer) -> None:
    send(srv, "a", "frontend_only")
    ledger = Ledger([Row(TODAY, "a", "posthog", 1), Row(TODAY, "m", "metrics", 4)])
    report = run_reconcile(
        settings_for(srv),
        ledger,
        since=YESTERDAY,
        today=TODAY,
        event=None,
        threshold=Threshold(),
    )
    assert srv.query.queries[0].events == ("a",)
    assert [(x.event, x.delivered, x.posthog) for x in report.lines] == [("a", 1, 1)]
    assert report.over == ()
    assert ledger.asked == [(YESTERDAY, None)]


def test_with_no_delivered_event_in_the_ledger_posthog_is_not_asked(srv: CaptureServer) -> None:
    report = run_reconcile(
        settings_for(srv), Ledger([]), since=YESTERDAY, today=TODAY, event=None,
        threshold=Threshold(),
    )  # fmt: skip
    assert not report.asked and srv.requests == []
    assert "nothing to compare" in "\n".join(render_text(report, project="p"))


def test_with_event_posthog_is_asked_even_if_the_ledger_has_none(srv: CaptureServer) -> None:
    send(srv, "a")
    report = run_reconcile(
        settings_for(srv), Ledger([]), since=YESTERDAY, today=TODAY, event="a",
        threshold=Threshold(),
    )  # fmt: skip
    assert [(x.event, x.delivered, x.posthog, x.over) for x in report.lines] == [("a", 0, 1, True)]


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"posthog_personal_api_key": None}, "OUTBOX_POSTHOG_PERSONAL_API_KEY"),
        ({"posthog_project_id": None}, "OUTBOX_POSTHOG_PROJECT_ID"),
    ],
)
def test_a_missing_setting_is_named(
    srv: CaptureServer, overrides: dict[str, object], variable: str
) -> None:
    with pytest.raises(SettingsError) as info:
        run_reconcile(
            settings_for(srv, **overrides), Ledger([]), since=TODAY, today=TODAY, event=None,
            threshold=Threshold(),
        )  # fmt: skip
    assert info.value.setting == variable
    assert str(info.value).startswith(f"reconcile needs {variable}")


def test_the_app_host_of_a_cloud_ingestion_host() -> None:
    assert Settings(posthog_host="https://us.i.posthog.com").app_host == "https://us.posthog.com"
    assert Settings(posthog_host="https://EU.i.posthog.com/").app_host == "https://eu.posthog.com"
    assert Settings(posthog_host="https://ph.example.com/").app_host == "https://ph.example.com"
    explicit = Settings(posthog_host="https://proxy.example", posthog_app_host="https://a.b/")
    assert explicit.app_host == "https://a.b"


def test_a_refused_connection_is_one_line_without_the_key(srv: CaptureServer) -> None:
    srv.stop()
    with pytest.raises(ReconcileError) as info:
        fetch_counts(settings_for(srv), TODAY, TODAY + dt.timedelta(days=1), ["a"])
    message = str(info.value)
    assert message.startswith(f"could not ask PostHog at {srv.url}/api/projects/7/query: ")
    assert "ConnectionError" in message and KEY not in message and "\n" not in message


def test_a_timeout_is_one_line(srv: CaptureServer) -> None:
    srv.query.enqueue_reply(Reply(status=200, delay=3))
    with pytest.raises(ReconcileError, match="ReadTimeout"):
        fetch_counts(
            settings_for(srv, request_timeout=0.2), TODAY, TODAY + dt.timedelta(days=1), ["a"]
        )


def test_the_request_is_the_one_the_docs_show() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "reconciliation.md").read_text()
    body = query_body(count_query(dt.date(2026, 11, 26), dt.date(2026, 12, 3), ["issue_created"]))
    assert f"\n{body.decode()}\n" in guide


# -- the settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("phc_Pr0jectKeyPr0jectKey", "is a project API key (phc_...)"),
        ("phs_Pr0jectSecretKey", "is a project secret API key (phs_...)"),
        ("phx_two words", "has spaces or characters that are not ASCII"),
        ("phx_ünïcode", "has spaces or characters that are not ASCII"),
        ("phx_esc\x1b[2J", "contains control characters"),
        ("phx_" + "x" * 1000, "over 1000"),
    ],
)
def test_a_bad_personal_key_is_one_line_naming_the_variable_never_the_key(
    raw: str, why: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OUTBOX_POSTHOG_PERSONAL_API_KEY": raw})
    message = str(info.value)
    assert info.value.setting == "OUTBOX_POSTHOG_PERSONAL_API_KEY"
    assert message.startswith("OUTBOX_POSTHOG_PERSONAL_API_KEY ") and why in message
    assert raw[4:] not in message and "\n" not in message


def test_the_personal_key_is_masked_in_the_settings_repr() -> None:
    settings = Settings.from_env({"OUTBOX_POSTHOG_PERSONAL_API_KEY": KEY})
    assert settings.posthog_personal_api_key == KEY
    assert KEY not in repr(settings) and "posthog_personal_api_key='***'" in repr(settings)


@pytest.mark.parametrize(
    ("variable", "raw", "why"),
    [
        ("OUTBOX_POSTHOG_PROJECT_ID", "0", "must be from 1 to 2147483647"),
        ("OUTBOX_POSTHOG_PROJECT_ID", "12a", "is not a whole number"),
        ("OUTBOX_POSTHOG_APP_HOST", "us.posthog.com", "must be an http:// or https:// URL"),
    ],
)
def test_a_bad_project_id_or_app_host_is_one_line_naming_the_variable(
    variable: str, raw: str, why: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: raw})
    assert info.value.setting == variable
    message = str(info.value)
    assert message.startswith(variable) and raw in message and why in message


def test_the_app_host_keeps_its_password_out_of_the_repr() -> None:
    settings = Settings.from_env({"OUTBOX_POSTHOG_APP_HOST": "https://u:hunter2@ph.example"})
    assert "hunter2" not in repr(settings)
