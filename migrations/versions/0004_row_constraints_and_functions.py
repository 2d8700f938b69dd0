"""Constraints on what a pending row may hold, and the functions behind least privilege.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

Constraints. A pending row must be something PostHog can take: ``properties`` a JSON
object, ``timestamp`` from 1970-01-01T00:00:00Z and before 2200-01-01T00:00:00Z (so
never ``infinity``), ``event`` and ``distinct_id`` 1 to 200 characters and not only
whitespace. ``enqueue`` never writes anything else. A dead row is kept as it was
found (``status = 'dead' OR ...``): the worker buries a row it cannot send instead
of refusing to read it, and a dead row is not sent again until ``retry`` makes it
pending, which these constraints then refuse for such a row (``retry`` skips it).

The constraints are added ``NOT VALID`` (a catalogue change that holds the table's
lock for an instant; under the session's short ``lock_timeout``, which
``outbox-worker migrate`` and ``env.py`` set, a long batch cannot queue the
application's inserts behind it), and committed. Then, outside any
transaction that locks the table against writes, pending rows that break them are
made dead with an error naming the column and the problem, and each constraint is
validated (``VALIDATE CONSTRAINT`` scans the table under a lock that lets inserts
and updates go on). Every step can be run again, so an upgrade interrupted in the
middle can simply be repeated.

Functions (``SECURITY DEFINER``, owned by the role that migrates, with a fixed
``search_path`` and schema-qualified names), so that no role needs a right on a
whole table that it does not use:

- ``outbox_enqueue_keyed`` (one event) and ``outbox_enqueue_keyed_rows`` (a JSON
  array of events): ``enqueue`` with dedup keys. They claim the keys and insert the
  events whose key was free in one statement, and return the claimed keys. The
  application needs no right on ``outbox_dedup_keys``: it can neither read keys nor
  claim a key without writing its event.
- ``outbox_ack``, ``outbox_purge_dead``, ``outbox_expire_dedup_keys``: the worker's
  deletes. The worker needs no ``DELETE`` right, which in PostgreSQL also allows
  ``LOCK TABLE`` in any mode (and so stopping every enqueue).

``EXECUTE`` on the functions is revoked from ``PUBLIC``. So that existing setups keep
working, the roles that may ``INSERT`` into ``outbox_events`` are granted the enqueue
functions, and those that may ``DELETE`` from it the worker's functions.

Downgrade drops the constraints and the functions. The code of revision 0003 needs
the grants documented for it (``SELECT, INSERT, UPDATE`` on ``outbox_dedup_keys`` for
the application, ``UPDATE, DELETE`` on both tables for the worker).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The fixed bounds (frozen here: a later change is a new migration). The worker's
# claim also buries a timestamp more than 23 hours ahead, which no CHECK can hold.
TIMESTAMP_MIN = "1970-01-01 00:00:00+00"
TIMESTAMP_BEFORE = "2200-01-01 00:00:00+00"
MAX_NAME_LENGTH = 200
# The ASCII whitespace Python's str.strip() also strips (a subset of what it strips,
# so whatever enqueue accepts passes).
_SPACE = r"E' \t\n\r\f\x0b'"


def _name_ok(column: str) -> str:
    return f"length({column}) <= {MAX_NAME_LENGTH} AND btrim({column}, {_SPACE}) <> ''"


CHECKS: dict[str, str] = {
    "outbox_events_properties_check": "jsonb_typeof(properties) = 'object'",
    "outbox_events_timestamp_check": (
        f"\"timestamp\" >= '{TIMESTAMP_MIN}' AND \"timestamp\" < '{TIMESTAMP_BEFORE}'"
    ),
    "outbox_events_event_check": _name_ok("event"),
    "outbox_events_distinct_id_check": _name_ok("distinct_id"),
}


def _problem(column: str) -> str:
    return (
        f"WHEN length({column}) > {MAX_NAME_LENGTH} THEN '{column}: is ' || length({column})"
        f" || ' characters long, over the {MAX_NAME_LENGTH} limit'"
        f" WHEN btrim({column}, {_SPACE}) = '' THEN '{column}: is empty or only whitespace'"
    )


# Pending rows that break the constraints become dead, with what is wrong.
BURY_BROKEN = f"""
UPDATE outbox_events
SET status = 'dead', attempts = attempts + 1,
    last_error = CASE
        WHEN jsonb_typeof(properties) <> 'object'
            THEN 'properties: is a JSON ' || jsonb_typeof(properties) || ', not an object'
        WHEN NOT isfinite("timestamp")
            THEN 'timestamp: ' || "timestamp"::text || ' is not a finite time'
        WHEN "timestamp" < '{TIMESTAMP_MIN}'
            THEN 'timestamp: ' || ("timestamp" AT TIME ZONE 'UTC')::text
                 || ' UTC is before 1970-01-01T00:00:00Z'
        WHEN "timestamp" >= '{TIMESTAMP_BEFORE}'
            THEN 'timestamp: ' || ("timestamp" AT TIME ZONE 'UTC')::text
                 || ' UTC is more than 23 hours ahead of the database''s clock'
        {_problem("event")}
        {_problem("distinct_id")}
    END || ' (found by migration 0004)'
