"""The snapshot engine behind the storage protocol (:class:`worker.storage.base.Storage`).

:class:`SnapshotStorage` drives :class:`worker.storage.snapshot.SnapshotEngine` over
its own autocommit connection. A claim hands out either due rows of ``outbox_retry``
(leased per row) or the next chunk of a leased snapshot batch (ticking first when no
batch is waiting, so events committed before the claim are found). Finishing a chunk
files its failed, deferred and unnamed events into ``outbox_retry`` (each with the
attempts and due time the protocol gives it), starts the dedup window of the shipped
ones and moves the batch's progress past the chunk, in one transaction fenced on the
batch's lease (and on the lease not having run out). Event ids are positions in the
batch (1, 2, ...), meaningful only to the object that claimed it.

Its connection is a :class:`worker.storage.connection.Connection`: the worker's
outage logging, timeouts, :class:`~worker.storage.connection.Health` and
``application_name`` prefixes.

What operators see (backlog, dead letters, leases) is in
:mod:`worker.storage.snapshot_inspection`, the worker-state rows in
:mod:`worker.storage.worker_states`; both are mixed into :class:`SnapshotStorage`.

Housekeeping must call :meth:`SnapshotStorage.maintain` regularly (see its text): it
ticks, so that events committed while no worker claims still get a batch, and it
TRUNCATEs the event tables whose rows are all delivered.

A batch is a lease (a row), not a transaction: it outlives a lost connection and is
finished over the next one while the lease holds. A claim or an outcome that fails
with the database up hands the lease back at once; one lost with the connection
waits for the lease to run out.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from outbox.exceptions import OutboxDatabaseError
from worker.database import check_installed
from worker.storage import snapshot_sql
from worker.storage.base import (
    Batch,
    BatchLostError,
    BatchOutcome,
    ClaimedEvent,
    Finished,
)
from worker.storage.connection import (
    LOCK_TIMEOUT,
    LOCK_TIMEOUT_MS,
    Connection,
    Health,
    first_line,
)
from worker.storage.snapshot import LeasedBatch, SnapshotEngine, SnapshotEvent, own_keys
from worker.storage.snapshot_inspection import SnapshotInspection
from worker.storage.worker_states import StoredWorkerStates

if TYPE_CHECKING:
    from worker.storage.base import Storage, WorkerStates


# -- finishing a chunk of a snapshot batch (one transaction) -----------------------------

FENCE_BATCH = """
SELECT 1 FROM outbox_batches
WHERE batch_id = %(batch)s AND lease = %(lease)s AND leased_until > now()
FOR UPDATE
"""

# Deferred events share one due time (the uncorrelated subquery runs once), so a held
# batch comes back whole rather than as the part a poll at the boundary happens to see.
FILE_RETRIES = """
-- created_at is when the event was enqueued as far as can be told (as the old table's
-- created_at was, and as PENDING's since): its timestamp, kept within the batch's two
-- ticks. So dead, purge and the backlog's oldest age count from then, not from its
-- first failure.
WITH w AS (
    SELECT t1.taken_at AS at1, t2.taken_at AS at2
    FROM outbox_batches AS b
    JOIN outbox_ticks AS t1 ON t1.tick_id = b.from_tick
    JOIN outbox_ticks AS t2 ON t2.tick_id = b.to_tick
    WHERE b.batch_id = %(batch)s
)
INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, destination, dedup_key,
    properties, status, attempts, next_attempt_at, last_error, created_at)
