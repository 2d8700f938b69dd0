"""The snapshot storage engine: PgQ-style batches over rotated, insert-only tables.

Events are INSERTed into one of ``outbox_events_0..3`` (migration 0006) and never
updated or deleted one by one. A *tick* records ``txid_current_snapshot()``; the
events of the interval between two ticks are the rows whose transaction the later
snapshot sees as finished and the earlier one does not, which is exact whatever the
order the transactions committed in. The ticker turns each interval into one batch
(or several over disjoint txid sub-ranges when the interval is big, so workers can
share it). A worker leases a batch, reads it in chunks (each a short statement),
sends a chunk with no transaction open, then advances the batch past it in one
fenced statement that also files the chunk's failed events into ``outbox_retry``.
A table is TRUNCATEd once every row in it is delivered (``outbox_snapshot_rotate``).

:class:`SnapshotEngine` is the SQL core over one autocommit connection; it does not
reconnect (the caller makes a new one after a lost connection).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from outbox.exceptions import OutboxDatabaseError
from outbox.validation import new_event_uuid
from worker.sinks.base import Outbound
from worker.storage import snapshot_sql as sql

_dumps = json.JSONEncoder(ensure_ascii=False).encode
#: The properties the worker sets itself, and "$ip", which decides $geoip_disable.
_OWN = ("$ip", "$ignore_sent_at", "$geoip_disable")
_EXTRA_WITH_IP = ', "$ignore_sent_at": true'
_EXTRA = _EXTRA_WITH_IP + ', "$geoip_disable": true'

#: Which database engine name the behaviour suite knows this one by.
NAME = "snapshot"


class SnapshotError(OutboxDatabaseError):
    """A statement of the snapshot engine failed (not a lost lease)."""


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which
# doubles what building one costs (2.6 against 1.2 us), once per event read.
@dataclass(slots=True)
class SnapshotEvent:
    """One event of a batch (or of ``outbox_retry``), as read: every field is text
    PostgreSQL rendered, so reading a row cannot fail on what it holds."""

    #: Where the row is: (event table, ctid) in a batch; (-1, retry id) for a retry.
    table: int
    position: str
    uuid: uuid.UUID
    event: str
    distinct_id: str
    #: The properties exactly as stored (json keeps the text it was given).
    properties_json: str
    #: ISO 8601 in UTC, with microseconds.
    timestamp: str
    destination: str
    dedup_key: str | None
    #: Why the event cannot be sent as it is, or None.
    problem: str | None = None
    attempts: int = 0

    @property
    def size(self) -> int:
        """About how many bytes the event takes in a request."""
        return len(self.properties_json) + len(self.event) + len(self.distinct_id) + 120

    def outbound(self) -> Outbound:
        """The capture event: the stored uuid and timestamp, ``$ignore_sent_at`` (so
        PostHog keeps the timestamp on a re-send) and ``$geoip_disable`` unless the
        properties have a top-level ``$ip`` string. Each key is in the object once."""
        props, has_ip = own_keys(self.properties_json)
        extra = (
            ', "$ignore_sent_at": true'
            if has_ip
            else ', "$ignore_sent_at": true, "$geoip_disable": true'
        )
        body = "{" + extra[2:] + "}" if props.strip() == "{}" else props.rstrip()[:-1] + extra + "}"
        return Outbound(
            '{"event": '
            + _dumps(self.event)
            + ', "distinct_id": '
            + _dumps(self.distinct_id)
            + ', "properties": '
            + body
            + ', "uuid": "'
            + str(self.uuid)
            + '", "timestamp": "'
            + self.timestamp
            + '"}'
        )


def own_keys(properties_json: str) -> tuple[str, bool]:
    """``(properties without the worker's own keys, whether they have a top-level "$ip"
    string)``. Cheap for nearly every event: the text is decoded only when it could
    hold one of them as a key (it has one of them in quotes, or any ``\\u`` escape,
    which could spell one);
    then the object is decoded (the last of duplicate keys wins, as in jsonb) and
    checked key by key, so a string value that merely contains ``"$ip"`` changes
    nothing."""
    # Spelled out, not any() over the keys: a generator costs more than the scans; and
    # one character first (memchr), which most texts do not have at all.
    if (
        ("\\" not in properties_json or "\\u" not in properties_json)
        and '"$ip"' not in properties_json
        and '"$ignore_sent_at"' not in properties_json
        and '"$geoip_disable"' not in properties_json
    ):
        return properties_json, False
    data = json.loads(properties_json)
    if not isinstance(data, dict) or not any(key in data for key in _OWN):
        return properties_json, False
    has_ip = isinstance(data.get("$ip"), str)
    data.pop("$ignore_sent_at", None)
    if not has_ip:
        data.pop("$geoip_disable", None)
    return _dumps(data), has_ip


@dataclass(eq=False, slots=True)
class LeasedBatch:
    """A batch this engine leased: where its next chunk starts, and the lease that
    every write to it must name."""

    batch_id: int
    lease: uuid.UUID
    txid_lo: int
    txid_hi: int
    #: Older transactions whose rows belong to the batch too (see migration 0006).
    txid_extra: list[int]
    snap1: str
    snap2: str
    progress_table: int
    progress_ctid: str
    #: Events of the batch already sent (by this lease or an earlier one).
    sent: int = 0
    #: How many events the tick expected in the batch (None: unknown, from before 0010).
    rows_estimate: int | None = None
    #: Set once the last chunk has been advanced past (the batch row is gone).
    finished: bool = False


@dataclass(frozen=True, slots=True)
class _Positions:
    """Where a batch's events are, in order, after ``start`` (a progress)."""

    start: tuple[int, str]
    items: list[tuple[int, str]]
    index: dict[tuple[int, str], int]
    #: The scan reached the batch's end (else there may be events after the last).
    complete: bool


