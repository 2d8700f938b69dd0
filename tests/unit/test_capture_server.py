"""Tests for worker.testing.CaptureServer, over real HTTP on a local port."""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import posthog.request
import pytest
import requests

from worker.testing import (
    AI_EVENT_NAMES,
    AI_PATHS,
    FLAGS_PATHS,
    CaptureServer,
    Exchange,
    ReceivedRequest,
    Reply,
)
from worker.testing import posthog_errors as texts


def make_event(i: int = 0, name: str = "page_viewed", **properties: Any) -> dict[str, Any]:
    return {
        "event": name,
        "distinct_id": "user-1",
        "properties": {"i": i, **properties},
        "uuid": str(uuid.uuid4()),
        "timestamp": "2024-05-01T12:00:00+00:00",
    }


def post(
    srv: CaptureServer,
    body: object,
    *,
    path: str = "/batch/",
    compress: bool = False,
    timeout: float = 5.0,
    session: requests.Session | None = None,
) -> requests.Response:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if compress:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    sender = session if session is not None else requests
    return sender.post(srv.url + path, data=data, headers=headers, timeout=timeout)


def post_raw(srv: CaptureServer, data: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(srv.url + "/batch/", data=data, headers=headers, timeout=5.0)


@pytest.fixture
def srv() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


# -- receiving ---------------------------------------------------------------------------------


def test_plain_json_batch_is_recorded(srv: CaptureServer) -> None:
    events = [make_event(0), make_event(1, name="signed_up")]
    body = {"api_key": "phc_test", "batch": events, "sent_at": "2024-05-01T12:00:01+00:00"}

    res = post(srv, body)

    assert res.status_code == 200
    assert res.json() == {"status": 1}
    assert res.headers["Content-Length"] == str(len(res.content))
    assert srv.events == events
    assert srv.uuids() == [e["uuid"] for e in events]
    assert srv.event_names() == ["page_viewed", "signed_up"]
    assert srv.accepted_count == 2
    [request] = srv.requests
    assert request.path == "/batch/"
    assert request.status == 200
    assert request.accepted
    assert request.api_key == "phc_test"
    assert request.events == events
    assert request.event_count == 2
    assert request.gzip is False
    assert request.raw_size == len(json.dumps(body).encode())
    assert request.headers["content-type"] == "application/json"
    assert request.received_at <= time.monotonic()
    assert request.detail is None


def test_gzip_body_is_decompressed(srv: CaptureServer) -> None:
    events = [make_event(i, padding="x" * 200) for i in range(20)]
    body = {"api_key": "phc_test", "batch": events}

    res = post(srv, body, compress=True)

    assert res.status_code == 200
    assert srv.events == events
    [request] = srv.requests
    assert request.gzip is True
    assert request.headers["content-encoding"] == "gzip"
    assert request.raw_size == int(request.headers["content-length"])
    assert request.raw_size < len(json.dumps(body).encode())


def test_chunked_body_is_read(srv: CaptureServer) -> None:
    events = [make_event(i) for i in range(3)]
    data = json.dumps({"api_key": "k", "batch": events}).encode()
    parts = iter([data[:10], data[10:50], data[50:]])

    res = requests.post(srv.url + "/batch/", data=parts, timeout=5.0)

    assert res.status_code == 200
    assert srv.requests[0].headers["transfer-encoding"] == "chunked"
    assert srv.events == events


def test_single_event_body_is_a_batch_of_one(srv: CaptureServer) -> None:
    body = {"api_key": "phc_test", **make_event(7, name="signed_up")}

    res = post(srv, body, path="/capture/")

    assert res.status_code == 200
    [event] = srv.events
    assert event == {k: v for k, v in body.items() if k != "api_key"}
    assert srv.requests[0].api_key == "phc_test"


@pytest.mark.parametrize("path", ["/batch", "/capture/", "/e/", "/i/v0/e/"])
def test_alternate_capture_paths(srv: CaptureServer, path: str) -> None:
    event = make_event()

    res = post(srv, {"api_key": "k", "batch": [event]}, path=path)

    assert res.status_code == 200
    assert srv.events == [event]
    assert srv.requests[0].path == path


def test_gzip_requested_by_query_parameter(srv: CaptureServer) -> None:
    event = make_event(token="phc_js")  # posthog-js puts the key in each event's properties
    data = gzip.compress(json.dumps([event]).encode())

    res = requests.post(srv.url + "/e/?compression=gzip-js", data=data, timeout=5.0)

    assert res.status_code == 200
    assert srv.events == [event]
    assert srv.requests[0].gzip is True
    assert srv.requests[0].path == "/e/"
    assert srv.requests[0].api_key == "phc_js"


def test_unknown_path_and_other_methods_are_refused_and_recorded(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=503))

    missing = post(srv, {"api_key": "k", "batch": [make_event()]}, path="/nope/")
    get = requests.get(srv.url + "/batch/", timeout=5.0)
    wrong_method = requests.put(srv.url + "/batch/", data=b"{}", timeout=5.0)
    preflight = requests.options(srv.url + "/batch/", timeout=5.0)
    capture = post(srv, {"api_key": "k", "batch": [make_event()]})

    assert missing.status_code == 404
    # PostHog's capture routes GET to the capture handler: with no payload it is a 400.
    assert get.status_code == 400
    assert get.text == texts.EMPTY_PAYLOAD
    assert get.headers["Content-Type"] == texts.TEXT_CONTENT_TYPE
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "GET, POST, OPTIONS"
    assert preflight.status_code == 200
    # Only capture POSTs consume scripted replies.
    assert capture.status_code == 503
    assert [r.status for r in srv.requests] == [404, 400, 405, 200, 503]
    assert [r.method for r in srv.requests] == ["POST", "GET", "PUT", "OPTIONS", "POST"]
    assert [r.path for r in srv.requests] == ["/nope/"] + ["/batch/"] * 4
    assert srv.requests[1].detail == texts.EMPTY_PAYLOAD
    assert srv.events == []


