"""The exceptions posthog-outbox raises.

Every exception derives from :class:`OutboxError`, so ``except outbox.OutboxError``
catches anything this project raises on purpose. Driver errors are wrapped at the
boundary with ``raise ... from exc``; the original stays on ``__cause__``.
A class's docstring is its default message.
"""

from __future__ import annotations


class OutboxError(Exception):
    """posthog-outbox failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class OutboxValidationError(OutboxError, ValueError):
    """An event was refused before it reached the database.

    ``field`` names the offending input (``event``, ``distinct_id``,
    ``properties.plan.price``, ``timestamp`` ...). Nothing was written, and the
    caller's transaction is untouched: it can still commit its own writes.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class OutboxDatabaseError(OutboxError):
    """The database refused or failed an outbox statement."""


class OutboxNotInstalledError(OutboxDatabaseError):
    """The outbox tables do not exist in this database: run `outbox-worker migrate` first (in Django, `python manage.py migrate` with outbox.contrib.django in INSTALLED_APPS)."""  # noqa: E501


class UnsupportedConnectionError(OutboxError, TypeError):
    """The call cannot write on this connection.

    The sync calls (``enqueue()``, the guards, ``identify()``...) take a SQLAlchemy
    ``Session`` or ``Connection``, or a psycopg ``Connection``; the async ones
    (``aenqueue()``, ``aupsert_first()``...) their async forms. The message names
    the object that was passed and what the call needs.
    """


class UnsupportedCallError(OutboxError, TypeError):
    """This call has no outbox form, or is written in a form that would be misread.

    Raised by :class:`outbox.Posthog` and :class:`outbox.AsyncPosthog` for
    posthog-python calls that need a live PostHog connection (feature flags), and
    for calls in older posthog-python's argument order (``capture(distinct_id,
    event)``), which are refused rather than guessed. The message names the form
    to use instead.
    """


class OutboxMissingExtraError(OutboxError, ImportError):
    """A part of posthog-outbox needs an optional dependency that is not installed.

    ``extra`` names the package extra that brings it; the message says what to run,
    e.g. ``pip install 'posthog-outbox[migrate]'``.
    """

    def __init__(self, needed_by: str, module: str, extra: str) -> None:
        self.extra = extra
        super().__init__(
            f"{needed_by} needs {module}, which is not installed: "
            f"pip install 'posthog-outbox[{extra}]'"
        )
        self.name = module
