"""The snapshot engine's SQL statements (the tables and functions are migration 0006's).

Every statement is its own short transaction on an autocommit connection: nothing
is held open while a batch is on the wire. A batch is leased by writing its row
(``lease``, a fresh uuid per claim, and ``leased_until``); every later write to it
names that lease, so a worker whose lease ran out (and whose batch another worker
claimed since) writes nothing.
"""

from __future__ import annotations

import functools

#: How many event tables migration 0006 creates.
EVENT_TABLES = 4

#: The timestamp as the worker sends it: ISO 8601 in UTC with microseconds.
_ISO = """'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'"""

# Set for the engine's session. The event tables are never analyzed (autovacuum is
# off for them and they are truncated, not vacuumed), so the planner knows nothing of
# how selective a txid range is and would scan a whole table, in parallel, for every
# chunk (measured: 27 ms for a chunk of 200 out of 50,000 rows); with seq scans off it
# takes the BRIN index. And with its inflated costs a one-row statement would pay for
# JIT compilation (milliseconds) each time. TID scans stay on (with seq scans off, a
# chunk's rows are fetched by TID whatever the planner thinks of the table's size: a seq
# scan testing every row against a chunk's thousand positions cost 2 ms per chunk); the
# scan for a batch's positions writes its "ctid > progress" as tidgt(), which is no TID
# range condition, so that it is not planned as a scan from there to the table's end.
# DateStyle ISO: a chunk's timestamps are read as PostgreSQL's own text of a timestamp
# in UTC (``YYYY-MM-DD HH:MM:SS.ffffff``), which is that style's (measured: to_char cost
# 0.3 us more per event read).
SESSION = (
    "SET jit = off; SET enable_seqscan = off; SET enable_tidscan = on;"
    " SET max_parallel_workers_per_gather = 0; SET DateStyle = ISO"
)

TICK = "SELECT outbox_snapshot_tick(%(split_rows)s)"

ROTATE = "SELECT outbox_snapshot_rotate(%(current)s)"

#: :data:`SESSION`'s settings as name -> value (for a caller that sets them per
#: transaction, behind a transaction pooler).
SETTINGS = {
    name.strip(): value.strip()
    for name, value in (
        part.strip().removeprefix("SET ").split("=", 1) for part in SESSION.split(";")
    )
}

# Lease the oldest batch nobody holds (or whose lease ran out), with what reading it
# needs: its interval's two snapshots, its txid range, where the next chunk starts and
# how many events the tick expected in it (NULL for a batch a tick before 0010 made).
# The lease (a fresh UUIDv7 per claim) says when it was made, for `status`.
CLAIM = """
UPDATE outbox_batches AS b
SET leased_by = %(worker)s, lease = %(lease)s,
    leased_until = now() + %(lease_seconds)s * interval '1 second'
FROM (
    SELECT batch_id FROM outbox_batches
    WHERE leased_until IS NULL OR leased_until < now()
    ORDER BY batch_id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
) AS c, outbox_ticks AS t1, outbox_ticks AS t2
WHERE b.batch_id = c.batch_id AND t1.tick_id = b.from_tick AND t2.tick_id = b.to_tick
RETURNING b.batch_id, b.lease, b.txid_lo, b.txid_hi, b.txid_extra, t1.snapshot, t2.snapshot,
    b.progress_table, b.progress_ctid, b.sent, b.rows_estimate
"""

# Whether any batch can be claimed now (an idle worker asks this before ticking).
ANY_CLAIMABLE = """
SELECT EXISTS (
    SELECT 1 FROM outbox_batches WHERE leased_until IS NULL OR leased_until < now()
)
"""


# The columns of an event as the worker reads them, computed from the raw row. The
# timestamp is the text of the UTC time in the session's DateStyle, ISO (see SESSION):
# ``YYYY-MM-DD HH:MM:SS`` and up to six digits of fraction (trailing zeros left out);
# the event tables' CHECK keeps it between 1970 and 2200, so it has no other form.
_COLUMNS = """e.ctid, e.uuid, e.event, e.distinct_id, e.properties::text,
    (e."timestamp" AT TIME ZONE 'UTC')::text, e.destination, e.dedup_key,
    e."timestamp" > now() + interval '23 hours'"""

#: The most positions one scan of a batch returns (a bigger batch is scanned again
#: from where the last scan ended, once its positions are used up).
POSITIONS_CAP = 10_000


