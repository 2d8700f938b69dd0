"""The app's configuration (what ``INSTALLED_APPS`` names)."""

from __future__ import annotations

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class OutboxConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    """posthog-outbox's tables, created by ``manage.py migrate``.

    The label is ``posthog_outbox`` (``manage.py migrate posthog_outbox``), not
    ``outbox``, so it cannot collide with an application's own app of that name.
    """

    name = "outbox.contrib.django"
    label = "posthog_outbox"
    verbose_name = "PostHog outbox"
    default = True

    def ready(self) -> None:
        from outbox.contrib.django.schema import create_when_unmigrated

        post_migrate.connect(
            create_when_unmigrated, sender=self, dispatch_uid="posthog_outbox.unmigrated"
        )
