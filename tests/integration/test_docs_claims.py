"""Behaviour the README and docs/ state that no other test checks, each against a real
PostgreSQL (and the capture server over HTTP where a request is involved)."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import outbox
from tests.conftest import wait_for
from tests.integration.test_drain import enqueue_n, make_drainer, remaining
from worker import commands
from worker.app import Worker
from worker.commands import status_report
from worker.settings import Settings
from worker.sinks import PostHogSink
from worker.storage.snapshot_storage import SnapshotStorage
from worker.testing import CaptureServer, Reply

ROOT = Path(__file__).resolve().parents[2]


def _readme_block(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    [block] = [b for b in blocks if marker in b]
    return block


# -- README, "Create the outbox tables": the include_object hook -------------------------


def test_the_readmes_include_object_hook_keeps_autogenerate_off_the_outbox(
    database_url: str,
) -> None:
    namespace: dict[str, Any] = {}
    exec(_readme_block("def include_object"), namespace)
    app = sa.MetaData()
    sa.Table("orders", app, sa.Column("id", sa.BigInteger, primary_key=True))
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            plain = compare_metadata(MigrationContext.configure(conn), app)
            hooked = compare_metadata(
                MigrationContext.configure(
                    conn, opts={"include_object": namespace["include_object"]}
                ),
                app,
            )
    finally:
        engine.dispose()
    # Without the hook, autogenerate would drop the outbox's tables (outbox_events is a
    # view, which autogenerate does not compare).
    assert {d[1].name for d in plain if d[0] == "remove_table"} >= {
        "outbox_events_0",
        "outbox_retry",
        "outbox_batches",
        "outbox_dedup_keys",
        "outbox_worker_state",
        "outbox_alembic_version",
    }
    # With it, the only change is the application's own table.
    assert [(d[0], d[1].name) for d in hooked] == [("add_table", "orders")]


# -- README, "Deduplication" ------------------------------------------------------------


def _waiting_on_a_lock(db: psycopg.Connection[Any], pid: int) -> bool:
    row = db.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
    found = row.fetchone()
    return found is not None and found[0] == "Lock"


@pytest.mark.parametrize("first_commits", [True, False])
def test_a_second_transaction_using_the_same_key_waits_for_the_first(
    database_url: str, db: psycopg.Connection[Any], first_commits: bool
) -> None:
    results: list[object] = []
    with psycopg.connect(database_url) as first, psycopg.connect(database_url) as second:
        assert outbox.enqueue(first, "invoice_paid", "user-42", dedup_key="k") is not None
        pid = second.info.backend_pid

        def enqueue_second() -> None:
            results.append(outbox.enqueue(second, "invoice_paid", "user-42", dedup_key="k"))
            second.commit()

        thread = threading.Thread(target=enqueue_second)
        thread.start()
        wait_for(lambda: _waiting_on_a_lock(db, pid), what="the second insert to wait")
        assert results == []  # still waiting for the first transaction
        if first_commits:
            first.commit()
        else:
            first.rollback()
        thread.join(timeout=30)
        assert not thread.is_alive()
    if first_commits:
        assert results == [None]  # refused: the key is taken
    else:
        assert len(results) == 1 and results[0] is not None  # the key was free after all
    assert len(remaining(db)) == 1


def test_a_dead_event_holds_its_key_until_it_is_purged(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "invoice_paid", "user-42", dedup_key="k") is not None
    capture.reject_events(lambda e: True, status=400, detail="invalid event")
    settings = settings_for()
    make_drainer(settings, PostHogSink("phc_test", capture.url, gzip=False)).drain()
    assert [r[1] for r in remaining(db)] == ["dead"]
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "invoice_paid", "user-42", dedup_key="k") is None
    assert commands.purge(settings, older_than=0) == 0
    assert remaining(db) == []
    with psycopg.connect(database_url) as conn:
        assert outbox.enqueue(conn, "invoice_paid", "user-42", dedup_key="k") is not None


# -- docs/design.md, "The 400/413 bisect" ---------------------------------------------


@pytest.mark.parametrize("position", [0, 499, 500, 999])
def test_one_bad_event_in_a_batch_of_1000_costs_at_most_20_extra_requests(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
    position: int,
) -> None:
    uuids = enqueue_n(database_url, 1000)
    poison = str(uuids[position])
    capture.reject_events(lambda e: e.get("uuid") == poison, status=400, detail="invalid event")
    settings = settings_for(batch_size=1000)
    stats = make_drainer(settings, PostHogSink("phc_test", capture.url, gzip=False)).drain()
    assert (stats.shipped, stats.dead) == (999, 1)
    assert [(str(r[0]), r[1]) for r in remaining(db)] == [(poison, "dead")]
    # Two requests per halving, ten halvings from 1,000 events to one.
    assert 1 + 10 <= len(capture.requests) <= 1 + 20


# -- docs/identity.md: an async connection gets the identity call's async form ---------


async def test_the_identity_calls_name_their_async_form_on_an_async_connection(
    database_url: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        calls: list[tuple[str, Callable[[], object]]] = [
            ("identify", lambda: outbox.identify(conn, "user-42", email="ada@example.com")),
            ("identify_actor", lambda: outbox.identify_actor(conn, outbox.workspace_actor("w-1"))),
            (
                "set_person_properties",
                lambda: outbox.set_person_properties(conn, "user-42", set={"plan": "team"}),
            ),
            (
                "group_identify",
                lambda: outbox.group_identify(conn, "organization", "org-7", {"name": "Acme"}),
            ),
            ("alias", lambda: outbox.alias(conn, "legacy-1007", "user-42")),
        ]
        for name, call in calls:
            with pytest.raises(outbox.UnsupportedConnectionError) as caught:
                call()
            assert str(caught.value).startswith(f"{name}() got psycopg.AsyncConnection;")
            assert str(caught.value).endswith(f"(use a{name}() for async connections)")


# -- README and docs/design.md: the states `outbox-worker status` shows ------------------


@pytest.mark.parametrize(
    ("answer", "state"),
    [
        (Reply(status=301, location="https://elsewhere.example/batch/"), "redirected"),
        (Reply(status=400, body="request holds no event"), "request_rejected"),
        (Reply(status=429, retry_after=30), "rate_limited"),
        (Reply(status=401), "unauthorized"),
        (Reply(status=503), "backing_off"),
    ],
)
def test_status_shows_each_sink_state_a_worker_reports(
    database_url: str,
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
    answer: Reply,
    state: str,
) -> None:
    enqueue_n(database_url, 3)
    capture.enqueue_reply(answer)
    settings = settings_for(
        posthog_api_key="phc_test",
        posthog_host=capture.url,
        verify_api_key=False,  # the answer comes from capture, not from the key check
        worker_id="w-states",
    )
    worker = Worker(settings)
    try:
        worker.drainer.drain()
        worker.report_state()
        store = SnapshotStorage(database_url, log_outages=False)
        try:
            (entry,) = status_report(store)["workers"]
        finally:
            store.close()
    finally:
        worker.close()
    assert (entry["worker"], entry["state"]) == ("w-states", state)
    assert entry["reason"].startswith("HTTP ")
