"""The outbox tables, as SQLAlchemy Core metadata.

The Alembic migrations under ``migrations/`` create these tables (a test runs
``alembic check`` against this metadata), and also what it leaves out: the
``outbox_events`` and ``outbox_stuck`` views, the functions and the CHECK constraints.
An application that manages its own schema with Alembic can skip the tables named
here in its ``include_object`` hook (and :data:`VERSION_TABLE`), so that autogenerate
neither drops nor duplicates them; the README shows such a hook.

Operators query these tables by hand, so the column names are part of the interface:

``outbox_events_0`` .. ``outbox_events_3``
    The event tables (migration 0006): ``enqueue`` INSERTs each event into the one
    the clock picks (``outbox_snapshot_slot()``), and nothing updates or deletes a
    row; a table is TRUNCATEd once all its rows are delivered. ``txid`` is the
    inserting transaction (the worker batches rows by it), ``properties`` is ``json``
    text, ``destination`` is NULL for an ordinary event and ``metrics`` for a
    metrics-only one, which the worker counts in Prometheus and never sends to
    PostHog (see :mod:`outbox.contract`).
``outbox_retry``
    One row per event whose delivery failed: ``pending`` (with ``attempts``,
    ``next_attempt_at`` and ``last_error``) or ``dead``.
``outbox_events`` (a view, migration 0007)
    Every event not delivered yet, one row each: the event tables' rows that no
    finished batch took (``retry_id`` NULL, ``status`` ``pending``, ``attempts`` 0),
    then ``outbox_retry``'s rows. ``destination`` is ``posthog`` or ``metrics``. A
    session sees its own uncommitted events. :data:`outbox_events` describes its
    columns, on its own :data:`view_metadata` (not created by ``metadata``).
``outbox_dedup_keys``
    Dedup keys of events that are undelivered (``expires_at`` is ``infinity``) or
    were delivered within the dedup window (``expires_at`` is delivery + window).
``outbox_worker_state``
    One row per worker: the PostHog host it sends to (never the key), its ``state``
    (``ok``, ``key_rejected``, ...) and why, written when it changes and as a heartbeat
    (``updated_at``). ``outbox-worker status`` reads it.
``outbox_ledger`` (migration 0009)
    The delivery ledger: per UTC ``day`` of the events' timestamps, ``event`` and
    ``destination`` (``posthog`` or ``metrics``), how many were ``delivered``, went
    ``dead`` and were ``purged``; the worker adds to it in the transaction that writes
    a batch's outcome. ``outbox-worker ledger`` reads it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, UUID

EVENTS_TABLE = "outbox_events"
DEDUP_TABLE = "outbox_dedup_keys"
STUCK_VIEW = "outbox_stuck"
WORKER_STATE_TABLE = "outbox_worker_state"
LEDGER_TABLE = "outbox_ledger"
#: Alembic's version table for the outbox migrations; separate from the application's own.
VERSION_TABLE = "outbox_alembic_version"
#: The channel producers NOTIFY (throttled) on commit and workers LISTEN to.
NOTIFY_CHANNEL = "outbox_events"

STATUS_PENDING = "pending"
STATUS_DEAD = "dead"

#: ``destination`` of an ordinary event, shipped to PostHog.
DESTINATION_POSTHOG: Final = "posthog"
#: ``destination`` of a metrics-only event: counted in the worker's Prometheus
#: metrics, never sent to PostHog.
DESTINATION_METRICS: Final = "metrics"

# The event timestamps PostHog keeps as they are. PostHog's capture
# (rust/common/types/src/timestamp.rs, parse_event_timestamp) replaces a timestamp
# more than 23 hours ahead of the time it receives the event with that time
# (FUTURE_EVENT_HOURS_CUTOFF_MILLIS), and one whose year is outside 0..9999 with
# the Unix epoch; the ingestion pipeline (nodejs/src/worker/ingestion/timestamps.ts)
# replaces out-of-range years with the time of ingestion. So the epoch is where
# PostHog puts timestamps it could not use, and the events table's
# DateTime64(6, 'UTC') column clamps anything before 1900 silently: an analytics
# event before 1970 is a bug (datetime.min, a zero Unix time), not history.
# enqueue() refuses a timestamp outside [TIMESTAMP_MIN, now + TIMESTAMP_MAX_AHEAD];
# since the worker sends an event after it was enqueued, a timestamp accepted then
# is at most 23 hours ahead when capture receives it too (as long as the clocks
# agree). The sources are in PostHog/posthog.

#: Earliest accepted event timestamp (inclusive): the Unix epoch, UTC.
TIMESTAMP_MIN: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: Furthest an event timestamp may be ahead of now (inclusive): capture's 23 hours.
TIMESTAMP_MAX_AHEAD: Final = timedelta(hours=23)

__all__ = [
    "DEDUP_TABLE",
    "DESTINATION_METRICS",
    "DESTINATION_POSTHOG",
    "EVENTS_TABLE",
    "EVENT_TABLES",
    "LEDGER_TABLE",
    "SLOT_SECONDS",
    "STATUS_DEAD",
    "STATUS_PENDING",
    "STUCK_VIEW",
    "TIMESTAMP_MAX_AHEAD",
    "TIMESTAMP_MIN",
    "VERSION_TABLE",
    "WORKER_STATE_TABLE",
    "event_table",
    "event_table_slot",
    "metadata",
    "outbox_dedup_keys",
    "outbox_events",
    "outbox_ledger",
    "outbox_worker_state",
    "snapshot_tables",
    "view_metadata",
]

metadata = MetaData()

outbox_dedup_keys = Table(
    DEDUP_TABLE,
    metadata,
    Column("dedup_key", Text, primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
Index("outbox_dedup_keys_expires_idx", outbox_dedup_keys.c.expires_at)

outbox_worker_state = Table(
    WORKER_STATE_TABLE,
    metadata,
    Column("worker_id", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=text("''")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

outbox_ledger = Table(
    LEDGER_TABLE,
    metadata,
    Column("day", Date, primary_key=True),
    Column("event", Text, primary_key=True),
    Column("destination", Text, primary_key=True),
    Column("delivered", BigInteger, nullable=False, server_default=text("0")),
    Column("dead", BigInteger, nullable=False, server_default=text("0")),
    Column("purged", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    postgresql_with={"fillfactor": "50"},
)


# The snapshot storage engine (migration 0006; the only one since 0007): see
# worker/storage/snapshot.py.
#: How many rotated event tables there are (``outbox_events_0`` .. ``outbox_events_3``).
EVENT_TABLES: Final = 4
#: How long the clock keeps enqueue writing to one event table before moving on to the
#: next, so that a table stops receiving rows and can be truncated once delivered.
SLOT_SECONDS: Final = 600
SNAPSHOT_EVENT_TABLES: Final = EVENT_TABLES


def event_table_slot(epoch_seconds: float) -> int:
    """The event table to write to at ``epoch_seconds`` (Unix time): the rule of the
    database's ``outbox_snapshot_slot()`` (which reads ``now()``), in Python."""
    return int(epoch_seconds // SLOT_SECONDS) % EVENT_TABLES


def event_table(slot: int) -> str:
    """The name of event table ``slot``."""
    return f"outbox_events_{slot}"


def _snapshot_event_table(number: int) -> Table:
    name = event_table(number)
    table = Table(
        name,
        metadata,
        Column("txid", BigInteger, nullable=False, server_default=text("txid_current()")),
        Column("timestamp", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("uuid", UUID(as_uuid=True), nullable=False),
        Column("event", Text, nullable=False),
        Column("distinct_id", Text, nullable=False),
        Column("destination", Text, nullable=True),
        Column("dedup_key", Text, nullable=True),
        Column("properties", JSON, nullable=False, server_default=text("'{}'::json")),
    )
    Index(
        f"{name}_txid_idx",
        table.c.txid,
        postgresql_using="brin",
        postgresql_with={"pages_per_range": 128, "autosummarize": "off"},
    )
    return table


#: The snapshot engine's tables: the rotated event tables, then the bookkeeping.
snapshot_tables: list[Table] = [_snapshot_event_table(n) for n in range(SNAPSHOT_EVENT_TABLES)]
snapshot_tables.append(
    Table(
        "outbox_ticks",
        metadata,
        Column("tick_id", BigInteger, primary_key=True, autoincrement=False),
        Column("snapshot", Text, nullable=False),
        Column("taken_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("pages", ARRAY(BigInteger), nullable=False),
    )
)
snapshot_tables.append(
    Table(
        "outbox_batches",
        metadata,
        Column("batch_id", BigInteger, Identity(always=True), primary_key=True),
        Column("from_tick", BigInteger, nullable=False),
        Column("to_tick", BigInteger, nullable=False),
        Column("txid_lo", BigInteger, nullable=False),
        Column("txid_hi", BigInteger, nullable=False),
        Column("txid_extra", ARRAY(BigInteger), nullable=False, server_default=text("'{}'")),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
        Column("leased_by", Text, nullable=True),
        Column("lease", UUID(as_uuid=True), nullable=True),
        Column("leased_until", DateTime(timezone=True), nullable=True),
        Column("progress_table", Integer, nullable=False, server_default=text("0")),
        Column("progress_ctid", Text, nullable=False, server_default=text("'(0,0)'")),
        Column("sent", BigInteger, nullable=False, server_default=text("0")),
        # How many events the tick expected in the batch (migration 0010).
        Column("rows_estimate", BigInteger, nullable=True),
    )
)
snapshot_tables.append(
    Table(
        "outbox_event_tables",
        metadata,
        Column("table_no", Integer, primary_key=True, autoincrement=False),
        Column("summarized_pages", BigInteger, nullable=False, server_default=text("0")),
        Column("truncated_at", DateTime(timezone=True), nullable=True),
    )
)
_retry = Table(
    "outbox_retry",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("uuid", UUID(as_uuid=True), nullable=False),
    Column("timestamp", DateTime(timezone=True), nullable=False),
    Column("event", Text, nullable=False),
    Column("distinct_id", Text, nullable=False),
    Column("destination", Text, nullable=True),
    Column("dedup_key", Text, nullable=True),
    Column("properties", JSON, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column(
        "next_attempt_at", DateTime(timezone=True), nullable=False, server_default=text("now()")
    ),
    Column("last_error", Text, nullable=True),
    Column("lease", UUID(as_uuid=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)
Index(
    "outbox_retry_due_idx",
    _retry.c.next_attempt_at,
    postgresql_where=text("status = 'pending'"),
)
Index("outbox_retry_dead_idx", _retry.c.created_at, postgresql_where=text("status = 'dead'"))
snapshot_tables.append(_retry)

#: Metadata for the views: described for queries, never created from here.
view_metadata = MetaData()

#: The view ``outbox_events`` (migration 0007): every event not delivered yet.
outbox_events = Table(
    EVENTS_TABLE,
    view_metadata,
    #: ``outbox_retry.id``; NULL for an event still in an event table.
    Column("retry_id", BigInteger),
    Column("uuid", UUID(as_uuid=True)),
    Column("event", Text),
    Column("distinct_id", Text),
    Column("properties", JSON),
    Column("timestamp", DateTime(timezone=True)),
    #: ``posthog`` or ``metrics``, never NULL.
    Column("destination", Text),
    Column("dedup_key", Text),
    #: ``pending`` or ``dead``.
    Column("status", Text),
    #: 0 for an event still in an event table.
    Column("attempts", Integer),
    #: NULL for an event still in an event table.
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text),
    #: The inserting transaction's id; NULL for a row of outbox_retry.
    Column("txid", BigInteger),
)
