"""CaptureServer's capture v1 endpoint, against posthog-python's and posthog-node's v1 modes
and raw requests that break each of PostHog's rules."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from posthog import Client
from posthog.capture_v1 import CaptureV1Error
from urllib3.util import SKIP_HEADER

from worker.testing import CaptureServer, Reply
from worker.testing.capture_v1 import BILLING_LIMIT_DESCRIPTION, V1_PATH


@pytest.fixture
def srv() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def v1_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "signed_up",
        "uuid": str(uuid.uuid4()),
        "distinct_id": "user-1",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "options": {},
        "properties": {"plan": "pro"},
    }
    event.update(overrides)
    return event


def headers(**overrides: str | None) -> dict[str, str | None]:
    base: dict[str, str | None] = {
        "Authorization": "Bearer phc_test",
        "Content-Type": "application/json",
        "User-Agent": "tests/1",
        "PostHog-Sdk-Info": "tests/1.0",
        "PostHog-Attempt": "1",
        "PostHog-Request-Id": str(uuid.uuid4()),
        "PostHog-Request-Timestamp": datetime.now(UTC).isoformat(),
    }
    base.update(overrides)
    if base["User-Agent"] is None:  # urllib3 adds its own unless told to skip it
        base["User-Agent"] = SKIP_HEADER
    return base  # requests leaves out a header whose value is None (even its own defaults)


def post(
    srv: CaptureServer,
    body: bytes | dict[str, Any] | None = None,
    *,
    events: list[dict[str, Any]] | None = None,
    **header_overrides: str | None,
) -> requests.Response:
    if body is None:
        body = {"created_at": datetime.now(UTC).isoformat(), "batch": events or [v1_event()]}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        srv.url + V1_PATH, data=data, headers=headers(**header_overrides), timeout=5
    )


def client(srv: CaptureServer, **options: Any) -> Client:
    errors: list[Exception] = []
    c = Client(
        "phc_python",
        host=srv.url,
        capture_mode="v1",
        sync_mode=True,
        max_retries=options.pop("max_retries", 0),
        on_error=lambda exc, _batch: errors.append(exc),
        **options,
    )
    c.errors = errors  # type: ignore[attr-defined]
    return c


# -- posthog-python's real client, capture_mode="v1" ------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "deflate", "zstd"])
def test_posthog_python_v1_delivers_in_each_compression(
    srv: CaptureServer, compression: str
) -> None:
    c = client(srv, capture_compression=compression)
    sent = c.capture(
        "signed_up",
        distinct_id="user-1",
        properties={"plan": "pro", "$ignore_sent_at": True, "$session_id": "s-1"},
    )
    c.shutdown()
    assert c.errors == []  # type: ignore[attr-defined]
    assert srv.uuids() == [sent]
    request = srv.requests[0]
    assert request.path == V1_PATH and request.status == 200
    assert request.api_key == "phc_python"
    assert request.headers.get("content-encoding") == (
        None if compression == "none" else compression
    )
    wire = request.events[0]
    assert wire["options"] == {"disable_skew_correction": True} and wire["session_id"] == "s-1"
    # srv.events holds the event as PostHog ingests it: options written back as properties.
    props = srv.events[0]["properties"]
    assert props["plan"] == "pro" and props["$ignore_sent_at"] is True
    assert props["$session_id"] == "s-1" and props["$lib"] == "posthog-python"
    assert srv.v1.answers[0].results == {sent: srv.v1.results_for(sent)[0]}


def test_posthog_python_sees_a_drop_with_its_reason_and_the_rest_is_kept(
    srv: CaptureServer,
) -> None:
    srv.v1.verdict(lambda e: e["properties"].get("n") == 1, "drop", "billing_limit_exceeded")
    errors: list[Exception] = []
    c = Client(
        "phc_python",
        host=srv.url,
        capture_mode="v1",
        max_retries=0,
        flush_at=10,
        on_error=lambda exc, _batch: errors.append(exc),
    )
    sent = [c.capture("e", distinct_id=f"u{n}", properties={"n": n}) for n in range(3)]
    c.shutdown()
    assert srv.uuids() == [sent[0], sent[2]]
    assert len(srv.requests) == 1
    assert srv.v1.answers[0].uuids("drop") == [sent[1]]
    assert [type(e) for e in errors] == [CaptureV1Error]
    assert errors[0].drops == [(sent[1], "billing_limit_exceeded")]  # type: ignore[attr-defined]


def test_posthog_python_resends_only_the_retry_event_in_the_same_request(
    srv: CaptureServer,
) -> None:
    srv.v1.verdict(lambda e: e["properties"].get("n") == 1, "retry", times=1)
    c = Client("phc_python", host=srv.url, capture_mode="v1", max_retries=1, flush_at=10)
    sent = [c.capture("e", distinct_id=f"u{n}", properties={"n": n}) for n in range(3)]
    c.shutdown()
    first, second = srv.v1.answers
    assert first.uuids("retry") == [sent[1]] and first.attempt == "1"
    assert second.attempt == "2" and second.request_id == first.request_id
    assert list(second.results) == [sent[1]] and second.uuids("ok") == [sent[1]]
    assert sorted(srv.uuids()) == sorted(sent) and len(srv.uuids()) == 3
    assert srv.v1.results_for(sent[1])[0].details == "not_persisted"


def test_posthog_python_treats_the_billing_limit_as_terminal(srv: CaptureServer) -> None:
    srv.v1.billing_limit = 402
    c = client(srv, max_retries=3)
    c.capture("e", distinct_id="u")  # the client logs the CaptureV1Error (402)
    c.shutdown()
    assert srv.events == []
    assert [r.status for r in srv.requests] == [402]  # no retry: 402 is terminal for it


# -- posthog-node, POSTHOG_CAPTURE_MODE=v1 ---------------------------------------------------


POSTHOG_NODE = (
    Path(__file__).resolve().parents[2] / ".ci" / "node" / "node_modules" / "posthog-node"
)
#: Sends events with posthog-node in its capture v1 mode (POSTHOG_CAPTURE_MODE=v1) and prints,
#: as one JSON line, the uuids it sent and the errors its client emitted.
NODE_V1_CLIENT = r"""
const { randomUUID } = require('node:crypto');
const { PostHog } = require(process.argv[1]);
const [host, count] = [process.argv[2], Number(process.argv[3])];
const client = new PostHog('phc_node', {
  host, flushAt: 1000, flushInterval: 0, fetchRetryCount: 1, fetchRetryDelay: 10,
});
const errors = [];
client.on('error', (e) => errors.push({ name: e.name, drops: e.drops ?? [] }));
const uuids = [];
for (let i = 0; i < count; i++) {
  const uuid = randomUUID();
  uuids.push(uuid);
  client.capture({ distinctId: `node-${i}`, event: 'node_event', uuid,
                   properties: { i, $ignore_sent_at: true } });
}
// posthog-node waits out its retry backoff on an unref'd timer: with nothing else to do,
// node would exit (code 13) before the retry goes out. Keep the event loop alive meanwhile.
const keepAlive = setInterval(() => {}, 1000);
client.shutdown().then(() => {
  clearInterval(keepAlive);
  console.log(JSON.stringify({ uuids, errors }));
}).catch((error) => { console.error(error); process.exit(1); });
"""


def run_node(srv: CaptureServer, count: int) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: install Node.js 20 to run the posthog-node tests")
    if not POSTHOG_NODE.is_dir():
        pytest.skip("posthog-node is not installed: npm install --prefix .ci/node posthog-node")
    done = subprocess.run(
        [node, "-e", NODE_V1_CLIENT, str(POSTHOG_NODE), srv.url, str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "POSTHOG_CAPTURE_MODE": "v1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_posthog_node_v1_delivers_and_reports_a_drop(srv: CaptureServer) -> None:
    srv.v1.verdict(lambda e: e["properties"].get("i") == 1, "drop", "event_restriction_drop")
    out = run_node(srv, 3)
    sent = out["uuids"]
    assert srv.uuids() == [sent[0], sent[2]]
    request = srv.requests[0]
    assert request.path == V1_PATH and request.api_key == "phc_node" and request.gzip
    assert request.headers["posthog-sdk-info"].startswith("posthog-node/")
    assert srv.events[0]["properties"]["$ignore_sent_at"] is True
    assert [e["drops"] for e in out["errors"]] == [
        [{"uuid": sent[1], "details": "event_restriction_drop"}]
    ]


def test_posthog_node_v1_resends_a_retry_event(srv: CaptureServer) -> None:
    srv.v1.verdict(lambda e: e["properties"].get("i") == 0, "retry", times=1)
    out = run_node(srv, 2)
    assert out["errors"] == []
    assert sorted(srv.uuids()) == sorted(out["uuids"])
    assert [list(a.results) for a in srv.v1.answers][1] == [out["uuids"][0]]


# -- PostHog's request rules ------------------------------------------------------------------


def error_of(response: requests.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error", "error_description", "error_uri"}
    return response.status_code, body["error"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"Authorization": None}, (401, "missing_authorization")),
        ({"Authorization": "Basic abc"}, (400, "invalid_header_value")),
        ({"Authorization": "Bearer phx_personal"}, (401, "invalid_api_token")),
        ({"Authorization": "Bearer " + "k" * 65}, (401, "invalid_api_token")),
        ({"PostHog-Sdk-Info": None}, (400, "missing_required_headers")),
        ({"User-Agent": None}, (400, "missing_required_headers")),
        ({"Content-Type": "text/plain"}, (415, "unsupported_content_type")),
        ({"Content-Encoding": "lz4"}, (415, "unsupported_encoding")),
        ({"PostHog-Request-Id": "not-a-uuid"}, (400, "invalid_header_value")),
        ({"PostHog-Attempt": "0"}, (400, "invalid_header_value")),
        ({"PostHog-Request-Timestamp": "yesterday"}, (400, "invalid_header_value")),
    ],
)
def test_header_rules(
    srv: CaptureServer, overrides: dict[str, str | None], expected: tuple[int, str]
) -> None:
    response = post(srv, **overrides)
    assert error_of(response) == expected
    assert srv.events == []
    assert srv.requests[0].status == expected[0]


def test_missing_headers_are_named_as_posthog_names_them(srv: CaptureServer) -> None:
    response = post(srv, **{"PostHog-Attempt": None, "User-Agent": None})
    assert response.json()["error_description"] == (
        'request is missing required headers: ["PostHog-Attempt", "user-agent"]'
    )


def test_bearer_scheme_is_case_insensitive_and_the_key_trimmed(srv: CaptureServer) -> None:
    response = post(srv, Authorization="bEaReR   phc_padded  ")
    assert response.status_code == 200
    assert srv.requests[0].api_key == "phc_padded"


def test_require_api_key_refuses_another_key(srv: CaptureServer) -> None:
    srv.require_api_key = "phc_right"
    assert error_of(post(srv)) == (401, "invalid_api_token")
    assert post(srv, Authorization="Bearer phc_right").status_code == 200


def created(batch: list[Any], created_at: Any = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"created_at": created_at, "batch": batch}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", (400, "empty_body")),
        (b"{not json", (400, "request_parsing_error")),
        (b"[]", (400, "request_parsing_error")),
        ({"batch": [v1_event()]}, (400, "request_parsing_error")),
        (
            created([{k: v for k, v in v1_event().items() if k != "distinct_id"}]),
            (400, "request_parsing_error"),
        ),
        (created([v1_event(distinct_id=7)]), (400, "request_parsing_error")),
        (created([]), (400, "empty_batch")),
        (created([v1_event()], created_at="2026-01-01 noon"), (400, "invalid_batch")),
        (created([v1_event(uuid="")]), (400, "missing_event_uuid")),
        (created([v1_event(uuid="not-a-uuid")]), (400, "invalid_event_uuid")),
    ],
)
def test_body_rules_refuse_the_whole_request(
    srv: CaptureServer, body: bytes | dict[str, Any], expected: tuple[int, str]
) -> None:
    assert error_of(post(srv, body)) == expected
    assert srv.events == []


def test_a_duplicate_uuid_refuses_the_whole_request(srv: CaptureServer) -> None:
    twin = str(uuid.uuid4())
    events = [v1_event(), v1_event(uuid=twin), v1_event(uuid=twin.upper())]
    response = post(srv, events=events)
    assert error_of(response) == (400, "duplicate_event_uuid")
    assert twin.upper() in response.json()["error_description"]
    assert srv.events == [] and srv.accepted_count == 0


def test_bodies_that_do_not_decompress(srv: CaptureServer) -> None:
    response = post(srv, b"not gzip at all", **{"Content-Encoding": "gzip"})
    assert error_of(response) == (400, "request_decoding_error")
    assert response.json()["error_description"] == "Failed to decode request body."
    assert "gzip" in (srv.requests[0].detail or "")


@pytest.mark.parametrize("encoding", ["gzip", "deflate-zlib", "deflate-raw"])
def test_gzip_and_both_deflate_forms_are_read(srv: CaptureServer, encoding: str) -> None:
    event = v1_event()
    raw = json.dumps(created([event])).encode()
    if encoding == "gzip":
        data = gzip.compress(raw)
    elif encoding == "deflate-zlib":
        data = zlib.compress(raw)
    else:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = packer.compress(raw) + packer.flush()
    response = post(srv, data, **{"Content-Encoding": encoding.split("-")[0]})
    assert response.status_code == 200
    assert srv.uuids() == [event["uuid"]]


def test_max_body_bytes_applies_to_the_decompressed_body(srv: CaptureServer) -> None:
    srv.max_body_bytes = 100
    assert error_of(post(srv)) == (413, "payload_too_large")


# -- per-event results ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"event": "$performance_event"}, "dropped_performance_event"),
        ({"event": ""}, "missing_event_name"),
        ({"event": "e" * 201}, "event_name_too_long"),
        ({"distinct_id": "   "}, "missing_distinct_id"),
        ({"distinct_id": "d" * 201}, "distinct_id_too_large"),
        ({"timestamp": "2026-01-01T00:00:00"}, "invalid_event_timestamp"),
        ({"properties": [1, 2]}, "malformed_event_properties"),
        ({"options": {"disable_skew_correction": "maybe"}}, "invalid_options"),
        ({"options": "yes"}, "invalid_options"),
    ],
)
def test_a_bad_event_is_dropped_alone_with_posthogs_reason(
    srv: CaptureServer, bad: dict[str, Any], reason: str
) -> None:
    good, wrong = v1_event(), v1_event(**bad)
    response = post(srv, events=[good, wrong])
    assert response.status_code == 200
    assert response.json() == {
        "results": {
            good["uuid"]: {"result": "ok"},
            wrong["uuid"]: {"result": "drop", "details": reason},
        }
    }
    assert srv.uuids() == [good["uuid"]]


def test_a_placeholder_distinct_id_is_kept_without_person_processing(
    srv: CaptureServer,
) -> None:
    event = v1_event(distinct_id="Anonymous")
    response = post(srv, events=[event])
    assert response.json()["results"][event["uuid"]] == {
        "result": "ok",
        "details": "person_processing_disabled",
    }
    assert srv.uuids() == [event["uuid"]]


def test_scripted_verdicts_and_retry_after(srv: CaptureServer) -> None:
    srv.v1.verdict(lambda e: e["properties"].get("n") == 0, "warning")
    srv.v1.verdict(lambda e: e["properties"].get("n") == 1, "retry", times=1)
    srv.v1.verdict(lambda e: e["properties"].get("n") == 2, "drop")
    events = [v1_event(properties={"n": n}) for n in range(4)]
    response = post(srv, events=events)
    assert response.headers["Retry-After"] == "1"
    results = response.json()["results"]
    assert [results[e["uuid"]] for e in events] == [
        {"result": "warning", "details": "person_processing_disabled"},
        {"result": "retry", "details": "not_persisted"},
        {"result": "drop", "details": "rejected"},
        {"result": "ok"},
    ]
    assert srv.uuids() == [events[0]["uuid"], events[3]["uuid"]]
    again = post(srv, events=[events[1]])  # the retry rule was for one event only
    assert again.json()["results"] == {events[1]["uuid"]: {"result": "ok"}}
    assert "Retry-After" not in again.headers
    srv.v1.clear_verdicts()
    assert post(srv, events=[v1_event(properties={"n": 2})]).status_code == 200
    assert len(srv.uuids()) == 4


def test_a_predicate_that_raises_is_a_500(srv: CaptureServer) -> None:
    srv.v1.verdict(lambda e: 1 // 0 == 0, "drop")
    assert error_of(post(srv)) == (500, "internal_error")


def test_verdict_checks_its_arguments(srv: CaptureServer) -> None:
    with pytest.raises(ValueError, match="result must be one of"):
        srv.v1.verdict(lambda e: True, "maybe")
    with pytest.raises(ValueError, match="times must be at least 1"):
        srv.v1.verdict(lambda e: True, "drop", times=0)


@pytest.mark.parametrize(("status", "retry_after"), [(402, None), (429, "1")])
def test_billing_limit_refuses_the_whole_request(
    srv: CaptureServer, status: int, retry_after: str | None
) -> None:
    srv.v1.billing_limit = status
    response = post(srv)
    assert error_of(response) == (status, "billing_limit_exceeded")
    assert response.json()["error_description"] == BILLING_LIMIT_DESCRIPTION
    assert response.json()["error_uri"] == "https://posthog.com/docs/billing/limits"
    assert response.headers.get("Retry-After") == retry_after
    assert srv.events == []


def test_queued_replies_answer_v1_requests_too(srv: CaptureServer) -> None:
    srv.enqueue_reply(Reply(status=503, retry_after=3), Reply(status=429, retry_after=7))
    first, second, third = post(srv), post(srv), post(srv)
    assert error_of(first) == (503, "service_unavailable")
    assert first.headers["Retry-After"] == "3"
    assert error_of(second) == (429, "rate_limited")
    assert second.headers["Retry-After"] == "7"
    assert third.status_code == 200
    assert len(srv.uuids()) == 1


def test_v0_and_v1_events_are_read_in_one_place(srv: CaptureServer) -> None:
    v0 = {"event": "old", "distinct_id": "u", "properties": {}, "uuid": str(uuid.uuid4())}
    requests.post(
        srv.url + "/batch/", json={"api_key": "phc_test", "batch": [v0]}, timeout=5
    ).raise_for_status()
    event = v1_event()
    post(srv, events=[event]).raise_for_status()
    assert srv.uuids() == [v0["uuid"], event["uuid"]]
    assert srv.event_names() == ["old", "signed_up"]
    srv.reset()
    assert srv.v1.answers == [] and srv.uuids() == []


def test_an_unknown_project_is_answered_ok_and_its_events_dropped(srv: CaptureServer) -> None:
    srv.project_keys = {"phc_known"}
    event = v1_event()
    response = post(srv, events=[event], Authorization="Bearer phc_typo")
    assert response.json() == {"results": {event["uuid"]: {"result": "ok"}}}
    assert srv.events == [] and [e["uuid"] for e in srv.dropped] == [event["uuid"]]
    assert srv.requests[0].dropped
    assert post(srv, Authorization="Bearer phc_known").status_code == 200
    assert len(srv.uuids()) == 1


def test_redirects_partial_delivery_and_other_methods(srv: CaptureServer) -> None:
    srv.enqueue_reply(
        Reply(status=308, location=srv.url + V1_PATH + "/"),
        Reply(status=503, accept_first=1),
    )
    moved = requests.post(
        srv.url + V1_PATH, data=b"{}", headers=headers(), timeout=5, allow_redirects=False
    )
    assert moved.status_code == 308 and moved.headers["Location"].endswith(V1_PATH + "/")
    events = [v1_event(), v1_event()]
    assert error_of(post(srv, events=events)) == (503, "service_unavailable")
    assert srv.uuids() == [events[0]["uuid"]]  # stored in part before it failed
    assert requests.get(srv.url + V1_PATH, timeout=5).status_code == 405
    srv.redirect_to = "https://eu.example"
    gone = requests.post(srv.url + V1_PATH, data=b"{}", timeout=5, allow_redirects=False)
    assert gone.status_code == 301 and gone.headers["Location"] == "https://eu.example" + V1_PATH
