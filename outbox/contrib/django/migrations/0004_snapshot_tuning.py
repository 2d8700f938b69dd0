"""The outbox tables up to Alembic revision 0008 (the snapshot engine's tick and rotation
no longer read from the oldest open transaction's id).

Like 0001 to 0003, it runs the outbox's Alembic migrations up to the newest one on a
connection of its own; reversing it leaves the tables where they are. Revision 0008
only redefines two functions (see migrations/versions/0008_snapshot_tuning.py).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from outbox.contrib.django.schema import upgrade

#: The newest outbox (Alembic) revision when this migration was written.
OUTBOX_REVISION = "0008"


def create_or_upgrade_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Create or upgrade the outbox tables (the outbox's Alembic migrations)"""
    upgrade(schema_editor.connection)


def leave_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Leave the outbox tables and their undelivered events in place"""


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no types
    atomic = False
    dependencies = (("posthog_outbox", "0003_cutover"),)
    operations = (migrations.RunPython(create_or_upgrade_outbox_tables, leave_outbox_tables),)