def test_posthog_batch_post_events_arrive_decoded(srv: CaptureServer) -> None:
    events = [make_event(i) for i in range(5)]

    res = posthog.request.batch_post("phc_from_lib", host=srv.url, gzip=True, batch=events)

    assert res.status_code == 200
    assert srv.events == events
    [request] = srv.requests
    assert request.path == "/batch/"
    assert request.api_key == "phc_from_lib"
    assert request.gzip is True
    assert request.headers["user-agent"].startswith("posthog-python/")


def test_posthog_client_sees_scripted_error_and_retry_after(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=503, retry_after=7))

    with pytest.raises(posthog.request.APIError) as info:
        posthog.request.batch_post("k", host=srv.url, gzip=True, batch=[make_event()])

    assert info.value.status == 503
    assert info.value.retry_after == 7.0
    assert info.value.message == texts.RETRYABLE
    assert srv.events == []


# -- keep-alive, concurrency, lifecycle ---------------------------------------------------------


def test_keep_alive_connection_is_reused(srv: CaptureServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5.0)
    try:
        bodies = [json.dumps({"api_key": "k", "batch": [make_event(i)]}) for i in range(3)]
        socks = []
        for body in bodies:
            conn.request("POST", "/batch/", body=body, headers={"Content-Type": "application/json"})
            res = conn.getresponse()
            assert res.status == 200
            assert json.loads(res.read()) == {"status": 1}
            assert res.getheader("Connection") != "close"
            socks.append(conn.sock)
    finally:
        conn.close()

    assert socks[0] is not None
    assert all(sock is socks[0] for sock in socks)
    assert srv.accepted_count == 3


def test_concurrent_posts_are_all_recorded(srv: CaptureServer) -> None:
    threads_count, requests_each, batch_size = 8, 20, 5
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []
    sent: list[str] = []
    sent_lock = threading.Lock()

    def worker(t: int) -> None:
        try:
            barrier.wait(timeout=5.0)
            with requests.Session() as session:
                for r in range(requests_each):
                    batch = [make_event(r * batch_size + k, thread=t) for k in range(batch_size)]
                    res = post(srv, {"api_key": "k", "batch": batch}, session=session)
                    assert res.status_code == 200
                    with sent_lock:
                        sent.extend(e["uuid"] for e in batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30.0)

    assert errors == []
    total = threads_count * requests_each * batch_size
    events = srv.wait_for_events(total, timeout=5.0)
    assert srv.accepted_count == total
    assert len(srv.requests) == threads_count * requests_each
    assert sorted(srv.uuids()) == sorted(sent)
    assert len(set(srv.uuids())) == total
    # Each client's events are recorded in the order that client sent them.
    for t in range(threads_count):
        seq = [e["properties"]["i"] for e in events if e["properties"]["thread"] == t]
        assert seq == list(range(requests_each * batch_size))


def test_stop_and_start_again_on_the_same_url() -> None:
    server = CaptureServer()
    with pytest.raises(RuntimeError, match="not been started"):
        _ = server.url
    server.start()
    try:
        url = server.url
        assert url == f"http://127.0.0.1:{server.port}"
        assert server.port != 0
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        assert post(server, {"api_key": "k", "batch": [make_event()]}).status_code == 200

        server.stop()
        assert not server.running
        with pytest.raises(requests.ConnectionError):
            post(server, {"api_key": "k", "batch": [make_event()]}, timeout=2.0)

        server.start()
        assert server.url == url
        assert post(server, {"api_key": "k", "batch": [make_event()]}).status_code == 200
        assert server.accepted_count == 2
    finally:
        server.stop()
    server.stop()  # stopping twice is harmless


def test_stop_closes_idle_keep_alive_connections() -> None:
    server = CaptureServer().start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5.0)
    body = json.dumps({"api_key": "k", "batch": [make_event()]})

    def send() -> bytes:
        conn.request("POST", "/batch/", body=body)
        return conn.getresponse().read()

    try:
        assert send() == b'{"status": 1}'
        server.stop()
        with pytest.raises((http.client.HTTPException, OSError)):
            send()
    finally:
        conn.close()
        server.stop()
    assert server.accepted_count == 1
    assert len(server.requests) == 1


def test_stop_cuts_a_reply_delay_short() -> None:
    server = CaptureServer().start()
    arrived = threading.Event()

    def note_arrival(event: dict[str, Any]) -> bool:
        arrived.set()
        return False

    server.reject_events(note_arrival)
    server.enqueue_reply(Reply(delay=30.0))
    outcome: list[object] = []

    def client() -> None:
        try:
            outcome.append(post(server, {"api_key": "k", "batch": [make_event()]}, timeout=20.0))
        except requests.RequestException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    assert arrived.wait(timeout=5.0)

    started = time.monotonic()
    server.stop()
    thread.join(timeout=10.0)

    assert time.monotonic() - started < 5.0
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert server.wait_for_requests(1, timeout=5.0)[0].path == "/batch/"


# -- scripted replies ---------------------------------------------------------------------------


def test_scripted_503_then_200(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=503, times=2))
    assert srv.replies_pending == 2
    first, second = [make_event(0)], [make_event(1)]

    statuses = [post(srv, {"api_key": "k", "batch": first}).status_code for _ in range(2)]
    final = post(srv, {"api_key": "k", "batch": second})

    assert statuses == [503, 503]
    assert final.status_code == 200
    assert srv.replies_pending == 0
    assert [r.status for r in srv.requests] == [503, 503, 200]
    assert srv.requests[0].events == first  # refused requests still show what was sent
    assert not srv.requests[0].accepted
    assert srv.events == second


