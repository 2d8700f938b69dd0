"""The worker's side of the outbox table: claim, acknowledge, retry, inspect.

One :class:`Store` owns one autocommit psycopg connection. When the database goes
away it raises :class:`DatabaseUnavailable`; the next call reconnects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from outbox.exceptions import OutboxDatabaseError, OutboxNotInstalledError
from worker import queries
from worker.database import check_installed, connect, describe_url
from worker.sinks.base import Outbound

log = logging.getLogger("outbox.worker")
_dumps = json.JSONEncoder(ensure_ascii=False).encode

#: Reconnection attempts during an outage start this far apart and double up to the max.
RECONNECT_DELAY_MIN = 0.25
RECONNECT_DELAY_MAX = 15.0


class DatabaseUnavailable(OutboxDatabaseError):
    """The database cannot be reached right now; the worker will reconnect."""


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """A leased outbox row, as the drainer ships it."""

    id: int
    uuid: uuid.UUID
    event: str
    distinct_id: str
    #: The stored properties as PostgreSQL renders jsonb (never decoded here).
    properties_json: str
    timestamp: datetime
    attempts: int
    #: ``posthog``, or ``metrics`` for a metrics-only event (counted, never sent).
    destination: str = "posthog"

    def outbound(self) -> Outbound:
        """The PostHog capture event, as JSON text: the row's uuid and timestamp, and
        ``$ignore_sent_at`` so PostHog keeps the timestamp on every re-send.

        ``$geoip_disable`` is added too (as posthog-python does), because the request
        comes from the worker, whose address says nothing about the user; an event
        that carries the user's ``$ip`` keeps GeoIP.
        """
        props = self.properties_json
        extra = _EXTRA_WITH_IP if '"$ip":' in props else _EXTRA
        props = "{" + extra[2:] + "}" if props == "{}" else props[:-1] + extra + "}"
        return Outbound(
            '{"event": '
            + _dumps(self.event)
            + ', "distinct_id": '
            + _dumps(self.distinct_id)
            + ', "properties": '
            + props
            + ', "uuid": "'
            + str(self.uuid)
            + '", "timestamp": "'
            + self.timestamp.isoformat()
            + '"}'
        )


_EXTRA_WITH_IP = ', "$ignore_sent_at": true'
_EXTRA = _EXTRA_WITH_IP + ', "$geoip_disable": true'


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed batch: its token fences every later write to its rows."""

    token: uuid.UUID
    events: list[ClaimedEvent]
    #: When the drainer asked for it (its clock): the lease runs from about then.
    claimed_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """Counts of the outbox table."""

    pending: int
    due: int
    leased: int
    retrying: int
    dead: int
    oldest_pending_age_seconds: float


