"""Test helpers for code that ships events to PostHog.

`CaptureServer` is a local, PostHog-capture-compatible HTTP endpoint: point a PostHog client at
``srv.url`` and inspect what it sent, or script failures with `Reply`. Its error texts are the
constants of `worker.testing.posthog_errors`.
"""

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

__all__ = [
    "AI_EVENT_NAMES",
    "AI_PATHS",
    "CAPTURE_PATHS",
    "FLAGS_PATHS",
    "CaptureServer",
    "Exchange",
    "ReceivedRequest",
    "Reply",
    "Route",
    "posthog_errors",
]