def test_replies_are_consumed_in_order(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=500), Reply(status=429, times=2))
    srv.enqueue_reply(Reply(status=502))

    statuses = [post(srv, {"api_key": "k", "batch": [make_event()]}).status_code for _ in range(5)]

    assert statuses == [500, 429, 429, 502, 200]
    assert srv.accepted_count == 1


def test_default_error_body(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=503))

    res = post(srv, {"api_key": "k", "batch": [make_event()]})

    assert res.status_code == 503
    # PostHog's capture answers errors with the error's text alone, as plain text.
    assert res.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert res.text == texts.RETRYABLE == "transient error, please retry"
    assert "Retry-After" not in res.headers
    assert srv.requests[0].detail == texts.RETRYABLE


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (400, "invalid event could not be processed"),
        (401, "api_key does not resolve to a known project"),
        (413, "maximum event size exceeded: scripted reply"),
        (429, "rate limited"),
        (500, "internal server error"),
        (502, "Bad Gateway"),
    ],
)
def test_scripted_errors_answer_posthogs_text(srv: CaptureServer, status: int, text: str) -> None:
    srv.enqueue_reply(Reply(status=status))

    res = post(srv, {"api_key": "k", "batch": [make_event()]})

    assert (res.status_code, res.text) == (status, text)
    assert res.headers["Content-Type"] == texts.TEXT_CONTENT_TYPE


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(30, "30"), (1.5, "1.5"), (2.0, "2"), ("Wed, 21 Oct 2015 07:28:00 GMT", None)],
)
def test_retry_after_header(
    srv: CaptureServer, retry_after: str | float, header: str | None
) -> None:
    srv.enqueue_reply(Reply(status=429, retry_after=retry_after))

    res = post(srv, {"api_key": "k", "batch": [make_event()]})

    assert res.status_code == 429
    assert res.headers["Retry-After"] == (header if header is not None else retry_after)


def test_custom_reply_bodies(srv: CaptureServer) -> None:
    srv.enqueue_reply(
        Reply(status=200, body={"status": 1, "quota_limited": ["events"]}),
        Reply(status=502, body="<html>Bad gateway</html>"),
    )
    event = make_event()

    ok = post(srv, {"api_key": "k", "batch": [event]})
    proxy = post(srv, {"api_key": "k", "batch": [make_event()]})

    assert ok.json() == {"status": 1, "quota_limited": ["events"]}
    assert proxy.status_code == 502
    assert proxy.text == "<html>Bad gateway</html>"
    assert proxy.headers["Content-Type"].startswith("text/plain")
    assert srv.events == [event]


def test_default_reply_401_until_the_key_is_fixed(srv: CaptureServer) -> None:
    srv.default_reply = Reply(status=401)

    refused = [post(srv, {"api_key": "k", "batch": [make_event()]}).status_code for _ in range(2)]
    srv.default_reply = Reply(status=200)
    accepted = post(srv, {"api_key": "k", "batch": [make_event()]})

    assert refused == [401, 401]
    assert accepted.status_code == 200
    assert srv.accepted_count == 1


def test_delay_is_observed(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(delay=0.3))

    started = time.monotonic()
    res = post(srv, {"api_key": "k", "batch": [make_event()]})
    elapsed = time.monotonic() - started

    assert res.status_code == 200
    assert elapsed >= 0.3


def test_delay_provokes_a_client_timeout(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(delay=0.5))
    event = make_event()

    with pytest.raises(requests.exceptions.ReadTimeout):
        post(srv, {"api_key": "k", "batch": [event]}, timeout=0.1)

    # The server still processed it: the classic "delivered but the client never heard" case.
    [request] = srv.wait_for_requests(1, timeout=5.0)
    assert request.status == 200
    assert srv.events == [event]
    assert post(srv, {"api_key": "k", "batch": [make_event()]}, timeout=2.0).status_code == 200


def test_wait_for_events_blocks_until_they_arrive(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(delay=0.3))
    batch = [make_event(0), make_event(1)]
    thread = threading.Thread(target=post, args=(srv, {"api_key": "k", "batch": batch}))

    started = time.monotonic()
    thread.start()
    events = srv.wait_for_events(2, timeout=5.0)
    elapsed = time.monotonic() - started
    thread.join(timeout=5.0)

    assert events == batch
    assert 0.25 <= elapsed < 3.0  # woken by the arrival, not by its own 5 s timeout


def test_wait_for_events_times_out(srv: CaptureServer) -> None:
    post(srv, {"api_key": "k", "batch": [make_event()]})
    srv.enqueue_reply(Reply(status=503))
    post(srv, {"api_key": "k", "batch": [make_event()]})

    started = time.monotonic()
    with pytest.raises(
        TimeoutError, match=r"at least 2 accepted event\(s\).*but 1 arrived"
    ) as info:
        srv.wait_for_events(2, timeout=0.2)

    assert time.monotonic() - started >= 0.2
    assert "503: 1" in str(info.value)


def test_wait_for_requests_times_out(srv: CaptureServer) -> None:
    with pytest.raises(TimeoutError, match="but 0 arrived"):
        srv.wait_for_requests(1, timeout=0.1)


# -- content rules and limits -------------------------------------------------------------------


