"""The outbox tables up to Alembic revision 0007 (the cutover to the snapshot engine).

Like 0001 and 0002, it runs the outbox's Alembic migrations up to the newest one on a
connection of its own; reversing it leaves the tables where they are. Stop the
workers of older versions first: revision 0007 moves their table's events into the
snapshot engine's tables and drops it (see migrations/versions/0007_cutover.py).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from outbox.contrib.django.schema import upgrade

#: The newest outbox (Alembic) revision when this migration was written.
OUTBOX_REVISION = "0007"


def create_or_upgrade_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Create or upgrade the outbox tables (the outbox's Alembic migrations)"""
    upgrade(schema_editor.connection)


def leave_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Leave the outbox tables and their undelivered events in place"""


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no types
    atomic = False
    dependencies = (("posthog_outbox", "0002_snapshot_engine"),)
    operations = (migrations.RunPython(create_or_upgrade_outbox_tables, leave_outbox_tables),)