def _member(snap1: bool) -> str:
    """Whether row ``e`` belongs to the batch's txid range: its transaction is below
    the later snapshot's xmax and finished in it (and, with ``snap1``, not finished in
    the earlier one; the tick's batches start at the earlier snapshot's xmax, so no
    transaction of the range can be)."""
    test = (
        "e.txid >= %(lo)s AND e.txid < %(hi)s"
        " AND txid_visible_in_snapshot(e.txid, %(snap2)s::txid_snapshot)"
    )
    if snap1:
        test += " AND NOT txid_visible_in_snapshot(e.txid, %(snap1)s::txid_snapshot)"
    return test


def _listed() -> str:
    """Whether row ``e`` is of one of the older transactions the batch lists (which
    the earlier snapshot saw in progress and the later one sees finished)."""
    return "e.txid >= %(xlo)s AND e.txid <= %(xhi)s AND e.txid = ANY(%(extra)s::bigint[])"


@functools.cache
def positions_statement(progress_table: int, *, extra: bool, snap1: bool) -> str:
    """Where the events of a batch are after its progress (progress_table,
    progress_ctid): ``(table, ctid)`` in that order, at most :cap. The events of the
    batch are the rows whose transaction the later tick's snapshot sees as finished and
    the earlier one's does not: those of its txid range, and those of the listed older
    transactions (``extra``: the batch lists some); rows of rolled-back transactions
    are not visible at all. Only the tables from ``progress_table`` on are read, through
    their BRIN index; nothing but the positions is sorted or sent.
    """
    parts: list[str] = []
    for t in range(progress_table, EVENT_TABLES):
        after = " AND tidgt(e.ctid, %(pc)s::tid)" if t == progress_table else ""
        tests = [_member(snap1)] + ([_listed()] if extra else [])
        parts.extend(
            f"SELECT {t} AS t, e.ctid AS c FROM outbox_events_{t} AS e WHERE {test}{after}"
            for test in tests
        )
    union = "\nUNION ALL\n".join(f"({part})" for part in parts)
    return f"{union}\nORDER BY t, c LIMIT %(cap)s"


@functools.cache
def chunk_statement(progress_table: int, *, extra: bool, snap1: bool) -> str:
    """The events of a batch after its progress, whole, in one scan of each table from
    ``progress_table`` on (through its BRIN index), at most :n of them and in no set
    order: for a batch expected to fit in one chunk, which is then all of it when fewer
    than :n come back (the caller puts them in order). Nothing is sorted here."""
    parts: list[str] = []
    for t in range(progress_table, EVENT_TABLES):
        after = " AND tidgt(e.ctid, %(pc)s::tid)" if t == progress_table else ""
        tests = [_member(snap1)] + ([_listed()] if extra else [])
        parts.extend(
            f"SELECT {t} AS t, {_COLUMNS} FROM outbox_events_{t} AS e WHERE {test}{after}"
            for test in tests
        )
    union = "\nUNION ALL\n".join(f"({part})" for part in parts)
    return f"{union}\nLIMIT %(n)s"


@functools.cache
def fetch_statement(tables: tuple[int, ...], *, extra: bool, snap1: bool) -> str:
    """The events at the given positions (``%(c<table>)s``: the ctids in each of
    ``tables``), by TID, that still belong to the batch (a table truncated since holds
    other rows at those positions, which the test leaves out)."""
    member = f"({_member(snap1)})" + (f" OR ({_listed()})" if extra else "")
    # OFFSET 0 keeps the test out of the scan, so that it is a TID scan of the
    # positions, not a BRIN scan of the batch's pages with the positions as a filter.
    parts = [
        f"SELECT {t} AS t, {_COLUMNS} FROM ("
        f"SELECT ctid, * FROM outbox_events_{t} WHERE ctid = ANY(%(c{t})s::tid[]) OFFSET 0"
        f") AS e WHERE {member}"
        for t in tables
    ]
    return "\nUNION ALL\n".join(f"({part})" for part in parts)


