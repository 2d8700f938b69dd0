"""Cut over to the snapshot engine: the old table's events move, outbox_events becomes a view.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Stop every worker of an older version before applying it (they read and delete rows
of the table this revision drops; a batch one of them holds open keeps the table
locked, and the migration waits at most its ``lock_timeout`` for it, then tries again).
The application may keep enqueueing, even on a version from before this one: its
INSERTs wait for the move, and once it commits they land in the snapshot engine's
tables (the enqueue functions are redefined in the same transaction, and an INSERT
into ``outbox_events`` goes through the view's trigger, see below).

In one transaction, under ``ACCESS EXCLUSIVE`` on the old ``outbox_events`` (so that
no event is written to it after the copy):

- Every row of the old table moves. A ``pending`` row never tried and due now goes
  into the event table of ``outbox_snapshot_slot()``, in ``id`` order (uuid, event,
  distinct_id, properties as ``json`` text, ``timestamp``, ``destination``, NULL for
  ``posthog``, and ``dedup_key``); its transaction is this migration's, so the first
  tick after the commit puts it in a batch. A ``pending`` row already tried, or not due
  yet, and every ``dead`` row go into ``outbox_retry`` with their ``status``,
  ``attempts``, ``next_attempt_at``, ``last_error`` and ``created_at``. A pending row
  the event tables' CHECKs would refuse (``properties`` not an object, a timestamp out
  of range, an empty or over-long name) goes into ``outbox_retry`` as ``dead``, with a
  ``last_error`` saying why (found by migration 0007): no row is lost and no row makes
  the migration fail. ``outbox_dedup_keys`` is left as it is (the keys of undelivered
  events stay held).
- The old table goes, with its indexes and constraints, the old ``outbox_stuck`` view
  and the functions only it used (``outbox_ack``, ``outbox_purge_dead``). Kept:
  ``outbox_expire_dedup_keys`` and the keyed enqueue functions, redefined with the same
  signatures and results to insert into the event table of ``outbox_snapshot_slot()``.
- ``outbox_events`` is now a VIEW of every event not delivered yet (see
  :data:`EVENTS_VIEW`), and ``outbox_stuck`` is redefined over the new tables with the
  same columns and meaning. An INSERT into the view (``enqueue``'s plain INSERT before
  this version: an application not redeployed yet keeps enqueueing across the
  upgrade) writes a new event into the clock's event table (an INSTEAD OF trigger,
  ``outbox_events_insert()``); one that sets ``retry_id``, ``status``, ``attempts``,
  ``next_attempt_at``, ``last_error`` or ``txid`` is refused in one line.
- Grants carry over. A role that could INSERT into the old table (the whole table or
  some columns) may INSERT ``uuid, event, distinct_id, properties, "timestamp",
  destination`` into every event table and EXECUTE ``outbox_snapshot_slot()``; one
  that could SELECT from it may SELECT from the view (and one that could INSERT may
  INSERT those columns into the view); one that could UPDATE or DELETE
  in it (the worker) gets what the snapshot engine's worker does: SELECT on the event
  tables, ``outbox_ticks`` and ``outbox_event_tables``, SELECT, UPDATE, DELETE on
  ``outbox_batches``, SELECT, INSERT, UPDATE, DELETE on ``outbox_retry``, SELECT,
  UPDATE, DELETE on ``outbox_dedup_keys``, and EXECUTE on the tick, rotate and slot
  functions and ``outbox_expire_dedup_keys``. SELECT on the old ``outbox_stuck`` carries
  over to the new one.

Downgrade recreates the old table as it stood at revision 0006 (constraints, indexes,
functions and view of revisions 0001 to 0004) and moves every undelivered event back
(``pending``, never tried, for the event tables' rows; ``outbox_retry``'s rows as they
are), keeping the first of several copies of one uuid; then the snapshot tables are
emptied. Grants on the event tables and ``outbox_retry`` carry back to the old table.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: How many event tables migration 0006 made (frozen here).
EVENT_TABLES = 4
#: The timestamp bounds of the event tables' CHECK (migration 0006).
TIMESTAMP_MIN = "1970-01-01 00:00:00+00"
TIMESTAMP_BEFORE = "2200-01-01 00:00:00+00"
MAX_NAME_LENGTH = 200
#: What a pending row of the old table must be to enter an event table.
_INSERTABLE_COLUMNS = 'uuid, event, distinct_id, properties, "timestamp", destination'

ENQUEUE_FUNCTIONS = (
    "outbox_enqueue_keyed(uuid, text, text, jsonb, text, timestamp with time zone, text)",
    "outbox_enqueue_keyed_rows(jsonb)",
)
OLD_WORKER_FUNCTIONS = (
    "outbox_ack(bigint[], double precision)",
    "outbox_purge_dead(double precision)",
)
WORKER_FUNCTIONS = (
    "outbox_snapshot_tick(integer)",
    "outbox_snapshot_rotate(boolean)",
    "outbox_snapshot_slot()",
    "outbox_expire_dedup_keys(integer)",
)
#: What the snapshot engine's worker role needs, table by table.
WORKER_TABLE_GRANTS = (
    *((f"outbox_events_{t}", "SELECT") for t in range(EVENT_TABLES)),
    ("outbox_ticks", "SELECT"),
    ("outbox_event_tables", "SELECT"),
    ("outbox_batches", "SELECT, UPDATE, DELETE"),
    ("outbox_retry", "SELECT, INSERT, UPDATE, DELETE"),
    ("outbox_dedup_keys", "SELECT, UPDATE, DELETE"),
)


# -- the view ----------------------------------------------------------------------------

_EVENT_COLUMNS = """NULL::bigint AS retry_id, e.uuid, e.event, e.distinct_id, e.properties,
    e."timestamp", coalesce(e.destination, 'posthog') AS destination, e.dedup_key,
    'pending'::text AS status, 0 AS attempts, NULL::timestamptz AS next_attempt_at,
    NULL::text AS last_error, e.txid"""

_RETRY_COLUMNS = """r.id AS retry_id, r.uuid, r.event, r.distinct_id, r.properties,
    r."timestamp", coalesce(r.destination, 'posthog') AS destination, r.dedup_key,
    r.status, r.attempts, r.next_attempt_at, r.last_error, NULL::bigint AS txid"""


def _undelivered(t: int, columns: str, since: str = "") -> str:
    """The rows of event table ``t`` not delivered yet: those of an unfinished batch
    after its progress (the batch's membership test is the engine's read's), and those
    the newest tick's snapshot does not see as finished (committed since, or still in
    progress: a session sees its own uncommitted events). ``since`` adds the taken_at
    of the tick before the row's interval as that column."""
    in_batch = f", t1.taken_at AS {since}" if since else ""
    in_none = f", last.taken_at AS {since}" if since else ""
    return f"""
SELECT {columns}{in_batch}
FROM outbox_batches AS b
JOIN outbox_ticks AS t1 ON t1.tick_id = b.from_tick
JOIN outbox_ticks AS t2 ON t2.tick_id = b.to_tick
JOIN outbox_events_{t} AS e ON (
    (e.txid >= b.txid_lo AND e.txid < b.txid_hi
     AND txid_visible_in_snapshot(e.txid, t2.snapshot::txid_snapshot)
     AND NOT txid_visible_in_snapshot(e.txid, t1.snapshot::txid_snapshot))
    OR e.txid = ANY(b.txid_extra))
WHERE b.progress_table < {t} OR (b.progress_table = {t} AND e.ctid > b.progress_ctid::tid)
UNION ALL
SELECT {columns}{in_none}
FROM (SELECT snapshot::txid_snapshot AS s, taken_at FROM outbox_ticks
      ORDER BY tick_id DESC LIMIT 1) AS last
JOIN outbox_events_{t} AS e
  ON e.txid >= txid_snapshot_xmin(last.s) AND NOT txid_visible_in_snapshot(e.txid, last.s)"""


