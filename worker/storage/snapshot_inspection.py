"""What the snapshot engine shows operators (:class:`worker.storage.base.Inspection`):
the backlog, the most frequent pending and dead events and errors, the dead letters
(list, requeue, purge) and the leases held.

:class:`SnapshotInspection` is a part of :class:`worker.storage.snapshot_storage.
SnapshotStorage`; it runs each statement through the storage's ``_rows`` (one statement,
run once more on a new connection if the old one broke under it). Every statement here
is read-only or idempotent, so running it twice is safe.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

from worker import queries
from worker.storage import snapshot_sql
from worker.storage.base import Backlog, LedgerRow, Requeued


def _in_batch(t: int) -> str:
    """The rows of event table ``t`` in batch ``b`` after its progress (the same
    membership test as the engine's READ), each with the time it has waited since."""
    after = (
        f"(b.progress_table < {t} OR (b.progress_table = {t} AND e.ctid > b.progress_ctid::tid))"
    )
    since = 'greatest(least(e."timestamp", b.at2), b.at1)'
    return f"""
    SELECT e.event, {since} AS since FROM outbox_events_{t} AS e
    WHERE e.txid >= b.txid_lo AND e.txid < b.txid_hi
      AND txid_visible_in_snapshot(e.txid, b.s2) AND NOT txid_visible_in_snapshot(e.txid, b.s1)
      AND {after}
    UNION ALL
    SELECT e.event, {since} FROM outbox_events_{t} AS e
    WHERE e.txid >= b.xlo AND e.txid <= b.xhi AND e.txid = ANY(b.txid_extra) AND {after}"""


def _after_last_tick(t: int) -> str:
    """The rows of event table ``t`` committed since the newest tick (in no batch yet)."""
    return f"""
SELECT e.event, greatest(least(e."timestamp", now()), last.taken_at)
FROM last JOIN outbox_events_{t} AS e
  ON e.txid >= txid_snapshot_xmin(last.s) AND NOT txid_visible_in_snapshot(e.txid, last.s)"""


#: Every undelivered event of the event tables, the oldest batches' first (so that a
#: LIMIT reads those): its name, and ``since``, when it was enqueued as far as can be
#: told: its ``timestamp`` (which enqueue sets to the transaction's start unless the
#: application gives one), kept within the interval in which it committed (between the
#: two ticks of its batch; after the newest tick for one in no batch yet).
PENDING = f"""
WITH last AS (
    SELECT snapshot::txid_snapshot AS s, taken_at FROM outbox_ticks
    ORDER BY tick_id DESC LIMIT 1
), b AS MATERIALIZED (
    SELECT b.batch_id, b.txid_lo, b.txid_hi, b.txid_extra, b.progress_table,
        b.progress_ctid, t1.snapshot::txid_snapshot AS s1, t2.snapshot::txid_snapshot AS s2,
        t1.taken_at AS at1, t2.taken_at AS at2,
        coalesce((SELECT min(x) FROM unnest(b.txid_extra) AS x), 1) AS xlo,
        coalesce((SELECT max(x) FROM unnest(b.txid_extra) AS x), 0) AS xhi
    FROM outbox_batches AS b
    JOIN outbox_ticks AS t1 ON t1.tick_id = b.from_tick
    JOIN outbox_ticks AS t2 ON t2.tick_id = b.to_tick
    ORDER BY b.batch_id
), p AS (
    SELECT e.event, e.since FROM b CROSS JOIN LATERAL ({
    " UNION ALL ".join(_in_batch(t) for t in range(snapshot_sql.EVENT_TABLES))
}
    ) AS e
    UNION ALL {" UNION ALL ".join(_after_last_tick(t) for t in range(snapshot_sql.EVENT_TABLES))}
)"""

_RETRY_COUNTS = """
    count(*) FILTER (WHERE r.status = 'pending'),
    count(*) FILTER (
        WHERE r.status = 'pending' AND (r.next_attempt_at <= now() OR r.lease IS NOT NULL)),
    count(*) FILTER (WHERE r.status = 'pending' AND r.attempts > 0),
    count(*) FILTER (WHERE r.status = 'dead'),
    greatest(coalesce(extract(epoch FROM now() - least(
        (SELECT min(since) FROM {events}), min(r.created_at) FILTER (WHERE r.status = 'pending')
    )), 0), 0)"""

# The event tables' pending events, then outbox_retry's pending, due (or leased),
# retrying and dead ones, and the oldest pending event's age in seconds.
BACKLOG = (
    PENDING
    + f"""
SELECT (SELECT count(*) FROM p), {_RETRY_COUNTS.format(events="p")}
FROM outbox_retry AS r
"""
)

# As BACKLOG, reading at most :cap events of the event tables (the oldest batches'
# first: their oldest is the oldest there is, but for events whose own timestamp is
# earlier in a later batch).
BACKLOG_CAPPED = (
    PENDING
    + f"""
, c AS (SELECT since FROM p LIMIT %(cap)s)
SELECT (SELECT count(*) FROM c), {_RETRY_COUNTS.format(events="c")}
FROM outbox_retry AS r
"""
)

TOP_PENDING = (
    PENDING
    + """
SELECT event, count(*) AS n FROM (
    SELECT event FROM p
    UNION ALL SELECT event FROM outbox_retry WHERE status = 'pending'
) AS e
GROUP BY event ORDER BY n DESC, event LIMIT %(limit)s
"""
)

TOP_DEAD = """
SELECT event, count(*) AS n FROM outbox_retry WHERE status = 'dead'
GROUP BY event ORDER BY n DESC, event LIMIT %(limit)s
"""

TOP_ERRORS = f"""
SELECT status, error, n, {queries.utc_text("since")} FROM (
    SELECT status, left(last_error, 200) AS error, count(*) AS n, min(created_at) AS since
    FROM outbox_retry WHERE last_error IS NOT NULL
    GROUP BY status, left(last_error, 200)
) AS g
ORDER BY n DESC, error LIMIT %(limit)s
"""

LIST_DEAD = f"""
SELECT id, uuid, event, distinct_id, attempts, last_error, {queries.utc_text("created_at")}
FROM outbox_retry
WHERE status = 'dead' AND (%(event)s::text IS NULL OR event = %(event)s::text)
ORDER BY created_at, id LIMIT %(limit)s
"""

# Dead rows (all, some ids, or one event name) pending again with no attempts, but
# for those an event table's constraints would refuse (they could never be sent:
# they stay dead, and are counted).
REQUEUE_DEAD = f"""
WITH chosen AS (
    SELECT id, {queries.RETRY_STORABLE} AS storable
    FROM outbox_retry
    WHERE status = 'dead'
      AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
      AND (%(event)s::text IS NULL OR event = %(event)s::text)
    FOR UPDATE
), requeued AS (
    UPDATE outbox_retry AS r
    SET status = 'pending', attempts = 0, last_error = NULL, next_attempt_at = now(),
        lease = NULL
    FROM chosen
    WHERE r.id = chosen.id AND chosen.storable
    RETURNING 1
)
SELECT (SELECT count(*) FROM requeued), count(*) FILTER (WHERE NOT storable) FROM chosen
"""

# The purged events are counted in the delivery ledger by the same statement (per UTC
# day of their timestamp, name and destination; rows locked in key order, as the
# worker's finish locks them).
PURGE_DEAD = """
WITH gone AS (
    DELETE FROM outbox_retry
    WHERE status = 'dead'
      AND (created_at < now() - %(older_than)s * interval '1 second' OR created_at > now())
    RETURNING dedup_key, "timestamp", event, destination
), keys AS (
    SELECT outbox_free_dedup_keys(array_agg(dedup_key)) AS n FROM gone
), counted AS (
    INSERT INTO outbox_ledger AS l (day, event, destination, purged, updated_at)
    SELECT ("timestamp" AT TIME ZONE 'UTC')::date, event, coalesce(destination, 'posthog'),
        count(*), now()
    FROM gone
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (day, event, destination) DO UPDATE
    SET purged = l.purged + EXCLUDED.purged, updated_at = EXCLUDED.updated_at
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT n FROM keys)
"""

LEDGER = """
SELECT day, event, destination, delivered, dead, purged FROM outbox_ledger
WHERE day >= %(since)s::date AND (%(event)s::text IS NULL OR event = %(event)s::text)
ORDER BY day, event, destination
"""

# The milliseconds since the Unix epoch in a UUIDv7's first 48 bits (the engine's leases
# are made so: see SnapshotEngine.claim_retries and CLAIM), as seconds.
_LEASE_SECONDS = (
    "(('x' || lpad(left(replace({}::text, '-', ''), 12), 16, '0'))::bit(64)::bigint / 1000.0)"
)

# The leased snapshot batches (worker, seconds since the lease was made), and the leased
# retries, one line per lease (their rows record no worker).
IN_FLIGHT = f"""
SELECT worker, held, state FROM (
    SELECT leased_by AS worker,
           greatest(extract(epoch FROM now()) - {_LEASE_SECONDS.format("lease")}, 0) AS held,
           'leased batch' AS state
    FROM outbox_batches
    WHERE lease IS NOT NULL AND leased_until > now()
    UNION ALL
    SELECT '(not recorded)',
           greatest(extract(epoch FROM now()) - {_LEASE_SECONDS.format("lease")}, 0),
           'leased retries (' || count(*) || ' events)'
    FROM outbox_retry
    WHERE lease IS NOT NULL AND status = 'pending' AND next_attempt_at > now()
    GROUP BY lease
) AS f
ORDER BY held DESC, worker
"""


class SnapshotInspection:
    """The :class:`worker.storage.base.Inspection` half of the snapshot engine's
    storage; the class it is mixed into provides ``_rows``."""

    def _rows(self, query: str, params: dict[str, Any] | None = None) -> list[Any]:
        raise NotImplementedError

    def backlog(self) -> Backlog:
        """See :meth:`worker.storage.base.Inspection.backlog`.

        The oldest age is exact for an event enqueued with the default timestamp
        (its transaction's start, as the old engine's ``created_at``); for one given
        a timestamp, the time since it committed as nearly as the ticks tell (at most
        the time since the tick before it committed, at least since the tick after).
        A retried event keeps that time (``outbox_retry.created_at``)."""
        return self._backlog(BACKLOG, None)

    def backlog_capped(self, cap: int = 100_000) -> Backlog:
        """See :meth:`worker.storage.base.Inspection.backlog_capped`: reads at most
        ``cap`` events of the event tables (the oldest batches first) and all of
        ``outbox_retry`` (which holds only failed events); past ``cap``, pending and
        due count ``cap`` for the event tables (a lower bound), and the oldest age is
        the oldest among the events read."""
        return self._backlog(BACKLOG_CAPPED, {"cap": max(1, int(cap))})

    def _backlog(self, query: str, params: dict[str, Any] | None) -> Backlog:
        events, pending, due, retrying, dead, age = self._rows(query, params)[0]
        return Backlog(
            pending=int(events) + int(pending),
            due=int(events) + int(due),
            retrying=int(retrying),
            dead=int(dead),
            oldest_pending_age_seconds=float(age),
        )

    def top_events(self, status: str, limit: int = 10) -> list[tuple[str, int]]:
        """See :meth:`worker.storage.base.Inspection.top_events`."""
        query = TOP_DEAD if status == "dead" else TOP_PENDING
        return [(r[0], int(r[1])) for r in self._rows(query, {"limit": limit})]

    def top_errors(self, limit: int = 10) -> list[dict[str, Any]]:
        """See :meth:`worker.storage.base.Inspection.top_errors`."""
        return [
            {"status": r[0], "error": r[1], "count": int(r[2]), "since": r[3]}
            for r in self._rows(TOP_ERRORS, {"limit": limit})
        ]

    def error_groups(self, limit: int = 20, ids: int = 50) -> list[dict[str, Any]]:
        """The status page's failed events (dead, or pending after a failed attempt:
        rows of ``outbox_retry``) grouped by status and error text, most first: count,
        first and last created_at (ISO 8601 text in UTC), the newest's age in seconds,
        the first ``ids`` row ids (those ``dead`` lists and ``retry --id`` takes), the
        number of event names and the first, how many dead rows have that name, and
        the newest row as an example (id, event, distinct_id, properties, attempts)."""
        columns = (
            "status", "error", "count", "first_at", "last_at", "last_age_seconds", "ids",
            "names", "name", "dead_of_name", "example_id", "event", "distinct_id",
            "properties", "attempts",
        )  # fmt: skip
        rows = self._rows(queries.ERROR_GROUPS, {"limit": limit, "ids": ids})
        groups = [dict(zip(columns, row, strict=True)) for row in rows]
        for group in groups:  # the example's properties, or None if Python cannot read them
            try:
                group["properties"] = json.loads(group["properties"])
            except (TypeError, ValueError):
                group["properties"] = None
        return groups

    def dead(self, limit: int = 100, event: str | None = None) -> list[dict[str, Any]]:
        """See :meth:`worker.storage.base.Inspection.dead` (``id`` is the
        ``outbox_retry`` row's)."""
        columns = ("id", "uuid", "event", "distinct_id", "attempts", "last_error", "created_at")
        rows = self._rows(LIST_DEAD, {"limit": limit, "event": event})
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def requeue_dead(self, ids: Sequence[int] | None = None, event: str | None = None) -> Requeued:
        """See :meth:`worker.storage.base.Inspection.requeue_dead`: a dead row an
        event table's constraints would refuse stays dead (``unsendable``)."""
        params = {"ids": list(ids) if ids else None, "event": event}
        row = self._rows(REQUEUE_DEAD, params)[0]
        return Requeued(requeued=int(row[0]), unsendable=int(row[1]))

    def purge_dead(self, older_than_seconds: float) -> int:
        """See :meth:`worker.storage.base.Inspection.purge_dead`."""
        return int(self._rows(PURGE_DEAD, {"older_than": float(older_than_seconds)})[0][0])

    def ledger(self, since: datetime.date, event: str | None = None) -> list[LedgerRow]:
        """See :meth:`worker.storage.base.Inspection.ledger`."""
        return [
            LedgerRow(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]))
            for r in self._rows(LEDGER, {"since": since, "event": event})
        ]

    def in_flight(self) -> list[dict[str, Any]]:
        """See :meth:`worker.storage.base.Inspection.in_flight`: each leased snapshot
        batch (``state`` ``leased batch``) and each lease of retry rows (``leased
        retries (N events)``, ``worker`` ``(not recorded)``: the rows do not say
        whose), longest held first. ``held_seconds`` runs from when the lease was
        made, by the claiming worker's clock (the time in its UUIDv7)."""
        return [
            {"worker": r[0], "held_seconds": float(r[1]), "state": r[2]}
            for r in self._rows(IN_FLIGHT)
        ]
