"""The event builders: $exception, $ai_generation, $pageview, attribution, IP hashing."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

import pytest

import outbox
from outbox import (
    AnalyticsConfig,
    OutboxConfigError,
    OutboxValidationError,
    PageviewDeduper,
    ai_generation_event,
    attribution_cookie,
    exception_event,
    hash_ip,
    normalise_path,
    pageview_event,
    signup_attribution,
    truncate_payload,
)
from outbox.enqueue import prepare_enqueue

# -- $exception ----------------------------------------------------------------------


def _load_settings(path: str) -> dict[str, Any]:
    raise KeyError(path)  # the line the frame must point at


def _start() -> None:
    try:
        _load_settings("/etc/app.toml")
    except KeyError as exc:
        raise RuntimeError("could not start: settings missing") from exc


def _caught() -> BaseException:
    try:
        _start()
    except RuntimeError as exc:
        return exc
    raise AssertionError("no exception")


def test_exception_event_has_posthogs_exception_list_shape() -> None:
    args = exception_event(_caught(), "user-1", properties={"component": "cli"})
    assert args["event"] == "$exception" and args["distinct_id"] == "user-1"
    props = args["properties"]
    assert props["$exception_level"] == "error"
    assert props["component"] == "cli"
    outer, cause = props["$exception_list"]
    assert (outer["type"], outer["value"]) == ("RuntimeError", "could not start: settings missing")
    assert outer["mechanism"] == {
        "type": "generic",
        "handled": True,
        "synthetic": False,
        "exception_id": 0,
    }
    assert cause["type"] == "KeyError" and cause["value"] == "'/etc/app.toml'"
    assert cause["mechanism"]["type"] == "chained"
    assert cause["mechanism"]["source"] == "__cause__"
    assert cause["mechanism"]["parent_id"] == 0
    frames = cause["stacktrace"]["frames"]
    assert cause["stacktrace"]["type"] == "raw"
    # Oldest call first; the last frame is where it was raised.
    assert [f["function"] for f in frames] == ["_start", "_load_settings"]
    last = frames[-1]
    assert last["filename"] == "test_builders.py"
    assert last["module"] == __name__
    assert last["in_app"] is True
    assert last["platform"] == "python"
    assert "raise KeyError(path)" in last["context_line"]
    assert len(last["pre_context"]) == 3 and "def _load_settings" in last["pre_context"][-1]
    # The event validates as it will be stored.
    assert prepare_enqueue(**args, config=AnalyticsConfig()) is not None


def test_exception_frames_are_capped_keeping_the_innermost() -> None:
    def recurse(n: int) -> None:
        if n == 0:
            raise ValueError("deep")
        recurse(n - 1)

    try:
        recurse(80)
    except ValueError as exc:
        args = exception_event(exc, "u", max_frames=10, context_lines=-1, handled=False)
    [entry] = args["properties"]["$exception_list"]
    frames = entry["stacktrace"]["frames"]
    assert len(frames) == 10
    assert frames[-1]["function"] == "recurse" and "context_line" not in frames[-1]
    assert entry["mechanism"]["handled"] is False


def test_library_frames_are_not_in_app() -> None:
    try:
        json.loads("{")
    except ValueError as caught:
        exc = caught
    args = exception_event(exc, "u")
    frames = args["properties"]["$exception_list"][0]["stacktrace"]["frames"]
    assert frames[0]["in_app"] is True  # this test
    assert frames[-1]["in_app"] is False  # inside the json package
    named = exception_event(exc, "u", in_app_modules=("json",))
    frames = named["properties"]["$exception_list"][0]["stacktrace"]["frames"]
    assert frames[-1]["in_app"] is True


def test_an_exception_without_traceback_has_no_stacktrace() -> None:
    args = exception_event(ValueError("never raised"), "u")
    [entry] = args["properties"]["$exception_list"]
    assert "stacktrace" not in entry and entry["value"] == "never raised"
    with pytest.raises(OutboxValidationError):
        exception_event("not an exception", "u")  # type: ignore[arg-type]


# -- $ai_generation ------------------------------------------------------------------


def test_ai_generation_ships_metadata_and_no_payload_by_default() -> None:
    args = ai_generation_event(
        "user-1",
        provider="anthropic",
        model="claude-x",
        latency=1.25,
        input_tokens=812,
        output_tokens=64,
        input=[{"role": "user", "content": "SELECT * FROM customers"}],
        output=[{"role": "assistant", "content": "done"}],
        trace_id="conv-9",
        config=AnalyticsConfig(),
    )
    props = args["properties"]
    assert args["event"] == "$ai_generation"
    assert props["$ai_provider"] == "anthropic" and props["$ai_model"] == "claude-x"
    assert props["$ai_latency"] == 1.25
    assert (props["$ai_input_tokens"], props["$ai_output_tokens"]) == (812, 64)
    assert props["$ai_is_error"] is False and props["$ai_trace_id"] == "conv-9"
    assert "$ai_input" not in props and "$ai_output_choices" not in props


def test_ai_payloads_when_enabled_are_truncated_with_a_marker() -> None:
    config = AnalyticsConfig(ai_payloads=True, ai_payload_max_chars=100)
    prompt = [
        {"role": "system", "content": "s" * 60},
        {"role": "user", "content": "u" * 70},
        {"role": "user", "content": "late"},
    ]
    args = ai_generation_event(
        "u",
        provider="openai",
        model="m",
        latency=0.5,
        input=prompt,
        output="o" * 150,
        config=config,
    )
    props = args["properties"]
    assert props["$ai_input"] == [
        {"role": "system", "content": "s" * 60},
        {"role": "user", "content": "u" * 40 + "…[truncated 30 chars]"},
        {"role": "user", "content": "…[truncated 4 chars]"},
    ]
    assert props["$ai_output_choices"] == "o" * 100 + "…[truncated 50 chars]"
    assert prompt[1]["content"] == "u" * 70  # the caller's data is untouched


def test_the_default_payload_limit_is_30000_characters() -> None:
    config = AnalyticsConfig(ai_payloads=True)
    props = ai_generation_event(
        "u", provider="p", model="m", latency=0, input="x" * 30_001, config=config
    )["properties"]
    assert props["$ai_input"] == "x" * 30_000 + "…[truncated 1 chars]"
    short = ai_generation_event(
        "u", provider="p", model="m", latency=0, input="x" * 30_000, config=config
    )["properties"]
    assert short["$ai_input"] == "x" * 30_000


def test_ai_generation_errors() -> None:
    props = ai_generation_event(
        "u",
        provider="p",
        model="m",
        latency=3.0,
        error=TimeoutError("upstream took too long"),
        http_status=504,
        config=AnalyticsConfig(),
    )["properties"]
    assert props["$ai_is_error"] is True
    assert props["$ai_error"] == "TimeoutError: upstream took too long"
    assert props["$ai_http_status"] == 504
    for kwargs, field in (
        ({"latency": -1}, "latency"),
        ({"input_tokens": -5}, "input_tokens"),
        ({"provider": ""}, "provider"),
    ):
        base: dict[str, Any] = {"provider": "p", "model": "m", "latency": 1.0}
        base.update(kwargs)
        with pytest.raises(OutboxValidationError) as info:
            ai_generation_event("u", **base)
        assert info.value.field == field


def test_truncate_payload_leaves_short_text_alone() -> None:
    value = {"a": ["xy", 3, None]}
    assert truncate_payload(value, 10) == value
    assert truncate_payload("abcdef", 0) == "…[truncated 6 chars]"


# -- $pageview -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "section"),
    [
        ("/acme/issues/8d5c1f5e-4c1b-4d0e-9a51-2a3c9b7d6e10", "/acme/issues"),
        ("/acme/issues/MUL-12", "/acme/issues"),
        ("/acme/issues/MUL-12/", "/acme/issues"),
        ("https://app.example.com/acme/issues?tab=open&sort=new#top", "/acme/issues"),
        ("/callback?code=secret-oauth-code&state=xyz", "/callback"),
        ("/acme/agents/8d5c1f5e4c1b4d0e9a512a3c9b7d6e10/settings", "/acme/agents/settings"),
        ("/onboarding/step-2", "/onboarding/step-2"),  # a lower-case slug is not an id
        ("/", "/"),
        ("", "/"),
        ("//double//slashes/", "/double/slashes"),
    ],
)
def test_paths_are_normalised_to_their_section(url: str, section: str) -> None:
    assert normalise_path(url) == section


def test_pageview_event_never_ships_the_query_string() -> None:
    args = pageview_event(
        "u",
        "https://app.example.com:8443/acme/issues/MUL-1?code=secret",
        deduper=PageviewDeduper(),
    )
    assert args is not None
    assert args["event"] == "$pageview"
    assert args["properties"] == {
        "$pathname": "/acme/issues",
        "$host": "app.example.com:8443",
        "$current_url": "https://app.example.com:8443/acme/issues",
    }
    assert "secret" not in json.dumps(args)


def test_consecutive_views_of_one_section_by_one_person_are_collapsed() -> None:
    deduper = PageviewDeduper()

    def view(who: str, url: str) -> bool:
        return pageview_event(who, url, deduper=deduper) is not None

    assert view("ada", "/acme/issues/MUL-1")
    assert not view("ada", "/acme/issues/MUL-2")
    assert not view("ada", "/acme/issues?filter=mine")
    assert view("bob", "/acme/issues/MUL-3")  # another person
    assert view("ada", "/acme/agents")
    assert view("ada", "/acme/issues/MUL-4")  # back again: not consecutive
    assert pageview_event("ada", "/acme/issues", dedupe=False, deduper=deduper) is not None


def test_the_pageview_memory_is_bounded() -> None:
    deduper = PageviewDeduper(max_size=2)
    assert not deduper.seen("a", "/x")
    assert not deduper.seen("b", "/x")
    assert not deduper.seen("c", "/x")  # evicts "a", the least recently seen
    assert not deduper.seen("a", "/x")
    assert deduper.seen("c", "/x")


# -- signup attribution --------------------------------------------------------------


def test_attribution_cookie_round_trip() -> None:
    cookie = attribution_cookie(
        {
            "utm_source": "newsletter",
            "utm_campaign": "launch",
            "referrer": "https://news.example.org/item?id=42&token=abc",
            "gclid": "not-kept",
            "utm_term": None,
        }
    )
    assert cookie is not None and "%7B" in cookie  # URL-encoded JSON
    assert signup_attribution(cookie) == {
        "initial_utm_source": "newsletter",
        "initial_utm_campaign": "launch",
        "initial_referrer": "https://news.example.org",
    }


def test_each_attribution_value_is_capped_at_96_characters() -> None:
    cookie = attribution_cookie({"utm_campaign": "c" * 200})
    assert cookie is not None
    assert signup_attribution(cookie) == {"initial_utm_campaign": "c" * 96}
    # A cookie written by someone else with long values is capped on reading too.
    raw = quote(json.dumps({"utm_source": "s" * 150}))
    assert signup_attribution(raw) == {"initial_utm_source": "s" * 96}


def test_an_attribution_payload_over_512_characters_is_dropped_whole() -> None:
    values = {key: "v" * 96 for key in ("utm_source", "utm_medium", "utm_campaign")}
    values |= {"utm_term": "t" * 96, "utm_content": "w" * 96, "referrer": "direct"}
    assert attribution_cookie(values) is None  # about 600 characters of JSON
    big = json.dumps({"utm_source": "x" * 90, "padding": "p" * 500})
    assert len(big) > 512
    assert signup_attribution(quote(big)) == {}
    fits = json.dumps({"utm_source": "x" * 90, "padding": "p" * 300})
    assert signup_attribution(quote(fits)) == {"initial_utm_source": "x" * 90}


@pytest.mark.parametrize(
    "cookie", [None, "", "not json", "%7Bbroken", "[1,2]", '"text"', "%7B%22utm_source%22%3A5%7D"]
)
def test_a_bad_attribution_cookie_never_raises(cookie: str | None) -> None:
    assert signup_attribution(cookie) == {}


# -- IP hashing ----------------------------------------------------------------------

KEY = b"0123456789abcdef-secret"


def test_ip_hashing_is_keyed_hmac_sha256() -> None:
    expected = hmac.new(KEY, b"203.0.113.7", hashlib.sha256).hexdigest()
    assert hash_ip("203.0.113.7", key=KEY) == expected
    assert hash_ip(" 203.0.113.7 ", key=KEY) == expected
    assert hash_ip("::ffff:203.0.113.7", key=KEY) == expected
    assert hash_ip("203.0.113.7", key=b"another-key-of-16+bytes") != expected
    assert hash_ip("2001:db8:0:0::1", key=KEY) == hash_ip("2001:DB8::1", key=KEY)
    assert hashlib.sha256(b"203.0.113.7").hexdigest() != expected


def test_ip_hashing_refuses_to_work_without_a_key() -> None:
    with pytest.raises(OutboxConfigError) as info:
        hash_ip("203.0.113.7", config=AnalyticsConfig())
    assert info.value.setting == "ip_hash_key"
    with pytest.raises(OutboxConfigError):
        hash_ip("203.0.113.7", key="short")
    configured = AnalyticsConfig(ip_hash_key=KEY)
    assert hash_ip("203.0.113.7", config=configured) == hash_ip("203.0.113.7", key=KEY)


def test_a_bad_ip_is_named() -> None:
    with pytest.raises(OutboxValidationError) as info:
        hash_ip("999.1.1.1", key=KEY)
    assert info.value.field == "ip"


def test_builders_are_exported() -> None:
    for name in ("exception_event", "ai_generation_event", "pageview_event", "hash_ip"):
        assert name in outbox.__all__