#: Every event not delivered yet, one row each: the event tables' rows no finished
#: batch took (``retry_id`` NULL, ``status`` pending, ``attempts`` 0, no
#: ``next_attempt_at``/``last_error``, ``txid`` the inserting transaction), then
#: ``outbox_retry``'s rows (``retry_id`` its id, ``txid`` NULL). ``destination`` is
#: ``posthog`` or ``metrics``, never NULL.
EVENTS_VIEW = (
    "CREATE VIEW {name} AS"
    + " UNION ALL ".join(_undelivered(t, _EVENT_COLUMNS) for t in range(EVENT_TABLES))
    + f"\nUNION ALL\nSELECT {_RETRY_COLUMNS}\nFROM outbox_retry AS r"
)

_STUCK_EVENT_COLUMNS = """NULL::bigint AS id, e.uuid, e.event, e.distinct_id,
    'pending'::text AS status, 0 AS attempts, NULL::text AS last_error,
    NULL::timestamptz AS next_attempt_at, e."timestamp\""""

# An event table row records no creation time. Its created_at here is the later of its
# "timestamp" (enqueue's now() unless the caller gave one) and the time of the tick
# before its interval (it committed after that tick, unless the tick saw its
# transaction in progress): never earlier than the event was enqueued for enqueue's
# own timestamps, and the same value before and after a tick takes the row.
STUCK_VIEW = (
    """
CREATE VIEW {name} AS
SELECT
    id,
    uuid,
    event,
    distinct_id,
    status,
    attempts,
    CASE
        WHEN status = 'dead'
            THEN 'dead after ' || attempts || ' attempts: ' || coalesce(last_error, '?')
        WHEN attempts > 0
            THEN 'retrying after ' || attempts || ' failed attempts: ' || coalesce(last_error, '?')
        WHEN next_attempt_at > now()
            THEN 'held back until ' || next_attempt_at || ': ' || coalesce(last_error, '?')
        ELSE 'pending for over 5 minutes: is an outbox-worker running against this database? '
             || '(outbox-worker status lists the batches in flight)'
    END AS reason,
    last_error,
    now() - created_at AS age,
    created_at,
    next_attempt_at
FROM (
    SELECT id, uuid, event, distinct_id, status, attempts, last_error, next_attempt_at,
           greatest("timestamp", since) AS created_at
    FROM ("""
    + " UNION ALL ".join(
        _undelivered(t, _STUCK_EVENT_COLUMNS, since="since") for t in range(EVENT_TABLES)
    )
    + """
    ) AS events
    UNION ALL
    SELECT id, uuid, event, distinct_id, status, attempts, last_error, next_attempt_at,
           created_at
    FROM outbox_retry
) AS u
WHERE status = 'dead'
   OR attempts > 0
   OR created_at < now() - interval '5 minutes'
"""
)


