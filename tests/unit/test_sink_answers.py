"""What the PostHog sink makes of each answer, and how it cleans what the endpoint says.

The texts are PostHog capture's own (``CaptureError`` in ``rust/capture/src/api.rs``).
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote

import pytest

from worker.settings import Settings, SettingsError
from worker.sinks import (
    Outbound,
    PostHogSink,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    UnauthorizedError,
    clean_text,
)
from worker.sinks.base import ERROR_TEXT_LIMIT
from worker.sinks.posthog import classify, read_answer, request_level
from worker.testing import CaptureServer, Reply
from worker.testing import posthog_errors as texts

KEY = "phc_Zq8vTs1mKx0bRr2WcYp9LnDf4HgJe6Ua3Oi5Sb7Qw"
#: A key that does not look like PostHog's, so only the configured-key masking finds it.
ODD_KEY = "tenant-7f3a9c2e5b1d8f4a6c0e"


@pytest.mark.parametrize(
    "detail",
    [
        "request missing data payload",
        "request holds no event",
        "failed to decode request: invalid gzip data",
        "failed to parse request: expected value at line 1 column 1",
        "batch submitted with inconsistent api_key values",
        "Failed to parse request: EOF while parsing an object",  # case does not matter
    ],
)
def test_a_400_about_the_request_is_a_request_rejection(detail: str) -> None:
    error = classify(400, detail)
    assert isinstance(error, RequestRejectedError)
    assert error.reason == "request_rejected" and error.detail == detail
    assert str(error) == f"HTTP 400: {detail}"


@pytest.mark.parametrize(
    "code", ["empty_payload", "empty_batch", "request_decoding_error", "request_parsing_error"]
)
def test_newer_captures_machine_readable_code_is_recognised(code: str) -> None:
    assert request_level("some text", code)
    assert isinstance(classify(400, "some text", code=code), RequestRejectedError)


@pytest.mark.parametrize(
    "detail",
    [
        "event submitted with an empty event name",
        "event submitted without a distinct_id",
        "event submitted with invalid timestamp",
        "invalid event could not be processed",
        "failed to hydrate events from request: invalid uuid",
        "bad property type",
        "",
    ],
)
def test_a_400_about_an_event_is_a_rejection_to_split(detail: str) -> None:
    error = classify(400, detail)
    assert type(error) is RejectedError and error.status == 400
    assert not request_level(detail, "missing_event_name")


def test_an_answer_that_is_not_an_object_is_read_as_text() -> None:
    assert read_answer("[" * 100_000) == ("[" * 100_000, None)  # too deep for json
    assert read_answer('["a"]') == ('["a"]', None)
    assert read_answer('{"code": 5, "error": "e"}') == ("e", None)
    assert read_answer("request holds no event") == ("request holds no event", None)


def test_413_is_always_about_content() -> None:
    # Even with a request-level text: 413 means "too large", which splitting fixes.
    assert type(classify(413, "request holds no event")) is RejectedError


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (301, RedirectError),
        (308, RedirectError),
        (304, RedirectError),
        (429, RateLimitedError),
        (401, UnauthorizedError),
        (403, UnauthorizedError),
        (404, RetryableSinkError),
        (502, RetryableSinkError),
    ],
)
def test_other_statuses(status: int, error: type[Exception]) -> None:
    assert type(classify(status, "x")) is error


def test_the_configured_key_is_masked_in_every_form_it_is_echoed_in() -> None:
    echoed = json.dumps({"api_key": KEY, "batch": []})
    text = clean_text(
        f"echo: {echoed} url={quote(KEY)} again {json.dumps(KEY)[1:-1]}", secrets=(KEY,)
    )
    assert KEY not in text
    assert text.count("***") == 3


def test_anything_shaped_like_a_posthog_key_is_masked_even_if_not_ours() -> None:
    text = clean_text("keys: phc_abcdefghijkl and phx_personal0123 and phs_s3cr3tvalue")
    assert "abcdefghijkl" not in text and "personal0123" not in text
    assert "s3cr3tvalue" not in text
    assert text == "keys: phc_*** and phx_*** and phs_***"


def test_a_key_cut_off_at_the_end_of_an_echo_is_masked() -> None:
    text = clean_text('{"api_key": "' + ODD_KEY[:12], secrets=(ODD_KEY,))
    assert ODD_KEY[:12] not in text and text.endswith("***")
    assert clean_text(f"it was {ODD_KEY}!", secrets=(ODD_KEY,)) == "it was ***!"


def test_control_characters_are_escaped() -> None:
    text = clean_text("line1\nline2\r\x1b[31mred\x07\u202etxt\u2028end")
    assert text == "line1\\nline2\\r\\x1b[31mred\\x07\\u202etxt\\u2028end"
    assert all(ch.isprintable() for ch in text)


def test_text_is_bounded_and_says_how_much_was_cut() -> None:
    text = clean_text("x" * 10_000)
    assert text.startswith("x" * ERROR_TEXT_LIMIT)
    assert text.endswith(f"... ({10_000 - ERROR_TEXT_LIMIT} more characters)")
    assert len(text) < ERROR_TEXT_LIMIT + 40
    # Escaping cannot push the text past the bound either.
    assert len(clean_text("\x00" * 10_000)) < ERROR_TEXT_LIMIT + 40


def test_a_key_is_masked_before_the_text_is_cut() -> None:
    text = clean_text("y" * (ERROR_TEXT_LIMIT - 10) + ODD_KEY, secrets=(ODD_KEY,))
    assert ODD_KEY[:10] not in text and "***" in text


def one_event() -> list[Outbound]:
    return [
        Outbound.from_data(
            {"event": "e", "distinct_id": "u", "properties": {}, "uuid": str(uuid.uuid4())}
        )
    ]


@pytest.mark.parametrize("transport", ["direct", "posthog"])
def test_a_json_answer_is_read_by_its_error_text_and_code(transport: str) -> None:
    with CaptureServer() as srv:
        sink = PostHogSink(KEY, srv.url, timeout=2.0, transport=transport)
        srv.enqueue_reply(
            Reply(status=400, body={"status": 400, "code": "empty_batch", "error": "no events"}),
            Reply(status=400, body={"detail": texts.EMPTY_PAYLOAD}),
            Reply(status=400, body={"status": 400, "code": "missing_event_name", "error": "x"}),
        )
        with pytest.raises(RequestRejectedError) as first:
            sink.send(one_event())
        assert first.value.detail == "no events"
        with pytest.raises(RequestRejectedError) as second:
            sink.send(one_event())
        assert second.value.detail == texts.EMPTY_PAYLOAD
        with pytest.raises(RejectedError) as third:
            sink.send(one_event())
        assert third.value.detail == "x"
        sink.close()


@pytest.mark.parametrize("transport", ["direct", "posthog"])
def test_a_redirects_location_is_cleaned(transport: str) -> None:
    with CaptureServer() as srv:
        sink = PostHogSink(KEY, srv.url, timeout=2.0, transport=transport)
        srv.enqueue_reply(Reply(status=302, location=f"https://proxy.example/{KEY}?" + "q" * 999))
        with pytest.raises(RedirectError) as info:
            sink.send(one_event())
        assert info.value.status == 302
        location = info.value.location
        assert location is not None and location.startswith("https://proxy.example/***?")
        assert KEY not in str(info.value) and len(location) < 350
        sink.close()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OUTBOX_RETRY_AFTER_MAX": "0"}, "OUTBOX_RETRY_AFTER_MAX must be positive"),
        ({"OUTBOX_RETRY_AFTER_MAX": "soon"}, "OUTBOX_RETRY_AFTER_MAX='soon' is not valid"),
        ({"OUTBOX_REJECTION_BREAKER": "1"}, "OUTBOX_REJECTION_BREAKER must be at least 2"),
        ({"OUTBOX_REJECTION_BREAKER": "2.5"}, "OUTBOX_REJECTION_BREAKER='2.5' is not valid"),
    ],
)
def test_the_answer_settings_refuse_values_they_cannot_use(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_answer_settings_from_the_environment() -> None:
    s = Settings.from_env({"OUTBOX_RETRY_AFTER_MAX": "90", "OUTBOX_REJECTION_BREAKER": "5"})
    assert (s.retry_after_max, s.rejection_breaker) == (90.0, 5)
    assert (Settings().retry_after_max, Settings().rejection_breaker) == (600.0, 3)
