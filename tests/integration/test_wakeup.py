"""NOTIFY wake-ups: a committed event reaches the sink well before the next poll."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg

import outbox
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
        with psycopg.connect(database_url) as conn:
            outbox.enqueue(conn, "e", "u")
            conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
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