# -- the keyed enqueue functions -----------------------------------------------------------


def _by_slot(statement: str) -> str:
    """``statement`` (with ``{t}`` for the table number) for the event table of the
    slot in ``slot``, static SQL in one IF branch per table."""
    branches = [
        ("IF" if t == 0 else "ELSIF") + f" slot = {t} THEN\n" + statement.format(t=t)
        for t in range(EVENT_TABLES)
    ]
    return "\n".join(branches) + "\n    END IF;"


_KEYED_INSERT = """
        INSERT INTO %1$I.outbox_events_{t}
            (uuid, event, distinct_id, properties, "timestamp", dedup_key, destination)
        VALUES (p_uuid, p_event, p_distinct_id, p_properties::json,
                coalesce(p_timestamp, now()), p_dedup_key, nullif(p_destination, 'posthog'));"""

# An INSERT into the view (what enqueue did before 0007: an application still on an
# older version keeps enqueueing across the upgrade), into the clock's event table.
# The dedup_key is kept: no application role may set it (its grant names the other
# columns), but a keyed enqueue function of before 0007 whose call waited for the
# migration's lock inserts its event here, after claiming the key.
_VIEW_INSERT = """
        INSERT INTO %1$I.outbox_events_{t}
            (uuid, event, distinct_id, properties, "timestamp", destination, dedup_key)
        VALUES (NEW.uuid, NEW.event, NEW.distinct_id, coalesce(NEW.properties, '{{}}'),
                coalesce(NEW."timestamp", now()), nullif(NEW.destination, 'posthog'),
                NEW.dedup_key);"""

