"""One reconnecting PostgreSQL connection of the worker, shared by every engine.

:class:`Connection` owns one autocommit psycopg connection and says what happened to
its statements in the storage protocol's terms (:mod:`worker.storage.base`):

- the database cannot be reached: :class:`DatabaseUnavailable`, logged once per
  outage (``db_unavailable``, then ``db_reconnected``), reconnection attempts backed
  off from :data:`RECONNECT_DELAY_MIN` to :data:`RECONNECT_DELAY_MAX`;
- a connection that worked was closed by the server or a proxy: replaced at once,
  without an outage (``db_connection_reset``); an idle one is noticed before a
  statement is sent (:func:`closed_by_peer`), one that breaks under a statement is
  replaced and the statement run once more (or, where it must not run twice,
  :class:`ConnectionReset`);
- PostgreSQL cut a statement short: :class:`StatementTimeout` or
  :class:`LockTimeout`, naming the setting in force (and, for a lock, who holds it);
  the database is up. :class:`Health` records the latest outcome and logs the
  timeouts' starts and ends once.

Each statement is bounded by the connection's ``lock_timeout`` and
``statement_timeout``: set for the transaction it runs in (``per_transaction``, as a
transaction pooler needs, since a session setting would stay on whichever server
session the pooler handed out), or once for the session when it connects (one round
trip per connection instead of two more per statement, BEGIN and COMMIT). Other
settings an engine needs (``settings``) are applied the same way.

An engine (:class:`worker.storage.snapshot_storage.SnapshotStorage`) holds one
:class:`Connection` and gives it two hooks: what to check on a new connection
(``prepare``) and what to forget when the connection goes (``on_drop``). No
transaction of an engine stays open between calls, so a broken idle connection is
always replaced at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg

from outbox._locks import lock_holders
from outbox.exceptions import OutboxDatabaseError, OutboxNotInstalledError
from worker.database import check_installed, connect, describe_url
from worker.storage.base import (
    ConnectionReset,
    DatabaseTimeout,
    DatabaseUnavailable,
    LockTimeout,
    StatementTimeout,
)

log = logging.getLogger("outbox.worker")

#: Reconnection attempts during an outage start this far apart and double up to the max.
RECONNECT_DELAY_MIN = 0.25
RECONNECT_DELAY_MAX = 15.0

#: How long the worker's statements wait for a lock another session holds on an
#: outbox table before they give up with :class:`LockTimeout` (milliseconds).
LOCK_TIMEOUT_MS = 2000
#: :data:`LOCK_TIMEOUT_MS` in seconds (what the engines' ``lock_timeout`` defaults to).
LOCK_TIMEOUT = LOCK_TIMEOUT_MS / 1000

#: Worker connections that claim batches are named ``<prefix><worker id>`` in
#: pg_stat_activity, so ``outbox-worker status`` can tell them apart.
BATCH_APPLICATION_PREFIX = "outbox-worker batches "
#: Every other worker connection (housekeeping, probes, commands).
APPLICATION_PREFIX = "outbox-worker "
_APPLICATION_NAME_MAX = 63  # PostgreSQL's NAMEDATALEN - 1


class Health:
    """What a connection (or the connections sharing it) last learned about the
    database: :attr:`problem` is None after a statement that worked, else what went
    wrong.

    With ``log``, a timeout is logged when it starts (``db_statement_timeout``,
    ``db_lock_timeout``) and when statements work again (``db_timeouts_over``), once
    however many connections share this object and however often it repeats.
    Outages are logged by the connection (``db_unavailable``), not here.
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


def application_name(worker_id: str, *, for_batches: bool) -> str:
    """The ``application_name`` of a worker connection (see the prefixes above)."""
    prefix = BATCH_APPLICATION_PREFIX if for_batches else APPLICATION_PREFIX
    return (prefix + worker_id)[:_APPLICATION_NAME_MAX]


#: What a setting's name and value may be made of (they are written into SQL as is).
_SETTING = re.compile(r"[A-Za-z0-9_.]+")


def _nothing() -> None:
    return None


