"""Every SQL statement the worker runs, named, in one place to read and review.

Parameters are psycopg named placeholders. A batch's statements share one
transaction, open from its CLAIM until its outcome commits (its row locks are the
batch's lease); every other statement runs in a transaction of its own. The deletes
are functions of migration 0004 (``outbox_ack``, ``outbox_purge_dead``,
``outbox_expire_dedup_keys``), so the worker's role needs no ``DELETE`` right.
"""

from __future__ import annotations

from outbox import _locks, schema
from outbox.validation import MAX_NAME_LENGTH

# The timestamps PostHog takes as they are, the bounds enqueue() checks (outbox/schema.py
# says where they come from): from TIMESTAMP_MIN to TIMESTAMP_AHEAD_HOURS past the
# database's now(). Migration 0004's CHECK holds the fixed part.
TIMESTAMP_MIN = schema.TIMESTAMP_MIN.isoformat().replace("+00:00", "Z")
TIMESTAMP_AHEAD_HOURS = round(schema.TIMESTAMP_MAX_AHEAD.total_seconds() / 3600)

# The ASCII whitespace Python's str.strip() strips too (see migration 0004).
_SPACE = r"E' \t\n\r\f\x0b'"
_ISO_UTC = """'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'"""  # for what commands show


def utc_text(column: str) -> str:
    """A timestamptz column as ISO 8601 text in UTC, whatever the session's TimeZone
    (and 'infinity', or the year's era, as PostgreSQL writes it when ISO cannot)."""
    return (
        f"CASE WHEN {column} >= '0001-01-01 00:00:00+00' AND isfinite({column})"
        f" THEN to_char({column} AT TIME ZONE 'UTC', {_ISO_UTC})"
        f" ELSE ({column} AT TIME ZONE 'UTC')::text END"
    )


def _name_problem(column: str) -> str:
    # Cheap tests first: a name of at most 200 bytes has at most 200 characters, and
    # one whose first byte is above ' ' is not blank (a C-collation comparison is a
    # memcmp); only a name that fails them pays for length() or btrim().
    return (
        f"WHEN octet_length(e.{column}) > {MAX_NAME_LENGTH}"
        f" AND length(e.{column}) > {MAX_NAME_LENGTH}"
        f" THEN '{column}: is ' || length(e.{column})"
        f" || ' characters long, over the {MAX_NAME_LENGTH} limit'"
        f""" WHEN e.{column} COLLATE "C" < '!' AND btrim(e.{column}, {_SPACE}) = ''"""
        f" THEN '{column}: is empty or only whitespace'"
    )


# Why a row cannot be sent as it is, or NULL: the column and the problem. Checked per
# row in the claim, so nothing PostHog cannot use is sent and nothing in a row can
# make the claim itself fail. Migration 0004's constraints refuse all of it in a
# pending row but the timestamp's distance ahead (a CHECK cannot hold now()); a row
# written before 0004 (or with the constraints dropped) may still hold any of it.
# (An infinite timestamp is out of range both ways; the bound ahead is computed once
# per claim, as an InitPlan.)
_PROBLEM = f"""CASE
        WHEN jsonb_typeof(e.properties) <> 'object'
            THEN 'properties: is a JSON ' || jsonb_typeof(e.properties) || ', not an object'
        WHEN e."timestamp" < '{TIMESTAMP_MIN}'
             OR e."timestamp" > (SELECT now() + interval '{TIMESTAMP_AHEAD_HOURS} hours')
            THEN 'timestamp: ' || CASE
                WHEN NOT isfinite(e."timestamp")
                    THEN e."timestamp"::text || ' is not a finite time'
                WHEN e."timestamp" < '{TIMESTAMP_MIN}'
                    THEN (e."timestamp" AT TIME ZONE 'UTC')::text
                         || ' UTC is before {TIMESTAMP_MIN}'
                ELSE (e."timestamp" AT TIME ZONE 'UTC')::text || ' UTC is more than '
                     || '{TIMESTAMP_AHEAD_HOURS} hours ahead of the database''s clock'
            END
        {_name_problem("event")}
        {_name_problem("distinct_id")}
    END"""

# What migration 0004's constraints require of a pending row (a dead row is exempt).
STORABLE = f"""(jsonb_typeof(properties) = 'object'
    AND "timestamp" >= '1970-01-01 00:00:00+00' AND "timestamp" < '2200-01-01 00:00:00+00'
    AND length(event) <= {MAX_NAME_LENGTH} AND btrim(event, {_SPACE}) <> ''
    AND length(distinct_id) <= {MAX_NAME_LENGTH} AND btrim(distinct_id, {_SPACE}) <> '')"""

