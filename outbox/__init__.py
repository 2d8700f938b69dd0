"""posthog-outbox: analytics events that commit or roll back with your transaction.

Call :func:`enqueue` inside your own SQLAlchemy or psycopg transaction; the
``outbox-worker`` process ships committed events to PostHog. This package is what
applications import; it never imports the worker.
"""

from outbox.enqueue import aenqueue, aenqueue_many, enqueue, enqueue_many
from outbox.exceptions import (
    OutboxDatabaseError,
    OutboxError,
    OutboxNotInstalledError,
    OutboxValidationError,
    UnsupportedConnectionError,
)

__version__ = "0.1.0"

__all__ = [
    "OutboxDatabaseError",
    "OutboxError",
    "OutboxNotInstalledError",
    "OutboxValidationError",
    "UnsupportedConnectionError",
    "__version__",
    "aenqueue",
    "aenqueue_many",
    "enqueue",
    "enqueue_many",
]