class Store:
    """Database operations of the worker, over one reconnecting connection."""

    def __init__(
        self, url: str, *, worker_id: str = "outbox-worker", log_outages: bool = True
    ) -> None:
        self.url = url
        self.worker_id = worker_id
        self.log_outages = log_outages
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.RLock()
        self._down_since: float | None = None
        self._reconnect_delay = RECONNECT_DELAY_MIN
        self._retry_at = 0.0

    # -- connection -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            wait = self._retry_at - time.monotonic()
            if wait > 0:  # back off between reconnection attempts during an outage
                raise DatabaseUnavailable(f"database unavailable; next reconnect in {wait:.1f}s")
            conn = connect(self.url, autocommit=True, connect_timeout=10)
            try:
                check_installed(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            if self._down_since is not None:
                log.warning(
                    "database reachable again",
                    extra={"action": "db_reconnected", "database": describe_url(self.url)},
                )
                self._down_since = None
            self._reconnect_delay = RECONNECT_DELAY_MIN
        return self._conn

    def _execute(self, query: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run one statement (its own transaction); return its rows, if any."""
        return self._run(query, params)[0]

    def _run(self, query: str, params: dict[str, Any] | None = None) -> tuple[list[Any], int]:
        """Run one statement; return its rows and its row count.

        A lost connection becomes :class:`DatabaseUnavailable` (logged once per outage)
        and the next call reconnects.
        """
        with self._lock:
            try:
                conn = self._connection()
                cur = conn.execute(query, params)
                rows = cur.fetchall() if cur.description is not None else []
                return rows, cur.rowcount
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._lost(exc)
                raise DatabaseUnavailable(f"database unavailable: {_first_line(exc)}") from exc
            except (OutboxNotInstalledError, DatabaseUnavailable):
                raise
            except OutboxDatabaseError as exc:
                if self._conn is None:  # could not connect at all
                    self._lost(exc)
                    raise DatabaseUnavailable(str(exc)) from exc
                raise

    def _lost(self, exc: BaseException) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the connection is gone either way
                self._conn.close()
        self._conn = None
        self._retry_at = time.monotonic() + self._reconnect_delay * random.uniform(0.5, 1.0)
        self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_DELAY_MAX)
        if self._down_since is None:
            self._down_since = time.monotonic()
            if not self.log_outages:
                return
            log.error(
                "database unavailable: %s",
                _first_line(exc),
                extra={"action": "db_unavailable", "database": describe_url(self.url)},
            )

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def ping_or_raise(self) -> None:
        """Run a trivial query; raise what went wrong (connection, missing tables)."""
        self._execute("SELECT 1")

    def ping(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            self._execute("SELECT 1")
        except OutboxDatabaseError:
            return False
        return True

    # -- the batch life cycle ---------------------------------------------------------

    def claim(self, limit: int, max_bytes: int, lease_seconds: float) -> Lease | None:
        """Lease up to ``limit`` due events (at most ``max_bytes`` of JSON); None if none."""
        token = uuid.uuid4()
        rows = self._execute(
            queries.CLAIM,
            {
                "limit": limit,
                "max_bytes": max_bytes,
                "token": token,
                "lease": lease_seconds,
                "worker": self.worker_id,
            },
        )
        if not rows:
            return None
        events = sorted((ClaimedEvent(*row) for row in rows), key=lambda e: e.id)
        return Lease(token=token, events=events)

    def ack(self, token: uuid.UUID, ids: Sequence[int], dedup_window: float) -> int:
        """Delete delivered rows still held by ``token``; returns how many."""
        if not ids:
            return 0
        rows = self._execute(
            queries.ACK, {"ids": list(ids), "token": token, "window": dedup_window}
        )
        return int(rows[0][0])

    def retry(
        self,
        token: uuid.UUID,
        ids: Sequence[int],
        error: str,
        *,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
    ) -> tuple[int, int]:
        """Count a failed attempt; returns (rows rescheduled, rows now dead)."""
        if not ids:
            return (0, 0)
        rows = self._execute(
            queries.RETRY,
            {
                "ids": list(ids),
                "token": token,
                "error": error[:2000],
                "max_attempts": max_attempts,
                "backoff_base": float(backoff_base),
                "backoff_max": float(backoff_max),
            },
        )
        dead = sum(1 for _, status in rows if status == "dead")
        return (len(rows) - dead, dead)

    def defer(self, token: uuid.UUID, ids: Sequence[int], delay: float, error: str | None) -> None:
        """Release rows to be retried after ``delay`` seconds, not counting an attempt."""
        if ids:
            self._execute(
                queries.DEFER,
                {"ids": list(ids), "token": token, "delay": float(delay), "error": error},
            )

    def bury(self, token: uuid.UUID, ids: Sequence[int], error: str) -> None:
        """Mark rows dead with ``error``: the sink refused the events themselves."""
        if ids:
            self._execute(queries.BURY, {"ids": list(ids), "token": token, "error": error[:2000]})

    # -- housekeeping and inspection --------------------------------------------------

    def expire_dedup_keys(self, limit: int = 10_000) -> int:
        """Delete dedup keys whose window has passed; returns how many."""
        return self._run(queries.EXPIRE_DEDUP_KEYS, {"limit": limit})[1]

    def backlog(self) -> Backlog:
        """Counts of pending, due, leased, retrying and dead rows, and the oldest age."""
        row = self._execute(queries.BACKLOG)[0]
        return Backlog(
            pending=int(row[0]),
            due=int(row[1]),
            leased=int(row[2]),
            retrying=int(row[3]),
            dead=int(row[4]),
            oldest_pending_age_seconds=float(row[5]),
        )

    def backlog_capped(self, cap: int = 100_000) -> Backlog:
        """Like :meth:`backlog`, at a cost that does not grow with the backlog: counts
        are exact up to ``cap``; past it, pending is the planner's estimate."""
        row = self._execute(queries.BACKLOG_CAPPED, {"cap": cap})[0]
        pending = int(row[0])
        if pending >= cap:
            pending = max(pending, int(row[6] or 0))
        return Backlog(
            pending=pending,
            due=int(row[1]),
            leased=int(row[2]),
            retrying=int(row[3]),
            dead=int(row[4]),
            oldest_pending_age_seconds=float(row[5]),
        )

    def top_events(self, status: str, limit: int = 10) -> list[tuple[str, int]]:
        """The most frequent event names among rows of ``status``."""
        return [
            (r[0], int(r[1]))
            for r in self._execute(queries.TOP_EVENTS, {"status": status, "limit": limit})
        ]

    def top_errors(self, limit: int = 10) -> list[dict[str, Any]]:
        """Rows with an error, grouped by status and error text."""
        return [
            {"status": r[0], "error": r[1], "count": int(r[2]), "since": r[3]}
            for r in self._execute(queries.TOP_ERRORS, {"limit": limit})
        ]

    def dead(self, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
        """Dead rows, oldest first."""
        columns = ("id", "uuid", "event", "distinct_id", "attempts", "last_error", "created_at")
        rows = self._execute(queries.LIST_DEAD, {"limit": limit, "event": event})
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def requeue_dead(self, ids: Sequence[int] | None = None, event: str | None = None) -> int:
        """Make dead rows pending again with fresh attempts; returns how many."""
        params = {"ids": list(ids) if ids else None, "event": event}
        return self._run(queries.REQUEUE_DEAD, params)[1]

    def purge_dead(self, older_than_seconds: float) -> int:
        """Delete dead rows older than the given age; returns how many."""
        rows = self._execute(queries.PURGE_DEAD, {"older_than": float(older_than_seconds)})
        return int(rows[0][0])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