# What an event table's constraints (migration 0006) require, over a row of
# outbox_retry (whose properties are json): a dead row that fails it (one migration
# 0007 filed there, or written by hand) could never be sent, so `retry` leaves it dead.
RETRY_STORABLE = f"""(json_typeof(properties) = 'object'
    AND "timestamp" >= '1970-01-01 00:00:00+00' AND "timestamp" < '2200-01-01 00:00:00+00'
    AND length(event) BETWEEN 1 AND {MAX_NAME_LENGTH} AND btrim(event, {_SPACE}) <> ''
    AND length(distinct_id) BETWEEN 1 AND {MAX_NAME_LENGTH}
    AND btrim(distinct_id, {_SPACE}) <> ''
    AND (destination IS NULL OR destination = 'metrics'))"""

# The keys the worker sets itself, when the row holds one of them (or "$ip", which
# decides whether it sets $geoip_disable): ARRAY['ip' if the row has a top-level "$ip"
# string (PostHog locates the user by it, so GeoIP stays on) else '', the properties
# without the worker's keys]. NULL for nearly every row: one ?| test, nothing else.
_OWN_KEYS = """CASE
        WHEN NOT e.properties ?| '{$ip,$ignore_sent_at,$geoip_disable}'::text[] THEN NULL
        WHEN jsonb_typeof(e.properties) <> 'object' THEN NULL
        WHEN jsonb_typeof(e.properties -> '$ip') = 'string'
            THEN ARRAY['ip', (e.properties - '$ignore_sent_at')::text]
        ELSE ARRAY['', (e.properties - '{$ignore_sent_at,$geoip_disable}'::text[])::text]
    END"""

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
#
# Every column comes back as something Python decodes whatever the row holds: text,
# integers, a uuid, a text array. The timestamp is text in UTC (BATCH_SETTINGS sets
# TimeZone and DateStyle for the batch's transaction), so a value that would be
# after year 9999 in the database's own TimeZone reads like any other.
CLAIM = f"""
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
SELECT e.id, e.uuid, e.event, e.distinct_id, e.properties::text, e."timestamp"::text,
    e.attempts, e.destination,
    {_OWN_KEYS},
    {_PROBLEM}
FROM sized JOIN outbox_events AS e USING (id)
WHERE sized.running <= %(max_bytes)s OR sized.n = 1
"""

# Whether anything is due, asked before CLAIM by a store whose last claim found
# nothing (an idle worker's poll). It plans in a fraction of CLAIM's time, which
# matters behind a transaction pooler, where no statement is prepared and every poll
# is planned afresh (docs/operations.md, "Behind a connection pooler").
ANY_DUE = """
SELECT EXISTS (
    SELECT 1 FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= now()
)
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
# - how a timestamp reads as text: in UTC, ISO style ('2026-03-04 05:06:07.89+00'),
#   whatever the database's or the role's TimeZone and DateStyle;
# - lock_timeout: a claim (or an outcome) waits at most LOCK_TIMEOUT_MS for a table
#   lock another session holds, instead of waiting silently for as long as it is held.
BATCH_SETTINGS = f"""
SELECT set_config('idle_in_transaction_session_timeout', %(lease_ms)s, true),
       set_config('lock_timeout', '{LOCK_TIMEOUT_MS}', true),
       set_config('enable_seqscan', 'off', true),
       set_config('enable_bitmapscan', 'off', true),
       set_config('TimeZone', 'UTC', true),
       set_config('DateStyle', 'ISO', true)
"""

# Delivered: delete the rows (locked by this transaction) and start the dedup window
# of their keys (migration 0004's outbox_ack).
ACK = "SELECT outbox_ack(%(ids)s::bigint[], %(window)s::double precision)"

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
# they are still due when the transaction releases them.) Every row gets the same
# due time (the uncorrelated subquery runs once), so a held batch comes back whole
# rather than as the part a poll at the boundary happens to see.
DEFER = """
UPDATE outbox_events
SET next_attempt_at = (SELECT clock_timestamp()) + %(delay)s * interval '1 second',
    last_error = coalesce(%(error)s, last_error)
