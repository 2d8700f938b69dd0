"""The API key check with a running worker: a wrong key sends nothing and deletes nothing,
a fixed key ships every event once, and each worker reports its state in
outbox_worker_state."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

import outbox
from tests.conftest import capture_requests, wait_for
from tests.integration.test_roles import WORKER_GRANTS
from worker import commands
from worker.app import Worker
from worker.commands import status_report
from worker.keycheck import (
    KEY_CHECK_OFF,
    KEY_REJECTED,
    KEY_UNREACHABLE,
    KEY_UNVERIFIABLE,
    KEY_VERIFIED,
    ApiKeyNotVerifiedError,
)
from worker.settings import Settings
from worker.storage.snapshot_storage import SnapshotStorage
from worker.testing import CaptureServer, Exchange, Reply

RIGHT = "phc_rightrightrightrightrightrightright"
WRONG = "phc_wrongwrongwrongwrongwrongwrongwrong"


def flags_404(srv: CaptureServer, ex: Exchange) -> None:
    ex.read_body()
    ex.respond(404, b"no such route")


def enqueue(database_url: str, n: int, name: str = "e") -> set[str]:
    with psycopg.connect(database_url) as conn:
        out = outbox.enqueue_many(
            conn, [{"event": name, "distinct_id": f"user-{i}"} for i in range(n)]
        )
        conn.commit()
    return {str(u) for u in out}


def rows(db: psycopg.Connection[Any]) -> list[tuple[str, int]]:
    query = 'SELECT status, attempts FROM outbox_events ORDER BY "timestamp", uuid'
    return db.execute(query).fetchall()


def state_row(db: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
    return db.execute("SELECT worker_id, host, state, reason FROM outbox_worker_state").fetchone()


@pytest.fixture
def running(
    capture: CaptureServer, in_process_workers: Callable[..., Worker]
) -> Callable[..., Worker]:
    def start(key: str = RIGHT, **overrides: Any) -> Worker:
        return in_process_workers(posthog_api_key=key, posthog_host=capture.url, **overrides)

    return start


def test_a_wrong_key_sends_nothing_and_deletes_nothing(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox.worker")
    capture.project_keys = {RIGHT}  # like PostHog: a well-formed WRONG is answered 200, dropped
    enqueue(database_url, 10)
    worker = running(WRONG, unauthorized_pause=0.2)
    wait_for(lambda: len(capture.flags_requests()) >= 3, what="the key checked again")
    assert worker.key_gate.state == KEY_REJECTED
    assert capture_requests(capture) == []
    assert capture.dropped == [] and capture.events == []
    assert rows(db) == [("pending", 0)] * 10  # nothing deleted, nothing dead, no attempt used
    ready, why = worker.readiness()
    assert not ready and "does not know POSTHOG_API_KEY" in why
    rejected = [r for r in caplog.records if getattr(r, "action", "") == "api_key_rejected"]
    assert len(rejected) == 1  # one loud line, not one per check
    assert rejected[0].levelno == logging.ERROR
    assert rejected[0].host == capture.url  # type: ignore[attr-defined]
    assert WRONG not in caplog.text and WRONG not in why
    wait_for(lambda: state_row(db) is not None and state_row(db)[2] == "key_rejected")  # type: ignore[index]
    row = state_row(db)
    assert row is not None and row[1] == capture.url
    assert WRONG not in repr(row)
    registry = worker.metrics.registry
    assert registry.get_sample_value("outbox_api_key_state", {"state": "rejected"}) == 1
    assert registry.get_sample_value("outbox_api_key_state", {"state": "verified"}) == 0


def test_a_key_that_becomes_known_ships_every_event_once(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.project_keys = set()
    uuids = enqueue(database_url, 25)
    worker = running(RIGHT, unauthorized_pause=0.2)
    wait_for(lambda: worker.key_gate.state == KEY_REJECTED)
    capture.project_keys = {RIGHT}  # fixed on PostHog's side: noticed without a restart
    capture.wait_for_events(25)
    wait_for(lambda: rows(db) == [])
    assert sorted(capture.uuids()) == sorted(uuids)
    assert capture.dropped == []
    wait_for(lambda: worker.readiness()[0])
    wait_for(lambda: state_row(db) is not None and state_row(db)[2] == "ok")  # type: ignore[index]


def test_a_key_that_stops_resolving_stops_sending_at_the_next_check(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.project_keys = {RIGHT}
    first = enqueue(database_url, 5, "before")
    worker = running(RIGHT, key_check_interval=0.3, unauthorized_pause=0.2)
    capture.wait_for_events(5)
    capture.project_keys = set()  # the key was reset in PostHog
    wait_for(lambda: worker.key_gate.state == KEY_REJECTED, what="the periodic check")
    enqueue(database_url, 7, "after")
    wait_for(lambda: len(capture.flags_requests()) >= 4)  # checked again meanwhile
    assert sorted(capture.uuids()) == sorted(first)
    assert capture.dropped == []
    assert rows(db) == [("pending", 0)] * 7


def test_a_401_from_capture_has_the_key_checked_again_at_once(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.project_keys = {RIGHT}
    capture.enqueue_reply(Reply(status=401))
    uuids = enqueue(database_url, 6)
    worker = running(RIGHT, unauthorized_pause=0.3)
    # The period is 300 s: a second check this soon is the re-check after the 401.
    wait_for(lambda: len(capture.flags_requests()) >= 2, what="the re-check after the 401")
    capture.wait_for_events(6)
    assert sorted(capture.uuids()) == sorted(uuids)
    assert worker.key_gate.state == KEY_VERIFIED
    wait_for(lambda: rows(db) == [])


def test_a_401_and_an_unknown_key_stops_sending(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.project_keys = {RIGHT}
    enqueue(database_url, 4)
    worker = running(RIGHT, unauthorized_pause=0.2)
    wait_for(lambda: worker.key_gate.state == KEY_VERIFIED)
    capture.wait_for_events(4)
    capture.project_keys = set()
    capture.default_reply = Reply(status=401)  # capture enforcing known keys refuses it
    enqueue(database_url, 3)
    wait_for(lambda: worker.key_gate.state == KEY_REJECTED, what="the re-check")
    sent = len(capture_requests(capture))
    wait_for(lambda: len(capture.flags_requests()) >= 4)
    assert len(capture_requests(capture)) == sent  # nothing more is sent
    assert rows(db) == [("pending", 0)] * 3


def test_a_proxy_without_flags_holds_events_and_says_which_setting(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox.worker")
    capture.routes["/flags/"] = flags_404
    enqueue(database_url, 3)
    worker = running(RIGHT)
    wait_for(lambda: worker.key_gate.state == KEY_UNVERIFIABLE)
    assert "OUTBOX_VERIFY_API_KEY=0" in worker.readiness()[1]
    assert any(getattr(r, "action", "") == "api_key_unverifiable" for r in caplog.records)
    assert capture_requests(capture) == []
    assert rows(db) == [("pending", 0)] * 3


def test_with_the_check_off_a_proxy_without_flags_ships(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox.worker")
    capture.routes["/flags/"] = flags_404
    uuids = enqueue(database_url, 3)
    worker = running(RIGHT, verify_api_key=False)
    capture.wait_for_events(3)
    assert set(capture.uuids()) == uuids
    assert worker.key_gate.state == KEY_CHECK_OFF
    assert [getattr(r, "action", "") for r in caplog.records].count("api_key_check_off") == 1


def test_an_unreachable_flags_service_holds_events_until_it_answers(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    answers: list[int] = []

    def flags_down(srv: CaptureServer, ex: Exchange) -> None:
        ex.read_body()
        answers.append(503)
        ex.respond(503, b"Service is currently unavailable.")

    capture.routes["/flags/"] = flags_down
    uuids = enqueue(database_url, 5)
    worker = running(RIGHT, unauthorized_pause=0.5)
    wait_for(lambda: len(answers) >= 2, what="a second try")
    assert worker.key_gate.state == KEY_UNREACHABLE
    assert not worker.readiness()[0]
    assert capture_requests(capture) == []
    del capture.routes["/flags/"]
    capture.wait_for_events(5)
    assert set(capture.uuids()) == uuids


def test_run_until_empty_with_a_wrong_key_sends_nothing(
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    capture.project_keys = {RIGHT}
    settings = settings_for(posthog_api_key=WRONG, posthog_host=capture.url)
    enqueue(settings.database_url or "", 4)
    with pytest.raises(ApiKeyNotVerifiedError) as caught:
        Worker(settings).run_until_empty()
    assert caught.value.exit_status == 3
    assert WRONG not in str(caught.value)
    assert capture_requests(capture) == []
    assert rows(db) == [("pending", 0)] * 4
    row = state_row(db)
    assert row is not None and row[2] == "key_rejected"
    # With the right key the same run ships them, and leaves no state row behind.
    capture.project_keys = {RIGHT, WRONG}
    stats = Worker(settings).run_until_empty()
    assert stats.shipped == 4 and stats.clean
    assert state_row(db) is None


def test_status_lists_each_worker_and_a_stop_removes_it(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
) -> None:
    capture.project_keys = set()
    worker = running(WRONG, worker_id="w-status", unauthorized_pause=0.2)
    wait_for(lambda: state_row(db) is not None and state_row(db)[2] == "key_rejected")  # type: ignore[index]
    store = SnapshotStorage(database_url, log_outages=False)
    try:
        report = status_report(store)
    finally:
        store.close()
    (entry,) = report["workers"]
    assert (entry["worker"], entry["host"], entry["state"]) == (
        "w-status",
        capture.url,
        "key_rejected",
    )
    assert "does not know POSTHOG_API_KEY" in entry["reason"]
    assert entry["stale"] is False
    before = db.execute("SELECT updated_at FROM outbox_worker_state").fetchone()
    worker.refresh_metrics()  # the heartbeat
    after = db.execute("SELECT updated_at FROM outbox_worker_state").fetchone()
    assert before is not None and after is not None and after[0] > before[0]
    worker.stop()
    assert state_row(db) is None


def test_old_rows_are_stale_then_expire(
    db: psycopg.Connection[Any],
    database_url: str,
    settings_for: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    db.execute(
        "INSERT INTO outbox_worker_state (worker_id, host, state, reason, updated_at) VALUES"
        " ('gone', 'h', 'ok', '', now() - interval '2 days'),"
        " ('here', 'h', 'ok', '', now())"
    )
    assert commands.status(settings_for(), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(w["worker"], w["stale"]) for w in report["workers"]] == [
        ("gone", True),
        ("here", False),
    ]
    assert commands.status(settings_for(), as_json=False) == 0
    text = capsys.readouterr().out
    assert "2d00h ago (stale)" in text and "here" in text
    store = SnapshotStorage(database_url, worker_id="x", log_outages=False)
    try:
        assert store.expire_worker_states(86400) == 1
    finally:
        store.close()
    assert db.execute("SELECT worker_id FROM outbox_worker_state").fetchall() == [("here",)]


def test_without_the_table_the_worker_still_ships_and_warns_once(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    running: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outbox.worker")
    db.execute("DROP TABLE outbox_worker_state")
    uuids = enqueue(database_url, 3)
    worker = running(RIGHT)
    capture.wait_for_events(3)
    worker.refresh_metrics()
    worker.refresh_metrics()
    assert set(capture.uuids()) == uuids
    warned = [r for r in caplog.records if getattr(r, "action", "") == "worker_state_unavailable"]
    assert len(warned) == 1
    store = SnapshotStorage(database_url, log_outages=False)
    try:
        report = status_report(store)
    finally:
        store.close()
    assert report["workers"] is None and "outbox_worker_state" in report["workers_unavailable"]


def test_the_worker_role_may_write_its_state(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    role = "outbox_worker_keycheck"
    db.execute(f"DROP ROLE IF EXISTS {role}")
    db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        db.execute(WORKER_GRANTS.format(worker=role))
        separator = "&" if "?" in database_url else "?"
        as_worker = f"{database_url}{separator}options={quote(f'-c role={role}')}"
        store = SnapshotStorage(as_worker, worker_id="w-role", log_outages=False)
        try:
            store.write_worker_state("https://us.i.posthog.com", "ok", "")
            store.write_worker_state("https://us.i.posthog.com", "key_rejected", "why")
            assert [w["state"] for w in store.worker_states()] == ["key_rejected"]
            assert store.expire_worker_states(86400) == 0
            store.delete_worker_state()
            assert store.worker_states() == []
        finally:
            store.close()
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")
