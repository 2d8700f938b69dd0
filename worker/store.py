"""The worker's side of the outbox table: claim, acknowledge, retry, inspect.

:class:`Store` is today's storage engine (:class:`worker.storage.base.Storage`). The
engine-neutral types live in :mod:`worker.storage.base` and are importable from here
too.

One :class:`Store` owns one autocommit psycopg connection. When the database goes
away it raises :class:`DatabaseUnavailable`; the next call reconnects. A connection
the server (or a proxy) closed while it sat idle is replaced at once, without an
outage: only a database that cannot be reached again is one. A statement that
PostgreSQL cut short raises :class:`StatementTimeout` or :class:`LockTimeout`
instead: the database is up, and the message says which setting ended it.

A claimed :class:`Batch` is a transaction on its store's connection: its rows stay
locked by it until :meth:`Store.finish` writes the outcome and commits, or
:meth:`Store.release` rolls back. A store holds at most one batch at a time.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from outbox._locks import lock_holders
from outbox.exceptions import OutboxDatabaseError, OutboxNotInstalledError
from worker import queries, worker_state
from worker.database import check_installed, connect, describe_url
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

log = logging.getLogger("outbox.worker")

#: Reconnection attempts during an outage start this far apart and double up to the max.
RECONNECT_DELAY_MIN = 0.25
RECONNECT_DELAY_MAX = 15.0


class Health:
    """What the store (or the stores sharing it) last learned about the database:
    :attr:`problem` is None after a statement that worked, else what went wrong.

    With ``log``, a timeout is logged when it starts (``db_statement_timeout``,
    ``db_lock_timeout``) and when statements work again (``db_timeouts_over``), once
    however many connections share this object and however often it repeats.
    Outages are logged by the store (``db_unavailable``), not here.
    """

    def __init__(self, *, log: bool = True) -> None:
        self.problem: OutboxDatabaseError | None = None
        #: Whether to log the timeouts' starts and ends (commands report them instead).
        self.log = log
        self._lock = threading.Lock()

    def note(self, problem: OutboxDatabaseError | None) -> None:
        """Record the outcome of a statement (None: it worked)."""
        with self._lock:
            before, self.problem = self.problem, problem
        if not self.log:
            return
        if isinstance(problem, DatabaseTimeout) and type(before) is not type(problem):
            if isinstance(problem, LockTimeout):
                log.warning(
                    "an outbox table is locked; the worker tries again: %s",
                    problem,
                    extra={"action": "db_lock_timeout"},
                )
            else:
                log.error(
                    "a statement ran past statement_timeout: %s",
                    problem,
                    extra={"action": "db_statement_timeout"},
                )
        elif problem is None and isinstance(before, DatabaseTimeout):
            log.info(
                "the worker's statements run again (after %s)",
                before.setting,
                extra={"action": "db_timeouts_over"},
            )


#: How long the worker's statements wait for a lock another session holds on an
#: outbox table before they give up with :class:`LockTimeout` (PostgreSQL's
#: ``lock_timeout``, set for each transaction, never for the session).
LOCK_TIMEOUT = queries.LOCK_TIMEOUT_MS / 1000


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


#: Worker connections that claim batches are named ``<prefix><worker id>`` in
#: pg_stat_activity, so ``outbox-worker status`` can list the batches in flight.
BATCH_APPLICATION_PREFIX = "outbox-worker batches "
#: Every other worker connection (housekeeping, probes, commands).
APPLICATION_PREFIX = "outbox-worker "
_APPLICATION_NAME_MAX = 63  # PostgreSQL's NAMEDATALEN - 1


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
        session's own) bound each of the store's single statements; the batch's
        statements take theirs from :data:`queries.BATCH_SETTINGS`. Stores given
        the same ``health`` report into it together (the worker's two batch
        connections: their latest statement tells whether the worker can ship)."""
        self.url = url
        self.pooler = pooler
        self.health = health if health is not None else Health(log=log_outages)
        self.worker_id = worker_id
        self.log_outages = log_outages
        timeouts = {
            name: _milliseconds(seconds)
            for name, seconds in (
                ("lock_timeout", lock_timeout),
                ("statement_timeout", statement_timeout),
            )
            if seconds is not None
        }
        #: One statement setting the timeouts for the transaction it runs in.
        self._set_timeouts = (
            "SELECT " + ", ".join(f"set_config('{name}', %({name})s, true)" for name in timeouts)
            if timeouts
            else ""
        )
        self._timeouts = timeouts
        #: The timeouts set for the statement running now (or that just failed).
        self._bounded: dict[str, str] = {}
        prefix = BATCH_APPLICATION_PREFIX if for_batches else APPLICATION_PREFIX
        self.application_name = (prefix + worker_id)[:_APPLICATION_NAME_MAX]
        self._conn: psycopg.Connection[Any] | None = None
        #: A statement has worked on ``_conn`` (so its breaking is not an outage).
        self._conn_worked = False
        #: ``_conn``'s statement_timeout, read when it connected ("" if unknown).
        self._session_statement_timeout = ""
        self._batch: Batch | None = None
        #: The last claim found nothing: the next one asks ANY_DUE first.
        self._idle = False
        self._lock = threading.RLock()
        self._down_since: float | None = None
        self._reconnect_delay = RECONNECT_DELAY_MIN
        self._retry_at = 0.0

    # -- connection -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and self._batch is None and _closed_by_peer(conn):
            # The server ended the idle session (pg_terminate_backend, a restart,
            # idle_session_timeout) or a proxy dropped it: connect again now. That is
            # not an outage unless the new connection fails too.
            self._reset("the server closed an idle connection")
        if self._conn is None or self._conn.closed:
            wait = self._retry_at - time.monotonic()
            if wait > 0:  # back off between reconnection attempts during an outage
                raise DatabaseUnavailable(f"database unavailable; next reconnect in {wait:.1f}s")
            conn = connect(
                self.url,
                pooler=self.pooler,
                autocommit=True,
                connect_timeout=10,
                application_name=self.application_name,
            )
            self._session_statement_timeout = ""
            try:
                # Read first, as the cheapest statement there is: a statement_timeout
                # short enough to cancel the next one can be named in the error.
                self._session_statement_timeout = _setting(conn, "statement_timeout")
                check_installed(conn)
            except psycopg.errors.QueryCanceled as exc:
                conn.close()
                problem = _canceled(exc, self._session_statement_timeout)
                if not isinstance(problem, StatementTimeout):  # canceled while connecting
                    problem = StatementTimeout(f"{_first_line(exc)}; check statement_timeout")
                raise problem from exc
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._conn_worked = False
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

    def _run(
        self, query: str, params: dict[str, Any] | None = None, *, bounded: bool = True
    ) -> tuple[list[Any], int]:
        """Run one statement; return its rows and its row count.

        With ``bounded`` it runs in a transaction of its own under the store's lock and
        statement timeouts. A connection that breaks is replaced and the statement
        run once more at once (every statement run here may run twice); only when
        that fails too is it an outage: :class:`DatabaseUnavailable` (logged once per
        outage), and the next call reconnects.
        """
        with self._lock, self._outage_guard():
            before = self._conn
            conn = self._connection()
            try:
                return self._statement(conn, query, params, bounded)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn is not before or self._batch is not None or not _broken(conn):
                    raise  # a fresh connection failed, or the statement did
                self._reset(_first_line(exc))
                return self._statement(self._connection(), query, params, bounded)

    def _statement(
        self,
        conn: psycopg.Connection[Any],
        query: str,
        params: dict[str, Any] | None,
        bounded: bool,
    ) -> tuple[list[Any], int]:
        if not (bounded and self._set_timeouts):
            cur = conn.execute(query, params)
            return (cur.fetchall() if cur.description is not None else []), cur.rowcount
        conn.execute("BEGIN")
        try:
            self._bounded = self._timeouts
            conn.execute(self._set_timeouts, self._timeouts)
            cur = conn.execute(query, params)
            rows = cur.fetchall() if cur.description is not None else []
            conn.execute("COMMIT")
            self._bounded = {}
        except BaseException:
            if not (conn.closed or conn.broken):
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise  # _statement_problem reads (and clears) _bounded
        return rows, cur.rowcount

    def _reset(self, why: str) -> None:
        """Replace a connection that broke while the database is up (not an outage)."""
        self._drop_connection()
        log.info(
            "database connection closed (%s); connecting again",
            why,
            extra={"action": "db_connection_reset", "database": describe_url(self.url)},
        )

    @contextlib.contextmanager
    def _outage_guard(self) -> Iterator[None]:
        """Turn a lost or unreachable database into :class:`DatabaseUnavailable`
        (logged once per outage; the next call reconnects), and a statement that
        PostgreSQL cut short into :class:`StatementTimeout` or :class:`LockTimeout`."""
        self._bounded = {}
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            problem = self._statement_problem(exc)
            if problem is None and self._conn_worked and self._conn is not None:
                # A connection that worked broke (terminated, or closed by a proxy under
                # a statement): connect again at the next call, at once. Only if that
                # fails is the database down.
                self._reset(_first_line(exc))
                raise ConnectionReset(f"database connection lost: {_first_line(exc)}") from exc
            if problem is None:
                self._lost(exc)
                problem = DatabaseUnavailable(f"database unavailable: {_first_line(exc)}")
            self.health.note(problem)
            raise problem from exc
        except (OutboxNotInstalledError, DatabaseUnavailable, DatabaseTimeout) as exc:
            self.health.note(exc)
            raise
        except OutboxDatabaseError as exc:
            if self._conn is None:  # could not connect at all
                self._lost(exc)
                unavailable = DatabaseUnavailable(str(exc))
                self.health.note(unavailable)
                raise unavailable from exc
            self.health.note(exc)
            raise
        self._conn_worked = self._conn is not None
        if self._batch is None:  # a claimed batch's outcome tells whether it worked
            self.health.note(None)

    def _statement_problem(self, exc: psycopg.Error) -> OutboxDatabaseError | None:
        """What a statement's failure means when the database is still up: a timeout,
        or a canceled statement (its transaction is rolled back). None when the
        connection itself was lost."""
        if not isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
            return None
        conn = self._conn
        if conn is None or conn.closed or conn.broken:  # nothing left to ask the session
            if isinstance(exc, psycopg.errors.LockNotAvailable):
                return LockTimeout(f"{_first_line(exc)}; an outbox table is locked")
            return _canceled(exc, self._session_statement_timeout)
        # The rollback undid the transaction's own settings: keep what was set.
        in_force, self._bounded = self._bounded, {}
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            in_force = {"lock_timeout": str(queries.LOCK_TIMEOUT_MS)}  # a batch's
            self._abort()  # the batch's transaction is aborted
        if self._conn is None:
            return DatabaseUnavailable(f"database unavailable: {_first_line(exc)}")
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            try:
                value = _duration(in_force.get("lock_timeout")) or _setting(conn, "lock_timeout")
                return LockTimeout(f"{_first_line(exc)} ({value}): {lock_holders(conn)}")
            except psycopg.Error:  # the diagnosis failed too: say what is known
                self._drop_connection()
                return LockTimeout(f"{_first_line(exc)}; an outbox table is locked")
        ours = "statement_timeout" in in_force
        value = _duration(in_force.get("statement_timeout")) or self._session_statement_timeout
        # A fresh session picks up a corrected ALTER ROLE/DATABASE ... SET statement_timeout.
        self._drop_connection()
        return _canceled(exc, value, ours=ours)

    def _drop_connection(self) -> None:
        """Close and forget the connection (and the batch whose transaction it held);
        the next call connects again."""
        if self._batch is not None:  # its transaction died with the connection
            self._batch.closed = True
            self._batch = None
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the connection is gone either way
                self._conn.close()
        self._conn = None

    def _lost(self, exc: BaseException) -> None:
        self._drop_connection()
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
        """Close the connection (a batch still open is rolled back by the server)."""
        with self._lock:
            if self._batch is not None:
                self._batch.closed = True
                self._batch = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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
        with self._lock, self._outage_guard():
            if self._batch is not None:
                raise RuntimeError("this store already holds a batch; finish or release it")
            conn = self._connection()
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
                raise OutboxDatabaseError(f"claiming a batch failed: {_first_line(exc)}") from exc
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
                problem = self._statement_problem(exc)
                if problem is not None:  # a timeout: the transaction is rolled back
                    self.health.note(problem)
                    raise BatchLostError(f"the batch's outcome was not written: {problem}") from exc
                if _connection_gone(conn, exc):
                    # Often the server ended an idle transaction (the lease ran out):
                    # not an outage. If the database is down, the next claim finds out.
                    self._drop_connection()
                    raise BatchLostError(
                        f"the batch's transaction was lost: {_first_line(exc)}"
                    ) from exc
                self._abort()
                raise OutboxDatabaseError(
                    f"writing a batch's outcome failed: {_first_line(exc)}"
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
                self._drop_connection()
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
                self._lost(exc)

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
                f"outbox_worker_state: {_first_line(exc)}"
            ) from exc


