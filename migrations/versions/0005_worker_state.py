"""Create outbox_worker_state: where each worker says what it is doing, and why.

Revision ID: 0005
Create Date: 2026-11-23

One row per worker (``worker_id`` is ``OUTBOX_WORKER_ID``): the PostHog host it sends
to (never the key), its state (``ok``, ``backing_off``, ``key_rejected``, ...), the
reason in one line, and ``updated_at``. A running worker writes its row when its state
changes and every 15 seconds as a heartbeat, and deletes it when it stops cleanly;
rows not written for a day are deleted by any worker's housekeeping. ``outbox-worker
status`` reads the table. The worker's role needs ``SELECT, INSERT, UPDATE, DELETE``
on it (docs/operations.md). Creating an empty table takes no lock on the outbox
tables; workers of older versions ignore it, and a worker of this version runs without
it (it warns, and ``status`` does not list it) until the migration is applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_worker_state",
        sa.Column("worker_id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.PrimaryKeyConstraint("worker_id"),
    )


def downgrade() -> None:
    op.drop_table("outbox_worker_state")