#: How many batches' positions an engine keeps (the oldest go first).
_KEPT_BATCHES = 2


@dataclass(frozen=True, slots=True)
class Chunk:
    """Events of a batch, in order; ``last`` when the batch has no events after them."""

    events: list[SnapshotEvent]
    last: bool


@dataclass(frozen=True, slots=True)
class Failure:
    """An event that could not be delivered: retried later unless ``dead``."""

    event: SnapshotEvent
    error: str
    dead: bool = False


@dataclass
class RetryOutcome:
    """What happened to leased retries."""

    shipped: list[int] = field(default_factory=list)
    failed: list[tuple[int, str, bool]] = field(default_factory=list)


class SnapshotEngine:
    """The snapshot engine's statements over one autocommit psycopg connection."""

    def __init__(
        self, conn: psycopg.Connection[Any], *, worker_id: str = "worker", settings: bool = True
    ) -> None:
        """With ``settings``, apply :data:`snapshot_sql.SETTINGS` to the session (a
        caller that applies them itself, per transaction behind a pooler, passes
        False)."""
        if not conn.autocommit:
            raise ValueError("the snapshot engine needs an autocommit connection")
        self.conn = conn
        self.worker_id = worker_id
        self._positions: dict[int, _Positions] = {}
        for setting in sql.SESSION.split(";"):
            if settings:  # else the caller applies them (per transaction, behind a pooler)
                conn.execute(setting.strip())

    def _run(self, query: str, params: dict[str, Any] | None = None) -> list[Any]:
        try:
            cur = self.conn.execute(query, params)
            return cur.fetchall() if cur.description else []
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SnapshotError(f"a snapshot engine statement failed: {first}") from exc

    # -- ticks, batches, rotation -----------------------------------------------------

    def tick(self, split_rows: int = 5_000) -> int | None:
        """Take a tick if anything committed since the last one; returns its id, or
        None (nothing new, or another session is ticking right now)."""
        rows = self._run(sql.TICK, {"split_rows": split_rows})
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def rotate(self, *, current: bool = False) -> int:
        """TRUNCATE the event tables whose rows are all delivered (not the one enqueue
        writes to now, unless ``current``); returns how many."""
        rows = self._run(sql.ROTATE, {"current": current})
        return int(rows[0][0])

    def claim(
        self, lease_seconds: float, *, tick: bool = True, split_rows: int = 5_000
    ) -> LeasedBatch | None:
        """Lease the oldest unleased batch; with none, tick (when ``tick``) and try once
        more. None when there is nothing to send."""
        params = {
            "worker": self.worker_id,
            "lease_seconds": float(lease_seconds),
            "lease": new_event_uuid(),
        }
        rows = self._run(sql.CLAIM, params)
        if not rows and tick and self.tick(split_rows) is not None:
            params["lease"] = new_event_uuid()
            rows = self._run(sql.CLAIM, params)
        if not rows:
            return None
        batch_id, lease, lo, hi, extra, snap1, snap2, pt, pc, sent, estimate = rows[0]
        return LeasedBatch(
            batch_id, lease, lo, hi, list(extra), snap1, snap2, pt, str(pc), sent, estimate
        )

    def read(self, batch: LeasedBatch, limit: int) -> Chunk:
        """The batch's next ``limit`` events at most (no transaction stays open).

        A batch the tick expected to fit in one chunk (its ``rows_estimate``, less what
        was sent, is at most ``limit`` and an eighth: the estimate can be a page of rows
        off either way) is read whole with one statement; if more than ``limit`` events
        come back, it is read as any other batch. Else the batch's positions (table,
        ctid) after its progress are found by one scan and kept (a batch's rows never
        change: all their transactions have finished), so that each chunk reads only
        its own rows, by TID, whoever advanced the batch in between; a batch of more
        than ``POSITIONS_CAP`` events is scanned again from where the last scan ended."""
        if limit < 1:
            raise ValueError(f"limit: {limit} is not a positive number of events")
        snap1 = batch.txid_lo < int(batch.snap1.split(":", 2)[1])
        extra = bool(batch.txid_extra)
        params: dict[str, Any] = {
            "lo": batch.txid_lo,
            "hi": batch.txid_hi,
            "extra": batch.txid_extra,
            "xlo": min(batch.txid_extra, default=1),
            "xhi": max(batch.txid_extra, default=0),
            "snap1": batch.snap1,
            "snap2": batch.snap2,
            "pt": batch.progress_table,
            "pc": batch.progress_ctid,
        }
        if (
            batch.rows_estimate is not None
            and batch.rows_estimate - batch.sent <= limit + limit // 8
            and batch.batch_id not in self._positions
        ):
            rows = self._run(
                sql.chunk_statement(batch.progress_table, extra=extra, snap1=snap1),
                {**params, "n": limit + 1},
            )
            if len(rows) <= limit:  # all of the batch after its progress
                rows.sort(key=_position)
                return Chunk(_events(rows), last=True)
        for scanned in (False, True):
            positions, start = self._positions_after(
                batch, params, snap1, extra, limit, fresh=scanned
            )
            take = positions.items[start : start + limit]
            if not take:
                return Chunk([], last=True)
            tables = tuple(sorted({t for t, _ in take}))
            for t in tables:
                # One array literal ('{"(0,1)","(0,2)"}'), not a list: psycopg escapes a
                # list's text elements one by one (2.7 ms against 0.3 ms for 1,000).
                params[f"c{t}"] = '{"' + '","'.join(c for u, c in take if u == t) + '"}'
            rows = self._run(sql.fetch_statement(tables, extra=extra, snap1=snap1), params)
            if len(rows) == len(take):
                break
            # Rows no longer there (a table truncated since the scan): scan again.
            self._positions.pop(batch.batch_id, None)
        else:
            raise SnapshotError("a snapshot engine statement failed: the batch's rows changed")
        order = {p: i for i, p in enumerate(take)}
        if [(r[0], str(r[1])) for r in rows] != take:
            rows.sort(key=lambda r: order[(r[0], str(r[1]))])
        end = start + len(take)
        return Chunk(_events(rows), last=positions.complete and end == len(positions.items))

    def _positions_after(
        self,
        batch: LeasedBatch,
        params: dict[str, Any],
        snap1: bool,
        extra: bool,
        limit: int,
        *,
        fresh: bool,
    ) -> tuple[_Positions, int]:
        """The kept positions of ``batch`` and the index of the first one after its
        progress; scanned now if none are kept from there, or too few for a chunk of
        ``limit`` (a scan that stopped at its cap), or when ``fresh``."""
        progress = (batch.progress_table, batch.progress_ctid)
        kept = None if fresh else self._positions.get(batch.batch_id)
        if kept is not None:
            if progress == kept.start:
                start = 0
            elif (i := kept.index.get(progress)) is not None:
                start = i + 1
            else:
                start = -1
            if start >= 0 and (kept.complete or start + limit <= len(kept.items)):
                return kept, start
        rows = self._run(
            sql.positions_statement(batch.progress_table, extra=extra, snap1=snap1),
            {**params, "cap": (cap := max(sql.POSITIONS_CAP, limit))},
        )
        items = [(int(t), str(c)) for t, c in rows]
        kept = _Positions(progress, items, {p: i for i, p in enumerate(items)}, len(items) < cap)
        self._positions.pop(batch.batch_id, None)
        while len(self._positions) >= _KEPT_BATCHES:
            self._positions.pop(next(iter(self._positions)))
        self._positions[batch.batch_id] = kept
        return kept, 0

    def advance(
        self,
        batch: LeasedBatch,
        upto: SnapshotEvent | None,
        *,
        last: bool,
        delivered: Sequence[SnapshotEvent] = (),
        failed: Sequence[Failure] = (),
        lease_seconds: float = 30.0,
        dedup_window: float = 0.0,
        backoff_base: float = 1.0,
    ) -> bool:
        """Move ``batch`` past ``upto`` (the last event of the chunk just handled), or
        finish it when ``last``; file ``failed`` into ``outbox_retry`` and start the
        dedup window of the ``delivered`` events' keys, all in one statement.
        Returns False when the lease was lost (then nothing was written: the events
        will be read and sent again, with the same uuids, by whoever holds it)."""
        pt = upto.table if upto is not None else batch.progress_table
        pc = upto.position if upto is not None else batch.progress_ctid
        keys = [e.dedup_key for e in delivered if e.dedup_key is not None]
        if not failed and not keys:  # the batch's row alone
            rows = self._run(
                sql.ADVANCE_DONE if last else sql.ADVANCE_PAST,
                {
                    "batch": batch.batch_id,
                    "lease": batch.lease,
                    "pt": pt,
                    "pc": pc,
                    "count": len(delivered),
                    "lease_seconds": float(lease_seconds),
                },
            )
            return self._advanced(batch, bool(rows), pt, pc, len(delivered), last)
        f = [x.event for x in failed]
        rows = self._run(
            sql.ADVANCE,
            {
                "batch": batch.batch_id,
                "lease": batch.lease,
                "last": last,
                "pt": pt,
                "pc": pc,
                "count": len(delivered) + len(failed),
                "lease_seconds": float(lease_seconds),
                "window": float(dedup_window),
                "keys": keys,
                "f_uuid": [e.uuid for e in f],
                "f_ts": [e.timestamp for e in f],
                "f_event": [e.event for e in f],
                "f_distinct_id": [e.distinct_id for e in f],
                "f_destination": [None if e.destination == "posthog" else e.destination for e in f],
                "f_dedup_key": [e.dedup_key for e in f],
                "f_properties": [e.properties_json for e in f],
                "f_dead": [x.dead for x in failed],
                "f_delay": [0.0 if x.dead else float(backoff_base) for x in failed],
                "f_error": [x.error[:2000] for x in failed],
            },
        )
        return self._advanced(batch, bool(rows[0][0]), pt, pc, len(delivered) + len(failed), last)

    @staticmethod
    def _advanced(batch: LeasedBatch, held: bool, pt: int, pc: str, count: int, last: bool) -> bool:
        if held:
            batch.progress_table, batch.progress_ctid = pt, pc
            batch.sent += count
            batch.finished = last
        return held

    def release(self, batch: LeasedBatch, delay: float = 0.0) -> bool:
        """Give the batch back unfinished; claimable again after ``delay`` seconds."""
        rows = self._run(
            sql.RELEASE, {"batch": batch.batch_id, "lease": batch.lease, "delay": float(delay)}
        )
        return bool(rows)

    # -- outbox_retry -----------------------------------------------------------------

    def claim_retries(
        self, limit: int, lease_seconds: float
    ) -> tuple[uuid.UUID, list[SnapshotEvent]]:
        """Lease up to ``limit`` due retries; returns the lease and the events (their
        ``position`` is the retry row's id). The lease is a UUIDv7: its first 48 bits
        are when it was made (the worker's clock, in milliseconds), which is how
        ``outbox-worker status`` tells how long leased retries have been held."""
        lease = new_event_uuid()
        rows = self._run(
            sql.CLAIM_RETRIES,
            {"lease": lease, "lease_seconds": float(lease_seconds), "limit": limit},
        )
        events = [
            SnapshotEvent(
                table=-1,
                position=str(i),
                uuid=u,
                event=ev,
                distinct_id=d,
                properties_json=p,
                timestamp=ts,
                destination=dest or "posthog",
                dedup_key=k,
                problem=(
                    f"timestamp: {ts} is more than 23 hours ahead of the database's clock"
                    if ahead
                    else None
                ),
                attempts=attempts,
            )
            for i, u, ev, d, p, ts, dest, k, ahead, attempts in rows
        ]
        return lease, events

    def finish_retries(
        self,
        lease: uuid.UUID,
        outcome: RetryOutcome,
        *,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
        dedup_window: float = 0.0,
    ) -> tuple[int, int, int]:
        """Write the outcome of leased retries: (delivered, retrying, dead)."""
        rows = self._run(
            sql.FINISH_RETRIES,
            {
                "lease": lease,
                "shipped": list(outcome.shipped),
                "window": float(dedup_window),
                "max_attempts": max_attempts,
                "backoff_base": float(backoff_base),
                "backoff_max": float(backoff_max),
                "f_id": [i for i, _, _ in outcome.failed],
                "f_error": [e[:2000] for _, e, _ in outcome.failed],
                "f_dead": [d for _, _, d in outcome.failed],
            },
        )
        done, retrying, dead, _ = rows[0]
        return int(done), int(retrying), int(dead)