WHERE status = 'pending' AND NOT ({" AND ".join(f"({c})" for c in CHECKS.values())})
"""

# A pending row that can never become due (written by hand before 0004): due now.
DUE_NEVER = """
UPDATE outbox_events SET next_attempt_at = now()
WHERE status = 'pending' AND NOT isfinite(next_attempt_at)
"""

ENQUEUE_FUNCTIONS = (
    "outbox_enqueue_keyed(uuid, text, text, jsonb, text, timestamp with time zone, text)",
    "outbox_enqueue_keyed_rows(jsonb)",
)
WORKER_FUNCTIONS = (
    "outbox_ack(bigint[], double precision)",
    "outbox_purge_dead(double precision)",
    "outbox_expire_dedup_keys(integer)",
)

# Each function is created in the schema the tables are in (the migrating role's
# current schema), naming every table with that schema.
_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION %1$I.outbox_enqueue_keyed(
    p_uuid uuid, p_event text, p_distinct_id text, p_properties jsonb,
    p_destination text, p_timestamp timestamptz, p_dedup_key text
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    claimed text;
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
    INSERT INTO %1$I.outbox_events
        (uuid, event, distinct_id, properties, "timestamp", dedup_key, destination)
    VALUES (p_uuid, p_event, p_distinct_id, p_properties, coalesce(p_timestamp, now()),
            p_dedup_key, coalesce(p_destination, 'posthog'));
    RETURN claimed;
END
$fn$;

CREATE OR REPLACE FUNCTION %1$I.outbox_enqueue_keyed_rows(p_rows jsonb)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
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
        INSERT INTO %1$I.outbox_events
            (uuid, event, distinct_id, properties, "timestamp", dedup_key, destination)
        SELECT i.uuid, i.event, i.distinct_id, i.properties,
               coalesce(i."timestamp", now()), i.dedup_key,
               coalesce(i.destination, 'posthog')
        FROM input AS i
        WHERE i.dedup_key IS NULL
           OR i.dedup_key IN (SELECT c.dedup_key FROM claimed_keys AS c)
        ORDER BY i.n
    )
    SELECT c.dedup_key FROM claimed_keys AS c;
END
$fn$;

CREATE OR REPLACE FUNCTION %1$I.outbox_ack(p_ids bigint[], p_dedup_window double precision)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n bigint;
BEGIN
    WITH done AS (
        DELETE FROM %1$I.outbox_events WHERE id = ANY(p_ids) RETURNING dedup_key
    ), keys AS (
        UPDATE %1$I.outbox_dedup_keys AS k
        SET expires_at = now() + p_dedup_window * interval '1 second'
        FROM done
        WHERE k.dedup_key = done.dedup_key
        RETURNING 1
    )
    SELECT count(*) INTO n FROM done;
    RETURN n;
END
$fn$;

CREATE OR REPLACE FUNCTION %1$I.outbox_purge_dead(p_older_than double precision)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n bigint;
BEGIN
    -- A created_at in the future (only a hand-written row has one) says nothing
    -- about the row's age: such a dead row counts as old enough.
    WITH gone AS (
        DELETE FROM %1$I.outbox_events
        WHERE status = 'dead'
          AND (created_at < now() - p_older_than * interval '1 second'
               OR created_at > now())
        RETURNING dedup_key
    ), keys AS (
        DELETE FROM %1$I.outbox_dedup_keys AS k USING gone
        WHERE k.dedup_key = gone.dedup_key
        RETURNING 1
    )
    SELECT count(*) INTO n FROM gone;
    RETURN n;
END
$fn$;

CREATE OR REPLACE FUNCTION %1$I.outbox_expire_dedup_keys(p_limit integer)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    n bigint;
BEGIN
    DELETE FROM %1$I.outbox_dedup_keys
    WHERE dedup_key IN (
        SELECT dedup_key FROM %1$I.outbox_dedup_keys WHERE expires_at < now() LIMIT p_limit
    );
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;
"""


