"""Every SQL statement the worker runs, named, in one place to read and review.

Parameters are psycopg named placeholders. A batch's statements share one
transaction, open from its CLAIM until its outcome commits (its row locks are the
batch's lease); every other statement runs in a transaction of its own.
"""

from __future__ import annotations

# Lock up to :limit due rows (skipping rows another worker holds this instant) and
# return the longest prefix whose stored size fits in :max_bytes (always at least one
# row; the drainer splits requests by the exact JSON size). Runs as the first statement
# of the batch's transaction, which stays open while the batch is on the wire: the row
# locks ARE the lease. Nothing is written to claim a row, so a claim costs a fraction
# of an UPDATE (no new row version, no index entries); the transaction ends with the
# outcome (ACK/RETRY/DEFER/BURY, then COMMIT), and a worker that dies or hangs loses
# its locks with its session (idle_in_transaction_session_timeout is the lease length).
# Rows locked but past the byte budget stay locked, unsent and untouched, until the
# transaction ends.
CLAIM = """
WITH locked AS (
    SELECT id, next_attempt_at, pg_column_size(properties) + 200 AS size
    FROM outbox_events
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), sized AS (
    SELECT id, sum(size) OVER (ORDER BY next_attempt_at, id) AS running,
           row_number() OVER (ORDER BY next_attempt_at, id) AS n
    FROM locked
)
SELECT e.id, e.uuid, e.event, e.distinct_id, e.properties::text, e."timestamp", e.attempts,
       e.destination
FROM sized JOIN outbox_events AS e USING (id)
WHERE sized.running <= %(max_bytes)s OR sized.n = 1
"""

#: How long (ms) a worker statement waits for a lock that another session holds on
#: an outbox table (a migration, LOCK TABLE, VACUUM FULL) before it gives up with
#: "canceling statement due to lock timeout"; the worker reports it and tries again.
LOCK_TIMEOUT_MS = 2000

# Set at the start of a batch's transaction, for that transaction only:
# - the lease: the server ends the session (and so the transaction and its row locks)
#   when it sits idle this long, as a hung or partitioned worker's does;
# - the plan: CLAIM must walk the due index in order and stop after :limit rows. If the
#   table was analyzed while nearly empty and a backlog built up since (an outage),
#   the planner would otherwise pick a bitmap scan and sort the whole backlog for every
#   batch (measured: 75 ms instead of 6 ms per claim at 100,000 rows, growing with the
#   backlog). The outcome's statements go by primary key either way;
# - lock_timeout: a claim (or an outcome) waits at most LOCK_TIMEOUT_MS for a table
#   lock another session holds, instead of waiting silently for as long as it is held.
BATCH_SETTINGS = f"""
SELECT set_config('idle_in_transaction_session_timeout', %(lease_ms)s, true),
       set_config('lock_timeout', '{LOCK_TIMEOUT_MS}', true),
       set_config('enable_seqscan', 'off', true),
       set_config('enable_bitmapscan', 'off', true)
"""

# Delivered: delete the rows (locked by this transaction) and start the dedup window
# of their keys.
ACK = """
WITH done AS (
    DELETE FROM outbox_events
    WHERE id = ANY(%(ids)s)
    RETURNING dedup_key
), keys AS (
    UPDATE outbox_dedup_keys AS k
    SET expires_at = now() + %(window)s * interval '1 second'
    FROM done
    WHERE k.dedup_key = done.dedup_key
    RETURNING 1
)
SELECT count(*) FROM done
"""

# A failed attempt: count it, back off exponentially with jitter (each row by its own
# attempt count), or bury the row once it has used its attempts.
RETRY = """
UPDATE outbox_events
SET attempts = attempts + 1,
    status = CASE WHEN attempts + 1 >= %(max_attempts)s THEN 'dead' ELSE 'pending' END,
    next_attempt_at = clock_timestamp() + least(
        %(backoff_max)s, %(backoff_base)s * power(2, least(attempts, 40))
    ) * (0.5 + random() / 2) * interval '1 second',
    last_error = %(error)s
WHERE id = ANY(%(ids)s)
RETURNING id, status
"""

# Not the events' fault (rate limited, unauthorised): try again after :delay seconds
# without counting an attempt. (Events merely handed back unsent need no statement:
# they are still due when the transaction releases them.)
DEFER = """
UPDATE outbox_events
SET next_attempt_at = clock_timestamp() + %(delay)s * interval '1 second',
    last_error = coalesce(%(error)s, last_error)
WHERE id = ANY(%(ids)s)
"""

# The sink refused these events themselves: no retry will help.
BURY = """
UPDATE outbox_events
SET status = 'dead', attempts = attempts + 1, last_error = %(error)s
WHERE id = ANY(%(ids)s)
"""