_ROWS_QUERY = """
        RETURN QUERY
        WITH input AS (
            SELECT * FROM ROWS FROM (
                jsonb_to_recordset(p_rows)
                    AS (d text, e text, k text, p jsonb, s text, t timestamptz, u uuid)
            ) WITH ORDINALITY
                AS r(distinct_id, event, dedup_key, properties, destination, "timestamp",
                     uuid, n)
        ), claimed_keys AS (
            INSERT INTO %1$I.outbox_dedup_keys AS k (dedup_key, expires_at)
            SELECT i.dedup_key, 'infinity' FROM input AS i WHERE i.dedup_key IS NOT NULL
            ON CONFLICT (dedup_key) DO UPDATE SET expires_at = 'infinity'
                WHERE k.expires_at <= now()
            RETURNING k.dedup_key
        ), inserted AS (
            INSERT INTO %1$I.outbox_events_{t}
                (uuid, event, distinct_id, properties, "timestamp", dedup_key, destination)
            SELECT i.uuid, i.event, i.distinct_id, i.properties::json,
                   coalesce(i."timestamp", now()), i.dedup_key,
                   nullif(i.destination, 'posthog')
            FROM input AS i
            WHERE i.dedup_key IS NULL
               OR i.dedup_key IN (SELECT c.dedup_key FROM claimed_keys AS c)
            ORDER BY i.n
        )
        SELECT c.dedup_key FROM claimed_keys AS c;"""

_FUNCTIONS = f"""
CREATE OR REPLACE FUNCTION %1$I.outbox_enqueue_keyed(
    p_uuid uuid, p_event text, p_distinct_id text, p_properties jsonb,
    p_destination text, p_timestamp timestamptz, p_dedup_key text
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    claimed text;
    slot integer;
BEGIN
    IF p_dedup_key IS NOT NULL THEN
        INSERT INTO %1$I.outbox_dedup_keys AS k (dedup_key, expires_at)
        VALUES (p_dedup_key, 'infinity')
        ON CONFLICT (dedup_key) DO UPDATE SET expires_at = 'infinity'
            WHERE k.expires_at <= now()
        RETURNING k.dedup_key INTO claimed;
        IF claimed IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;
    slot := %1$I.outbox_snapshot_slot();
    {_by_slot(_KEYED_INSERT)}
    RETURN claimed;
END
$fn$;

CREATE OR REPLACE FUNCTION %1$I.outbox_events_insert() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    slot integer;
BEGIN
    IF NEW.retry_id IS NOT NULL OR NEW.status IS NOT NULL OR NEW.attempts IS NOT NULL
       OR NEW.next_attempt_at IS NOT NULL OR NEW.last_error IS NOT NULL
       OR NEW.txid IS NOT NULL THEN
        RAISE EXCEPTION 'outbox_events is a view: INSERT writes only uuid, event, '
            'distinct_id, properties, timestamp and destination (a new pending event)'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    slot := %1$I.outbox_snapshot_slot();
    {_by_slot(_VIEW_INSERT)}
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE FUNCTION %1$I.outbox_enqueue_keyed_rows(p_rows jsonb)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    slot integer := %1$I.outbox_snapshot_slot();
BEGIN
    {_by_slot(_ROWS_QUERY)}
END
$fn$;
"""


def _in_schema(functions: str) -> str:
    """Run ``functions`` (``%1$I`` for the schema) in the migrating role's schema."""
    body = functions.replace("'", "''")
    return f"DO $do$ BEGIN EXECUTE format('{body}', current_schema()); END $do$"


# -- the move ------------------------------------------------------------------------------


def _name_problem(column: str) -> str:
    value = f"o.{column}"
    return (
        f"WHEN length({value}) > {MAX_NAME_LENGTH} THEN '{column}: is ' || length({value})"
        f" || ' characters long, over the {MAX_NAME_LENGTH} limit'"
        f" WHEN length({value}) = 0 THEN '{column}: is empty'"
    )


#: Why a pending row of the old table cannot enter an event table, or NULL.
PROBLEM = f"""CASE
        WHEN jsonb_typeof(o.properties) <> 'object'
            THEN 'properties: is a JSON ' || jsonb_typeof(o.properties) || ', not an object'
        WHEN NOT isfinite(o."timestamp")
            THEN 'timestamp: ' || o."timestamp"::text || ' is not a finite time'
        WHEN o."timestamp" < '{TIMESTAMP_MIN}'
            THEN 'timestamp: ' || (o."timestamp" AT TIME ZONE 'UTC')::text
                 || ' UTC is before 1970-01-01T00:00:00Z'
        WHEN o."timestamp" >= '{TIMESTAMP_BEFORE}'
            THEN 'timestamp: ' || (o."timestamp" AT TIME ZONE 'UTC')::text
                 || ' UTC is more than 23 hours ahead of the database''s clock'
        {_name_problem("event")}
        {_name_problem("distinct_id")}
        WHEN o.destination NOT IN ('posthog', 'metrics')
            THEN 'destination: ' || o.destination || ' is neither posthog nor metrics'
    END"""

