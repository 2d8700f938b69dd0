"""The snapshot engine's tick gets cheaper and says how many events it put in a batch.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

``outbox_batches.rows_estimate`` (new, nullable): how many events the tick expected in
the batch (its estimate of the interval's rows, from the pages the event tables grew
by, shared out over the batches it split the interval into). The worker reads a batch
it expects to fit in one chunk with one statement (its rows, whole), and any other by
its positions first, as before; the estimate only chooses between the two (a batch
bigger than expected is read by positions), so an estimate that is wrong costs time,
never an event. NULL (a batch made before this revision) reads by positions.

``outbox_snapshot_tick(integer)`` does the same as revision 0008's, for less CPU
(measured with `python -m bench storage`, see docs/benchmarks.md):

- "nothing new" is known without reading a table when the server handed out no
  transaction id since the last tick, or since the last call in the same session that
  found nothing new against it, and none that snapshot saw in progress has finished
  (the snapshot's xmax is the same, its in-progress list has not shrunk); the session
  keeps that snapshot (with the tick and the schema's ``outbox_ticks``) in a setting of
  its own, ``outbox.tick_checked``, not in a table
  (a write would hand out a transaction id, and the next call could not tell);
- else the last page of each event table is looked at first (a TID range scan): the
  newest events are there, and one found there answers "anything new?" without the
  scan of the table's unsummarized BRIN range;
- the plans of its statements are generic and cached for the session (``plan_cache_mode
  = force_generic_plan``: they were planned again on every call), and the statements
  that were built as text and planned on every call (the rows of a page, the BRIN
  summary of a range) are written out for each event table.

Its signature, attributes and grants stay (``CREATE OR REPLACE``); the rotation is
unchanged.

Two functions (``SECURITY DEFINER``, fixed ``search_path``, ``EXECUTE`` revoked from
``PUBLIC``) take the worker's writes to ``outbox_dedup_keys``, so that its role needs
no right on that table: ``outbox_start_dedup_window(text[], double precision)`` (the
delivered events' keys are held for that many seconds more) and
``outbox_free_dedup_keys(text[])`` (the keys of purged dead events). Every role that
may UPDATE or DELETE in ``outbox_dedup_keys`` (the worker's, with the grants
documented before) is granted ``EXECUTE`` on both, so a worker keeps working across the
upgrade; its rights on the table can then be revoked.

Adding a nullable column without a default takes an instant's ACCESS EXCLUSIVE lock
on ``outbox_batches`` (under the migration's lock timeout and retries), and no rewrite.
A worker of this version refuses to start before this revision; one of an older
version goes on working after it (it neither reads nor writes the column).

Downgrade drops the two functions, puts revision 0008's tick back and drops the column.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Frozen copies of revision 0006's constants.
EVENT_TABLES = 4
PAGES_PER_RANGE = 128
TICK_LOCK = 0x6F7574626F78  # "outbox"


def _union(template: str) -> str:
    """``template`` (with ``{t}`` for the table number) for every event table, ORed."""
    return " OR ".join(template.format(t=t) for t in range(EVENT_TABLES))


def _each(template: str) -> str:
    """``template`` (with ``{t}`` for the table number) once for every event table."""
    return "\n".join(template.format(t=t, ppr=PAGES_PER_RANGE) for t in range(EVENT_TABLES))


#: A row committed since the last tick (``prev_xmax``) and before this one (``snap``).
_NEW = (
    "e.txid >= prev_xmax AND e.txid < txid_snapshot_xmax(snap)"
    " AND txid_visible_in_snapshot(e.txid, snap)"
)

_PAGES = ", ".join(
    f"pg_relation_size('%1$I.outbox_events_{t}'::regclass) / current_setting('block_size')::bigint"
    for t in range(EVENT_TABLES)
)

_LOOK = (
    """    IF NOT found AND now_pages[{t} + 1] > 0 THEN
        found := EXISTS (SELECT 1 FROM %1$I.outbox_events_{t} AS e
            WHERE e.ctid >= format('(%%s,0)', now_pages[{t} + 1] - 1)::tid AND """
    + _NEW
    + """);
    END IF;"""
)

_TABLE = """    pages := now_pages[{t} + 1];
    IF pages > 0 THEN
        -- The rows of the table's last full page, for the estimate.
        SELECT count(*) INTO per_page FROM %1$I.outbox_events_{t}
        WHERE ctid >= format('(%%s,0)', greatest(pages - 2, 0))::tid
          AND ctid < format('(%%s,0)', greatest(pages - 1, 1))::tid;
        added := CASE WHEN pages >= prev.pages[{t} + 1]
                      THEN pages - prev.pages[{t} + 1] + 1 ELSE pages END;
        est := est + greatest(per_page, 1) * added;
        -- Summarize the BRIN ranges that are full now, so that reading a batch visits
        -- only the ranges whose txids overlap it (an unsummarized range matches every
        -- query). A partial range stays unsummarized: summarizing it would make
        -- every later INSERT into it update its summary.
        full_pages := pages / {ppr} * {ppr};
        IF full_pages > summarized[{t} + 1] THEN
            i := summarized[{t} + 1];
            WHILE i < full_pages LOOP
                PERFORM brin_summarize_range('%1$I.outbox_events_{t}_txid_idx'::regclass, i);
                i := i + {ppr};
            END LOOP;
            UPDATE %1$I.outbox_event_tables SET summarized_pages = full_pages
            WHERE table_no = {t};
        END IF;
    END IF;"""

_FUNCTIONS = f"""
-- Take a tick if anything committed since the last one, and create the batches of the
-- interval: one, or several over disjoint txid sub-ranges when the tables grew by
-- more than about p_split_rows rows, each with the rows it is expected to hold.
-- Returns the new tick's id, or NULL (no tick: nothing new, or another session is
-- ticking).
CREATE OR REPLACE FUNCTION %1$I.outbox_snapshot_tick(p_split_rows integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET jit = off SET enable_seqscan = off SET max_parallel_workers_per_gather = 0
SET enable_tidscan = on SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    prev %1$I.outbox_ticks;
    prev_snap txid_snapshot;
    prev_xmax bigint;
    checked text;
    checked_snap txid_snapshot;
    found boolean := false;
    snap txid_snapshot;
    new_id bigint;
    now_pages bigint[];
    summarized bigint[];
    est numeric := 0;
    per_page bigint;
    added bigint;
    pages bigint;
    full_pages bigint;
    extra bigint[];
    lo bigint;
    hi bigint;
    parts bigint;
    step numeric;
    i bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock({TICK_LOCK}) THEN
        RETURN NULL;
    END IF;
    SELECT * INTO prev FROM %1$I.outbox_ticks ORDER BY tick_id DESC LIMIT 1;
    prev_snap := prev.snapshot::txid_snapshot;
    prev_xmax := txid_snapshot_xmax(prev_snap);
    snap := txid_current_snapshot();
    -- The older transactions of the interval: those the last tick saw in progress that
    -- have finished since (listed, so that a long transaction anywhere on the server does
    -- not make every batch scan from its id, as a range from the earlier xmin would).
    extra := ARRAY(
        SELECT x FROM txid_snapshot_xip(prev_snap) AS x
        WHERE txid_visible_in_snapshot(x, snap) ORDER BY x
    );
    -- Nothing can have committed since a snapshot when no transaction id was handed out
    -- since (a transaction that commits moves xmax past its id) and none that it saw in
    -- progress has finished: the last tick's, or the last one this session found
    -- nothing new against (kept for the session, with the tick it was compared to).
    IF txid_snapshot_xmax(snap) = prev_xmax AND cardinality(extra) = 0 THEN
        RETURN NULL;
    END IF;
    -- "<outbox_ticks' oid>/<tick id>/<snapshot>": the oid tells this schema's ticks from
    -- those of another outbox schema the same session may tick.
    checked := current_setting('outbox.tick_checked', true);
    IF split_part(checked, '/', 1) = '%1$I.outbox_ticks'::regclass::oid::text
        AND split_part(checked, '/', 2) = prev.tick_id::text THEN
        checked_snap := split_part(checked, '/', 3)::txid_snapshot;
        IF txid_snapshot_xmax(snap) = txid_snapshot_xmax(checked_snap) AND NOT EXISTS (
            SELECT 1 FROM txid_snapshot_xip(checked_snap) AS x
            WHERE txid_visible_in_snapshot(x, snap)
        ) THEN
            RETURN NULL;
        END IF;
    END IF;
    -- Read after the snapshot: every row of a transaction the snapshot sees as
    -- finished is on a page below these sizes.
    now_pages := ARRAY[{_PAGES}];
    -- Anything committed that the last tick did not see? First on each table's last
    -- page, where the newest events are (one statement per table that has pages: an
    -- expression holding every test would set up every scan on every call); then rows
    -- of the transactions from the last tick's xmax on, or of those it saw in progress
    -- that have finished since (by their ids' range, not from its xmin: a transaction
    -- open anywhere on the server would make that every row since it began).
{_each(_LOOK)}
    IF NOT found THEN  -- (nested: the tests below are set up only when they run)
        IF NOT ({_union("EXISTS (SELECT 1 FROM %1$I.outbox_events_{t} AS e WHERE " + _NEW + ")")})
            AND (cardinality(extra) = 0 OR NOT ({
    _union(
        "EXISTS (SELECT 1 FROM %1$I.outbox_events_{t} AS e"
        " WHERE e.txid >= extra[1] AND e.txid <= extra[cardinality(extra)]"
        " AND e.txid = ANY(extra))"
    )
})) THEN
            PERFORM set_config('outbox.tick_checked', '%1$I.outbox_ticks'::regclass::oid
                || '/' || prev.tick_id || '/' || snap::text, false);
            RETURN NULL;
        END IF;
    END IF;
    new_id := prev.tick_id + 1;
    INSERT INTO %1$I.outbox_ticks (tick_id, snapshot, pages) VALUES (new_id, snap::text, now_pages);
    summarized := ARRAY(
        SELECT summarized_pages FROM %1$I.outbox_event_tables ORDER BY table_no
    );
    -- Rows in the pages added since the last tick (a table truncated since has regrown
    -- from 0), at as many rows a page as its last full page holds.
{_each(_TABLE)}
    -- The interval's transactions: those from the earlier snapshot's xmax up to the
    -- later one's (the range), and the listed older ones.
    lo := prev_xmax;
    hi := txid_snapshot_xmax(snap);
    parts := least(greatest(ceil(est / greatest(p_split_rows, 1)), 1), greatest(hi - lo, 1));
    step := (hi - lo)::numeric / parts;
    FOR i IN 0 .. parts - 1 LOOP
        INSERT INTO %1$I.outbox_batches
            (from_tick, to_tick, txid_extra, txid_lo, txid_hi, rows_estimate)
        VALUES (prev.tick_id, new_id, CASE WHEN i = 0 THEN extra ELSE '{{}}' END,
                CASE WHEN i = 0 THEN lo ELSE lo + floor(step * i)::bigint END,
                CASE WHEN i = parts - 1 THEN hi ELSE lo + floor(step * (i + 1))::bigint END,
                ceil(est / parts)::bigint);
    END LOOP;
    RETURN new_id;
END
$fn$;
"""


#: The functions that write the worker's dedup keys (see the module's text).
DEDUP_FUNCTIONS = (
    "outbox_start_dedup_window(text[], double precision)",
    "outbox_free_dedup_keys(text[])",
)

_DEDUP = """
-- Start the dedup window of delivered events' keys: each is held p_window seconds from
-- now on (it was held for good while its event was undelivered). Returns how many.
CREATE OR REPLACE FUNCTION %1$I.outbox_start_dedup_window(
    p_keys text[], p_window double precision
) RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH k AS (
        UPDATE %1$I.outbox_dedup_keys SET expires_at = now() + p_window * interval '1 second'
        WHERE dedup_key = ANY(p_keys)
        RETURNING 1
    )
    SELECT count(*)::integer FROM k
$fn$;

-- Free the keys of purged dead events. Returns how many.
CREATE OR REPLACE FUNCTION %1$I.outbox_free_dedup_keys(p_keys text[]) RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH k AS (
        DELETE FROM %1$I.outbox_dedup_keys WHERE dedup_key = ANY(p_keys) RETURNING 1
    )
    SELECT count(*)::integer FROM k
$fn$;
"""

# Every role (but the owner; PUBLIC too) that may UPDATE or DELETE in outbox_dedup_keys
# is a worker: it gets EXECUTE on the functions that now do its writes there.
_DEDUP_GRANTS = f"""
DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                             ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS who
        FROM pg_class AS c, aclexplode(c.relacl) AS a
        WHERE c.oid = 'outbox_dedup_keys'::regclass
          AND a.privilege_type IN ('UPDATE', 'DELETE') AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION {", ".join(DEDUP_FUNCTIONS)} TO %s', r.who);
    END LOOP;
END
$do$
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
    op.execute("ALTER TABLE outbox_batches ADD COLUMN IF NOT EXISTS rows_estimate bigint")
    op.execute(_in_schema(_FUNCTIONS))
    op.execute(_in_schema(_DEDUP))
    op.execute(f"REVOKE ALL ON FUNCTION {', '.join(DEDUP_FUNCTIONS)} FROM PUBLIC")
    op.execute(_DEDUP_GRANTS)


def downgrade() -> None:
    for function in DEDUP_FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
    # 0008's definitions of the tick and the rotation (the rotation is the same).
    op.execute(_in_schema(_revision("0008", "snapshot_tuning")._FUNCTIONS))
    op.execute("ALTER TABLE outbox_batches DROP COLUMN IF EXISTS rows_estimate")
