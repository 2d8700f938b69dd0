"""CaptureServer's PostHog query API (worker.testing.query_api): the parser of reconcile's
count query, and the endpoint over real HTTP."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from worker.reconcile import count_query, hogql_string
from worker.testing import CaptureServer, Reply
from worker.testing.query_api import (
    DEFAULT_PERSONAL_API_KEY,
    QuerySyntaxError,
    parse_count_query,
)

UTC = dt.UTC
START = dt.date(2026, 11, 25)
END = dt.date(2026, 12, 3)
QUERY = count_query(START, END, ["signed_up", "page_viewed"])


# -- the parser -------------------------------------------------------------------------


def test_it_parses_the_query_reconcile_sends() -> None:
    parsed = parse_count_query(QUERY)
    assert parsed.start == dt.datetime(2026, 11, 25, tzinfo=UTC)
    assert parsed.end == dt.datetime(2026, 12, 3, tzinfo=UTC)
    assert parsed.events == ("signed_up", "page_viewed")
    assert parsed.limit == 50_000
    assert parsed.ordered


def test_without_event_names_limit_or_order_it_counts_every_event() -> None:
    parsed = parse_count_query(count_query(START, END).split(" ORDER BY")[0])
    assert parsed.events is None
    assert parsed.limit is None
    assert not parsed.ordered


def test_keywords_are_read_in_any_case_and_whitespace_is_free() -> None:
    text = QUERY.replace("SELECT", "select").replace(" FROM ", "\n  from\t").replace("AND", "and")
    assert parse_count_query(text) == parse_count_query(QUERY)


@pytest.mark.parametrize(
    "name",
    ["it's", "back\\slash", "new\nline", "tab\there", "nul\0", "quote''twice", "ünïcødé 🎉", ""],
)
def test_event_names_round_trip_through_hogql_escaping(name: str) -> None:
    parsed = parse_count_query(count_query(START, END, [name, "other"]))
    assert parsed.events == (name, "other")


def test_a_doubled_quote_is_a_quote_as_in_clickhouse() -> None:
    text = QUERY.replace("'signed_up'", "'it''s'")
    assert parse_count_query(text).events == ("it's", "page_viewed")


def test_hogql_string_escapes_as_posthog_does() -> None:
    assert hogql_string("a'b\\c\n\t\0") == "'a\\'b\\\\c\\n\\t\\0'"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("SELECT event,", "SELECT distinct_id,"), "expected event"),
        (("toTimeZone(timestamp, 'UTC')", "toTimeZone(timestamp, 'Europe/Paris')"), "UTC days"),
        (("toDate(toTimeZone(timestamp, 'UTC'))", "toDate(timestamp)"), "expected toTimeZone"),
        (("count() AS total", "sum(1) AS total"), "expected count"),
        (("FROM events", "FROM persons"), "expected events"),
        (("timestamp >= ", "timestamp > "), "expected '>='"),
        (("'2026-11-25T00:00:00Z'", "'last week'"), "not a date and time"),
        (("GROUP BY event, day", "GROUP BY day"), "expected event"),
        (("LIMIT 50000", "LIMIT 50000; DROP TABLE events"), "unexpected character ';'"),
        (("LIMIT 50000", "LIMIT ten"), "expected a number"),
        (("'signed_up'", "'signed_up"), "not closed"),
        (("IN ('signed_up', 'page_viewed')", "IN (signed_up)"), "expected a string"),
        (("ORDER BY day, event", "ORDER BY event, day"), "expected day"),
        (("LIMIT 50000", "LIMIT 50000 OFFSET 10"), "expected the end"),
    ],
)
def test_any_other_query_is_refused_saying_where(change: tuple[str, str], why: str) -> None:
    old, new = change
    assert old in QUERY
    with pytest.raises(QuerySyntaxError, match=why):
        parse_count_query(QUERY.replace(old, new))


def test_an_empty_query_is_refused() -> None:
    with pytest.raises(QuerySyntaxError, match="expected SELECT but found the end"):
        parse_count_query("   ")


# -- the endpoint over HTTP -------------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def event(name: str, timestamp: str, uid: str | None = None) -> dict[str, Any]:
    return {
        "event": name,
        "distinct_id": "user-1",
        "uuid": uid or str(uuid.uuid4()),
        "timestamp": timestamp,
    }


def capture(srv: CaptureServer, key: str, events: list[dict[str, Any]]) -> None:
    answer = requests.post(srv.url + "/batch/", json={"api_key": key, "batch": events}, timeout=5)
    assert answer.status_code == 200


def ask(
    srv: CaptureServer,
    query: str,
    *,
    key: str | None = DEFAULT_PERSONAL_API_KEY,
    project: int | str = 1,
    method: str = "POST",
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return requests.request(
        method,
        f"{srv.url}/api/projects/{project}/query/",
        json={"query": {"kind": "HogQLQuery", "query": query}},
        headers=headers,
        timeout=5,
    )


def test_it_counts_per_utc_day_and_event_each_uuid_once(srv: CaptureServer) -> None:
    twice = str(uuid.uuid4())
    capture(
        srv,
        "phc_project",
        [
            event("signed_up", "2026-11-30T23:59:59.999+00:00", twice),
            event("signed_up", "2026-11-30T23:59:59.999+00:00", twice),  # re-sent copy
            # 01:30 in Paris is 00:30 UTC: the UTC day, not the sender's.
            event("signed_up", "2026-12-01T01:30:00+01:00"),
            event("page_viewed", "2026-12-01T12:00:00Z"),
            event("page_viewed", "2026-12-03T00:00:00Z"),  # the end is excluded
            event("page_viewed", "2026-11-24T23:59:59Z"),  # before the start
            event("other", "2026-12-01T12:00:00Z"),  # not asked for
        ],
    )
    answer = ask(srv, QUERY)
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["columns"] == ["event", "day", "total"]
    assert document["results"] == [
        ["signed_up", "2026-11-30", 1],
        ["page_viewed", "2026-12-01", 1],
        ["signed_up", "2026-12-01", 1],
    ]
    assert document["hasMore"] is False
    assert srv.query.queries == [parse_count_query(QUERY)]


def test_before_the_merge_each_copy_of_a_uuid_counts(srv: CaptureServer) -> None:
    twice = str(uuid.uuid4())
    capture(srv, "phc_p", [event("signed_up", "2026-12-01T00:00:00Z", twice)] * 2)
    assert ask(srv, QUERY).json()["results"] == [["signed_up", "2026-12-01", 1]]
    srv.query.merged = False
    assert ask(srv, QUERY).json()["results"] == [["signed_up", "2026-12-01", 2]]


def test_events_of_a_key_of_no_project_are_accepted_but_never_counted(
    srv: CaptureServer,
) -> None:
    srv.project_keys = {"phc_right"}
    capture(srv, "phc_wrong", [event("signed_up", "2026-12-01T12:00:00Z") for _ in range(5)])
    capture(srv, "phc_right", [event("signed_up", "2026-12-01T12:00:00Z")])
    assert len(srv.dropped) == 5
    assert ask(srv, QUERY).json()["results"] == [["signed_up", "2026-12-01", 1]]


def test_without_a_limit_it_answers_100_rows_and_says_there_are_more(srv: CaptureServer) -> None:
    capture(srv, "phc_p", [event(f"e{i:03}", "2026-12-01T00:00:00Z") for i in range(101)])
    document = ask(srv, count_query(START, END).split(" ORDER BY")[0]).json()
    assert len(document["results"]) == 100
    assert document["hasMore"] is True


@pytest.mark.parametrize(
    ("key", "code", "detail"),
    [
        (None, "not_authenticated", "Authentication credentials were not provided."),
        (
            "phx_other",
            "authentication_failed",
            "Personal API key found in request Authorization header is invalid.",
        ),
    ],
)
def test_a_missing_or_unknown_personal_key_is_answered_401(
    srv: CaptureServer, key: str | None, code: str, detail: str
) -> None:
    answer = ask(srv, QUERY, key=key)
    assert answer.status_code == 401
    assert answer.json() == {
        "type": "authentication_error",
        "code": code,
        "detail": detail,
        "attr": None,
    }
    assert srv.query.queries == []


def test_the_personal_key_is_checked_before_the_project(srv: CaptureServer) -> None:
    assert ask(srv, QUERY, key="phx_other", project=2).status_code == 401


def test_another_project_is_answered_404(srv: CaptureServer) -> None:
    srv.query.project_id = 7
    assert ask(srv, QUERY, project=7).status_code == 200
    for project in (1, "abc"):
        answer = ask(srv, QUERY, project=project)
        assert answer.status_code == 404
        assert answer.json()["code"] == "not_found"


def test_only_post_is_answered(srv: CaptureServer) -> None:
    answer = ask(srv, QUERY, method="GET")
    assert answer.status_code == 405
    assert answer.json()["detail"] == 'Method "GET" not allowed.'


def test_a_path_without_the_trailing_slash_is_answered_too(srv: CaptureServer) -> None:
    answer = requests.post(
        f"{srv.url}/api/projects/1/query",
        json={"query": {"kind": "HogQLQuery", "query": QUERY}},
        headers={"Authorization": f"Bearer {DEFAULT_PERSONAL_API_KEY}"},
        timeout=5,
    )
    assert answer.status_code == 200


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not json", "not JSON"),
        (b"[]", "needs a 'query' object"),
        (json.dumps({"query": {"kind": "TrendsQuery"}}).encode(), "HogQLQuery queries only"),
        (json.dumps({"query": {"kind": "HogQLQuery"}}).encode(), "needs its 'query' text"),
        (
            json.dumps({"query": {"kind": "HogQLQuery", "query": "SELECT 1"}}).encode(),
            "expected event",
        ),
    ],
)
def test_other_bodies_are_refused_400_posthog_style(
    srv: CaptureServer, body: bytes, why: str
) -> None:
    answer = requests.post(
        f"{srv.url}/api/projects/1/query/",
        data=body,
        headers={"Authorization": f"Bearer {DEFAULT_PERSONAL_API_KEY}"},
        timeout=5,
    )
    assert answer.status_code == 400
    document = answer.json()
    assert document["type"] == "validation_error"
    assert why in document["detail"]


def test_scripted_replies_answer_the_next_queries(srv: CaptureServer) -> None:
    srv.query.enqueue_reply(Reply(status=429, retry_after=30), Reply(status=503, times=2))
    throttled = ask(srv, QUERY)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "30"
    assert throttled.json()["type"] == "throttled_error"
    assert [ask(srv, QUERY).status_code for _ in range(3)] == [503, 503, 200]


def test_reset_forgets_queries_and_replies(srv: CaptureServer) -> None:
    ask(srv, QUERY)
    srv.query.enqueue_reply(Reply(status=500))
    srv.reset()
    assert srv.query.queries == []
    assert ask(srv, QUERY).status_code == 200


def test_query_requests_are_recorded_with_the_others(srv: CaptureServer) -> None:
    ask(srv, QUERY, key="phx_other")
    [request] = srv.requests
    assert (request.path, request.status, request.events) == ("/api/projects/1/query/", 401, [])