SELECT x.*, coalesce(greatest(least(x.ts, w.at2), w.at1), now()) FROM (
SELECT f.uuid, f.ts, f.event, f.distinct_id, f.destination, f.dedup_key, f.properties::json,
    f.status, f.attempts, (SELECT clock_timestamp()) + f.delay * interval '1 second', f.error
FROM unnest(%(uuid)s::uuid[], %(ts)s::timestamptz[], %(event)s::text[],
            %(distinct_id)s::text[], %(destination)s::text[], %(dedup_key)s::text[],
            %(properties)s::text[], %(status)s::text[], %(attempts)s::integer[],
            %(delay)s::double precision[], %(error)s::text[])
    AS f(uuid, ts, event, distinct_id, destination, dedup_key, properties, status,
         attempts, delay, error)
) AS x LEFT JOIN w ON true
"""

# The worker's writes to outbox_dedup_keys go through migration 0010's functions (its
# role needs no right on the table).
START_WINDOW = "SELECT outbox_start_dedup_window(%(keys)s::text[], %(window)s::double precision)"

BATCH_DONE = "DELETE FROM outbox_batches WHERE batch_id = %(batch)s"

BATCH_PAST = """
UPDATE outbox_batches
SET progress_table = %(pt)s, progress_ctid = %(pc)s, sent = sent + %(count)s,
    leased_by = NULL, lease = NULL, leased_until = NULL
WHERE batch_id = %(batch)s
"""

# -- the delivery ledger (the last statement of either finish) --------------------------

# The finish's delivered and dead events, counted per (day, event, destination) by the
# worker already (one element per group): one row per group is written, each at most
# once. Rows are locked in key order, so that two workers finishing at once never wait
# for each other in a cycle; being the transaction's last statement, it holds them for
# the commit alone.
LEDGER_ADD = """
INSERT INTO outbox_ledger AS l (day, event, destination, delivered, dead, updated_at)
SELECT f.day, f.event, f.destination, sum(f.delivered), sum(f.dead), now()
FROM unnest(%(day)s::date[], %(event)s::text[], %(destination)s::text[],
            %(delivered)s::bigint[], %(dead)s::bigint[])
    AS f(day, event, destination, delivered, dead)
GROUP BY f.day, f.event, f.destination
ORDER BY f.day, f.event, f.destination
ON CONFLICT (day, event, destination) DO UPDATE
SET delivered = l.delivered + EXCLUDED.delivered, dead = l.dead + EXCLUDED.dead,
    updated_at = EXCLUDED.updated_at
"""

# -- finishing leased retries (one transaction) ------------------------------------------

FENCE_RETRIES = """
SELECT id FROM outbox_retry
WHERE lease = %(lease)s AND status = 'pending' AND next_attempt_at > now()
FOR UPDATE
"""

SHIP_RETRIES = """
WITH done AS (
    DELETE FROM outbox_retry WHERE id = ANY(%(ids)s::bigint[]) AND lease = %(lease)s
    RETURNING dedup_key
), keys AS (
    SELECT outbox_start_dedup_window(array_agg(dedup_key), %(window)s::double precision) AS n
    FROM done
)
SELECT (SELECT count(*) FROM done), (SELECT n FROM keys)
"""

BURY_RETRIES = """
UPDATE outbox_retry AS r
SET status = 'dead', attempts = r.attempts + 1, last_error = f.error, lease = NULL
FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS f(id, error)
WHERE r.id = f.id AND r.lease = %(lease)s
"""

RETRY_RETRIES = """
UPDATE outbox_retry AS r
SET attempts = r.attempts + 1,
    status = CASE WHEN r.attempts + 1 >= %(max_attempts)s THEN 'dead' ELSE 'pending' END,
    next_attempt_at = clock_timestamp() + least(
        %(backoff_max)s, %(backoff_base)s * power(2, least(r.attempts, 40))
    ) * (0.5 + random() / 2) * interval '1 second',
    last_error = %(error)s, lease = NULL
WHERE r.id = ANY(%(ids)s::bigint[]) AND r.lease = %(lease)s
RETURNING r.id, r.status
"""

DEFER_RETRIES = """
UPDATE outbox_retry
SET next_attempt_at = (SELECT clock_timestamp()) + %(delay)s * interval '1 second',
    last_error = coalesce(%(error)s::text, last_error), lease = NULL
