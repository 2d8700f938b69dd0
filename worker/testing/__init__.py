"""Test helpers for code that ships events to PostHog.

`CaptureServer` is a local, PostHog-capture-compatible HTTP endpoint: point a PostHog client at
``srv.url`` and inspect what it sent, or script failures with `Reply`. Its error texts are the
constants of `worker.testing.posthog_errors`. `deliver(database_url, srv)` ships a test's committed
events to the server with the real worker (`worker.testing.delivery`, imported on first use, as it
loads the whole worker).
"""

from typing import TYPE_CHECKING, Any

# The project bans importing `worker` (to keep it out of outbox/); inside worker/ it is fine.
from . import posthog_errors
from .capture_server import (
    AI_EVENT_NAMES,
    AI_PATHS,
    CAPTURE_PATHS,
    FLAGS_PATHS,
    CaptureServer,
    Exchange,
    ReceivedRequest,
    Reply,
    Route,
)

if TYPE_CHECKING:
    from .delivery import NotDeliveredError, deliver

__all__ = [
    "AI_EVENT_NAMES",
    "AI_PATHS",
    "CAPTURE_PATHS",
    "FLAGS_PATHS",
    "CaptureServer",
    "Exchange",
    "NotDeliveredError",
    "ReceivedRequest",
    "Reply",
    "Route",
    "deliver",
    "posthog_errors",
]


def __getattr__(name: str) -> Any:
    if name in ("deliver", "NotDeliveredError"):
        from . import delivery

        return getattr(delivery, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