# Each old row's problem (NULL: none), joined in by both moves.
_PROBLEMS = f"""(SELECT o.id, CASE WHEN o.status = 'pending' THEN {PROBLEM} END AS problem
       FROM outbox_events AS o) AS p"""

# Pending, never tried, due, nothing wrong: into the clock's event table, in id order.
MOVE_FRESH = f"""
DO $do$
BEGIN
    EXECUTE format($q$
        INSERT INTO %I.outbox_events_%s
            (uuid, event, distinct_id, properties, "timestamp", destination, dedup_key)
        SELECT o.uuid, o.event, o.distinct_id, o.properties::text::json, o."timestamp",
               nullif(o.destination, 'posthog'), o.dedup_key
        FROM outbox_events AS o JOIN {_PROBLEMS} ON p.id = o.id
        WHERE o.status = 'pending' AND o.attempts = 0 AND o.next_attempt_at <= now()
          AND p.problem IS NULL
        ORDER BY o.id
    $q$, current_schema(), outbox_snapshot_slot());
END
$do$
"""

# The rest: retrying, deferred and dead rows as they are; broken pending rows dead.
MOVE_REST = f"""
INSERT INTO outbox_retry (uuid, "timestamp", event, distinct_id, destination, dedup_key,
    properties, status, attempts, next_attempt_at, last_error, created_at)
SELECT o.uuid, o."timestamp", o.event, o.distinct_id, nullif(o.destination, 'posthog'),
       o.dedup_key, o.properties::text::json,
       CASE WHEN p.problem IS NULL THEN o.status ELSE 'dead' END,
       o.attempts,
       CASE WHEN isfinite(o.next_attempt_at) THEN o.next_attempt_at ELSE now() END,
       CASE WHEN p.problem IS NULL THEN o.last_error
            ELSE p.problem || ' (found by migration 0007)' END,
       o.created_at
FROM outbox_events AS o JOIN {_PROBLEMS} ON p.id = o.id
WHERE NOT (o.status = 'pending' AND o.attempts = 0 AND o.next_attempt_at <= now()
           AND p.problem IS NULL)
ORDER BY o.id
"""


# -- grants --------------------------------------------------------------------------------


def _holders(relation: str, privileges: Sequence[str]) -> str:
    """SQL for the roles (other than the owner; 0 for PUBLIC) holding one of
    ``privileges`` on ``relation`` as a whole or on any of its columns."""
    wanted = ", ".join(f"'{p}'" for p in privileges)
    return f"""
        SELECT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
        WHERE c.oid = '{relation}'::regclass AND a.privilege_type IN ({wanted})
          AND a.grantee <> c.relowner
        UNION
        SELECT a.grantee FROM pg_class AS c JOIN pg_attribute AS att ON att.attrelid = c.oid,
            aclexplode(att.attacl) AS a
        WHERE c.oid = '{relation}'::regclass AND a.privilege_type IN ({wanted})
          AND a.grantee <> c.relowner"""


def _carry(relation: str, privileges: Sequence[str], grants: Sequence[str]) -> str:
    """A DO block: each of ``grants`` (``GRANT ... TO %s``) to every holder of one of
    ``privileges`` on ``relation``."""
    statements = "\n".join(
        f"        EXECUTE format('{g.replace(chr(39), chr(39) * 2)}', r.who);" for g in grants
    )
    return f"""
DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT CASE WHEN h.grantee = 0 THEN 'PUBLIC'
                    ELSE quote_ident(pg_get_userbyid(h.grantee)) END AS who
        FROM ({_holders(relation, privileges)}) AS h
    LOOP
{statements}
    END LOOP;
END
$do$
"""


