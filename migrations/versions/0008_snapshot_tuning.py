"""The snapshot engine's tick and rotation stop scanning from the oldest open transaction.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

``outbox_snapshot_tick(integer)`` first asks whether anything committed that the last
tick did not see, and ``outbox_snapshot_rotate(boolean)`` whether a table holds rows
that no finished batch delivered. Both asked it as ``txid >= xmin(snapshot) AND NOT
txid_visible_in_snapshot(txid, snapshot)``: a transaction left open anywhere on the
server (another database's too: transaction ids are the server's) holds the snapshot's
xmin back, and every row from its id on was read again on every tick (measured on the
shared development server, with another session's migration open: 0.7 to 5 ms per tick,
growing with the table). The same question is now two narrow ones: rows of transactions
from the snapshot's xmax on, and rows of the transactions the snapshot saw in progress
that have finished since, found through the BRIN index by their ids' range (a
transaction still in progress has no visible rows, so it is left out of that range).
The answers are the same as before; only what is read to find them changes. The
functions keep their signatures, attributes and grants (``CREATE OR REPLACE``).

Downgrade puts back revision 0006's definitions.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Frozen copies of revision 0006's constants.
EVENT_TABLES = 4
PAGES_PER_RANGE = 128
TICK_LOCK = 0x6F7574626F78  # "outbox"


def _union(template: str) -> str:
    """``template`` (with ``{t}`` for the table number) for every event table, ORed."""
    return " OR ".join(template.format(t=t) for t in range(EVENT_TABLES))


# The ids of the transactions a snapshot saw in progress that have finished by now, in
# order (a plpgsql expression over the snapshot ``{snap}``).
_FINISHED = """ARRAY(
        SELECT x FROM txid_snapshot_xip({snap}) AS x
        WHERE txid_visible_in_snapshot(x, txid_current_snapshot()) ORDER BY x
    )"""

_FUNCTIONS = f"""
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
    finished bigint[];
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
    -- Rows of the transactions from its xmax on, or of those it saw in progress that
    -- have finished since (by their ids' range, not from its xmin: a transaction open
    -- anywhere on the server would make that every row since it began).
    finished := {_FINISHED.format(snap="prev_snap")};
    IF NOT ({
    _union(
        "EXISTS (SELECT 1 FROM %1$I.outbox_events_{t} AS e"
        " WHERE e.txid >= txid_snapshot_xmax(prev_snap))"
    )
}) AND (cardinality(finished) = 0 OR NOT ({
    _union(
        "EXISTS (SELECT 1 FROM %1$I.outbox_events_{t} AS e"
        " WHERE e.txid >= finished[1] AND e.txid <= finished[cardinality(finished)]"
        " AND e.txid = ANY(finished))"
    )
})) THEN
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
    finished bigint[];
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
        -- Rows the snapshot does not see as finished: of the transactions from its
        -- xmax on, or of those it saw in progress that have finished since (one still
        -- open has no visible rows, and holds a lock on a table it wrote to).
        -- First without the lock (most calls stop here: rows still to deliver), then
        -- again under it, when no transaction that wrote to the table is still open.
        undelivered := format(
            'SELECT EXISTS (SELECT 1 FROM %%s WHERE txid >= txid_snapshot_xmax($1))'
            ' OR EXISTS (SELECT 1 FROM %%s WHERE txid >= $2[1]'
            ' AND txid <= $2[cardinality($2)] AND txid = ANY($2))', tbl, tbl);
        finished := {_FINISHED.format(snap="done_snap")};
        EXECUTE undelivered INTO busy USING done_snap, finished;
        CONTINUE WHEN busy;
        BEGIN
            EXECUTE format('LOCK TABLE %%s IN ACCESS EXCLUSIVE MODE NOWAIT', tbl);
            finished := {_FINISHED.format(snap="done_snap")};
            EXECUTE undelivered INTO busy USING done_snap, finished;
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


def _in_schema(functions: str) -> str:
    """Run ``functions`` (``%1$I`` for the schema) in the migrating role's schema."""
    body = functions.replace("'", "''")
    return f"DO $do$ BEGIN EXECUTE format('{body}', current_schema()); END $do$"


def _revision(number: str, name: str) -> Any:
    """An earlier revision's module (file names start with a digit: not importable by
    name), for its frozen definitions."""
    path = Path(__file__).with_name(f"{number}_{name}.py")
    spec = importlib.util.spec_from_file_location(f"outbox_migration_{number}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.execute(_in_schema(_FUNCTIONS))


def downgrade() -> None:
    op.execute(_in_schema(_revision("0006", "snapshot_engine")._FUNCTIONS))
