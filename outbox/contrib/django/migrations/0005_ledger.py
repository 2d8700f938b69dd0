"""The outbox tables up to Alembic revision 0009 (the delivery ledger, ``outbox_ledger``).

Like 0001 to 0004, it runs the outbox's Alembic migrations up to the newest one on a
connection of its own; reversing it leaves the tables where they are. Revision 0009
only creates a table (see migrations/versions/0009_ledger.py).
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from outbox.contrib.django.schema import upgrade

#: The newest outbox (Alembic) revision when this migration was written.
OUTBOX_REVISION = "0009"


def create_or_upgrade_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Create or upgrade the outbox tables (the outbox's Alembic migrations)"""
    upgrade(schema_editor.connection)


def leave_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Leave the outbox tables and their undelivered events in place"""


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no types
    atomic = False
    dependencies = (("posthog_outbox", "0004_snapshot_tuning"),)
    operations = (migrations.RunPython(create_or_upgrade_outbox_tables, leave_outbox_tables),)