def _connection_gone(conn: psycopg.Connection[Any], exc: psycopg.Error) -> bool:
    """The error ended the session (lost connection, or the server terminated it)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or bool(
        conn.closed or conn.broken
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _broken(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.closed or conn.broken)


def _closed_by_peer(conn: psycopg.Connection[Any]) -> bool:
    """An idle connection has something to read: the server's goodbye (a FATAL error,
    then end of file), since none of the store's sessions LISTENs. Costs one poll."""
    try:
        fd = conn.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def _milliseconds(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _canceled(
    exc: psycopg.Error, statement_timeout: str, *, ours: bool = False
) -> OutboxDatabaseError:
    """A canceled statement: :class:`StatementTimeout` with the setting in force (the
    store's own when ``ours``, else the session's), or a plain error when none was
    (someone canceled it)."""
    if ours:
        return StatementTimeout(f"{_first_line(exc)} (gave up after {statement_timeout})")
    if statement_timeout in ("0", ""):
        return OutboxDatabaseError(f"statement canceled: {_first_line(exc)}")
    return StatementTimeout(
        f"{_first_line(exc)} (statement_timeout is {statement_timeout} for the worker's "
        "sessions: see ALTER ROLE/ALTER DATABASE ... SET statement_timeout)"
    )


def _duration(milliseconds: str | None) -> str:
    """A timeout in PostgreSQL's own notation (``2s``, ``500ms``); "" for None."""
    if milliseconds is None:
        return ""
    ms = int(milliseconds)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _setting(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    return str(row[0]) if row else ""


if TYPE_CHECKING:

    def _is_an_engine(store: Store) -> Storage:
        return store  # mypy checks that Store implements the protocol
