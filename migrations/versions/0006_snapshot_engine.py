"""Create the snapshot storage engine's objects, beside the current ``outbox_events``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Nothing writes to these objects yet (``enqueue`` still writes ``outbox_events``): this
revision only creates them, so applying it takes no lock on an existing table.

- ``outbox_events_0`` .. ``outbox_events_3``: the event tables, written by INSERT only
  and emptied by TRUNCATE (so ``autovacuum_enabled = off``: there is never a dead row
  for it to clean, and no visibility map worth the WAL). Each row records the id of
  the transaction that inserted it (``txid``, ``txid_current()`` by default), and has
  one BRIN index on ``txid``; no primary key, no index on ``uuid``. ``properties`` is
  ``json`` (its text as written; nothing is parsed to read it), ``destination`` is
  NULL for an ordinary event and ``metrics`` for a metrics-only one.
- ``outbox_ticks``: a tick is ``txid_current_snapshot()`` at some moment. The events
  of the interval between two consecutive ticks are the rows whose transaction is
  visible in the later snapshot and not in the earlier one: exactly the rows that
  committed in between, whatever order the transactions committed in.
- ``outbox_batches``: the unfinished batches. A batch is one interval's events (or
  the part of them in a ``txid`` sub-range, when the ticker splits a big interval so
  that several workers can share it), leased by one worker at a time
  (``lease``/``leased_until``), read in chunks in (table, ctid) order; ``progress_*``
  is where the next chunk starts. A finished batch's row is deleted.
- ``outbox_retry``: events whose delivery failed, one row each (``pending`` with
  ``attempts``, ``next_attempt_at`` and ``last_error``, or ``dead``), claimed per row.
- ``outbox_event_tables``: one row per event table, how many of its pages have a BRIN
  summary (the ticker summarizes full page ranges as the table grows; TRUNCATE resets
  it to 0).

Functions (``SECURITY DEFINER``, fixed ``search_path``, schema-qualified names):
``outbox_snapshot_slot()`` (the event table the clock suggests writing to now),
``outbox_snapshot_tick(integer)`` (one ticker at a time, under an advisory lock) and
``outbox_snapshot_rotate(boolean)`` (TRUNCATE of every table whose rows are all delivered,
under ``LOCK ... NOWAIT``). ``EXECUTE`` is revoked from ``PUBLIC``.

Every step can be run again (``IF NOT EXISTS``, ``OR REPLACE``), so a database
whose version table was set back below 0006 with these objects present upgrades
again. Downgrade drops all of it; ``outbox_events`` is untouched either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: How many event tables there are (outbox_events_0 .. outbox_events_{N-1}).
EVENT_TABLES = 4
#: Seconds per slot of outbox_snapshot_slot(): the clock moves enqueue on to the next
#: table this often, so a table stops receiving rows and can be truncated.
SLOT_SECONDS = 600
#: Pages per BRIN range (1 MiB of heap, about 2,000 events of 450 bytes).
PAGES_PER_RANGE = 128
#: The advisory lock key the ticker holds for its transaction (one ticker at a time).
TICK_LOCK = 0x6F7574626F78  # "outbox"

FUNCTIONS = (
    "outbox_snapshot_slot()",
    "outbox_snapshot_tick(integer)",
    "outbox_snapshot_rotate(boolean)",
)

_EVENT_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    txid bigint NOT NULL DEFAULT txid_current(),
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    uuid uuid NOT NULL,
    event text NOT NULL,
    distinct_id text NOT NULL,
    destination text,
    dedup_key text,
    properties json NOT NULL DEFAULT '{{}}',
    CONSTRAINT {name}_properties_check CHECK (json_typeof(properties) = 'object'),
    CONSTRAINT {name}_timestamp_check
        CHECK ("timestamp" >= '1970-01-01 00:00:00+00' AND "timestamp" < '2200-01-01 00:00:00+00'),
    CONSTRAINT {name}_event_check CHECK (length(event) BETWEEN 1 AND 200),
    CONSTRAINT {name}_distinct_id_check CHECK (length(distinct_id) BETWEEN 1 AND 200),
    CONSTRAINT {name}_destination_check CHECK (destination = 'metrics')
) WITH (autovacuum_enabled = off, toast.autovacuum_enabled = off);
CREATE INDEX IF NOT EXISTS {name}_txid_idx ON {name} USING brin (txid)
    WITH (pages_per_range = {ppr}, autosummarize = off);
"""

