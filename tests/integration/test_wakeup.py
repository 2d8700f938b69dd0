"""NOTIFY wake-ups: a committed event reaches the sink well before the next poll."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

import outbox
from outbox.enqueue import NOTIFY_INTERVAL
from outbox.schema import NOTIFY_CHANNEL
from tests.conftest import wait_for
from worker.app import Worker
from worker.settings import Settings
from worker.sinks import MemorySink


def test_a_notify_wakes_an_idle_worker_long_before_its_poll(
    database_url: str, settings_for: Callable[..., Settings]
) -> None:
    sink = MemorySink()
    worker = Worker(settings_for(poll_interval=30.0), sink=sink)
    worker.start()
    try:
        time.sleep(1.0)  # past the start-up drain and its hot spell: the worker is idle
        time.sleep(NOTIFY_INTERVAL)  # past this process's notify throttle
        with psycopg.connect(database_url) as conn:
            outbox.enqueue(conn, "e", "u")  # its statement notifies; delivered at commit
            conn.commit()
        started = time.monotonic()
        wait_for(lambda: sink.events, timeout=5, what="the event")
        assert time.monotonic() - started < 1.0
    finally:
        worker.stop()


def test_poll_only_mode_still_ships(
    database_url: str, settings_for: Callable[..., Settings]
) -> None:
    sink = MemorySink()
    worker = Worker(settings_for(notify=False, poll_interval=0.2), sink=sink)
    worker.start()
    try:
        time.sleep(0.8)
        with psycopg.connect(database_url) as conn:
            outbox.enqueue(conn, "e", "u")
            conn.commit()
        wait_for(lambda: sink.events, timeout=5, what="the event")
        assert worker._listener is None
    finally:
        worker.stop()


def test_enqueue_notifies_at_commit_only_and_is_throttled(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        time.sleep(NOTIFY_INTERVAL)
        with psycopg.connect(database_url) as conn:
            outbox.enqueue(conn, "e", "u")
            conn.rollback()  # a rolled-back notify is never delivered
        assert list(listener.notifies(timeout=0.3)) == []
        time.sleep(NOTIFY_INTERVAL)
        with psycopg.connect(database_url) as conn:
            outbox.enqueue(conn, "e", "u")
            outbox.enqueue(conn, "e", "u", dedup_key="k")  # within the throttle: no notify
            conn.commit()
        got = list(listener.notifies(timeout=0.3))
        assert [n.channel for n in got] == [NOTIFY_CHANNEL]
        time.sleep(NOTIFY_INTERVAL)
        with psycopg.connect(database_url) as conn:
            assert outbox.enqueue(conn, "e", "u", dedup_key="k") is None  # dedup path notifies
            conn.commit()
        assert len(list(listener.notifies(timeout=0.3))) == 1