class Connection:
    """One autocommit connection that is made again after it is lost, and the
    protocol's errors for what happens to its statements (see the module's text).

    Not thread-safe by itself: callers hold :attr:`lock` around a call (the engines'
    methods do), or use :meth:`run`, which takes it.
    """

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
        settings: Mapping[str, str] | None = None,
        per_transaction: bool | None = None,
        prepare: Callable[[psycopg.Connection[Any]], None] = check_installed,
        on_drop: Callable[[], None] = _nothing,
    ) -> None:
        """``lock_timeout`` and ``statement_timeout`` are seconds (None leaves the
        session's own). ``settings`` are more configuration parameters the engine's
        statements need. ``per_transaction`` (default: only behind a transaction
        pooler) sets both for each statement's transaction instead of once per session.

        ``prepare`` runs on each new connection (raise
        :class:`~outbox.exceptions.OutboxNotInstalledError` there when the tables are
        missing); ``on_drop`` is called when the connection is closed and forgotten."""
        self.url = url
        self.pooler = pooler
        self.worker_id = worker_id
        self.log_outages = log_outages
        self.health = health if health is not None else Health(log=log_outages)
        self.application_name = application_name(worker_id, for_batches=for_batches)
        timeouts = {
            name: milliseconds(seconds)
            for name, seconds in (
                ("lock_timeout", lock_timeout),
                ("statement_timeout", statement_timeout),
            )
            if seconds is not None
        }
        self._timeouts = timeouts
        self._settings = {**(settings or {}), **timeouts}
        self.per_transaction = (
            pooler == "transaction" if per_transaction is None else per_transaction
        )
        #: One statement applying the settings to a new session (unless per transaction).
        self._apply = (
            "SELECT "
            + ", ".join(f"set_config('{name}', %({name})s, false)" for name in self._settings)
            if self._settings and not self.per_transaction
            else ""
        )
        for name, value in self._settings.items():
            if not (_SETTING.fullmatch(name) and _SETTING.fullmatch(value)):
                raise ValueError(f"settings: {name!r} = {value!r} is not a plain setting")
        #: The start of a transaction, with its settings, in one round trip (no
        #: parameters, so both statements go in one simple query).
        self._begin = "BEGIN"
        if self._settings and self.per_transaction:
            self._begin += "; SELECT " + ", ".join(
                f"set_config('{name}', '{value}', true)" for name, value in self._settings.items()
            )
        self._prepare = prepare
        self._on_drop = on_drop
        self.lock = threading.RLock()
        self.conn: psycopg.Connection[Any] | None = None
        #: A statement has worked on ``conn`` (so its breaking is not an outage).
        self.worked = False
        #: ``conn``'s statement_timeout, read when it connected ("" if unknown).
        self._session_statement_timeout = ""
        #: The timeouts in force for the statement running now (or that just failed).
        self._bounded: dict[str, str] = {}
        self._down_since: float | None = None
        self._reconnect_delay = RECONNECT_DELAY_MIN
        self._retry_at = 0.0

    # -- the connection ---------------------------------------------------------------

    def connection(self) -> psycopg.Connection[Any]:
        """The connection, made again if it was lost (or the server closed it while
        it sat idle). Raises :class:`DatabaseUnavailable` while backing off."""
        conn = self.conn
        if conn is not None and not conn.closed and closed_by_peer(conn):
            # The server ended the idle session (pg_terminate_backend, a restart,
            # idle_session_timeout) or a proxy dropped it: connect again now. That is
            # not an outage unless the new connection fails too.
            self.reset("the server closed an idle connection")
        if self.conn is None or self.conn.closed:
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
                self._session_statement_timeout = setting(conn, "statement_timeout")
                self._prepare(conn)
                if self._apply:
                    conn.execute(self._apply, self._settings)
            except psycopg.errors.QueryCanceled as exc:
                conn.close()
                problem = canceled(exc, self._session_statement_timeout)
                if not isinstance(problem, StatementTimeout):  # canceled while connecting
                    problem = StatementTimeout(f"{first_line(exc)}; check statement_timeout")
                raise problem from exc
            except BaseException:
                conn.close()
                raise
            self.conn = conn
            self.worked = False
            if self._down_since is not None:
                log.warning(
                    "database reachable again",
                    extra={"action": "db_reconnected", "database": describe_url(self.url)},
                )
                self._down_since = None
            self._reconnect_delay = RECONNECT_DELAY_MIN
        return self.conn

    def execute(self, query: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Run one statement (its own transaction); return its rows, if any."""
        return self.run(query, params)[0]

    def run(
        self, query: str, params: Mapping[str, Any] | None = None, *, bounded: bool = True
    ) -> tuple[list[Any], int]:
        """Run one statement; return its rows and its row count.

        With ``bounded`` it runs under the connection's lock and statement timeouts.
        A connection that breaks is replaced and the statement run once more at once
        (every statement run here may run twice); only when that fails too is it an
        outage: :class:`DatabaseUnavailable` (logged once per outage), and the next
        call reconnects.
        """
        with self.lock, self.guard():
            before = self.conn
            conn = self.connection()
            try:
                return self._statement(conn, query, params, bounded)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn is not before or not broken(conn):
                    raise  # a fresh connection failed, or the statement did
                self.reset(first_line(exc))
                return self._statement(self.connection(), query, params, bounded)

    def _statement(
        self,
        conn: psycopg.Connection[Any],
        query: str,
        params: Mapping[str, Any] | None,
        bounded: bool,
    ) -> tuple[list[Any], int]:
        if not (bounded and self._settings and self.per_transaction):
            # Set for the session, the timeouts bound every statement; else none of ours.
            self._bounded = {} if self.per_transaction else self._timeouts
            cur = conn.execute(query, params)
            rows = cur.fetchall() if cur.description is not None else []
            self._bounded = {}
            return rows, cur.rowcount
        with self.transaction(conn) as tx:
            cur = tx.execute(query, params)
            rows = cur.fetchall() if cur.description is not None else []
        return rows, cur.rowcount

    @contextlib.contextmanager
    def transaction(
        self, conn: psycopg.Connection[Any] | None = None
    ) -> Iterator[psycopg.Connection[Any]]:
        """A transaction on the connection (BEGIN ... COMMIT, rolled back if the block
        raises) under the connection's timeouts and settings; use it inside
        :meth:`guard`, holding :attr:`lock`."""
        conn = conn if conn is not None else self.connection()
        self._bounded = self._timeouts
        try:
            conn.execute(self._begin)
            yield conn
            conn.execute("COMMIT")
            self._bounded = {}
        except BaseException:
            if not (conn.closed or conn.broken):
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise  # problem() reads (and clears) _bounded

    def reset(self, why: str) -> None:
        """Replace a connection that broke while the database is up (not an outage)."""
        self.drop()
        log.info(
            "database connection closed (%s); connecting again",
            why,
            extra={"action": "db_connection_reset", "database": describe_url(self.url)},
        )

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a lost or unreachable database into :class:`DatabaseUnavailable`
        (logged once per outage; the next call reconnects), a connection that worked
        and broke into :class:`ConnectionReset`, and a statement that PostgreSQL cut
        short into :class:`StatementTimeout` or :class:`LockTimeout`; note the outcome
        in :attr:`health`."""
        self._bounded = {}
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            problem = self.problem(exc)
            if problem is None and self.worked and self.conn is not None:
                # A connection that worked broke (terminated, or closed by a proxy under
                # a statement): connect again at the next call, at once. Only if that
                # fails is the database down.
                self.reset(first_line(exc))
                raise ConnectionReset(f"database connection lost: {first_line(exc)}") from exc
            if problem is None:
                self.lost(exc)
                problem = DatabaseUnavailable(f"database unavailable: {first_line(exc)}")
            self.health.note(problem)
            raise problem from exc
        except (OutboxNotInstalledError, DatabaseUnavailable, DatabaseTimeout) as exc:
            self.health.note(exc)
            raise
        except OutboxDatabaseError as exc:
            if self.conn is None:  # could not connect at all
                self.lost(exc)
                unavailable = DatabaseUnavailable(str(exc))
                self.health.note(unavailable)
                raise unavailable from exc
            self.health.note(exc)
            raise
        self.worked = self.conn is not None
        self.health.note(None)

    def problem(self, exc: psycopg.Error) -> OutboxDatabaseError | None:
        """What a statement's failure means when the database is still up: a timeout,
        or a canceled statement (its transaction is rolled back). None when the
        connection itself was lost."""
        if not isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
            return None
        conn = self.conn
        if conn is None or conn.closed or conn.broken:  # nothing left to ask the session
            if isinstance(exc, psycopg.errors.LockNotAvailable):
                return LockTimeout(f"{first_line(exc)}; an outbox table is locked")
            return canceled(exc, self._session_statement_timeout)
        # The rollback undid the transaction's own settings: keep what was set.
        in_force, self._bounded = self._bounded, {}
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            # A transaction the engine holds between calls (which sets the lock
            # timeout of its own).
            in_force = in_force or {"lock_timeout": str(LOCK_TIMEOUT_MS)}
            self._abort()
        if self.conn is None:
            return DatabaseUnavailable(f"database unavailable: {first_line(exc)}")
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            try:
                value = duration(in_force.get("lock_timeout")) or setting(conn, "lock_timeout")
                return LockTimeout(f"{first_line(exc)} ({value}): {lock_holders(conn)}")
            except psycopg.Error:  # the diagnosis failed too: say what is known
                self.drop()
                return LockTimeout(f"{first_line(exc)}; an outbox table is locked")
        ours = "statement_timeout" in in_force
        value = duration(in_force.get("statement_timeout")) or self._session_statement_timeout
        # A fresh session picks up a corrected ALTER ROLE/DATABASE ... SET statement_timeout.
        self.drop()
        return canceled(exc, value, ours=ours)

    def _abort(self) -> None:
        if self.conn is not None:
            try:
                self.conn.execute("ROLLBACK")
            except psycopg.Error as exc:
                self.lost(exc)

    def drop(self) -> None:
        """Close and forget the connection (``on_drop`` forgets what lived on it);
        the next call connects again."""
        self._on_drop()
        if self.conn is not None:
            with contextlib.suppress(Exception):  # the connection is gone either way
                self.conn.close()
        self.conn = None

    def lost(self, exc: BaseException) -> None:
        """The database could not be reached: drop the connection, back off the next
        attempt, and log the outage when it starts."""
        self.drop()
        self._retry_at = time.monotonic() + self._reconnect_delay * random.uniform(0.5, 1.0)
        self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_DELAY_MAX)
        if self._down_since is None:
            self._down_since = time.monotonic()
            if not self.log_outages:
                return
            log.error(
                "database unavailable: %s",
                first_line(exc),
                extra={"action": "db_unavailable", "database": describe_url(self.url)},
            )

    def close(self) -> None:
        """Close the connection (a transaction still open is rolled back by the server)."""
        with self.lock:
            self._on_drop()
            if self.conn is not None:
                self.conn.close()
                self.conn = None


