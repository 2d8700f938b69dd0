"""Sinks: where the worker delivers events."""

from worker.sinks.base import (
    Event,
    Outbound,
    RateLimitedError,
    RejectedError,
    RetryableSinkError,
    Sink,
    SinkError,
    UnauthorizedError,
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
    "RejectedError",
    "RetryableSinkError",
    "Sink",
    "SinkError",
    "StdoutSink",
    "UnauthorizedError",
]
