"""The configuration error, apart from ``outbox.exceptions`` (which the core owns)."""

from __future__ import annotations

from outbox.exceptions import OutboxError


class OutboxConfigError(OutboxError, ValueError):
    """The analytics configuration or the event contract is invalid.

    Raised where the configuration is made (``AnalyticsConfig(...)``,
    ``configure(...)``, ``EventSpec(...)``, ``EventRegistry.add(...)``), never by
    ``enqueue()`` for an event: a bad *event* raises
    :class:`~outbox.exceptions.OutboxValidationError` instead. ``setting`` names the
    setting, environment variable or contract entry at fault.
    """

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")
