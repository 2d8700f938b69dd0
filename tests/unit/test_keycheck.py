"""The API key check: what a flags answer means, the request over real HTTP, the gate."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from worker.keycheck import (
    CHECK_DISTINCT_ID,
    KEY_CHECK_OFF,
    KEY_REJECTED,
    KEY_UNCHECKED,
    KEY_UNREACHABLE,
    KEY_UNVERIFIABLE,
    KEY_VERIFIED,
    MAX_DETAIL,
    KeyChecker,
    KeyGate,
    KeyVerdict,
    build_key_gate,
    check_body,
    flags_url,
    interpret,
    public_host,
    scrub,
)
from worker.settings import Settings, SettingsError, api_key_problem
from worker.testing import CaptureServer, posthog_errors

KEY = "phc_wrongwrongwrongwrongwrongwrongwrong"
HOST = "https://us.i.posthog.com"
# PostHog's flags service's answer to an unknown key (rust/feature-flags/src/api/errors.rs).
UNKNOWN_KEY_TEXT = (
    "The provided API key is invalid or has expired. Please check your API key and try again."
)
FLAGS_V2 = {
    "errorsWhileComputingFlags": False,
    "flags": {},
    "requestId": "0190f7f2-0000-7000-8000-000000000000",
    "evaluatedAt": 1,
}


# -- the protocol -----------------------------------------------------------------------


def test_the_request_resolves_the_key_without_evaluating_flags() -> None:
    assert flags_url(HOST) == "https://us.i.posthog.com/flags/?v=2"
    assert flags_url("http://proxy.local/ingest/") == "http://proxy.local/ingest/flags/?v=2"
    # posthog-python's mapping of app hosts to ingestion hosts applies, as for capture.
    assert flags_url("https://eu.posthog.com") == "https://eu.i.posthog.com/flags/?v=2"
    body = json.loads(check_body(KEY))
    assert body == {"api_key": KEY, "distinct_id": CHECK_DISTINCT_ID, "disable_flags": True}


@pytest.mark.parametrize(
    ("status", "body", "state"),
    [
        (200, json.dumps(FLAGS_V2), KEY_VERIFIED),
        (200, json.dumps({"featureFlags": {}, "errorsWhileComputingFlags": False}), KEY_VERIFIED),
        (200, json.dumps({"flags": {}, "quotaLimited": ["feature_flags"]}), KEY_VERIFIED),
        (200, "<html>welcome to nginx</html>", KEY_UNVERIFIABLE),
        (200, json.dumps({"status": 1}), KEY_UNVERIFIABLE),  # a capture answer, not flags
        (401, UNKNOWN_KEY_TEXT, KEY_REJECTED),
        (403, json.dumps({"detail": "forbidden"}), KEY_REJECTED),
        (404, "not found", KEY_UNVERIFIABLE),
        (405, "", KEY_UNVERIFIABLE),
        (400, "Failed to decode request", KEY_UNVERIFIABLE),
        (301, "", KEY_UNVERIFIABLE),
        (307, "", KEY_UNVERIFIABLE),
        (408, "", KEY_UNREACHABLE),
        (429, json.dumps({"detail": "Rate limit exceeded"}), KEY_UNREACHABLE),
        (500, "", KEY_UNREACHABLE),
        (503, "Service is currently unavailable.", KEY_UNREACHABLE),
    ],
)
def test_what_each_answer_means(status: int, body: str, state: str) -> None:
    verdict = interpret(status, body.encode(), host=HOST, api_key=KEY, location="https://x/")
    assert verdict.state == state
    assert verdict.status == status
    assert "us.i.posthog.com" in verdict.reason
    assert KEY not in verdict.reason
    assert "\n" not in verdict.reason


def test_a_rejection_says_what_to_check() -> None:
    verdict = interpret(401, UNKNOWN_KEY_TEXT.encode(), host=HOST, api_key=KEY)
    assert "does not know POSTHOG_API_KEY" in verdict.reason
    assert "invalid or has expired" in verdict.reason
    assert "POSTHOG_HOST=https://eu.i.posthog.com" in verdict.reason


def test_an_unverifiable_host_points_to_the_setting() -> None:
    verdict = interpret(404, b"", host="http://proxy.local", api_key=KEY)
    assert "OUTBOX_VERIFY_API_KEY=0" in verdict.reason
    redirect = interpret(
        302, b"", host="http://proxy.local", api_key=KEY, location="https://eu.i.posthog.com/x"
    )
    assert "https://eu.i.posthog.com/x" in redirect.reason
    assert "POSTHOG_HOST" in redirect.reason


def test_an_answer_that_echoes_the_key_does_not_leak_it() -> None:
    echoed = json.dumps({"detail": f"no such token {KEY}\n\x1b[31m\u202e"}).encode()
    for status in (401, 400, 503):
        reason = interpret(status, echoed, host=HOST, api_key=KEY).reason
        assert KEY not in reason
        assert "[redacted]" in reason
        assert "\x1b" not in reason and "\u202e" not in reason and "\n" not in reason


def test_scrub_escapes_and_bounds() -> None:
    assert scrub("a\x00b\x1bc\u00e9\u202e", None) == "a\\x00b\\x1bc\\xe9\\u202e"
    assert scrub("x y\n\tz", None) == "x y z"
    long = scrub("k" * 1000 + " " + KEY, KEY)
    assert len(long) == MAX_DETAIL and long.endswith("…")


def test_public_host_drops_credentials() -> None:
    assert public_host("https://user:s3cret@proxy.example:8443/ingest/?token=t") == (
        "https://proxy.example:8443/ingest"
    )
    assert public_host(HOST) == HOST
    assert "s3cret" not in public_host("user:s3cret@nonsense")


# -- the key's shape ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("   ", "is empty"),
        ("phc_" + "a" * 61, "longer than 64 bytes"),
        ("phc_\u00e9t\u00e9", "not ASCII"),
        ("phx_personalpersonalpersonal", "personal API key"),
        ("phc_a\x00b", "NUL"),
    ],
)
def test_shapes_posthog_refuses_are_refused_locally(key: str, words: str) -> None:
    problem = api_key_problem(key)
    assert problem is not None and words in problem
    with pytest.raises(SettingsError) as caught:
        Settings(posthog_api_key=key, sink="posthog").check()
    message = str(caught.value)
    assert message.startswith("POSTHOG_API_KEY ")
    assert "\n" not in message
    if key.strip():
        assert key.strip() not in message


def test_well_formed_keys_pass_the_shape_check() -> None:
    assert api_key_problem("phc_" + "a" * 60) is None  # exactly 64 bytes
    assert api_key_problem(KEY) is None
    Settings.from_env({"POSTHOG_API_KEY": f"  {KEY}\n"}).check()  # the variable is trimmed


def test_a_personal_key_in_the_environment_stops_the_worker_in_one_line() -> None:
    with pytest.raises(SettingsError, match="POSTHOG_API_KEY is a personal API key") as caught:
        Settings.from_env({"POSTHOG_API_KEY": "phx_abcdefabcdef"})
    assert "phx_abcdefabcdef" not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"OUTBOX_VERIFY_API_KEY": "perhaps"}, "OUTBOX_VERIFY_API_KEY"),
        ({"OUTBOX_KEY_CHECK_INTERVAL": "0"}, "OUTBOX_KEY_CHECK_INTERVAL"),
        ({"OUTBOX_KEY_CHECK_INTERVAL": "soon"}, "OUTBOX_KEY_CHECK_INTERVAL"),
    ],
)
def test_bad_check_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_check_settings_from_the_environment() -> None:
    s = Settings.from_env({"OUTBOX_VERIFY_API_KEY": "0", "OUTBOX_KEY_CHECK_INTERVAL": "30"})
    assert (s.verify_api_key, s.key_check_interval) == (False, 30.0)
    assert Settings().verify_api_key is True
    assert Settings().key_check_interval == 300.0


# -- the request, over real HTTP --------------------------------------------------------


class Scripted:
    """A local HTTP server that answers every request with one scripted answer."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.headers: dict[str, str] = {}
        self.hang = threading.Event()
        self.release = threading.Event()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                if outer.hang.is_set():
                    outer.release.wait(10)
                    return
                self.send_response(outer.status)
                for name, value in outer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            do_POST = do_GET = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the checker hangs up on a huge answer: expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    srv = Scripted()
    yield srv
    srv.close()