def utc_iso(text: str) -> str:
    """A UTC ``timestamp``'s text in DateStyle ISO (``2026-03-04 05:06:07.89``: up to
    six digits of fraction, none when it is 0) as ISO 8601 with microseconds and the
    offset (``2026-03-04T05:06:07.890000+00:00``)."""
    if len(text) == 26:  # six digits of fraction, the most common case
        return text[:10] + "T" + text[11:] + "+00:00"
    if len(text) == 19:
        return text[:10] + "T" + text[11:] + ".000000+00:00"
    return text[:10] + "T" + text[11:].ljust(15, "0") + "+00:00"


def _position(row: Sequence[Any]) -> tuple[int, int, int]:
    """A row's (table, block, offset), from its table number and ctid text ``(b,o)``."""
    block, _, offset = str(row[1])[1:-1].partition(",")
    return (row[0], int(block), int(offset))


def _events(rows: list[Any]) -> list[SnapshotEvent]:
    """The events of rows read with :data:`snapshot_sql._COLUMNS` (and the table first)."""
    events = []
    for t, c, u, ev, d, p, ts, dest, k, ahead in rows:
        iso = utc_iso(ts)
        events.append(
            SnapshotEvent(
                table=t,
                position=str(c),
                uuid=u,
                event=ev,
                distinct_id=d,
                properties_json=p,
                timestamp=iso,
                destination=dest or "posthog",
                dedup_key=k,
                problem=(
                    f"timestamp: {iso} is more than 23 hours ahead of the database's clock"
                    if ahead
                    else None
                ),
            )
        )
    return events


