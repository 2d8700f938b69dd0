"""Wake-ups on commit: ``LISTEN`` for the producers' (throttled) ``NOTIFY``.

A notification is only a hint that something was committed; polling stays the
fallback, so a lost notification costs latency, never an event. Under PgBouncer's
transaction pooling LISTEN does not work: set ``OUTBOX_NOTIFY=0`` for poll-only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from outbox.schema import NOTIFY_CHANNEL
from worker.database import connect

log = logging.getLogger("outbox.worker")

RETRY_MIN = 0.5
RETRY_MAX = 15.0


class Listener:
    """A daemon thread that calls ``on_wake`` for every notification on the channel."""

    def __init__(self, url: str, on_wake: Callable[[], None]) -> None:
        self.url = url
        self.on_wake = on_wake
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="outbox-listen", daemon=True)

    def start(self) -> None:
        """Start listening."""
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close the connection."""
        self._stop.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.cancel_safe()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = RETRY_MIN
        while not self._stop.is_set():
            try:
                with connect(self.url, autocommit=True) as conn:
                    self._conn = conn
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                    delay = RETRY_MIN
                    self.on_wake()  # anything committed while we were not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.on_wake()
            except Exception as exc:
                if self._stop.is_set():
                    break
                log.debug("listener: %s", exc, extra={"action": "listen_retry"})
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
            finally:
                self._conn = None