WHERE id = ANY(%(ids)s::bigint[]) AND lease = %(lease)s
"""

# The rest of the lease (unnamed, or released): due at once, unchanged.
RELEASE_RETRIES = """
UPDATE outbox_retry SET lease = NULL, next_attempt_at = now()
WHERE lease = %(lease)s AND status = 'pending'
RETURNING 1
"""


# The ledger's days before the retention (days before today, UTC; the primary key's
# index leads with the day, so this reads only what it deletes).
EXPIRE_LEDGER = """
WITH gone AS (
    DELETE FROM outbox_ledger
    WHERE day < (now() AT TIME ZONE 'UTC')::date - %(days)s::integer
    RETURNING 1
)
SELECT count(*) FROM gone
"""

#: How often housekeeping must call :meth:`SnapshotStorage.maintain` (seconds).
MAINTAIN_EVERY_SECONDS = 15.0


@dataclass(eq=False, slots=True)
class _Handle:
    """What a claimed :class:`Batch` is to this engine: a chunk of a leased snapshot
    batch (``leased``), or leased retry rows (``retry_lease``)."""

    events: list[SnapshotEvent]
    leased: LeasedBatch | None = None
    #: The chunk is the batch's last: finishing it deletes the batch.
    last: bool = False
    retry_lease: uuid.UUID | None = None


class SnapshotStorage(SnapshotInspection, StoredWorkerStates):
    """The snapshot engine as a :class:`worker.storage.base.Storage` (and
    :class:`worker.storage.base.WorkerStates`), over one
    :class:`worker.storage.connection.Connection`: reconnecting, with the worker's
    outage logging, timeouts and :class:`~worker.storage.connection.Health`."""

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
        split_rows: int = 5_000,
    ) -> None:
        """The keyword arguments are the connection's (see
        :class:`worker.storage.connection.Connection`): ``lock_timeout`` and
        ``statement_timeout`` (seconds; None leaves the session's own) bound every
        statement, set once per session, or for each transaction behind a
        transaction pooler (``pooler="transaction"``), where the engine's planner
        settings (:data:`snapshot_sql.SETTINGS`) are set per transaction too.
        ``split_rows``: a tick splits an interval of more rows than this into
        several batches (so that several workers can share it)."""
        self.worker_id = worker_id
        self.split_rows = split_rows
        self._engine: SnapshotEngine | None = None
        self._batch: Batch | None = None
        self._db = Connection(
            url,
            worker_id=worker_id,
            log_outages=log_outages,
            for_batches=for_batches,
            lock_timeout=lock_timeout,
            statement_timeout=statement_timeout,
            health=health,
            pooler=pooler,
            settings=snapshot_sql.SETTINGS,
            prepare=check_installed,
            on_drop=self._forget,
        )
        self.url = url
        self.pooler = pooler
        self.for_batches = for_batches
        self.health = self._db.health
        self.application_name = self._db.application_name

    # -- connection -------------------------------------------------------------------

    @property
    def _conn(self) -> psycopg.Connection[Any] | None:
        return self._db.conn

    def _forget(self) -> None:
        """The connection is gone, and the engine on it. A batch claimed on it is not:
        its lease is a row, so it is finished (or released) over the next connection
        as long as the lease holds."""
        self._engine = None

    @contextlib.contextmanager
    def _guard(self, *, transaction: bool = False) -> Iterator[SnapshotEngine]:
        """The engine on a working connection, under the connection's lock and
        :meth:`~worker.storage.connection.Connection.guard` (the driver's errors as the
        protocol's), in one transaction when ``transaction`` (or behind a transaction
        pooler, where the settings are per transaction). Other statement failures
        raise :class:`~outbox.exceptions.OutboxDatabaseError`."""
        db = self._db
        with db.lock, db.guard():
            conn = db.connection()
            if self._engine is None or self._engine.conn is not conn:
                self._engine = SnapshotEngine(conn, worker_id=self.worker_id, settings=False)
            try:
                if transaction or db.per_transaction:
                    with db.transaction(conn):
                        yield self._engine
                else:
                    yield self._engine
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise  # the guard's to judge
            except psycopg.Error as exc:
                raise OutboxDatabaseError(
                    f"a snapshot storage statement failed: {first_line(exc)}"
                ) from exc

    def _rows(self, query: str, params: dict[str, Any] | None = None) -> list[Any]:
        """One statement's rows (run once more on a new connection if the old one
        broke under it: every statement given here may run twice)."""
        return self._db.execute(query, params)

    def ping_or_raise(self) -> None:
        """Run a trivial query; raise what went wrong (connection, missing tables)."""
        self._db.run("SELECT 1", bounded=False)

    def ping(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            self.ping_or_raise()
        except OutboxDatabaseError:
            return False
        return True

    def close(self) -> None:
        """Hand back the batch held, if any, and close the connection."""
        with self._db.lock:
            if self._batch is not None and not self._batch.closed:
                with contextlib.suppress(OutboxDatabaseError):
                    self.release(self._batch)
            self._db.close()

    # -- the batch life cycle ---------------------------------------------------------

    def claim(self, limit: int, max_bytes: int, lease_seconds: float) -> Batch | None:
        """See :meth:`worker.storage.base.DrainStorage.claim`: due retries first, else
        the next chunk of the oldest snapshot batch (ticking when none is waiting)."""
        with self._guard() as engine:
            if self._batch is not None and not self._batch.closed:
                raise RuntimeError("this store already holds a batch; finish or release it")
            self._batch = None
            lease, rows = engine.claim_retries(limit, lease_seconds)
            if rows:
                kept = _within(rows, max_bytes)
                if len(kept) < len(rows):
                    engine.conn.execute(
                        "UPDATE outbox_retry SET lease = NULL, next_attempt_at = now()"
                        " WHERE id = ANY(%(ids)s::bigint[])",
                        {"ids": [int(e.position) for e in rows[len(kept) :]]},
                    )
                handle = _Handle(kept, retry_lease=lease)
            else:
                while True:
                    leased = engine.claim(lease_seconds, split_rows=self.split_rows)
                    if leased is None:
                        return None
                    try:
                        chunk = engine.read(leased, limit)
                    except BaseException:
                        self._let_go(_Handle([], leased=leased))
                        raise
                    if chunk.events:
                        break
                    engine.advance(leased, None, last=True)  # nothing left in it
                kept = _within(chunk.events, max_bytes)
                last = chunk.last and len(kept) == len(chunk.events)
                handle = _Handle(kept, leased=leased, last=last)
            events = [_claimed(i, e) for i, e in enumerate(handle.events, 1)]
            self._batch = Batch(store=self, events=events, handle=handle)
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
        """See :meth:`worker.storage.base.DrainStorage.finish`."""
        with self._db.lock:
            handle = batch.handle
            if (
                batch.store is not self
                or batch.closed
                or self._batch is not batch
                or not isinstance(handle, _Handle)
            ):
                batch.closed = True
                if self._batch is batch:
                    self._batch = None
                raise BatchLostError("the batch is already over")
            try:
                with self._guard(transaction=True) as engine:
                    # A lease that ran out is not the database's problem: the guard
                    # sees it as a statement that worked (and the transaction wrote
                    # nothing).
                    if handle.leased is not None:
                        done = self._finish_chunk(
                            engine, handle, outcome, dedup_window, max_attempts,
                            backoff_base, backoff_max,
                        )  # fmt: skip
                    else:
                        done = self._finish_retries(
                            engine, handle, outcome, dedup_window, max_attempts,
                            backoff_base, backoff_max,
                        )  # fmt: skip
                if isinstance(done, str):
                    raise BatchLostError(done)
            except BatchLostError:
                raise
            except OutboxDatabaseError as exc:
                self._let_go(handle)
                raise BatchLostError(f"the batch's outcome was not written: {exc}") from exc
            finally:
                batch.closed = True
                if self._batch is batch:
                    self._batch = None
            return done

    def _finish_chunk(
        self,
        engine: SnapshotEngine,
        handle: _Handle,
        outcome: BatchOutcome,
        dedup_window: float,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
    ) -> Finished | str:
        """What was written, or why nothing was (the lease is lost)."""
        leased = handle.leased
        assert leased is not None
        conn = engine.conn
        if (
            conn.execute(FENCE_BATCH, {"batch": leased.batch_id, "lease": leased.lease}).fetchone()
            is None
        ):
            return "the batch's lease ran out or was taken over"
        events = dict(enumerate(handle.events, 1))
        shipped = [events.pop(i) for i in dict.fromkeys(outcome.shipped) if i in events]
        # Each filed event: (event, status, attempts, delay, error).
        filed: list[tuple[SnapshotEvent, str, int, float, str | None]] = []
        for i, error in outcome.dead:
            if (e := events.pop(i, None)) is not None:
                filed.append((e, "dead", 1, 0.0, error[:2000]))
        retried = dead_by_retry = 0
        backoff = min(backoff_max, backoff_base)
        for i in outcome.retry:
            if (e := events.pop(i, None)) is None:
                continue
            if max_attempts <= 1:
                dead_by_retry += 1
                filed.append((e, "dead", 1, 0.0, outcome.retry_error[:2000]))
            else:
                retried += 1
                delay = backoff * (0.5 + random.random() / 2)
                filed.append((e, "pending", 1, delay, outcome.retry_error[:2000]))
        if outcome.defer and (outcome.defer_delay > 0 or outcome.defer_error):
            for i in outcome.defer:
                if (e := events.pop(i, None)) is not None:
                    filed.append((e, "pending", 0, float(outcome.defer_delay), outcome.defer_error))
        # Unnamed (and deferred for no time): due again at once, as they were.
        filed.extend((e, "pending", 0, 0.0, None) for e in events.values())
        if filed:
            conn.execute(
                FILE_RETRIES,
                {
                    "batch": leased.batch_id,
                    "uuid": [f[0].uuid for f in filed],
                    "ts": [f[0].timestamp for f in filed],
                    "event": [f[0].event for f in filed],
                    "distinct_id": [f[0].distinct_id for f in filed],
                    "destination": [
                        None if f[0].destination == "posthog" else f[0].destination for f in filed
                    ],
                    "dedup_key": [f[0].dedup_key for f in filed],
                    "properties": [f[0].properties_json for f in filed],
                    "status": [f[1] for f in filed],
                    "attempts": [f[2] for f in filed],
                    "delay": [f[3] for f in filed],
                    "error": [f[4] for f in filed],
                },
            )
        keys = [e.dedup_key for e in shipped if e.dedup_key is not None]
        if keys:
            conn.execute(START_WINDOW, {"window": float(dedup_window), "keys": keys})
        if handle.last:
            conn.execute(BATCH_DONE, {"batch": leased.batch_id})
        else:
            end = handle.events[-1]
            conn.execute(
                BATCH_PAST,
                {
                    "batch": leased.batch_id,
                    "pt": end.table,
                    "pc": end.position,
                    "count": len(handle.events),
                },
            )
        ledger = count_in_ledger(conn, shipped, [f[0] for f in filed if f[1] == "dead"])
        return Finished(
            shipped=len(shipped), retried=retried, dead_by_retry=dead_by_retry, ledger=ledger
        )

    def _finish_retries(
        self,
        engine: SnapshotEngine,
        handle: _Handle,
        outcome: BatchOutcome,
        dedup_window: float,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
    ) -> Finished | str:
        """What was written, or why nothing was (the lease is lost)."""
        conn = engine.conn
        lease = handle.retry_lease
        ids = {i: int(e.position) for i, e in enumerate(handle.events, 1)}
        held = {int(r[0]) for r in conn.execute(FENCE_RETRIES, {"lease": lease}).fetchall()}
        if not set(ids.values()) <= held:
            return "the retries' lease ran out or was taken over"

        by_id = {int(e.position): e for e in handle.events}
        # Each event's first outcome is the one written (as for a chunk).
        named: set[int] = set()

        def rows(listed: Sequence[int]) -> list[int]:
            out = [ids[i] for i in dict.fromkeys(listed) if i in ids and ids[i] not in named]
            named.update(out)
            return out

        shipped = 0
        delivered: list[SnapshotEvent] = []
        if outcome.shipped:
            gone = rows(outcome.shipped)
            row = conn.execute(
                SHIP_RETRIES, {"ids": gone, "lease": lease, "window": float(dedup_window)}
            ).fetchone()
            shipped = int(row[0]) if row else 0
            delivered = [by_id[i] for i in gone]  # the fence holds each of them
        dead: list[tuple[int, str]] = []
        for i, error in outcome.dead:
            if i in ids and ids[i] not in named:
                named.add(ids[i])
                dead.append((ids[i], error[:2000]))
        if dead:
            conn.execute(
                BURY_RETRIES,
                {"ids": [d[0] for d in dead], "errors": [d[1] for d in dead], "lease": lease},
            )
        statuses: list[Any] = []
        if outcome.retry:
            cur = conn.execute(
                RETRY_RETRIES,
                {
                    "ids": rows(outcome.retry),
                    "lease": lease,
                    "error": outcome.retry_error[:2000],
                    "max_attempts": max_attempts,
                    "backoff_base": float(backoff_base),
                    "backoff_max": float(backoff_max),
                },
            )
            statuses = cur.fetchall()
        if outcome.defer and (outcome.defer_delay > 0 or outcome.defer_error):
            conn.execute(
                DEFER_RETRIES,
                {
                    "ids": rows(outcome.defer),
                    "lease": lease,
                    "delay": float(outcome.defer_delay),
                    "error": outcome.defer_error,
                },
            )
        conn.execute(RELEASE_RETRIES, {"lease": lease})
        died = [by_id[int(r[0])] for r in statuses if r[1] == "dead"]
        buried = [by_id[d[0]] for d in dead]
        ledger = count_in_ledger(conn, delivered, buried + died)
        return Finished(
            shipped=shipped,
            retried=len(statuses) - len(died),
            dead_by_retry=len(died),
            ledger=ledger,
        )

    def _let_go(self, handle: _Handle) -> None:
        """After a claim or an outcome failed with the database up (a timeout, a
        statement error): hand the lease back, so that its events are due again now
        rather than when the lease runs out. Best effort, under the lock timeout; it
        raises nothing and tells :attr:`health` nothing (the failure already did)."""
        conn = self._db.conn
        if (
            conn is None
            or conn.closed
            or conn.broken
            or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        ):
            return  # a lost connection (the lease runs out), or a failed transaction
        with contextlib.suppress(psycopg.Error), conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (str(LOCK_TIMEOUT_MS),))
            if handle.leased is not None:
                conn.execute(
                    snapshot_sql.RELEASE,
                    {"batch": handle.leased.batch_id, "lease": handle.leased.lease, "delay": 0.0},
                )
            else:
                conn.execute(RELEASE_RETRIES, {"lease": handle.retry_lease})

    def release(self, batch: Batch) -> bool:
        """See :meth:`worker.storage.base.DrainStorage.release`."""
        with self._db.lock:
            handle = batch.handle
            live = not batch.closed and self._batch is batch and isinstance(handle, _Handle)
            batch.closed = True
            if self._batch is batch:
                self._batch = None
            if not live:
                return False
            with self._guard() as engine:
                if handle.leased is not None:
                    return engine.release(handle.leased)
                cur = engine.conn.execute(RELEASE_RETRIES, {"lease": handle.retry_lease})
                return bool(cur.fetchall())

    # -- housekeeping -----------------------------------------------------------------

    def expire_dedup_keys(self, limit: int = 10_000) -> int:
        """See :meth:`worker.storage.base.Housekeeping.expire_dedup_keys`."""
        rows = self._rows("SELECT outbox_expire_dedup_keys(%(limit)s::integer)", {"limit": limit})
        return int(rows[0][0])

    def expire_ledger(self, retention_days: int) -> int:
        """See :meth:`worker.storage.base.Housekeeping.expire_ledger`."""
        rows = self._rows(EXPIRE_LEDGER, {"days": int(retention_days)})
        return int(rows[0][0])

    def maintain(self) -> None:
        """Tick (so batches wait for the next claim), truncate the event tables whose
        rows are all delivered, and delete the ticks no batch needs any more.

        Housekeeping must call it every :data:`MAINTAIN_EVERY_SECONDS` (with the
        backlog refresh), and never less often than once a minute. Enqueue moves on
        to the next event table every ``SLOT_SECONDS`` (600 s) and comes back to a
        table three slots (30 minutes) later: it must have been truncated by then,
        or it keeps its delivered rows (and its size) for another round. Each
        attempt gives up at once when any session is using the table (``LOCK ...
        NOWAIT``: the application's open transactions that wrote to it, a worker
        reading it), so it takes many attempts over those 30 minutes, not one.
        Frequent calls are cheap (measured: 0.2 ms with nothing to do, 14 ms with
        200,000 events pending) and safe from every worker at once: one ticks at a
        time, the others skip."""
        with self._guard() as engine:
            engine.tick(self.split_rows)
            engine.rotate()


def count_in_ledger(
    conn: psycopg.Connection[Any],
    delivered: Sequence[SnapshotEvent],
    dead: Sequence[SnapshotEvent],
) -> tuple[tuple[str, str, int], ...]:
    """Add a finish's delivered and dead events to the ledger (:data:`LEDGER_ADD`, on
    ``conn`` in the finish's transaction); what was added, per destination and
    outcome. (The storage benchmark's drain calls it as the finish does.)"""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for outcome, events in ((0, delivered), (1, dead)):
        for e in events:
            # The UTC day: the timestamp is ISO 8601 in UTC (YYYY-MM-DDT...).
            key = (e.timestamp[:10], e.event, e.destination)
            if (counts := groups.get(key)) is None:
                counts = groups[key] = [0, 0]
            counts[outcome] += 1
    if not groups:
        return ()
    conn.execute(
        LEDGER_ADD,
        {
            "day": [k[0] for k in groups],
            "event": [k[1] for k in groups],
            "destination": [k[2] for k in groups],
            "delivered": [c[0] for c in groups.values()],
            "dead": [c[1] for c in groups.values()],
        },
    )
    totals: dict[tuple[str, str], int] = {}
    for (_, _, destination), (n_delivered, n_dead) in groups.items():
        for what, n in (("delivered", n_delivered), ("dead", n_dead)):
            if n:
                totals[destination, what] = totals.get((destination, what), 0) + n
    return tuple((d, o, n) for (d, o), n in sorted(totals.items()))


def _within(events: list[SnapshotEvent], max_bytes: int) -> list[SnapshotEvent]:
    """The first events whose sizes add up to at most ``max_bytes`` (at least one)."""
    kept: list[SnapshotEvent] = []
    size = 0
    for e in events:
        size += e.size
        if kept and size > max_bytes:
            break
        kept.append(e)
    return kept


def _claimed(position: int, e: SnapshotEvent) -> ClaimedEvent:
    props, has_ip = own_keys(e.properties_json)
    ts = e.timestamp  # 2026-03-04T05:06:07.890123+00:00 -> 2026-03-04 05:06:07.890123+00
    return ClaimedEvent(
        id=position,
        uuid=e.uuid,
        event=e.event,
        distinct_id=e.distinct_id,
        properties_json=props,
        timestamp=ts[:10] + " " + ts[11:-6] + "+00",
        attempts=e.attempts,
        destination=e.destination,
        has_ip=has_ip,
        problem=e.problem,
    )


if TYPE_CHECKING:

    def _is_an_engine(store: SnapshotStorage) -> Storage:
        return store  # mypy checks that SnapshotStorage implements the protocol

    def _keeps_worker_states(store: SnapshotStorage) -> WorkerStates:
        return store