def test_reject_events_refuses_the_whole_request(srv: CaptureServer) -> None:
    srv.reject_events(lambda e: e.get("event") == "bad", status=400, detail="bad event name")
    good, bad = make_event(0), make_event(1, name="bad")

    refused = post(srv, {"api_key": "k", "batch": [good, bad]})
    accepted = post(srv, {"api_key": "k", "batch": [good]})

    assert refused.status_code == 400
    assert refused.text == "bad event name"
    assert accepted.status_code == 200
    assert srv.events == [good]
    assert srv.requests[0].status == 400
    assert srv.requests[0].events == [good, bad]
    assert srv.requests[0].detail == "bad event name"

    srv.clear_rules()
    assert post(srv, {"api_key": "k", "batch": [bad]}).status_code == 200


def test_reject_events_with_a_custom_status(srv: CaptureServer) -> None:
    srv.reject_events(lambda e: "$set" in e.get("properties", {}), status=422, detail="no $set")

    event = make_event()
    event["properties"]["$set"] = {"plan": "pro"}

    res = post(srv, {"api_key": "k", "batch": [make_event(), event]})

    assert res.status_code == 422
    assert res.text == "no $set"
    assert srv.events == []


def test_reject_events_predicate_that_raises_answers_500(srv: CaptureServer) -> None:
    srv.reject_events(lambda e: e["missing"] == 1)

    res = post(srv, {"api_key": "k", "batch": [make_event()]})

    assert res.status_code == 500
    assert res.text.startswith(texts.INTERNAL_ERROR)
    assert "KeyError" in res.text
    assert srv.events == []


def test_max_body_bytes_measures_the_decompressed_body(srv: CaptureServer) -> None:
    srv.max_body_bytes = 1_000
    big = {"api_key": "k", "batch": [make_event(i, padding="a" * 100) for i in range(20)]}
    small = {"api_key": "k", "batch": [make_event()]}

    refused = post(srv, big, compress=True)
    accepted = post(srv, small, compress=True)

    assert refused.status_code == 413
    assert refused.text.startswith("maximum event size exceeded: ")
    assert "exceeds the limit of 1000 bytes" in refused.text
    assert srv.requests[0].raw_size < 1_000  # small on the wire, too big once decompressed
    assert accepted.status_code == 200
    assert srv.events == small["batch"]


def test_max_event_bytes(srv: CaptureServer) -> None:
    srv.max_event_bytes = 400
    small, large = make_event(0), make_event(1, padding="b" * 500)

    refused = post(srv, {"api_key": "k", "batch": [small, large]})
    accepted = post(srv, {"api_key": "k", "batch": [small, small]})

    assert refused.status_code == 413
    assert refused.text.startswith("maximum event size exceeded: event 1 ")
    assert accepted.status_code == 200
    assert srv.events == [small, small]


def test_require_api_key(srv: CaptureServer) -> None:
    srv.require_api_key = "phc_right"
    event = make_event()

    wrong = post(srv, {"api_key": "phc_wrong", "batch": [event]})
    missing = post(srv, {"batch": [event]})
    right = post(srv, {"api_key": "phc_right", "batch": [event]})

    assert wrong.status_code == 401
    assert wrong.text == texts.UNKNOWN_KEY
    assert missing.status_code == 401
    assert missing.text == texts.NO_KEY
    assert right.status_code == 200
    assert srv.events == [event]
    assert [r.api_key for r in srv.requests] == ["phc_wrong", None, "phc_right"]


DECODE = "failed to decode request: "
PARSE = "failed to parse request: "


@pytest.mark.parametrize(
    ("data", "headers", "detail"),
    [
        (b"{not json", {}, PARSE + "the body is not valid JSON"),
        (b"", {}, texts.EMPTY_PAYLOAD),
        (b'{"api_key": "k", "batch": [1]}', {"Content-Encoding": "gzip"}, DECODE + "invalid gzip"),
        (
            gzip.compress(b'{"api_key": "k", "batch": [1]}')[:-8],
            {"Content-Encoding": "gzip"},
            DECODE + "invalid gzip",
        ),
        (b'{"api_key": "k", "batch": [1]}\xff', {}, DECODE + "invalid body encoding"),
        (b'{"api_key": "k", "batch": {"event": "x"}}', {}, PARSE + "'batch' must be"),
        (b'{"api_key": "k", "batch": [1, 2]}', {}, PARSE + "every event must be a JSON object"),
        (b'{"api_key": "k", "batch": [{"distinct_id": "u"}]}', {}, PARSE + "every event needs"),
        (b'{"api_key": "k"}', {}, PARSE + "the body has neither"),
        (b'"just a string"', {}, PARSE + "the body must be a JSON object or array"),
        (b'{"api_key": "k", "batch": []}', {}, texts.EMPTY_BATCH),
        (
            b'{"api_key": "k", "batch": [{"event": "", "distinct_id": "u"}]}',
            {},
            texts.MISSING_EVENT_NAME,
        ),
        (b'{"api_key": "k", "batch": [{"event": "x"}]}', {}, texts.MISSING_DISTINCT_ID),
    ],
)
def test_bad_bodies_answer_400(
    srv: CaptureServer, data: bytes, headers: dict[str, str], detail: str
) -> None:
    res = post_raw(srv, data, headers)

    assert res.status_code == 400
    assert res.headers["Content-Type"] == texts.TEXT_CONTENT_TYPE
    assert res.text.startswith(detail)
    assert srv.requests[0].detail == res.text
    assert srv.events == []
    assert srv.requests[0].status == 400
    # The connection stays usable after a refused body.
    assert post(srv, {"api_key": "k", "batch": [make_event()]}).status_code == 200


# -- bookkeeping ----------------------------------------------------------------------------------


def test_record_events_off_only_counts(srv: CaptureServer) -> None:
    srv.record_events = False

    post(srv, {"api_key": "k", "batch": [make_event(i) for i in range(5)]})
    srv.enqueue_reply(Reply(status=500))
    post(srv, {"api_key": "k", "batch": [make_event(i) for i in range(3)]})

    assert srv.wait_for_events(5, timeout=1.0) == []
    assert srv.accepted_count == 5
    assert srv.events == []
    assert srv.uuids() == []
    assert [(r.status, r.event_count, r.events) for r in srv.requests] == [
        (200, 5, []),
        (500, 3, []),
    ]