def test_a_flags_answer_verifies_the_key(scripted: Scripted) -> None:
    scripted.body = json.dumps(FLAGS_V2).encode()
    checker = KeyChecker(KEY, scripted.url, timeout=5)
    verdict = checker.check()
    assert verdict.state == KEY_VERIFIED
    ((method, path, headers, body),) = scripted.requests
    assert (method, path) == ("POST", "/flags/?v=2")
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["disable_flags"] is True
    assert KEY not in repr(checker)


def test_a_redirect_is_not_followed(scripted: Scripted) -> None:
    # Followed, a 301 would turn the POST into a GET, which the flags service answers 200
    # without reading any key.
    scripted.status = 301
    scripted.body = b""
    scripted.headers = {"Location": scripted.url + "/elsewhere/"}
    verdict = KeyChecker(KEY, scripted.url, timeout=5).check()
    assert verdict.state == KEY_UNVERIFIABLE
    assert "/elsewhere/" in verdict.reason
    assert len(scripted.requests) == 1


def test_a_server_error_is_unreachable(scripted: Scripted) -> None:
    scripted.status = 502
    scripted.body = b"<html>bad gateway</html>"
    verdict = KeyChecker(KEY, scripted.url, timeout=5).check()
    assert (verdict.state, verdict.status) == (KEY_UNREACHABLE, 502)


