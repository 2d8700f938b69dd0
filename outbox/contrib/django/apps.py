"""The app's configuration (what ``INSTALLED_APPS`` names)."""

from __future__ import annotations

from django.apps import AppConfig


class OutboxConfig(AppConfig):  # type: ignore[misc]  # Django ships no types
    """posthog-outbox's tables, created by ``manage.py migrate``.

    The label is ``posthog_outbox`` (``manage.py migrate posthog_outbox``), not
    ``outbox``, so it cannot collide with an application's own app of that name.
    """

    name = "outbox.contrib.django"
    label = "posthog_outbox"
    verbose_name = "PostHog outbox"
    default = True