WHERE id = ANY(%(ids)s)
"""

# No retry will help (the sink refused these events, or they cannot be sent as they
# are stored): each row dies with its own error.
BURY = """
UPDATE outbox_events AS e
SET status = 'dead', attempts = e.attempts + 1, last_error = d.error
FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS d(id, error)
WHERE e.id = d.id
"""

EXPIRE_DEDUP_KEYS = "SELECT outbox_expire_dedup_keys(%(limit)s::integer)"

# Ages leave out a created_at that is not a finite time (only a row written by hand
# has one): PostgreSQL cannot subtract it.
BACKLOG = """
SELECT
    count(*) FILTER (WHERE status = 'pending') AS pending,
    count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()) AS due,
    count(*) FILTER (WHERE status = 'pending' AND attempts > 0) AS retrying,
    count(*) FILTER (WHERE status = 'dead') AS dead,
    greatest(coalesce(extract(epoch FROM now() - min(created_at)
        FILTER (WHERE status = 'pending' AND isfinite(created_at))), 0), 0)
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

TOP_ERRORS = f"""
SELECT status, error, n, {utc_text("since")}
FROM (
    SELECT status, left(coalesce(last_error, ''), 200) AS error, count(*) AS n,
           min(created_at) AS since
    FROM outbox_events
    WHERE last_error IS NOT NULL
    GROUP BY status, left(coalesce(last_error, ''), 200)
) AS grouped
ORDER BY n DESC
LIMIT %(limit)s
"""

LIST_DEAD = f"""
SELECT id, uuid, event, distinct_id, attempts, last_error, {utc_text("created_at")}
FROM outbox_events
WHERE status = 'dead'
  AND (%(event)s::text IS NULL OR event = %(event)s::text)
ORDER BY created_at, id
LIMIT %(limit)s
"""

# Give dead rows (all, some ids, or one event name) a fresh set of attempts, but for
# those that migration 0004's constraints refuse in a pending row (they could never
# be sent: they stay dead, and are counted).
REQUEUE_DEAD = f"""
WITH chosen AS (
    SELECT id, {STORABLE} AS storable
    FROM outbox_events
    WHERE status = 'dead'
      AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
      AND (%(event)s::text IS NULL OR event = %(event)s::text)
    FOR UPDATE
), requeued AS (
    UPDATE outbox_events AS e
    SET status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
    FROM chosen
    WHERE e.id = chosen.id AND chosen.storable
    RETURNING 1
)
SELECT (SELECT count(*) FROM requeued), count(*) FILTER (WHERE NOT storable)
FROM chosen
"""

# Delete dead rows created before the cutoff (or with a created_at in the future,
# which says nothing about their age), and free their dedup keys.
PURGE_DEAD = "SELECT outbox_purge_dead(%(older_than)s::double precision)"

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
    coalesce((SELECT greatest(extract(epoch FROM now() - created_at), 0) FROM outbox_events
        WHERE status = 'pending' AND isfinite(created_at) ORDER BY id LIMIT 1), 0)
        AS oldest_pending_age_seconds,
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

# After a lock timeout: who holds the lock (defined beside the migration runner, which
# names them too when it gives up).
LOCK_HOLDERS = _locks.LOCK_HOLDERS
BLOCKING_MODES = _locks.BLOCKING_MODES
ALL_MODES = _locks.ALL_MODES

# The status page's failed events (dead, or pending after a failed attempt), grouped by
# status and error text. They are all rows of outbox_retry (an event still in an event
# table has never failed): the count, the oldest and newest created_at, the first
# %(ids)s row ids (in id order) for a `retry --id` command (the ids `dead` lists), how
# many event names the group has (and the first), how many dead rows carry that name in
# all (what `retry --event` would requeue), and the newest row as the group's example.
# A deferred row (rate limited, unauthorised: an error, no attempt) is not a failure.
ERROR_GROUPS = f"""
WITH grouped AS (
    SELECT status, left(last_error, 200) AS error, count(*) AS n,
           min(created_at) AS first_at, max(created_at) AS last_at,
           (array_agg(id ORDER BY id))[1:%(ids)s] AS ids, max(id) AS example_id,
           count(DISTINCT event) AS names, min(event) AS name
    FROM outbox_retry
    WHERE last_error IS NOT NULL AND (status = 'dead' OR attempts > 0)
    GROUP BY status, left(last_error, 200)
    ORDER BY n DESC, status, error
    LIMIT %(limit)s
)
SELECT g.status, g.error, g.n, {utc_text("g.first_at")}, {utc_text("g.last_at")},
       CASE WHEN isfinite(g.last_at)
           THEN greatest(extract(epoch FROM now() - g.last_at), 0) ELSE 0 END,
       g.ids, g.names, g.name,
       (SELECT count(*) FROM outbox_retry d WHERE d.status = 'dead' AND d.event = g.name),
       e.id, e.event, e.distinct_id, e.properties, e.attempts
FROM grouped AS g
JOIN outbox_retry AS e ON e.id = g.example_id
ORDER BY g.n DESC, g.status, g.error
"""