def test_reset_clears_recordings_and_replies(srv: CaptureServer) -> None:
    post(srv, {"api_key": "k", "batch": [make_event()]})
    srv.enqueue_reply(Reply(status=503, times=5))
    srv.default_reply = Reply(status=401)

    srv.reset()

    assert srv.requests == []
    assert srv.events == []
    assert srv.accepted_count == 0
    assert srv.replies_pending == 0
    assert post(srv, {"api_key": "k", "batch": [make_event()]}).status_code == 200


def test_urllib_client_works_too(srv: CaptureServer) -> None:
    event = make_event()
    request = urllib.request.Request(
        srv.url + "/batch/",
        data=gzip.compress(json.dumps({"api_key": "k", "batch": [event]}).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        method="POST",
    )
    srv.enqueue_reply(Reply(status=413))

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5.0)
    assert info.value.code == 413
    info.value.close()
    with urllib.request.urlopen(request, timeout=5.0) as res:
        assert res.status == 200

    assert srv.events == [event]
    assert isinstance(srv.requests[0], ReceivedRequest)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 100},
        {"status": 600},
        {"status": 304},
        {"status": 301},  # a redirect needs a location
        {"status": 200, "location": "http://elsewhere"},
        {"delay": -1.0},
        {"times": 0},
        {"status": 200, "accept_first": 1},
        {"status": 503, "accept_first": -1},
    ],
)
def test_reply_validates_its_fields(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Reply(**kwargs)


def test_reject_events_requires_an_error_status(srv: CaptureServer) -> None:
    with pytest.raises(ValueError, match="between 400 and 599"):
        srv.reject_events(lambda e: True, status=200)


# -- keys and projects ----------------------------------------------------------------------------


def test_unknown_project_key_is_answered_200_and_its_events_dropped(srv: CaptureServer) -> None:
    srv.project_keys = {"phc_known"}
    known, unknown = make_event(0), make_event(1)

    kept = post(srv, {"api_key": "phc_known", "batch": [known]})
    lost = post(srv, {"api_key": "phc_typo", "batch": [unknown]})

    # PostHog's capture does not look keys up: a typo'd key is accepted and its events vanish.
    assert (kept.status_code, kept.json()) == (200, {"status": 1})
    assert (lost.status_code, lost.json()) == (200, {"status": 1})
    assert srv.events == [known]
    assert srv.uuids() == [known["uuid"]]
    assert srv.accepted_count == 1
    assert srv.dropped == [unknown]
    assert [(r.api_key, r.accepted, r.dropped, r.delivered) for r in srv.requests] == [
        ("phc_known", True, False, 1),
        ("phc_typo", True, True, 1),
    ]
    with pytest.raises(TimeoutError):
        srv.wait_for_events(2, timeout=0.1)


def test_default_mode_takes_every_well_formed_key(srv: CaptureServer) -> None:
    events = [make_event(i) for i in range(3)]

    for i, event in enumerate(events):
        assert post(srv, {"api_key": f"phc_any_{i}", "batch": [event]}).status_code == 200

    assert srv.events == events
    assert srv.dropped == []


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("  \n", "empty"),
        ("x" * 65, "too_long"),
        ("phc_é", "not_ascii"),
        ("phx_personal_key", "personal_api_key"),
        ("phc_a\0b", "null_byte"),
    ],
)
def test_a_malformed_key_is_answered_401(srv: CaptureServer, key: str, reason: str) -> None:
    res = post(srv, {"api_key": key, "batch": [make_event()]})

    assert res.status_code == 401
    assert res.text == texts.INVALID_KEY.format(reason) == f"API key is not valid: {reason}"
    assert texts.key_problem(key) == reason
    assert srv.events == []
    assert srv.dropped == []


@pytest.mark.parametrize("key", ["x" * 64, "phc_copied_with_a_newline\n", " phc_padded "])
def test_well_formed_keys_pass_the_shape_check(srv: CaptureServer, key: str) -> None:
    srv.project_keys = {key.strip()}
    event = make_event()

    res = post(srv, {"api_key": key, "batch": [event]})

    assert res.status_code == 200
    assert texts.key_problem(key) is None
    assert srv.events == [event]  # the trimmed key is the project's


def test_keys_carried_by_the_events(srv: CaptureServer) -> None:
    one = make_event(0)
    one["api_key"] = "phc_a"
    other = make_event(1, token="phc_b")

    mixed = post(srv, [one, other])
    same = post(srv, [one, make_event(2, token="phc_a")])
    none = post(srv, [make_event(3)])

    assert (mixed.status_code, mixed.text) == (401, texts.MULTIPLE_KEYS)
    assert same.status_code == 200
    assert (none.status_code, none.text) == (401, texts.NO_KEY)
    assert [r.api_key for r in srv.requests] == ["phc_a", "phc_a", None]
    assert srv.event_names() == ["page_viewed", "page_viewed"]


# -- /flags ---------------------------------------------------------------------------------------


def post_flags(
    srv: CaptureServer, body: object, query: str = "?v=2", path: str = "/flags/"
) -> requests.Response:
    return requests.post(srv.url + path + query, json=body, timeout=5.0)


