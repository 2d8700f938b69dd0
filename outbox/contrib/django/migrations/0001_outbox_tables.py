"""The outbox tables, as the outbox's Alembic migrations make them.

Every Django migration of this app runs the Alembic migrations up to the newest one
the installed posthog-outbox has, and declares that revision in ``OUTBOX_REVISION``;
a release that adds an Alembic migration adds a Django migration here too, so
``manage.py migrate`` upgrades the tables after an upgrade of the package.

``atomic = False``: the work commits on a connection of its own (see
:mod:`outbox.contrib.django.schema`), whatever Django's transaction does; when it is
run again it finds the tables up to date. Reversing it leaves the tables and the
undelivered events in them where they are: they are shared with the workers, and a
test database is dropped whole anyway.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

from outbox.contrib.django.schema import upgrade

#: The newest outbox (Alembic) revision when this migration was written.
OUTBOX_REVISION = "0005"


def create_or_upgrade_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Create or upgrade the outbox tables (the outbox's Alembic migrations)"""
    upgrade(schema_editor.connection)


def leave_outbox_tables(apps: Any, schema_editor: Any) -> None:
    """Leave the outbox tables and their undelivered events in place"""


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no types
    initial = True
    atomic = False
    dependencies = ()
    operations = (migrations.RunPython(create_or_upgrade_outbox_tables, leave_outbox_tables),)