# A chunk was sent (or failed): in one statement, fenced on the lease, move the
# batch's progress past it (or delete the batch, when it was the last chunk), file
# the failed events into outbox_retry, and start the dedup window of the delivered
# events' keys. Returns whether the lease still held (nothing is written otherwise).
ADVANCE = """
WITH moved AS (
    UPDATE outbox_batches
    SET progress_table = %(pt)s, progress_ctid = %(pc)s, sent = sent + %(count)s,
        leased_until = now() + %(lease_seconds)s * interval '1 second'
    WHERE batch_id = %(batch)s AND lease = %(lease)s AND NOT %(last)s
    RETURNING 1
), gone AS (
    DELETE FROM outbox_batches
    WHERE batch_id = %(batch)s AND lease = %(lease)s AND %(last)s
    RETURNING 1
), held AS (
    SELECT 1 FROM moved UNION ALL SELECT 1 FROM gone
), failed AS (
    INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, destination,
        dedup_key, properties, status, attempts, next_attempt_at, last_error)
    SELECT f.uuid, f.ts, f.event, f.distinct_id, f.destination, f.dedup_key,
        f.properties::json, CASE WHEN f.dead THEN 'dead' ELSE 'pending' END, 1,
        clock_timestamp() + f.delay * interval '1 second', f.error
    FROM unnest(%(f_uuid)s::uuid[], %(f_ts)s::timestamptz[], %(f_event)s::text[],
                %(f_distinct_id)s::text[], %(f_destination)s::text[],
                %(f_dedup_key)s::text[], %(f_properties)s::text[], %(f_dead)s::boolean[],
                %(f_delay)s::double precision[], %(f_error)s::text[])
        AS f(uuid, ts, event, distinct_id, destination, dedup_key, properties, dead,
             delay, error)
    WHERE EXISTS (SELECT 1 FROM held)
    RETURNING 1
), keys AS (
    SELECT outbox_start_dedup_window(%(keys)s::text[], %(window)s::double precision) AS n
    WHERE EXISTS (SELECT 1 FROM held)
)
SELECT EXISTS (SELECT 1 FROM held), (SELECT count(*) FROM failed),
    (SELECT coalesce(sum(n), 0) FROM keys)
"""

# ADVANCE for a chunk with no failed event and no dedup key to start: the batch's row
# alone (moved past the chunk, or deleted after the last one), fenced on the lease.
# (ADVANCE's unused parts cost 0.25 us per event of a chunk of 1,000.)
ADVANCE_PAST = """
UPDATE outbox_batches
SET progress_table = %(pt)s, progress_ctid = %(pc)s, sent = sent + %(count)s,
    leased_until = now() + %(lease_seconds)s * interval '1 second'
WHERE batch_id = %(batch)s AND lease = %(lease)s
RETURNING true
"""

ADVANCE_DONE = """
DELETE FROM outbox_batches WHERE batch_id = %(batch)s AND lease = %(lease)s
RETURNING true
"""

# Hand a batch back unfinished (the worker stops, or PostHog asked it to wait): it can
# be claimed again after :delay seconds, from its progress.
RELEASE = """
UPDATE outbox_batches
SET leased_by = NULL, lease = NULL,
    leased_until = now() + %(delay)s * interval '1 second'
WHERE batch_id = %(batch)s AND lease = %(lease)s
RETURNING 1
"""

# Due retries, leased per row until now + :lease_seconds (their next_attempt_at moves
# there, so a worker that dies leaves them due again then).
CLAIM_RETRIES = f"""
UPDATE outbox_retry AS r
SET lease = %(lease)s, next_attempt_at = now() + %(lease_seconds)s * interval '1 second'
FROM (
    SELECT id FROM outbox_retry
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) AS c
WHERE r.id = c.id
RETURNING r.id, r.uuid, r.event, r.distinct_id, r.properties::text,
    to_char(r."timestamp" AT TIME ZONE 'UTC', {_ISO}), r.destination, r.dedup_key,
    r."timestamp" > now() + interval '23 hours', r.attempts
"""

# The outcome of leased retries, fenced on the lease: the delivered are deleted (and
# their keys' dedup window starts), the failed count an attempt and back off (or die,
# on their last attempt or when :dead says so).
FINISH_RETRIES = """
WITH done AS (
    DELETE FROM outbox_retry
    WHERE id = ANY(%(shipped)s::bigint[]) AND lease = %(lease)s
    RETURNING dedup_key
), keys AS (
    SELECT outbox_start_dedup_window(array_agg(dedup_key), %(window)s::double precision) AS n
    FROM done
), failed AS (
    UPDATE outbox_retry AS r
    SET attempts = r.attempts + 1,
        status = CASE WHEN f.dead OR r.attempts + 1 >= %(max_attempts)s
                      THEN 'dead' ELSE 'pending' END,
        next_attempt_at = clock_timestamp() + least(
            %(backoff_max)s, %(backoff_base)s * power(2, least(r.attempts, 40))
        ) * (0.5 + random() / 2) * interval '1 second',
        last_error = f.error, lease = NULL
    FROM unnest(%(f_id)s::bigint[], %(f_error)s::text[], %(f_dead)s::boolean[])
        AS f(id, error, dead)
    WHERE r.id = f.id AND r.lease = %(lease)s
    RETURNING r.status
)
SELECT (SELECT count(*) FROM done),
       (SELECT count(*) FROM failed WHERE status = 'pending'),
       (SELECT count(*) FROM failed WHERE status = 'dead'),
       (SELECT n FROM keys)
"""
