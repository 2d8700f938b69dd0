"""The status page of a running worker, as a person sees it in a real browser.

The worker (``outbox-worker run``, a subprocess) has a backlog its sink keeps
refusing (503) and dead letters with hostile error texts; headless Chromium (Debian's
``chromium``) loads ``/status`` and the test reads the rendered text. With
``STATUS_PAGE_SCREENSHOT=docs/status-page.png`` it also refreshes the README's
screenshot.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from tests.acceptance.test_probes import free_port, get
from tests.acceptance.test_worker_process import run_cli, start_worker
from tests.conftest import move_to_retry, wait_for, worker_env
from worker.testing import CaptureServer, Reply

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "phc_PLANTEDstatusPAGEkey0123456789"
PASSWORD = "PLANTED-db-password-42"
HOSTILE_EVENT = '<img src=x onerror="alert(1)">checkout'
HOSTILE_ERROR = f"400 <script>alert('dead')</script> key {KEY} password={PASSWORD} {PASSWORD}"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="install Debian's chromium package"
)


class _Visible(HTMLParser):
    """The text a person sees (no <style>), and every element's tag."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._skip += tag in ("style", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "title")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def with_password(url: str) -> tuple[str, str]:
    """``url`` with a password (the planted one, unless it has its own) and that password."""
    own = psycopg.conninfo.conninfo_to_dict(url).get("password")
    if own:
        return url, str(own)
    return psycopg.conninfo.make_conninfo(url, password=PASSWORD), PASSWORD


def test_a_person_sees_the_backlog_the_sink_and_the_dead_letters(
    database_url: str, db: psycopg.Connection[Any], capture: CaptureServer, tmp_path: Path
) -> None:
    url, password = with_password(database_url)
    with psycopg.connect(database_url) as conn:
        uuids = outbox.enqueue_many(
            conn,
            [
                {
                    "event": "page_viewed" if i % 3 else "signed_up",
                    "distinct_id": f"person-{i}@example.com",
                    "properties": {"email": f"person-{i}@example.com", "plan": "pro"},
                }
                for i in range(30)
            ]
            + [
                {"event": HOSTILE_EVENT, "distinct_id": "eve@example.com", "properties": {"n": i}}
                for i in range(4)
            ],
        )
        conn.commit()
    # Dead letters, as a 400 leaves them (with a hostile error that names both secrets).
    hostile_error = HOSTILE_ERROR.replace(PASSWORD, password)
    assert move_to_retry(database_url, uuids[30:], attempts=1, last_error=hostile_error) == 4
    signed_up = [u for i, u in enumerate(uuids[:30]) if i % 3 == 0][:3]
    assert (
        move_to_retry(database_url, signed_up, attempts=24, last_error="503: upstream unavailable")
        == 3
    )
    # What earlier runs left in the delivery ledger (this run delivers nothing).
    db.execute(
        "INSERT INTO outbox_ledger (day, event, destination, delivered, dead, purged)"
        " VALUES ((now() AT TIME ZONE 'UTC')::date, %s, 'posthog', 4321, 17, 3)",
        (HOSTILE_EVENT,),
    )
    # The sink refuses the rest: they stay pending and retry (and its answer plants the key).
    capture.default_reply = Reply(status=503, body=f"overloaded, key {KEY} <b>bold</b>")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = worker_env(
        url,
        capture,
        OUTBOX_METRICS_PORT=str(port),
        POSTHOG_API_KEY=KEY,
        OUTBOX_VERIFY_API_KEY="0",
        OUTBOX_BACKOFF_BASE="60",
    )
    proc = start_worker(env)
    try:
        wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=60, what="/healthz")
        wait_for(lambda: "backing_off" in get(base + "/status")[1], timeout=60, what="backing_off")
        wait_for(
            lambda: (
                db.execute(
                    "SELECT count(*) FROM outbox_events WHERE status = 'pending' AND attempts > 0"
                ).fetchone()
                == (27,)
            ),
            timeout=60,
            what="the backlog to fail once",
        )
        status, raw = get(base + "/status")
        assert status == 200
        for secret in (KEY, password):
            assert secret not in raw
        with urllib.request.urlopen(base + "/status", timeout=10) as response:
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]

        # What a person sees: Chromium's DOM after it loaded and parsed the page.
        dumped = chromium("--dump-dom", base + "/status", profile=tmp_path / "profile")
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        page = _Visible()
        page.feed(dumped.stdout)
        text = page.text
        assert "posthog-outbox status" in text
        # The backlog: 27 pending (all retrying), 7 dead, two charts.
        assert "27 pending" in text and "7 dead" in text and "27 retrying" in text
        assert page.tags.count("svg") == 2
        assert re.search(r"\d+ samples? taken by this worker", text)
        # The sink and why.
        assert "backing_off" in text and "retried with backoff" in text
        assert "overloaded" in text
        # Dead letters by error: the hostile texts are text, not markup.
        assert HOSTILE_EVENT in text
        assert "<script>alert('dead')</script>" in text
        assert "img" not in page.tags and "script" not in page.tags
        assert "retrying" in text and "the worker tries these again itself" in text
        # The ledger of the last 7 days: the totals, and the row with its hostile name.
        assert "Ledger (last 7 days)" in text
        assert "4,321 delivered" in text and "17 dead" in text and "3 purged" in text
        assert f"{HOSTILE_EVENT} posthog 4,321 17 3" in text
        # Privacy: event names shown; values hidden, distinct ids hashed.
        assert "page_viewed" in text and "signed_up" in text
        assert "example.com" not in text
        assert "(hidden)" in text and "hash:" in text
        for secret in (KEY, password):
            assert secret not in dumped.stdout

        screenshot = Path(os.environ.get("STATUS_PAGE_SCREENSHOT") or tmp_path / "status.png")
        shot = chromium(
            f"--screenshot={screenshot.resolve()}",
            "--window-size=1280,1700",
            "--hide-scrollbars",
            base + "/status",
            profile=tmp_path / "profile",
        )
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert screenshot.stat().st_size > 10_000

        # The command shown for the hostile group requeues exactly that group.
        command = next(
            line.split("outbox-worker ", 1)[1].split(" requeues")[0]
            for line in dumped.stdout.split("<li>")
            if "retry --id" in line and "requeues exactly this group's 4 events" in line
        )
        args = shlex.split(command.split("</code>")[0])
        done = run_cli(env, *args)
        assert done.returncode == 0, done.stderr
        assert "requeued 4 dead events" in done.stdout
        row = db.execute(
            "SELECT count(*) FILTER (WHERE status = 'dead'), "
            "count(*) FILTER (WHERE status = 'dead' AND event = %s) FROM outbox_events",
            (HOSTILE_EVENT,),
        ).fetchone()
        assert row == (3, 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert KEY not in err and password not in err


def test_the_page_can_be_turned_off(database_url: str) -> None:
    port = free_port()
    proc = start_worker(
        worker_env(database_url, OUTBOX_METRICS_PORT=str(port), OUTBOX_STATUS_PAGE="0")
    )
    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, what="/healthz")
        assert get(f"http://127.0.0.1:{port}/status")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