def test_flags_resolve_known_keys_for_the_posthog_client(srv: CaptureServer) -> None:
    srv.project_keys = {"phc_known"}
    srv.feature_flags = {"beta": True, "checkout": "variant-b", "old": False}
    known = posthog.Posthog("phc_known", host=srv.url, sync_mode=True, max_retries=0)
    unknown = posthog.Posthog("phc_typo", host=srv.url, sync_mode=True, max_retries=0)
    try:
        flags = known.evaluate_flags("user-1")
        lost = unknown.evaluate_flags("user-1")
    finally:
        known.shutdown()
        unknown.shutdown()

    assert flags.is_enabled("beta") is True
    assert flags.get_flag("checkout") == "variant-b"
    assert flags.is_enabled("old") is False
    assert lost.get_flag("beta") is None
    [good, bad] = srv.flags_requests()
    assert (good.path, good.status, good.api_key) == ("/flags/", 200, "phc_known")
    assert good.document is not None and good.document["distinct_id"] == "user-1"
    assert (bad.status, bad.api_key, bad.detail) == (401, "phc_typo", texts.FLAGS_INVALID_KEY)
    # Flags requests are no capture requests: no events, no scripted replies consumed.
    assert srv.events == [] and srv.accepted_count == 0


def test_flags_document_by_version(srv: CaptureServer) -> None:
    srv.feature_flags = {"beta": True, "checkout": "b"}
    body = {"api_key": "phc_any", "distinct_id": "user-1"}

    v4 = post_flags(srv, body, "?v=4").json()
    v2 = post_flags(srv, body, "?v=2", path="/flags").json()
    v1 = post_flags(srv, body, "").json()

    assert v4["flags"]["beta"]["value"] is True
    assert v4["flags"]["checkout"]["value"] == "b"
    assert v2["flags"]["checkout"]["enabled"] is True
    assert v2["flags"]["checkout"]["variant"] == "b"
    assert "value" not in v2["flags"]["beta"]
    assert v1["featureFlags"] == {"beta": True, "checkout": "b"}
    assert v2["errorsWhileComputingFlags"] is False
    assert isinstance(v2["requestId"], str)
    assert [r.path for r in srv.flags_requests()] == ["/flags/", "/flags", "/flags/"]


def test_flags_refusals(srv: CaptureServer) -> None:
    srv.require_api_key = "phc_right"

    right = post_flags(srv, {"token": "phc_right", "distinct_id": "u"})
    wrong = post_flags(srv, {"api_key": "phc_wrong", "distinct_id": "u"})
    shape = post_flags(srv, {"api_key": "phx_personal", "distinct_id": "u"})
    no_key = post_flags(srv, {"distinct_id": "u"})
    no_user = post_flags(srv, {"api_key": "phc_right"})
    broken = requests.post(srv.url + "/flags/?v=2", data=b"{", timeout=5.0)

    assert right.status_code == 200
    assert (wrong.status_code, wrong.text) == (401, texts.FLAGS_INVALID_KEY)
    assert (shape.status_code, shape.text) == (401, texts.FLAGS_INVALID_KEY)
    assert (no_key.status_code, no_key.text) == (401, texts.FLAGS_NO_KEY)
    assert (no_user.status_code, no_user.text) == (400, texts.FLAGS_MISSING_DISTINCT_ID)
    assert broken.status_code == 400
    assert broken.text.startswith("Failed to parse request: ")
    assert len(srv.flags_requests()) == 6


def test_flags_do_not_consume_scripted_replies(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=503))

    flags = post_flags(srv, {"api_key": "phc_any", "distinct_id": "u"})
    capture = post(srv, {"api_key": "phc_any", "batch": [make_event()]})

    assert flags.status_code == 200
    assert capture.status_code == 503
    assert srv.replies_pending == 0


# -- redirects ------------------------------------------------------------------------------------


def test_redirect_to_moves_every_request(srv: CaptureServer) -> None:
    with CaptureServer() as new_home:
        srv.redirect_to = new_home.url + "/"
        event = make_event()

        res = post(srv, {"api_key": "phc_any", "batch": [event]}, path="/batch/?ver=1")
        direct = requests.get(srv.url + "/anything?x=1", allow_redirects=False, timeout=5.0)

        # requests follows a 301 answer to a POST with a GET without the body: the events
        # never arrive, and the new host answers PostHog's empty-payload 400.
        assert [r.status_code for r in res.history] == [301]
        assert res.history[0].headers["Location"] == new_home.url + "/batch/?ver=1"
        assert res.status_code == 400
        assert res.text == texts.EMPTY_PAYLOAD
        assert (direct.status_code, direct.headers["Location"]) == (
            301,
            new_home.url + "/anything?x=1",
        )
        assert [(r.method, r.status, r.location) for r in srv.requests] == [
            ("POST", 301, new_home.url + "/batch/?ver=1"),
            ("GET", 301, new_home.url + "/anything?x=1"),
        ]
        assert [(r.method, r.path, r.status) for r in new_home.requests] == [
            ("GET", "/batch/", 400)
        ]
        assert srv.events == [] and new_home.events == []


@pytest.mark.parametrize(
    ("status", "followed"), [(301, "GET"), (302, "GET"), (303, "GET"), (307, "POST"), (308, "POST")]
)
def test_scripted_redirects(srv: CaptureServer, status: int, followed: str) -> None:
    with CaptureServer() as new_home:
        srv.enqueue_reply(Reply(status=status, location=new_home.url + "/batch/"))
        event = make_event()

        res = post(srv, {"api_key": "phc_any", "batch": [event]})

        assert res.history[0].status_code == status
        [request] = new_home.requests
        assert request.method == followed
        if followed == "POST":  # 307 and 308 keep the method and the body
            assert res.status_code == 200
            assert new_home.events == [event]
        else:
            assert res.status_code == 400
            assert new_home.events == []
        assert srv.events == []
        assert srv.requests[0].location == new_home.url + "/batch/"
        assert srv.requests[0].events == [event]