def test_a_hanging_server_times_out(scripted: Scripted) -> None:
    scripted.hang.set()
    verdict = KeyChecker(KEY, scripted.url, timeout=0.3).check()
    assert verdict.state == KEY_UNREACHABLE
    assert "timed out" in verdict.reason


def test_a_huge_answer_is_read_only_in_part(scripted: Scripted) -> None:
    scripted.status = 400
    scripted.body = b"x" * 5_000_000
    verdict = KeyChecker(KEY, scripted.url, timeout=5).check()
    assert verdict.state == KEY_UNVERIFIABLE
    assert len(verdict.reason) < 1000


def test_capture_server_flags_verifies_a_known_key(capture: CaptureServer) -> None:
    capture.project_keys = {KEY}
    verdict = KeyChecker(KEY, capture.url, timeout=5).check()
    assert (verdict.state, verdict.status) == (KEY_VERIFIED, 200)
    (request,) = capture.flags_requests()
    assert (request.method, request.path, request.api_key) == ("POST", "/flags/", KEY)
    assert request.document is not None and request.document["disable_flags"] is True
    assert capture.events == [] and capture.dropped == []


def test_capture_server_flags_rejects_an_unknown_key(capture: CaptureServer) -> None:
    capture.project_keys = {"phc_the_right_one"}
    verdict = KeyChecker(KEY, capture.url, timeout=5).check()
    assert (verdict.state, verdict.status) == (KEY_REJECTED, 401)
    assert posthog_errors.FLAGS_INVALID_KEY in verdict.reason
    assert KEY not in verdict.reason


def test_capture_server_redirect_is_not_followed(capture: CaptureServer) -> None:
    capture.redirect_to = "https://eu.i.posthog.com"
    verdict = KeyChecker(KEY, capture.url, timeout=5).check()
    assert (verdict.state, verdict.status) == (KEY_UNVERIFIABLE, 301)
    assert "https://eu.i.posthog.com/flags/?v=2" in verdict.reason
    assert len(capture.requests) == 1  # the redirect was not followed


def test_a_host_without_flags_is_unverifiable(capture: CaptureServer) -> None:
    # Under this prefix CaptureServer serves nothing: 404, like a proxy that forwards
    # only the capture paths.
    verdict = KeyChecker(KEY, capture.url + "/capture-only", timeout=5).check()
    assert (verdict.state, verdict.status) == (KEY_UNVERIFIABLE, 404)
    assert "OUTBOX_VERIFY_API_KEY=0" in verdict.reason
    assert [r.path for r in capture.requests] == ["/capture-only/flags/"]


def test_a_closed_port_is_unreachable() -> None:
    srv = CaptureServer().start()
    url = srv.url
    srv.stop()
    verdict = KeyChecker(KEY, url, timeout=2).check()
    assert verdict.state == KEY_UNREACHABLE
    assert "cannot reach" in verdict.reason
    assert KEY not in verdict.reason


def test_an_unreachable_host_with_credentials_does_not_show_them() -> None:
    srv = CaptureServer().start()
    port = srv.port
    srv.stop()
    verdict = KeyChecker(KEY, f"http://proxyuser:pr0xyS3cret@127.0.0.1:{port}", timeout=2).check()
    assert verdict.state == KEY_UNREACHABLE
    assert "pr0xyS3cret" not in verdict.reason
    assert f"http://127.0.0.1:{port}" in verdict.reason