_TABLES = """
CREATE TABLE IF NOT EXISTS outbox_ticks (
    tick_id bigint PRIMARY KEY,
    -- txid_current_snapshot() as text (read with ::txid_snapshot).
    snapshot text NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now(),
    -- Each event table's size in pages right after the snapshot was taken.
    pages bigint[] NOT NULL
);
-- The first tick's snapshot, taken inside the migration's own transaction. A
-- transaction's snapshot does not list its own id among those in progress, so once a
-- later transaction has committed, the snapshot would count the migration's own
-- transaction as finished, and rows a later migration of the same transaction writes
-- into the event tables (0007 moves the old table's events there) would belong to no
-- interval: never batched, and truncated with the table. The tick lists its own
-- transaction as in progress, as every other session's snapshot does.
INSERT INTO outbox_ticks (tick_id, snapshot, pages)
SELECT 1,
       CASE WHEN txid_visible_in_snapshot(me, snap) THEN
           least(txid_snapshot_xmin(snap), me)::text || ':' || txid_snapshot_xmax(snap)::text
           || ':' || array_to_string(ARRAY(
               SELECT x FROM txid_snapshot_xip(snap) AS x UNION SELECT me ORDER BY 1
           ), ',')
       ELSE snap::text END,
       array_fill(0::bigint, ARRAY[{n}])
FROM (SELECT txid_current_snapshot() AS snap, txid_current() AS me) AS s
ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS outbox_batches (
    batch_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_tick bigint NOT NULL,
    to_tick bigint NOT NULL,
    txid_lo bigint NOT NULL,
    txid_hi bigint NOT NULL,
    -- Transactions older than txid_lo that the earlier snapshot saw in progress and the
    -- later one sees finished (their rows are in the batch too).
    txid_extra bigint[] NOT NULL DEFAULT '{{}}',
    created_at timestamptz NOT NULL DEFAULT now(),
    leased_by text,
    lease uuid,
    leased_until timestamptz,
    progress_table integer NOT NULL DEFAULT 0,
    -- A ctid as text (read with ::tid).
    progress_ctid text NOT NULL DEFAULT '(0,0)',
    sent bigint NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS outbox_event_tables (
    table_no integer PRIMARY KEY,
    summarized_pages bigint NOT NULL DEFAULT 0,
    truncated_at timestamptz
);
INSERT INTO outbox_event_tables (table_no) SELECT generate_series(0, {n} - 1)
ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS outbox_retry (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid uuid NOT NULL,
    "timestamp" timestamptz NOT NULL,
    event text NOT NULL,
    distinct_id text NOT NULL,
    destination text,
    dedup_key text,
    properties json NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'dead')),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    lease uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_retry_due_idx ON outbox_retry (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_retry_dead_idx ON outbox_retry (created_at)
    WHERE status = 'dead';
"""


def _union(template: str) -> str:
    """``template`` (with ``{t}`` for the table number) for every event table, ORed."""
    return " OR ".join(template.format(t=t) for t in range(EVENT_TABLES))