def _upgrade_grants() -> list[str]:
    app = [
        f"GRANT INSERT ({_INSERTABLE_COLUMNS}) ON outbox_events_{t} TO %s"
        for t in range(EVENT_TABLES)
    ]
    app.append("GRANT EXECUTE ON FUNCTION outbox_snapshot_slot() TO %s")
    worker = [f"GRANT {rights} ON {table} TO %s" for table, rights in WORKER_TABLE_GRANTS]
    worker.append(f"GRANT EXECUTE ON FUNCTION {', '.join(WORKER_FUNCTIONS)} TO %s")
    return [
        _carry("outbox_events", ("INSERT",), app),
        _carry("outbox_events", ("UPDATE", "DELETE"), worker),
        _carry("outbox_events", ("SELECT",), ["GRANT SELECT ON outbox_events_0007 TO %s"]),
        _carry(
            "outbox_events",
            ("INSERT",),
            [f"GRANT INSERT ({_INSERTABLE_COLUMNS}) ON outbox_events_0007 TO %s"],
        ),
        _carry("outbox_stuck", ("SELECT",), ["GRANT SELECT ON outbox_stuck_0007 TO %s"]),
    ]


def upgrade() -> None:
    # Nothing may be written to the old table after the copy: take its lock first (a
    # batch an old worker holds makes this wait, at most lock_timeout).
    op.execute("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE")
    op.execute(MOVE_FRESH)
    op.execute(MOVE_REST)
    # The views are made under other names, given the old objects' grants, and renamed
    # once the old ones are gone.
    op.execute(EVENTS_VIEW.format(name="outbox_events_0007"))
    op.execute(STUCK_VIEW.format(name="outbox_stuck_0007"))
    for statement in _upgrade_grants():
        op.execute(statement)
    op.execute("DROP VIEW outbox_stuck")
    op.execute(f"DROP FUNCTION {', '.join(OLD_WORKER_FUNCTIONS)}")
    op.execute("DROP TABLE outbox_events")
    op.execute("ALTER VIEW outbox_events_0007 RENAME TO outbox_events")
    op.execute("ALTER VIEW outbox_stuck_0007 RENAME TO outbox_stuck")
    op.execute(_in_schema(_FUNCTIONS))
    op.execute("REVOKE ALL ON FUNCTION outbox_events_insert() FROM PUBLIC")
    op.execute(
        "CREATE TRIGGER outbox_events_insert INSTEAD OF INSERT ON outbox_events"
        " FOR EACH ROW EXECUTE FUNCTION outbox_events_insert()"
    )


# -- downgrade -----------------------------------------------------------------------------

_OLD_TABLE = """
CREATE TABLE outbox_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid uuid NOT NULL,
    event text NOT NULL,
    distinct_id text NOT NULL,
    properties jsonb NOT NULL DEFAULT '{}'::jsonb,
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    dedup_key text,
    status text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    destination text NOT NULL DEFAULT 'posthog',
    CONSTRAINT outbox_events_status_check CHECK (status IN ('pending', 'dead')),
    CONSTRAINT outbox_events_attempts_check CHECK (attempts >= 0),
    CONSTRAINT outbox_events_uuid_key UNIQUE (uuid),
    CONSTRAINT outbox_events_destination_check CHECK (destination IN ('posthog', 'metrics'))
);
CREATE INDEX outbox_events_due_idx ON outbox_events (next_attempt_at, id)
    WHERE status = 'pending';
CREATE INDEX outbox_events_dead_idx ON outbox_events (created_at) WHERE status = 'dead';
"""

_BACK_EVENT_COLUMNS = _EVENT_COLUMNS + ", 0 AS kind, {t} AS table_no, e.ctid AS c"


def _move_back() -> str:
    """Every undelivered event into outbox_events_0006: the event tables' rows in
    (table, ctid) order, then outbox_retry's in id order, the first copy of a uuid."""
    events = " UNION ALL ".join(
        _undelivered(t, _BACK_EVENT_COLUMNS.format(t=t), since="since") for t in range(EVENT_TABLES)
    )
    return f"""
INSERT INTO outbox_events_0006 (uuid, event, distinct_id, properties, "timestamp", dedup_key,
    status, attempts, next_attempt_at, last_error, created_at, destination)
SELECT uuid, event, distinct_id, properties::text::jsonb, "timestamp", dedup_key,
       status, attempts, coalesce(next_attempt_at, now()), last_error, created_at,
       destination
FROM (
    SELECT u.*, row_number() OVER (
        PARTITION BY u.uuid ORDER BY u.kind, u.table_no, u.c, u.retry_id) AS copy
    FROM (
        SELECT x.*, least(greatest(x."timestamp", x.since), now()) AS created_at
        FROM ({events}) AS x
        UNION ALL
        SELECT {_RETRY_COLUMNS}, 1, 0, NULL::tid, r.created_at, r.created_at
        FROM outbox_retry AS r
    ) AS u
) AS v
WHERE copy = 1
ORDER BY kind, table_no, c, retry_id
ON CONFLICT (uuid) DO NOTHING
"""


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


