"""The outbox tables up to Alembic revision 0010 (the snapshot engine's cheaper tick,
and ``outbox_batches.rows_estimate``).

Like 0001 to 0005, it runs the outbox's Alembic migrations up to the newest one on a
connection of its own; reversing it leaves the tables where they are. Revision 0010
adds a nullable column and redefines one function (see
migrations/versions/0010_snapshot_tick.py).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from outbox.contrib.django.schema import upgrade

#: The newest outbox (Alembic) revision when this migration was written.
OUTBOX_REVISION = "0010"


def create_or_upgrade_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Create or upgrade the outbox tables (the outbox's Alembic migrations)"""
    upgrade(schema_editor.connection)


def leave_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Leave the outbox tables and their undelivered events in place"""


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no types
    atomic = False
    dependencies = (("posthog_outbox", "0005_ledger"),)
    operations = (migrations.RunPython(create_or_upgrade_outbox_tables, leave_outbox_tables),)