# -- helpers ------------------------------------------------------------------------------


def connection_gone(conn: psycopg.Connection[Any], exc: psycopg.Error) -> bool:
    """The error ended the session (lost connection, or the server terminated it)."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or bool(
        conn.closed or conn.broken
    )


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def broken(conn: psycopg.Connection[Any]) -> bool:
    """The connection is closed or unusable."""
    return bool(conn.closed or conn.broken)


def closed_by_peer(conn: psycopg.Connection[Any]) -> bool:
    """An idle connection has something to read: the server's goodbye (a FATAL error,
    then end of file), since none of the worker's storage sessions LISTENs. Costs one
    poll."""
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


def milliseconds(seconds: float) -> str:
    """Seconds as PostgreSQL's milliseconds (at least 1)."""
    return str(max(1, round(seconds * 1000)))


def canceled(
    exc: psycopg.Error, statement_timeout: str, *, ours: bool = False
) -> OutboxDatabaseError:
    """A canceled statement: :class:`StatementTimeout` with the setting in force (the
    connection's own when ``ours``, else the session's), or a plain error when none was
    (someone canceled it)."""
    if ours:
        return StatementTimeout(f"{first_line(exc)} (gave up after {statement_timeout})")
    if statement_timeout in ("0", ""):
        return OutboxDatabaseError(f"statement canceled: {first_line(exc)}")
    return StatementTimeout(
        f"{first_line(exc)} (statement_timeout is {statement_timeout} for the worker's "
        "sessions: see ALTER ROLE/ALTER DATABASE ... SET statement_timeout)"
    )


def duration(milliseconds: str | None) -> str:
    """A timeout in PostgreSQL's own notation (``2s``, ``500ms``); "" for None."""
    if milliseconds is None:
        return ""
    ms = int(milliseconds)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def setting(conn: psycopg.Connection[Any], name: str) -> str:
    """The session's value of a configuration parameter."""
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    return str(row[0]) if row else ""