# -- 2xx replies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_reply_accepts(srv: CaptureServer, status: int) -> None:
    srv.enqueue_reply(Reply(status=status), Reply(status=status))
    event = make_event()

    res = post(srv, {"api_key": "phc_any", "batch": [event]})
    bad = post(srv, {"api_key": "phc_any", "batch": [{"event": "x"}]})

    assert res.status_code == status
    assert res.content == (b"" if status == 204 else b'{"status": 1}')
    assert srv.events == [event]
    assert srv.requests[0].accepted
    assert (bad.status_code, bad.text) == (400, texts.MISSING_DISTINCT_ID)  # still judged


# -- the official SDK in its default mode ---------------------------------------------------------


@pytest.mark.parametrize("gzip_body", [False, True])
def test_posthog_client_capture_is_accepted(srv: CaptureServer, gzip_body: bool) -> None:
    client = posthog.Posthog("phc_sdk", host=srv.url, sync_mode=True, gzip=gzip_body, max_retries=0)
    try:
        uuids = [
            client.capture("signed_up", distinct_id="user-1", properties={"plan": "pro"}),
            client.capture("$pageview", distinct_id="user-1"),
        ]
        client.set(distinct_id="user-1", properties={"email": "ada@example.com"})
        client.group_identify("company", "acme", {"name": "Acme"})
    finally:
        client.shutdown()

    assert [r.status for r in srv.requests] == [200] * len(srv.requests)
    assert srv.uuids()[:2] == uuids
    assert srv.event_names()[:2] == ["signed_up", "$pageview"]
    assert srv.event_names()[2:] == ["$set", "$groupidentify"]
    assert all(r.api_key == "phc_sdk" and r.gzip is gzip_body for r in srv.requests)


# -- partial delivery -----------------------------------------------------------------------------


def test_accept_first_keeps_part_of_a_failed_batch(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=503, accept_first=2, retry_after=1))
    events = [make_event(i) for i in range(5)]

    res = post(srv, {"api_key": "phc_any", "batch": events})

    assert res.status_code == 503
    assert res.text == texts.RETRYABLE
    assert res.headers["Retry-After"] == "1"
    assert srv.events == events[:2]
    assert srv.accepted_count == 2
    [request] = srv.requests
    assert (request.accepted, request.delivered, request.event_count) == (False, 2, 5)
    assert request.events == events


def test_accept_first_beyond_the_batch_and_of_a_broken_body(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=500, accept_first=10), Reply(status=500, accept_first=10))
    events = [make_event(i) for i in range(3)]

    post(srv, {"api_key": "phc_any", "batch": events})
    post_raw(srv, b"{not json", {})

    assert srv.events == events
    assert [r.delivered for r in srv.requests] == [3, 0]


def test_accept_first_of_an_unknown_project_is_dropped(srv: CaptureServer) -> None:
    srv.project_keys = {"phc_known"}
    srv.enqueue_reply(Reply(status=413, accept_first=1))
    events = [make_event(0), make_event(1)]

    res = post(srv, {"api_key": "phc_other", "batch": events})

    assert res.status_code == 413
    assert srv.events == []
    assert srv.dropped == events[:1]
    assert srv.requests[0].dropped


@pytest.mark.parametrize("partial", [True, False])
def test_partial_delivery_before_an_oversized_event(srv: CaptureServer, partial: bool) -> None:
    srv.max_event_bytes = 400
    srv.partial_delivery = partial
    events = [make_event(0), make_event(1), make_event(2, padding="b" * 500), make_event(3)]

    res = post(srv, {"api_key": "phc_any", "batch": events})

    assert res.status_code == 413
    assert res.text.startswith("maximum event size exceeded: event 2 ")
    assert srv.events == (events[:2] if partial else [])
    assert srv.requests[0].delivered == (2 if partial else 0)


def test_partial_delivery_needs_a_valid_batch(srv: CaptureServer) -> None:
    srv.max_event_bytes = 400
    srv.partial_delivery = True
    events = [make_event(0), make_event(1, padding="b" * 500), {"event": "no_distinct_id"}]

    res = post(srv, {"api_key": "phc_any", "batch": events})

    # A malformed event refuses the whole batch before anything is stored.
    assert (res.status_code, res.text) == (400, texts.MISSING_DISTINCT_ID)
    assert srv.events == []


# -- the AI endpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize("sync_mode", [True, False])
def test_posthog_client_ai_events_reach_the_ai_endpoint(
    srv: CaptureServer, sync_mode: bool
) -> None:
    client = posthog.Posthog(
        "phc_ai", host=srv.url, sync_mode=sync_mode, max_retries=0, enable_full_ai_capture=True
    )
    try:
        generation = client.capture_ai(
            "$ai_generation",
            distinct_id="user-1",
            properties={"$ai_model": "gpt-4o", "$ai_input_tokens": 12, "$ai_trace_id": "t1"},
        )
        span = client.capture_ai(
            "$ai_span", distinct_id="user-1", properties={"$ai_trace_id": "t1"}
        )
        pageview = client.capture("$pageview", distinct_id="user-1")
        client.flush()
    finally:
        client.shutdown()

    srv.wait_for_events(3)
    ai_requests = [r for r in srv.requests if r.path in AI_PATHS]
    assert [r.path for r in ai_requests] == ["/i/v0/ai/batch/"] * len(ai_requests)
    assert all(r.status == 200 and r.api_key == "phc_ai" for r in srv.requests)
    ai_uuids = [e["uuid"] for r in ai_requests for e in r.events]
    assert ai_uuids == [generation, span]
    assert [e["uuid"] for r in srv.requests if r.path == "/batch/" for e in r.events] == [pageview]
    assert sorted(srv.uuids()) == sorted([generation, span, pageview])


