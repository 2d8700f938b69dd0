"""Create the outbox tables, their indexes and the outbox_stuck view.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A queue table churns: every row is inserted, updated a few times and deleted within
# seconds. The default scale factors (20% of the table) let dead tuples pile up when
# the table is small and vacuum rarely; vacuum it by an absolute number of dead rows
# instead, without cost throttling, and keep its statistics fresh for the claim plan.
AUTOVACUUM = (
    "autovacuum_vacuum_scale_factor = 0.0, "
    "autovacuum_vacuum_threshold = 5000, "
    "autovacuum_vacuum_insert_scale_factor = 0.0, "
    "autovacuum_vacuum_insert_threshold = 20000, "
    "autovacuum_analyze_scale_factor = 0.0, "
    "autovacuum_analyze_threshold = 20000, "
    "autovacuum_vacuum_cost_delay = 0"
)

STUCK_VIEW = """
CREATE VIEW outbox_stuck AS
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
        WHEN lease_token IS NOT NULL AND leased_until < now()
            THEN 'lease of ' || coalesce(leased_by, '?')
                 || ' expired: worker stopped or crashed mid-batch'
        WHEN lease_token IS NOT NULL THEN 'being shipped by ' || coalesce(leased_by, '?')
        WHEN attempts > 0
            THEN 'retrying after ' || attempts || ' failed attempts: ' || coalesce(last_error, '?')
        ELSE 'pending for over 5 minutes: is an outbox-worker running against this database?'
    END AS reason,
    last_error,
    now() - created_at AS age,
    created_at,
    next_attempt_at,
    leased_by,
    leased_until
FROM outbox_events
WHERE status = 'dead'
   OR attempts > 0
   OR created_at < now() - interval '5 minutes'
"""


def upgrade() -> None:
    op.create_table(
        "outbox_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("uuid", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("distinct_id", sa.Text(), nullable=False),
        sa.Column(
            "properties",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column(
            "timestamp", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        sa.Column("dedup_key", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("lease_token", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("leased_by", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'dead')", name="outbox_events_status_check"),
        sa.CheckConstraint("attempts >= 0", name="outbox_events_attempts_check"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("uuid"),
    )
    op.create_index(
        "outbox_events_due_idx",
        "outbox_events",
        ["next_attempt_at", "id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "outbox_events_dead_idx",
        "outbox_events",
        ["created_at"],
        postgresql_where=sa.text("status = 'dead'"),
    )
    op.execute(f"ALTER TABLE outbox_events SET ({AUTOVACUUM})")

    op.create_table(
        "outbox_dedup_keys",
        sa.Column("dedup_key", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("dedup_key"),
    )
    op.create_index("outbox_dedup_keys_expires_idx", "outbox_dedup_keys", ["expires_at"])
    op.execute(STUCK_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS outbox_stuck")
    op.drop_index("outbox_dedup_keys_expires_idx", table_name="outbox_dedup_keys")
    op.drop_table("outbox_dedup_keys")
    op.drop_index("outbox_events_dead_idx", table_name="outbox_events")
    op.drop_index("outbox_events_due_idx", table_name="outbox_events")
    op.drop_table("outbox_events")
