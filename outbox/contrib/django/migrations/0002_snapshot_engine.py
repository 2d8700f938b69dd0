"""The outbox tables up to Alembic revision 0006 (the snapshot engine's new objects).

Like 0001, it runs the outbox's Alembic migrations up to the newest one on a
connection of its own; reversing it leaves the tables where they are.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from outbox.contrib.django.schema import upgrade

#: The newest outbox (Alembic) revision when this migration was written.
OUTBOX_REVISION = "0006"


def create_or_upgrade_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Create or upgrade the outbox tables (the outbox's Alembic migrations)"""
    upgrade(schema_editor.connection)


def leave_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Leave the outbox tables and their undelivered events in place"""


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no types
    atomic = False
    dependencies = (("posthog_outbox", "0001_outbox_tables"),)
    operations = (migrations.RunPython(create_or_upgrade_outbox_tables, leave_outbox_tables),)
