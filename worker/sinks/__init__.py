"""Sinks: where the worker delivers events."""

from worker.sinks.base import (
    Event,
    Outbound,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    Sink,
    SinkError,
    UnauthorizedError,
    clean_text,
)
from worker.sinks.memory import MemorySink
from worker.sinks.posthog import PostHogSink
from worker.sinks.stdout import StdoutSink

__all__ = [
    "Event",
    "MemorySink",
    "Outbound",
    "PostHogSink",
    "RateLimitedError",
    "RedirectError",
    "RejectedError",
    "RequestRejectedError",
    "RetryableSinkError",
    "Sink",
    "SinkError",
    "StdoutSink",
    "UnauthorizedError",
    "clean_text",
]