def test_ai_endpoint_refuses_a_batch_with_other_events(srv: CaptureServer) -> None:
    ai_event = make_event(0, name="$ai_generation")

    mixed = post(
        srv, {"api_key": "phc_any", "batch": [ai_event, make_event(1)]}, path="/i/v0/ai/batch/"
    )
    pure = post(srv, {"api_key": "phc_any", "batch": [ai_event]}, path="/i/v0/ai/batch")
    on_batch = post(srv, {"api_key": "phc_any", "batch": [ai_event, make_event(2)]})
    get = requests.get(srv.url + "/i/v0/ai/batch/", timeout=5.0)

    assert (mixed.status_code, mixed.text) == (400, texts.NON_RETRYABLE)
    assert pure.status_code == 200
    assert on_batch.status_code == 200  # /batch/ takes AI events among the others
    assert get.status_code == 405
    assert srv.event_names() == ["$ai_generation", "$ai_generation", "page_viewed"]
    assert {"$ai_generation", "$ai_span", "$ai_trace", "$ai_embedding"} <= AI_EVENT_NAMES


def test_ai_endpoint_judges_like_batch(srv: CaptureServer) -> None:
    srv.project_keys = {"phc_known"}
    event = make_event(name="$ai_trace")

    bad_key = post(srv, {"api_key": "phx_x", "batch": [event]}, path="/i/v0/ai/batch/")
    dropped = post(srv, {"api_key": "phc_typo", "batch": [event]}, path="/i/v0/ai/batch/")
    srv.enqueue_reply(Reply(status=503))
    scripted = post(srv, {"api_key": "phc_known", "batch": [event]}, path="/i/v0/ai/batch/")

    assert (bad_key.status_code, bad_key.text) == (
        401,
        texts.INVALID_KEY.format("personal_api_key"),
    )
    assert dropped.status_code == 200
    assert srv.dropped == [event]
    assert scripted.status_code == 503
    assert srv.events == []


# -- posthog-node ---------------------------------------------------------------------------------

POSTHOG_NODE = (
    Path(__file__).resolve().parents[2] / ".ci" / "node" / "node_modules" / "posthog-node"
)
NODE_CLIENT = r"""
const { PostHog } = require(process.argv[1]);
const options = { host: process.argv[2], flushAt: 1, flushInterval: 0, fetchRetryCount: 0 };
(async () => {
  const known = new PostHog('phc_node', options);
  known.capture({ distinctId: 'user-1', event: 'signed_up', properties: { plan: 'pro' } });
  const flags = await known.evaluateFlags('user-1');
  known.captureAi({ distinctId: 'user-1', event: '$ai_generation', properties: { n: 1 } });
  await known.shutdown();
  const typo = new PostHog('phc_typo', options);
  const lost = await typo.evaluateFlags('user-1');
  typo.capture({ distinctId: 'user-1', event: 'signed_up' });
  await typo.shutdown();
  console.log(JSON.stringify({
    beta: flags.isEnabled('beta'), checkout: flags.getFlag('checkout'),
    lost: lost.getFlag('beta') === undefined ? null : lost.getFlag('beta'),
  }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def test_posthog_node_client(srv: CaptureServer) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: install Node.js 20 to run the posthog-node test")
    if not POSTHOG_NODE.is_dir():
        pytest.skip("posthog-node is not installed: npm install --prefix .ci/node posthog-node")
    srv.project_keys = {"phc_node"}
    srv.feature_flags = {"beta": True, "checkout": "variant-b"}

    done = subprocess.run(
        [node, "-e", NODE_CLIENT, str(POSTHOG_NODE), srv.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers == {"beta": True, "checkout": "variant-b", "lost": None}
    names = srv.event_names()  # with the client's own $feature_flag_called events
    assert names.count("signed_up") == 1
    assert names.count("$ai_generation") == 1
    assert set(names) <= {"signed_up", "$ai_generation", "$feature_flag_called"}
    assert [r.path for r in srv.requests if r.path in AI_PATHS] == ["/i/v0/ai/batch/"]
    assert "signed_up" in [e["event"] for e in srv.dropped]
    assert {r.api_key for r in srv.requests if r.dropped} == {"phc_typo"}
    flags = srv.flags_requests()
    assert [(r.api_key, r.status) for r in flags] == [("phc_node", 200), ("phc_typo", 401)]
    assert all(r.headers["user-agent"].startswith("posthog-node/") for r in srv.requests)
    assert all(r.status == 200 for r in srv.requests if r.path not in FLAGS_PATHS)


# -- extra routes ---------------------------------------------------------------------------------


def test_extra_routes_are_served_and_recorded(srv: CaptureServer) -> None:
    def echo(server: CaptureServer, exchange: Exchange) -> None:
        body = exchange.read_body() or b""
        reply = server._next_reply()
        server._record(
            ReceivedRequest(
                exchange.path,
                exchange.headers,
                reply.status,
                None,
                [],
                len(body),
                False,
                exchange.received_at,
                method=exchange.method,
            )
        )
        exchange.respond(reply.status, body, "application/octet-stream")

    srv.routes["/echo"] = echo
    srv.enqueue_reply(Reply(status=202))

    res = requests.post(srv.url + "/echo?x=1", data=b"hello", timeout=5.0)

    assert (res.status_code, res.content) == (202, b"hello")
    assert [(r.path, r.method, r.status, r.raw_size) for r in srv.requests] == [
        ("/echo", "POST", 202, 5)
    ]
    srv.redirect_to = "http://elsewhere"  # redirect_to wins over every route
    moved = requests.post(srv.url + "/echo", data=b"x", allow_redirects=False, timeout=5.0)
    assert moved.status_code == 301