def _grant_to_holders(privilege: str, functions: Sequence[str]) -> str:
    """GRANT EXECUTE on ``functions`` to every role (or PUBLIC) holding ``privilege``
    on the whole of outbox_events, other than its owner."""
    names = ", ".join(functions)
    return f"""
DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee
        FROM pg_class AS c, aclexplode(c.relacl) AS a
        WHERE c.oid = 'outbox_events'::regclass
          AND a.privilege_type = '{privilege}' AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION {names} TO %s',
            CASE WHEN r.grantee = 0 THEN 'PUBLIC'
                 ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
    END LOOP;
END
$do$
"""


def upgrade() -> None:
    body = _FUNCTIONS.replace("'", "''")
    op.execute(f"DO $do$ BEGIN EXECUTE format('{body}', current_schema()); END $do$")
    every = ", ".join((*ENQUEUE_FUNCTIONS, *WORKER_FUNCTIONS))
    op.execute(f"REVOKE ALL ON FUNCTION {every} FROM PUBLIC")
    op.execute(_grant_to_holders("INSERT", ENQUEUE_FUNCTIONS))
    op.execute(_grant_to_holders("DELETE", WORKER_FUNCTIONS))
    with op.get_context().autocommit_block():
        _add_constraints()
        op.execute(DUE_NEVER)
        op.execute(BURY_BROKEN)
        for name in CHECKS:
            op.execute(f"ALTER TABLE outbox_events VALIDATE CONSTRAINT {name}")


def _add_constraints() -> None:
    """ADD CONSTRAINT ... NOT VALID for those not there yet, in one statement."""
    if context.is_offline_mode():
        missing = list(CHECKS)
    else:
        rows = op.get_bind().execute(
            sa.text(
                "SELECT conname FROM pg_constraint"
                " WHERE conrelid = 'outbox_events'::regclass AND conname = ANY(:names)"
            ),
            {"names": list(CHECKS)},
        )
        present = {row[0] for row in rows}
        missing = [name for name in CHECKS if name not in present]
    if not missing:
        return
    alter = "ALTER TABLE outbox_events " + ", ".join(
        f"ADD CONSTRAINT {name} CHECK (status = 'dead' OR ({CHECKS[name]})) NOT VALID"
        for name in missing
    )
    # The table's lock is needed for an instant, but ADD CONSTRAINT waits for it behind
    # any batch in flight, and the application's INSERTs would queue behind the ALTER.
    # So it waits at most the session's lock_timeout: `outbox-worker migrate` sets one
    # (1 s) and tries the migration again after a timeout; env.py sets the same for
    # `alembic upgrade` run by hand, which then fails in one line instead of waiting.
    op.execute(alter)


def downgrade() -> None:
    for name in CHECKS:
        op.execute(f"ALTER TABLE outbox_events DROP CONSTRAINT IF EXISTS {name}")
    for function in (*ENQUEUE_FUNCTIONS, *WORKER_FUNCTIONS):
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
