"""Add outbox_events.destination: PostHog, or the worker's Prometheus metrics.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

A metrics-only event (see ``outbox.contract``) goes through the outbox like any
other, so it is counted only if its transaction commits, but the worker turns it
into Prometheus counters and histograms instead of sending it to PostHog. Existing
rows are PostHog events. Adding a column with a constant default is a catalogue-only
change in PostgreSQL 11 and later: no table rewrite, no long lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "outbox_events",
        sa.Column("destination", sa.Text(), nullable=False, server_default=sa.text("'posthog'")),
    )
    op.create_check_constraint(
        "outbox_events_destination_check",
        "outbox_events",
        "destination IN ('posthog', 'metrics')",
    )


def downgrade() -> None:
    # Without the column, a worker would send metrics-only rows to PostHog as events,
    # which is exactly what they must never be. Drop them: only uncounted metric
    # increments are lost.
    op.execute("DELETE FROM outbox_events WHERE destination = 'metrics'")
    op.drop_constraint("outbox_events_destination_check", "outbox_events", type_="check")
    op.drop_column("outbox_events", "destination")