def insert_events(
    conn: psycopg.Connection[Any],
    events: Sequence[dict[str, Any]],
    *,
    table: int | None = None,
) -> None:
    """INSERT events into an event table (the clock's, ``outbox_snapshot_slot()``,
    unless ``table``), in the caller's transaction: what enqueue will do next. Each
    event is a mapping with ``uuid``, ``event``, ``distinct_id`` and optionally
    ``properties`` (a mapping), ``destination``, ``dedup_key``, ``timestamp``."""
    if table is None:
        row = conn.execute("SELECT outbox_snapshot_slot()").fetchone()
        assert row is not None
        table = int(row[0])
    if not 0 <= table < sql.EVENT_TABLES:
        raise ValueError(f"table: {table} is not one of 0..{sql.EVENT_TABLES - 1}")
    conn.execute(
        f"""
        INSERT INTO outbox_events_{table}
            (uuid, event, distinct_id, properties, destination, dedup_key, "timestamp")
        SELECT u, e, d, p::json, s, k, coalesce(t, now())
        FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                    %s::timestamptz[]) AS r(u, e, d, p, s, k, t)
        """,
        (
            [e["uuid"] for e in events],
            [e["event"] for e in events],
            [e["distinct_id"] for e in events],
            [_dumps(e.get("properties") or {}) for e in events],
            [e.get("destination") for e in events],
            [e.get("dedup_key") for e in events],
            [e.get("timestamp") for e in events],
        ),
    )
