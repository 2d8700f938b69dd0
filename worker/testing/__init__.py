"""Test helpers for code that ships events to PostHog.

`CaptureServer` is a local, PostHog-capture-compatible HTTP endpoint: point a PostHog client at
``srv.url`` and inspect what it sent, or script failures with `Reply`.
"""

# The project bans importing `worker` (to keep it out of outbox/); inside worker/ it is fine.
from .capture_server import CaptureServer, ReceivedRequest, Reply

__all__ = ["CaptureServer", "ReceivedRequest", "Reply"]
