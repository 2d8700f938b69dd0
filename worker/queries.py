"""SQL the worker runs beside its storage engine's own, named, to read and review.

The snapshot engine's statements are in :mod:`worker.storage.snapshot_sql` (ticks,
batches, chunks, retries) and :mod:`worker.storage.snapshot_storage` (the storage
protocol's inspection and outcomes); the worker's state table's in
:mod:`worker.worker_state`. Here: what the status page and the dead-letter commands
share with them. Parameters are psycopg named placeholders.
"""

from __future__ import annotations

from outbox.validation import MAX_NAME_LENGTH

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


# What an event table's constraints (migration 0006) require, over a row of
# outbox_retry (whose properties are json, and which has no such constraints): a dead
# row that fails it (one migration 0007 filed there from the old table, or written by
# hand) could never be sent, so `retry` leaves it dead. Blank names too, which enqueue
# refuses.
RETRY_STORABLE = f"""(json_typeof(properties) = 'object'
    AND "timestamp" >= '1970-01-01 00:00:00+00' AND "timestamp" < '2200-01-01 00:00:00+00'
    AND length(event) BETWEEN 1 AND {MAX_NAME_LENGTH} AND btrim(event, {_SPACE}) <> ''
    AND length(distinct_id) BETWEEN 1 AND {MAX_NAME_LENGTH}
    AND btrim(distinct_id, {_SPACE}) <> ''
    AND (destination IS NULL OR destination = 'metrics'))"""

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