_FUNCTIONS = f"""
CREATE OR REPLACE FUNCTION %1$I.outbox_snapshot_slot() RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT (floor(extract(epoch FROM now()) / {SLOT_SECONDS})::bigint %% {EVENT_TABLES})::integer
$fn$;

-- Take a tick if anything committed since the last one, and create the batches of the
-- interval: one, or several over disjoint txid sub-ranges when the tables grew by
-- more than about p_split_rows rows. Returns the new tick's id, or NULL (no tick:
-- nothing new, or another session is ticking).
CREATE OR REPLACE FUNCTION %1$I.outbox_snapshot_tick(p_split_rows integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET jit = off SET enable_seqscan = off SET max_parallel_workers_per_gather = 0
SET enable_tidscan = on
AS $fn$
DECLARE
    prev %1$I.outbox_ticks;
    prev_snap txid_snapshot;
    snap txid_snapshot;
    new_id bigint;
    now_pages bigint[];
    est numeric := 0;
    per_page bigint;
    extra bigint[];
    lo bigint;
    hi bigint;
    parts bigint;
    step numeric;
    i bigint;
    t integer;
    summarized bigint;
    full_pages bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock({TICK_LOCK}) THEN
        RETURN NULL;
    END IF;
    SELECT * INTO prev FROM %1$I.outbox_ticks ORDER BY tick_id DESC LIMIT 1;
    prev_snap := prev.snapshot::txid_snapshot;
    -- Anything committed (visible to this statement) that the last tick did not see?
    IF NOT ({
    _union(
        "EXISTS (SELECT 1 FROM %1$I.outbox_events_{t} AS e"
        " WHERE e.txid >= txid_snapshot_xmin(prev_snap)"
        " AND NOT txid_visible_in_snapshot(e.txid, prev_snap))"
    )
}) THEN
        RETURN NULL;
    END IF;
    snap := txid_current_snapshot();
    -- Read after the snapshot: every row of a transaction the snapshot sees as
    -- finished is on a page below these sizes.
    now_pages := ARRAY[{
    ", ".join(
        f"pg_relation_size('%1$I.outbox_events_{t}') / current_setting('block_size')::bigint"
        for t in range(EVENT_TABLES)
    )
}];
    new_id := prev.tick_id + 1;
    INSERT INTO %1$I.outbox_ticks (tick_id, snapshot, pages) VALUES (new_id, snap::text, now_pages);
    FOR t IN 0 .. {EVENT_TABLES} - 1 LOOP
        -- Rows in the pages added since the last tick (a table truncated since has
        -- regrown from 0), at as many rows a page as its last full page holds.
        IF now_pages[t + 1] > 0 THEN
            EXECUTE format('SELECT count(*) FROM %1$I.outbox_events_%%s'
                ' WHERE ctid >= $1::text::tid AND ctid < $2::text::tid', t)
                INTO per_page
                USING format('(%%s,0)', greatest(now_pages[t + 1] - 2, 0)),
                      format('(%%s,0)', greatest(now_pages[t + 1] - 1, 1));
            est := est + greatest(per_page, 1) * CASE
                WHEN now_pages[t + 1] >= prev.pages[t + 1]
                    THEN now_pages[t + 1] - prev.pages[t + 1] + 1
                ELSE now_pages[t + 1] END;
        END IF;
        -- Summarize the BRIN ranges that are full now, so that reading a batch visits
        -- only the ranges whose txids overlap it (an unsummarized range matches every
        -- query). A partial range stays unsummarized: summarizing it would make
        -- every later INSERT into it update its summary.
        SELECT summarized_pages INTO summarized
        FROM %1$I.outbox_event_tables WHERE table_no = t;
        full_pages := now_pages[t + 1] / {PAGES_PER_RANGE} * {PAGES_PER_RANGE};
        IF full_pages > summarized THEN
            i := summarized;
            WHILE i < full_pages LOOP
                PERFORM brin_summarize_range(
                    format('%1$I.outbox_events_%%s_txid_idx', t)::regclass, i);
                i := i + {PAGES_PER_RANGE};
            END LOOP;
            UPDATE %1$I.outbox_event_tables SET summarized_pages = full_pages
            WHERE table_no = t;
        END IF;
    END LOOP;
    -- The interval's transactions: those from the earlier snapshot's xmax up to the
    -- later one's (the range), and those the earlier one saw in progress that have
    -- finished since (listed, so that a long transaction anywhere on the server does
    -- not make every batch scan from its id, as a range from the earlier xmin would).
    lo := txid_snapshot_xmax(prev_snap);
    hi := txid_snapshot_xmax(snap);
    extra := ARRAY(
        SELECT x FROM txid_snapshot_xip(prev_snap) AS x
        WHERE txid_visible_in_snapshot(x, snap) ORDER BY x
    );
    parts := least(greatest(ceil(est / greatest(p_split_rows, 1)), 1), greatest(hi - lo, 1));
    step := (hi - lo)::numeric / parts;
    FOR i IN 0 .. parts - 1 LOOP
        INSERT INTO %1$I.outbox_batches (from_tick, to_tick, txid_extra, txid_lo, txid_hi)
        VALUES (prev.tick_id, new_id, CASE WHEN i = 0 THEN extra ELSE '{{}}' END,
                CASE WHEN i = 0 THEN lo ELSE lo + floor(step * i)::bigint END,
                CASE WHEN i = parts - 1 THEN hi ELSE lo + floor(step * (i + 1))::bigint END);
    END LOOP;
    RETURN new_id;
END
$fn$;

-- TRUNCATE each event table none of whose rows can still be delivered by a batch:
-- every row's transaction is visible in the snapshot of the newest tick all of whose
-- batches are finished (so it committed, or rolled back, by then, and the batches that
-- held it are done). LOCK ... NOWAIT first: while any transaction that wrote to the
-- table is open, or a worker is reading it, the table is left for the next call, and
-- no session ever waits behind this one for more than the instant of the TRUNCATE.
-- The table the clock has enqueue write to now is left alone unless p_current.
-- Returns how many tables it truncated. Also deletes the ticks no batch needs.
CREATE OR REPLACE FUNCTION %1$I.outbox_snapshot_rotate(p_current boolean) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET jit = off SET enable_seqscan = off SET max_parallel_workers_per_gather = 0
SET enable_tidscan = on
AS $fn$
DECLARE
    done_tick bigint;
    done_snap txid_snapshot;
    t integer;
    tbl text;
    busy boolean;
    undelivered text;
    n integer := 0;
BEGIN
    SELECT coalesce(
        (SELECT min(from_tick) FROM %1$I.outbox_batches),
        (SELECT max(tick_id) FROM %1$I.outbox_ticks)
    ) INTO done_tick;
    SELECT snapshot::txid_snapshot INTO done_snap FROM %1$I.outbox_ticks WHERE tick_id = done_tick;
    FOR t IN 0 .. {EVENT_TABLES} - 1 LOOP
        tbl := format('%1$I.outbox_events_%%s', t);
        CONTINUE WHEN pg_relation_size(tbl) = 0
            OR (t = %1$I.outbox_snapshot_slot() AND NOT p_current);
        -- First without the lock (most calls stop here: rows still to deliver), then
        -- again under it, when no transaction that wrote to the table is still open.
        undelivered := format(
            'SELECT EXISTS (SELECT 1 FROM %%s WHERE txid >= txid_snapshot_xmin($1)'
            ' AND NOT txid_visible_in_snapshot(txid, $1))', tbl);
        EXECUTE undelivered INTO busy USING done_snap;
        CONTINUE WHEN busy;
        BEGIN
            EXECUTE format('LOCK TABLE %%s IN ACCESS EXCLUSIVE MODE NOWAIT', tbl);
            EXECUTE undelivered INTO busy USING done_snap;
            IF NOT busy THEN
                EXECUTE format('TRUNCATE %%s', tbl);
                UPDATE %1$I.outbox_event_tables
                SET summarized_pages = 0, truncated_at = now() WHERE table_no = t;
                n := n + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
    DELETE FROM %1$I.outbox_ticks WHERE tick_id < done_tick;
    RETURN n;
END
$fn$;
"""


def upgrade() -> None:
    for t in range(EVENT_TABLES):
        op.execute(_EVENT_TABLE.format(name=f"outbox_events_{t}", ppr=PAGES_PER_RANGE))
    op.execute(_TABLES.format(n=EVENT_TABLES))
    body = _FUNCTIONS.replace("'", "''")
    op.execute(f"DO $do$ BEGIN EXECUTE format('{body}', current_schema()); END $do$")
    op.execute(f"REVOKE ALL ON FUNCTION {', '.join(FUNCTIONS)} FROM PUBLIC")


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
    for table in ("outbox_retry", "outbox_event_tables", "outbox_batches", "outbox_ticks"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
    for t in range(EVENT_TABLES):
        op.execute(f"DROP TABLE IF EXISTS outbox_events_{t}")
