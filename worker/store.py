"""The worker's side of the outbox table: claim, acknowledge, retry, inspect.

:class:`Store` is today's storage engine (:class:`worker.storage.base.Storage`). The
engine-neutral types live in :mod:`worker.storage.base` and are importable from here
too.

One :class:`Store` owns one :class:`worker.storage.connection.Connection`, an autocommit
psycopg connection that is made again after it is lost: when the database goes away
it raises :class:`DatabaseUnavailable`; the next call reconnects. A connection the
server (or a proxy) closed while it sat idle is replaced at once, without an outage:
only a database that cannot be reached again is one. A statement that PostgreSQL cut
short raises :class:`StatementTimeout` or :class:`LockTimeout` instead: the database
is up, and the message says which setting ended it.

A claimed :class:`Batch` is a transaction on its store's connection: its rows stay
locked by it until :meth:`Store.finish` writes the outcome and commits, or
:meth:`Store.release` rolls back. A store holds at most one batch at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from outbox.exceptions import OutboxDatabaseError
from worker import queries, worker_state
from worker.storage.base import Backlog as Backlog
from worker.storage.base import Batch as Batch
from worker.storage.base import BatchLostError as BatchLostError
from worker.storage.base import BatchOutcome as BatchOutcome
from worker.storage.base import ClaimedEvent as ClaimedEvent
from worker.storage.base import ConnectionReset as ConnectionReset
from worker.storage.base import DatabaseTimeout as DatabaseTimeout
from worker.storage.base import DatabaseUnavailable as DatabaseUnavailable
from worker.storage.base import Finished as Finished
from worker.storage.base import LockTimeout as LockTimeout
from worker.storage.base import Requeued as Requeued
from worker.storage.base import StatementTimeout as StatementTimeout
from worker.storage.base import Storage
from worker.storage.connection import APPLICATION_PREFIX as APPLICATION_PREFIX
from worker.storage.connection import BATCH_APPLICATION_PREFIX as BATCH_APPLICATION_PREFIX
from worker.storage.connection import LOCK_TIMEOUT as LOCK_TIMEOUT
from worker.storage.connection import RECONNECT_DELAY_MAX as RECONNECT_DELAY_MAX
from worker.storage.connection import RECONNECT_DELAY_MIN as RECONNECT_DELAY_MIN
from worker.storage.connection import Connection, connection_gone, first_line
from worker.storage.connection import Health as Health


def _claimed(row: tuple[Any, ...]) -> ClaimedEvent:
    """A CLAIM row as a :class:`ClaimedEvent` (see ``queries.CLAIM`` for the columns)."""
    id_, uuid_, event, distinct_id, props, ts, attempts, destination, own, problem = row
    has_ip = False
    if own is not None:  # the row holds a key the worker sets, or "$ip"
        has_ip = own[0] == "ip"
        props = own[1]
    return ClaimedEvent(
        id_, uuid_, event, distinct_id, props, ts, attempts, destination, has_ip, problem
    )


class Store:
    """Database operations of the worker, over one reconnecting connection."""

    def __init__(
        self,
        url: str,
        *,
        worker_id: str = "outbox-worker",
        log_outages: bool = True,
        for_batches: bool = False,
        lock_timeout: float | None = LOCK_TIMEOUT,
        statement_timeout: float | None = None,
        health: Health | None = None,
        pooler: str = "none",
    ) -> None:
        """``pooler`` is ``OUTBOX_POOLER`` (``transaction``: connect without prepared
        statements, see :func:`worker.database.connect_options`).

        ``lock_timeout`` and ``statement_timeout`` (seconds; None leaves the
        session's own) bound each of the store's single statements, set for the
        transaction each runs in; the batch's statements take theirs from
        :data:`queries.BATCH_SETTINGS`. Stores given the same ``health`` report into
        it together (the worker's two batch connections: their latest statement
        tells whether the worker can ship)."""
        self.worker_id = worker_id
        self._batch: Batch | None = None
        #: The last claim found nothing: the next one asks ANY_DUE first.
        self._idle = False
        self._db = Connection(
            url,
            worker_id=worker_id,
            log_outages=log_outages,
            for_batches=for_batches,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            health=health,
            pooler=pooler,
            per_transaction=True,
            holding=self._holding,
            on_drop=self._forget_batch,
            on_abort=self._abort,
        )
        self.url = url
        self.pooler = pooler
        self.log_outages = log_outages
        self.health = self._db.health
        self.application_name = self._db.application_name
        self._lock = self._db.lock

    # -- connection -------------------------------------------------------------------

    @property
    def _conn(self) -> psycopg.Connection[Any] | None:
        return self._db.conn

    def _holding(self) -> bool:
        return self._batch is not None

    def _forget_batch(self) -> None:
        """The connection is gone, and the batch's transaction with it."""
        if self._batch is not None:
            self._batch.closed = True
            self._batch = None

    def _execute(self, query: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run one statement (its own transaction); return its rows, if any."""
        return self._db.execute(query, params)

    def _run(
        self, query: str, params: dict[str, Any] | None = None, *, bounded: bool = True
    ) -> tuple[list[Any], int]:
        """Run one statement; return its rows and its row count (see
        :meth:`worker.storage.connection.Connection.run`)."""
        return self._db.run(query, params, bounded=bounded)

    def close(self) -> None:
        """Close the connection (a batch still open is rolled back by the server)."""
        self._db.close()

    def ping_or_raise(self) -> None:
        """Run a trivial query; raise what went wrong (connection, missing tables)."""
        self._run("SELECT 1", bounded=False)

    def ping(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            self.ping_or_raise()
        except OutboxDatabaseError:
            return False
        return True

    # -- the batch life cycle ---------------------------------------------------------

    def claim(self, limit: int, max_bytes: int, lease_seconds: float) -> Batch | None:
        """Lock up to ``limit`` due events (at most ``max_bytes`` of JSON) in a new
        transaction and return them as a :class:`Batch`; None (and no transaction) if
        none are due. The server ends the transaction, releasing the rows, if this
        connection then sits idle for ``lease_seconds``."""
        with self._lock, self._db.guard():
            if self._batch is not None:
                raise RuntimeError("this store already holds a batch; finish or release it")
            conn = self._db.connection()
            try:
                conn.execute("BEGIN")
                lease_ms = str(max(1, int(lease_seconds * 1000)))
                conn.execute(queries.BATCH_SETTINGS, {"lease_ms": lease_ms})
                if self._idle:
                    due = conn.execute(queries.ANY_DUE).fetchone()
                    if not (due and due[0]):
                        conn.execute("ROLLBACK")
                        return None
                rows = conn.execute(
                    queries.CLAIM, {"limit": limit, "max_bytes": max_bytes}
                ).fetchall()
                self._idle = not rows
                if not rows:
                    conn.execute("ROLLBACK")
                    return None
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except psycopg.Error as exc:
                self._abort()
                raise OutboxDatabaseError(f"claiming a batch failed: {first_line(exc)}") from exc
            events = sorted(map(_claimed, rows), key=lambda e: e.id)
            self._batch = Batch(store=self, events=events, handle=conn)
            return self._batch

    def finish(
        self,
        batch: Batch,
        outcome: BatchOutcome,
        *,
        dedup_window: float,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
    ) -> Finished:
        """Write ``outcome`` in the batch's transaction and commit.

        Rows the outcome does not name are released unchanged (still due). Raises
        :class:`BatchLostError` when the transaction is already over; then nothing
        was written.
        """
        with self._lock:
            conn = self._own(batch)
            try:
                shipped = 0
                if outcome.shipped:
                    ack = conn.execute(
                        queries.ACK, {"ids": list(outcome.shipped), "window": dedup_window}
                    ).fetchone()
                    shipped = int(ack[0]) if ack else 0
                if outcome.dead:
                    conn.execute(
                        queries.BURY,
                        {
                            "ids": [event_id for event_id, _ in outcome.dead],
                            "errors": [error[:2000] for _, error in outcome.dead],
                        },
                    )
                statuses: list[str] = []
                if outcome.retry:
                    retried = conn.execute(
                        queries.RETRY,
                        {
                            "ids": list(outcome.retry),
                            "error": outcome.retry_error[:2000],
                            "max_attempts": max_attempts,
                            "backoff_base": float(backoff_base),
                            "backoff_max": float(backoff_max),
                        },
                    )
                    statuses = [row[1] for row in retried.fetchall()]
                if outcome.defer and (outcome.defer_delay > 0 or outcome.defer_error):
                    conn.execute(
                        queries.DEFER,
                        {
                            "ids": list(outcome.defer),
                            "delay": float(outcome.defer_delay),
                            "error": outcome.defer_error,
                        },
                    )
                conn.execute("COMMIT")
                self.health.note(None)
            except psycopg.Error as exc:
                problem = self._db.problem(exc)
                if problem is not None:  # a timeout: the transaction is rolled back
                    self.health.note(problem)
                    raise BatchLostError(f"the batch's outcome was not written: {problem}") from exc
                if connection_gone(conn, exc):
                    # Often the server ended an idle transaction (the lease ran out):
                    # not an outage. If the database is down, the next claim finds out.
                    self._db.drop()
                    raise BatchLostError(
                        f"the batch's transaction was lost: {first_line(exc)}"
                    ) from exc
                self._abort()
                raise OutboxDatabaseError(
                    f"writing a batch's outcome failed: {first_line(exc)}"
                ) from exc
            finally:
                batch.closed = True
                if self._batch is batch:
                    self._batch = None
        dead = statuses.count("dead")
        return Finished(shipped=shipped, retried=len(statuses) - dead, dead_by_retry=dead)

    def release(self, batch: Batch) -> bool:
        """Roll the batch's transaction back: its rows are due again at once, with no
        attempt counted. Returns False if it was already over."""
        with self._lock:
            if batch.closed or self._batch is not batch:
                return False
            batch.closed = True
            self._batch = None
            try:
                batch.handle.execute("ROLLBACK")
            except psycopg.Error:  # the rows are released with the session anyway
                self._db.drop()
                return False
            return True

    def _own(self, batch: Batch) -> psycopg.Connection[Any]:
        """The batch's connection, if its transaction is still open on this store."""
        if batch.store is not self or batch.closed or self._batch is not batch:
            raise BatchLostError("the batch's transaction is already over")
        conn: psycopg.Connection[Any] = batch.handle
        if conn is not self._conn or conn.closed:
            batch.closed = True
            self._batch = None
            raise BatchLostError("the batch's connection was lost")
        return conn

    def _abort(self) -> None:
        """After an unexpected error inside a batch: roll back, forget the batch."""
        if self._batch is not None:
            self._batch.closed = True
            self._batch = None
        if self._conn is not None:
            try:
                self._conn.execute("ROLLBACK")
            except psycopg.Error as exc:
                self._db.lost(exc)

    def in_flight(self) -> list[dict[str, Any]]:
        """Batches held by workers on this database now: worker, seconds held, state."""
        rows = self._execute(queries.IN_FLIGHT, {"prefix": BATCH_APPLICATION_PREFIX})
        return [{"worker": r[0], "held_seconds": float(r[1] or 0.0), "state": r[2]} for r in rows]

    # -- housekeeping and inspection --------------------------------------------------

    def maintain(self) -> None:
        """Nothing to do: a shipped row is deleted when its batch is finished, and
        autovacuum cleans up after it."""

    def expire_dedup_keys(self, limit: int = 10_000) -> int:
        """Delete dedup keys whose window has passed; returns how many."""
        return int(self._execute(queries.EXPIRE_DEDUP_KEYS, {"limit": limit})[0][0])

    def backlog(self) -> Backlog:
        """Counts of pending, due, retrying and dead rows, and the oldest age."""
        row = self._execute(queries.BACKLOG)[0]
        return Backlog(
            pending=int(row[0]),
            due=int(row[1]),
            retrying=int(row[2]),
            dead=int(row[3]),
            oldest_pending_age_seconds=float(row[4]),
        )

    def backlog_capped(self, cap: int = 100_000) -> Backlog:
        """Like :meth:`backlog`, at a cost that does not grow with the backlog: counts
        are exact up to ``cap``; past it, pending is the planner's estimate."""
        row = self._execute(queries.BACKLOG_CAPPED, {"cap": cap})[0]
        pending = int(row[0])
        if pending >= cap:
            pending = max(pending, int(row[5] or 0))
        return Backlog(
            pending=pending,
            due=int(row[1]),
            retrying=int(row[2]),
            dead=int(row[3]),
            oldest_pending_age_seconds=float(row[4]),
        )

    def top_events(self, status: str, limit: int = 10) -> list[tuple[str, int]]:
        """The most frequent event names among rows of ``status``."""
        return [
            (r[0], int(r[1]))
            for r in self._execute(queries.TOP_EVENTS, {"status": status, "limit": limit})
        ]

    def top_errors(self, limit: int = 10) -> list[dict[str, Any]]:
        """Rows with an error, grouped by status and error text; ``since`` is the
        oldest row's created_at as ISO 8601 text in UTC."""
        return [
            {"status": r[0], "error": r[1], "count": int(r[2]), "since": r[3]}
            for r in self._execute(queries.TOP_ERRORS, {"limit": limit})
        ]

    def dead(self, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
        """Dead rows, oldest first; ``created_at`` is ISO 8601 text in UTC."""
        columns = ("id", "uuid", "event", "distinct_id", "attempts", "last_error", "created_at")
        rows = self._execute(queries.LIST_DEAD, {"limit": limit, "event": event})
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def requeue_dead(self, ids: Sequence[int] | None = None, event: str | None = None) -> Requeued:
        """Make dead rows pending again with fresh attempts, but for those that could
        never be sent as stored (they stay dead); says how many of each."""
        params = {"ids": list(ids) if ids else None, "event": event}
        row = self._execute(queries.REQUEUE_DEAD, params)[0]
        return Requeued(requeued=int(row[0]), unsendable=int(row[1]))

    def purge_dead(self, older_than_seconds: float) -> int:
        """Delete dead rows older than the given age (a row whose created_at lies in
        the future, which only a hand-written row has, counts as old enough); returns
        how many."""
        rows = self._execute(queries.PURGE_DEAD, {"older_than": float(older_than_seconds)})
        return int(rows[0][0])

    def error_groups(self, limit: int = 20, ids: int = 50) -> list[dict[str, Any]]:
        """Failed rows (dead, or pending after a failed attempt) grouped by status and
        error text, most first: count, first and last created_at (ISO 8601 text in
        UTC), the newest's age in seconds, the first ``ids`` row ids, the number of
        event names and the first, how many dead rows have that name, and the newest
        row as an example (id, event, distinct_id, properties, attempts)."""
        columns = (
            "status", "error", "count", "first_at", "last_at", "last_age_seconds", "ids",
            "names", "name", "dead_of_name", "example_id", "event", "distinct_id",
            "properties", "attempts",
        )  # fmt: skip
        rows = self._execute(queries.ERROR_GROUPS, {"limit": limit, "ids": ids})
        return [dict(zip(columns, row, strict=True)) for row in rows]

    # -- worker state (outbox_worker_state; see worker.worker_state) ------------------

    def write_worker_state(self, host: str, state: str, reason: str) -> None:
        """Write this worker's row: the host it sends to, its state and why."""
        params = {"worker": self.worker_id, "host": host, "state": state, "reason": reason}
        self._state_statement(worker_state.WRITE, params)

    def delete_worker_state(self) -> None:
        """Delete this worker's row."""
        self._state_statement(worker_state.DELETE, {"worker": self.worker_id})

    def expire_worker_states(self, older_than_seconds: float) -> int:
        """Delete rows not written for ``older_than_seconds``; returns how many."""
        params = {"older_than": float(older_than_seconds)}
        return self._state_statement(worker_state.EXPIRE, params)[1]

    def worker_states(self) -> list[dict[str, Any]]:
        """Every worker's row: worker, host, state, reason, updated_at, age_seconds."""
        columns = ("worker", "host", "state", "reason", "updated_at", "age_seconds")
        rows = self._state_statement(worker_state.LIST, None)[0]
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def _state_statement(self, query: str, params: dict[str, Any] | None) -> tuple[list[Any], int]:
        try:
            return self._run(query, params)
        except psycopg.Error as exc:  # no table (migration 0005), no grant
            raise worker_state.WorkerStateUnavailable(
                f"outbox_worker_state: {first_line(exc)}"
            ) from exc


if TYPE_CHECKING:

    def _is_an_engine(store: Store) -> Storage:
        return store  # mypy checks that Store implements the protocol