def test_a_malformed_key_is_refused_without_a_request(scripted: Scripted) -> None:
    verdict = KeyChecker("phx_personal", scripted.url, timeout=5).check()
    assert verdict.state == KEY_REJECTED
    assert scripted.requests == []


# -- the gate ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StubChecker:
    def __init__(self, *verdicts: str) -> None:
        self.verdicts = list(verdicts)
        self.calls = 0

    def check(self) -> KeyVerdict:
        self.calls += 1
        state = self.verdicts.pop(0) if len(self.verdicts) > 1 else self.verdicts[0]
        return KeyVerdict(state, f"because {state}", 401 if state == KEY_REJECTED else None)

    def close(self) -> None:
        pass


def gate(checker: StubChecker, clock: Clock) -> KeyGate:
    return KeyGate(checker, host=HOST, interval=300, retry_delay=60, clock=clock)


def actions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "action", "-") for r in caplog.records]


def test_nothing_is_sent_until_the_key_verifies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="outbox.worker")
    clock = Clock()
    g = gate(StubChecker(KEY_REJECTED, KEY_REJECTED, KEY_VERIFIED), clock)
    assert (g.state, g.allows_sending(), g.due()) == (KEY_UNCHECKED, False, True)
    g.check()
    assert (g.state, g.allows_sending(), g.due()) == (KEY_REJECTED, False, False)
    clock.now += 59
    assert not g.due()
    clock.now += 1  # a rejected key is checked again every OUTBOX_UNAUTHORIZED_PAUSE
    assert g.due()
    g.check()  # still rejected: no second loud line
    clock.now += 60
    g.check()
    assert (g.state, g.allows_sending()) == (KEY_VERIFIED, True)
    assert actions(caplog) == ["api_key_rejected", "api_key_verified"]
    rejected = caplog.records[0]
    assert rejected.levelno == logging.ERROR
    assert rejected.host == HOST  # type: ignore[attr-defined]
    assert "nothing is deleted" in rejected.getMessage()
    assert "sending resumes" in caplog.records[1].getMessage()


def test_a_verified_key_is_checked_every_interval() -> None:
    clock = Clock()
    checker = StubChecker(KEY_VERIFIED)
    g = gate(checker, clock)
    g.check()
    clock.now += 299
    assert not g.due()
    clock.now += 1
    assert g.due()
    g.check()
    assert checker.calls == 2 and g.allows_sending()


def test_unreachable_at_start_holds_sending_and_backs_off() -> None:
    clock = Clock()
    g = gate(StubChecker(KEY_UNREACHABLE), clock)
    delays = []
    for _ in range(9):
        g.check()
        assert not g.allows_sending()
        delays.append(g.next_check_in())
        clock.now += g.next_check_in()
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_a_verified_key_stays_trusted_while_the_flags_service_is_unreachable() -> None:
    clock = Clock()
    g = gate(StubChecker(KEY_VERIFIED, KEY_UNREACHABLE, KEY_REJECTED), clock)
    g.check()
    g.check()
    assert (g.state, g.allows_sending()) == (KEY_UNREACHABLE, True)
    g.check()
    assert (g.state, g.allows_sending()) == (KEY_REJECTED, False)


def test_capture_refusing_the_key_withdraws_trust(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="outbox.worker")
    clock = Clock()
    g = gate(StubChecker(KEY_VERIFIED, KEY_UNREACHABLE), clock)
    g.check()
    g.invalidate("capture answered 401")
    assert (g.state, g.allows_sending(), g.due()) == (KEY_UNCHECKED, False, True)
    g.check()  # unreachable now: no longer trusted, so still nothing is sent
    assert (g.state, g.allows_sending()) == (KEY_UNREACHABLE, False)
    assert actions(caplog) == ["api_key_verified", "api_key_recheck", "api_key_unreachable"]


def test_the_gate_is_open_without_a_check(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="outbox.worker")
    stdout = build_key_gate(Settings())
    assert (stdout.state, stdout.enabled, stdout.allows_sending()) == (KEY_CHECK_OFF, False, True)
    assert actions(caplog) == []
    off = build_key_gate(Settings(posthog_api_key=KEY, verify_api_key=False))
    assert (off.state, off.allows_sending(), off.due()) == (KEY_CHECK_OFF, True, False)
    assert actions(caplog) == ["api_key_check_off"]
    on = build_key_gate(Settings(posthog_api_key=KEY))
    assert (on.state, on.enabled, on.allows_sending()) == (KEY_UNCHECKED, True, False)
    on.close()
