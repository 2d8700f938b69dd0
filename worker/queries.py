"""Every SQL statement the worker runs, named, in one place to read and review.

Parameters are psycopg named placeholders. Each statement runs in its own short
transaction (the worker's connection is in autocommit mode): no transaction is
ever open while a batch is on the wire to the sink.
"""

from __future__ import annotations

# Lock up to :limit due rows that no live lease holds (skipping rows another worker has
# locked this instant), keep the longest prefix whose stored size fits in :max_bytes
# (always at least one row; the drainer splits requests by the exact JSON size), and
# lease it with a new token. next_attempt_at moves to the lease's end, so the due index
# no longer holds leased rows at its head: other workers' claims never step over them
# (measured: two workers scale 1.9x this way, 1.3x when leased rows stay in place), and
# a crashed worker's rows come due again exactly when its lease expires. Rows locked
# but not kept are released when the statement ends.
CLAIM = """
WITH locked AS (
    SELECT id, next_attempt_at, pg_column_size(properties) + 200 AS size
    FROM outbox_events
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (lease_token IS NULL OR leased_until <= now())
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), sized AS (
    SELECT id, sum(size) OVER (ORDER BY next_attempt_at, id) AS running,
           row_number() OVER (ORDER BY next_attempt_at, id) AS n
    FROM locked
), chosen AS (
    SELECT id FROM sized WHERE running <= %(max_bytes)s OR n = 1
)
UPDATE outbox_events AS e
SET lease_token = %(token)s,
    leased_until = now() + %(lease)s * interval '1 second',
    leased_by = %(worker)s,
    next_attempt_at = now() + %(lease)s * interval '1 second'
FROM chosen
WHERE e.id = chosen.id
RETURNING e.id, e.uuid, e.event, e.distinct_id, e.properties::text, e."timestamp", e.attempts,
          e.destination
"""

# Delivered: delete the rows this lease still holds (a worker whose lease was taken
# over deletes nothing), and start the dedup window of their keys.
ACK = """
WITH done AS (
    DELETE FROM outbox_events
    WHERE id = ANY(%(ids)s) AND lease_token = %(token)s
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
    next_attempt_at = now() + least(
        %(backoff_max)s, %(backoff_base)s * power(2, least(attempts, 40))
    ) * (0.5 + random() / 2) * interval '1 second',
    last_error = %(error)s,
    lease_token = NULL, leased_until = NULL, leased_by = NULL
WHERE id = ANY(%(ids)s) AND lease_token = %(token)s
RETURNING id, status
"""

# Not the events' fault (rate limited, unauthorised, shutting down): try again after
# :delay seconds without counting an attempt.
DEFER = """
UPDATE outbox_events
SET next_attempt_at = now() + %(delay)s * interval '1 second',
    last_error = coalesce(%(error)s, last_error),
    lease_token = NULL, leased_until = NULL, leased_by = NULL
WHERE id = ANY(%(ids)s) AND lease_token = %(token)s
"""

# The sink refused these events themselves: no retry will help.
BURY = """
UPDATE outbox_events
SET status = 'dead', attempts = attempts + 1, last_error = %(error)s,
    lease_token = NULL, leased_until = NULL, leased_by = NULL
WHERE id = ANY(%(ids)s) AND lease_token = %(token)s
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
    count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()
                     AND (lease_token IS NULL OR leased_until <= now())) AS due,
    count(*) FILTER (WHERE status = 'pending' AND lease_token IS NOT NULL
                     AND leased_until > now()) AS leased,
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
        WHERE status = 'pending' AND next_attempt_at <= now()
          AND (lease_token IS NULL OR leased_until <= now()) LIMIT %(cap)s) s) AS due,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events
        WHERE status = 'pending' AND lease_token IS NOT NULL AND leased_until > now()
        LIMIT %(cap)s) s) AS leased,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events
        WHERE status = 'pending' AND attempts > 0 LIMIT %(cap)s) s) AS retrying,
    (SELECT count(*) FROM (SELECT 1 FROM outbox_events
        WHERE status = 'dead' LIMIT %(cap)s) s) AS dead,
    coalesce((SELECT extract(epoch FROM now() - created_at) FROM outbox_events
        WHERE status = 'pending' ORDER BY id LIMIT 1), 0) AS oldest_pending_age_seconds,
    (SELECT greatest(reltuples, 0)::bigint FROM pg_class
        WHERE oid = to_regclass('outbox_events_due_idx')) AS pending_estimate
"""