EXPIRE_DEDUP_KEYS = """
DELETE FROM outbox_dedup_keys
WHERE dedup_key IN (
    SELECT dedup_key FROM outbox_dedup_keys WHERE expires_at < now() LIMIT %(limit)s
)
"""

BACKLOG = """
SELECT
    count(*) FILTER (WHERE status = 'pending') AS pending,
    count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()) AS due,
    count(*) FILTER (WHERE status = 'pending' AND attempts > 0) AS retrying,
    count(*) FILTER (WHERE status = 'dead') AS dead,
    coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0)
        AS oldest_pending_age_seconds
FROM outbox_events
"""

TOP_EVENTS = """
SELECT event, count(*) AS n
FROM outbox_events
WHERE status = %(status)s
GROUP BY event
ORDER BY n DESC, event
LIMIT %(limit)s
"""

TOP_ERRORS = """
SELECT status, left(coalesce(last_error, ''), 200) AS error, count(*) AS n,
       min(created_at) AS since
FROM outbox_events
WHERE last_error IS NOT NULL
GROUP BY status, left(coalesce(last_error, ''), 200)
ORDER BY n DESC
LIMIT %(limit)s
"""

LIST_DEAD = """
SELECT id, uuid, event, distinct_id, attempts, last_error, created_at
FROM outbox_events
WHERE status = 'dead'
  AND (%(event)s::text IS NULL OR event = %(event)s::text)
ORDER BY created_at, id
LIMIT %(limit)s
"""

# Give dead rows (all, some ids, or one event name) a fresh set of attempts.
REQUEUE_DEAD = """
UPDATE outbox_events
SET status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
WHERE status = 'dead'
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(event)s::text IS NULL OR event = %(event)s::text)
"""

# Delete dead rows created before the cutoff, and free their dedup keys.
PURGE_DEAD = """
WITH gone AS (
    DELETE FROM outbox_events
    WHERE status = 'dead' AND created_at < now() - %(older_than)s * interval '1 second'
    RETURNING dedup_key
), keys AS (
    DELETE FROM outbox_dedup_keys AS k USING gone WHERE k.dedup_key = gone.dedup_key
    RETURNING 1
)
SELECT count(*) FROM gone
"""

# The backlog for metrics, refreshed every few seconds: every count is capped, so its
# cost does not grow with the backlog (past the cap, pending is the planner's estimate
# of the due index's size). The oldest pending row is the first in id order, found by
# the primary key (only dead rows older than it are stepped over).
BACKLOG_CAPPED = """
SELECT
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events
        WHERE status = 'pending' LIMIT %(cap)s) s) AS pending,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events
        WHERE status = 'pending' AND next_attempt_at <= now() LIMIT %(cap)s) s) AS due,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events
        WHERE status = 'pending' AND attempts > 0 LIMIT %(cap)s) s) AS retrying,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events
        WHERE status = 'dead' LIMIT %(cap)s) s) AS dead,
    coalesce((SELECT extract(epoch FROM now() - created_at) FROM outbox_events
        WHERE status = 'pending' ORDER BY id LIMIT 1), 0) AS oldest_pending_age_seconds,
    (SELECT greatest(reltuples, 0)::bigint FROM pg_class
        WHERE oid = to_regclass('outbox_events_due_idx')) AS pending_estimate
"""

# Batches in flight right now, across all workers on this database: each is a worker's
# batch connection inside its claim's transaction (see CLAIM). Sessions of other roles
# show only to members of pg_read_all_stats.
IN_FLIGHT = """
SELECT substr(application_name, length(%(prefix)s) + 1) AS worker,
       extract(epoch FROM now() - xact_start) AS held_seconds,
       state
FROM pg_stat_activity
WHERE datname = current_database()
  AND application_name LIKE %(prefix)s || '%%'
  AND xact_start IS NOT NULL
ORDER BY xact_start
"""

# After a lock timeout: the other sessions that hold, or wait for, a lock of one of
# :modes on an outbox table, as pid, table, mode, granted, application_name, seconds
# (its transaction's age). No query text: it may hold data or secrets.
LOCK_HOLDERS = """
SELECT l.pid, l.relation::regclass::text, l.mode, l.granted,
       coalesce(a.application_name, ''),
       extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))
FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a USING (pid)
WHERE l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation IN (to_regclass('outbox_events'), to_regclass('outbox_dedup_keys'))
  AND l.mode = ANY(%(modes)s)
  AND l.pid <> pg_backend_pid()
ORDER BY l.granted DESC, 6 DESC NULLS LAST
LIMIT 5
"""

#: The lock modes that block the worker's claims and outcomes (SHARE and above).
BLOCKING_MODES = ["ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"]
#: Every table lock mode (what a migration's ACCESS EXCLUSIVE lock waits for).
ALL_MODES = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    *BLOCKING_MODES,
]
