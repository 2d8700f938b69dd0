"""Create outbox_ledger: the delivery ledger, per-day counts of what left the outbox.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

One row per (``day``, ``event``, ``destination``): ``day`` is the UTC day of the events'
``timestamp``, ``destination`` is ``posthog`` or ``metrics``; ``delivered``, ``dead``
and ``purged`` count the events delivered, that became dead, and that were purged
dead. The worker adds to them in the transaction that writes a batch's outcome (one
upsert per batch, so a row is written at most once per batch and (day, event)), and
``outbox-worker purge`` in the statement that deletes the dead events; a worker's
housekeeping deletes the days older than ``OUTBOX_LEDGER_RETENTION_DAYS``. Its rows are
updated in place many times a day, so the table leaves half of each page free
(``fillfactor = 50``) for the new row versions to stay on their page (HOT updates, which
leave the primary key's index alone).

The worker's role needs ``SELECT, INSERT, UPDATE, DELETE`` on it (docs/operations.md):
every role that may UPDATE or DELETE in ``outbox_retry`` (the worker's, with the grants
documented since migration 0007) is given them here, so a worker keeps working across
the upgrade. Creating an empty table takes no lock on the outbox tables. A worker of
this version refuses to start until the table exists (run ``outbox-worker migrate``
first); a worker of an older version ignores it, and what it delivers is not counted.

Every step can be run again (``IF NOT EXISTS``; a GRANT held already changes nothing).
Downgrade drops the table and its counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: What the worker's role needs on the ledger.
WORKER_RIGHTS = "SELECT, INSERT, UPDATE, DELETE"

TABLE = """
CREATE TABLE IF NOT EXISTS outbox_ledger (
    day date NOT NULL,
    event text NOT NULL,
    destination text NOT NULL,
    delivered bigint NOT NULL DEFAULT 0,
    dead bigint NOT NULL DEFAULT 0,
    purged bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, event, destination)
) WITH (fillfactor = 50)
"""

# Every role (but the owner; PUBLIC too) that may UPDATE or DELETE in outbox_retry, as a
# whole or in some of its columns, is a worker: it gets the ledger's rights.
GRANTS = f"""
DO $do$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT CASE WHEN h.grantee = 0 THEN 'PUBLIC'
                             ELSE quote_ident(pg_get_userbyid(h.grantee)) END AS who
        FROM (
            SELECT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
            WHERE c.oid = 'outbox_retry'::regclass
              AND a.privilege_type IN ('UPDATE', 'DELETE') AND a.grantee <> c.relowner
            UNION
            SELECT a.grantee
            FROM pg_class AS c JOIN pg_attribute AS att ON att.attrelid = c.oid,
                aclexplode(att.attacl) AS a
            WHERE c.oid = 'outbox_retry'::regclass
              AND a.privilege_type IN ('UPDATE', 'DELETE') AND a.grantee <> c.relowner
        ) AS h
    LOOP
        EXECUTE format('GRANT {WORKER_RIGHTS} ON outbox_ledger TO %s', r.who);
    END LOOP;
END
$do$
"""


def upgrade() -> None:
    op.execute(TABLE)
    op.execute(GRANTS)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS outbox_ledger")