def downgrade() -> None:
    rev1 = _revision("0001", "create_outbox")
    rev3 = _revision("0003", "transaction_leases")
    rev4 = _revision("0004", "row_constraints_and_functions")
    tables = ", ".join(f"outbox_events_{t}" for t in range(EVENT_TABLES))
    # No event may be written to the event tables or outbox_retry after the copy back.
    op.execute(f"LOCK TABLE {tables}, outbox_retry, outbox_batches IN ACCESS EXCLUSIVE MODE")
    op.execute(_OLD_TABLE.replace("outbox_events", "outbox_events_0006"))
    op.execute(f"ALTER TABLE outbox_events_0006 SET ({rev1.AUTOVACUUM})")
    op.execute(_move_back())
    op.execute(
        rev3.STUCK_VIEW.replace("VIEW outbox_stuck", "VIEW outbox_stuck_0006").replace(
            "FROM outbox_events", "FROM outbox_events_0006"
        )
    )
    app = [f"GRANT INSERT ({_INSERTABLE_COLUMNS}) ON outbox_events_0006 TO %s"]
    worker = [
        "GRANT SELECT ON outbox_events_0006 TO %s",
        "GRANT UPDATE (status, attempts, next_attempt_at, last_error) ON outbox_events_0006 TO %s",
    ]
    for statement in (
        _carry("outbox_events_0", ("INSERT",), app),
        _carry("outbox_retry", ("UPDATE", "DELETE"), worker),
        _carry("outbox_events", ("SELECT",), ["GRANT SELECT ON outbox_events_0006 TO %s"]),
        _carry("outbox_stuck", ("SELECT",), ["GRANT SELECT ON outbox_stuck_0006 TO %s"]),
    ):
        op.execute(statement)
    op.execute("DROP VIEW outbox_stuck")
    op.execute("DROP VIEW outbox_events")
    op.execute("DROP FUNCTION outbox_events_insert()")
    op.execute("ALTER TABLE outbox_events_0006 RENAME TO outbox_events")
    op.execute("ALTER VIEW outbox_stuck_0006 RENAME TO outbox_stuck")
    op.execute("ALTER SEQUENCE outbox_events_0006_id_seq RENAME TO outbox_events_id_seq")
    for index in ("pkey", "due_idx", "dead_idx"):
        op.execute(f"ALTER INDEX outbox_events_0006_{index} RENAME TO outbox_events_{index}")
    for name in ("status_check", "attempts_check", "uuid_key", "destination_check"):
        op.execute(
            f"ALTER TABLE outbox_events RENAME CONSTRAINT outbox_events_0006_{name}"
            f" TO outbox_events_{name}"
        )
    # Revision 0004's functions (the enqueue ones back on the table) and row checks.
    body = rev4._FUNCTIONS.replace("'", "''")
    op.execute(f"DO $do$ BEGIN EXECUTE format('{body}', current_schema()); END $do$")
    op.execute(f"REVOKE ALL ON FUNCTION {', '.join(OLD_WORKER_FUNCTIONS)} FROM PUBLIC")
    op.execute(
        _carry(
            "outbox_retry",
            ("UPDATE", "DELETE"),
            [f"GRANT EXECUTE ON FUNCTION {', '.join(rev4.WORKER_FUNCTIONS)} TO %s"],
        )
    )
    op.execute(rev4.DUE_NEVER)
    op.execute(rev4.BURY_BROKEN.replace("migration 0004", "the downgrade of migration 0007"))
    op.execute(
        "ALTER TABLE outbox_events "
        + ", ".join(
            f"ADD CONSTRAINT {name} CHECK (status = 'dead' OR ({check}))"
            for name, check in rev4.CHECKS.items()
        )
    )
    # The snapshot tables are emptied: their events are in the old table now.
    op.execute(f"TRUNCATE {tables}, outbox_retry, outbox_batches")
    op.execute("UPDATE outbox_event_tables SET summarized_pages = 0, truncated_at = now()")
