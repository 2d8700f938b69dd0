"""The PostHog sink: ``/batch/`` through the posthog package's own request layer."""

from __future__ import annotations

from collections.abc import Sequence

import requests
from posthog import request as ph_request

from worker.sinks.base import (
    Event,
    RateLimitedError,
    RejectedError,
    RetryableSinkError,
    UnauthorizedError,
)


class PostHogSink:
    """Ships batches with ``posthog.request.batch_post``.

    Each event keeps the outbox row's ``uuid`` and ``timestamp`` and carries
    ``$ignore_sent_at`` (set by the drainer), so a re-send keeps its identity and
    time and PostHog can drop the duplicate.
    """

    name = "posthog"

    def __init__(self, api_key: str, host: str, *, gzip: bool = True, timeout: float = 15.0):
        self._api_key = api_key
        self.host = host
        self.gzip = gzip
        self.timeout = timeout

    def __repr__(self) -> str:  # never show the key
        return f"PostHogSink(host={self.host!r}, gzip={self.gzip})"

    def send(self, events: Sequence[Event]) -> None:
        """POST the events to ``{host}/batch/``; raise a SinkError for anything but 200."""
        try:
            ph_request.batch_post(
                self._api_key,
                host=self.host,
                gzip=self.gzip,
                timeout=self.timeout,
                batch=list(events),
            )
        except ph_request.APIError as exc:
            raise classify(exc.status, str(exc.message), exc.retry_after) from exc
        except requests.exceptions.Timeout as exc:
            raise RetryableSinkError(f"timed out after {self.timeout}s: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise RetryableSinkError(f"connection error: {exc}") from exc

    def close(self) -> None:
        """Nothing to release: the posthog package owns its HTTP session."""


def classify(
    status: int | str, message: str, retry_after: float | None = None
) -> RetryableSinkError | RateLimitedError | UnauthorizedError | RejectedError:
    """The SinkError for an HTTP status other than 200."""
    try:
        code = int(status)
    except (TypeError, ValueError):
        return RetryableSinkError(f"HTTP {status}: {message}")
    text = f"HTTP {code}: {message}"[:1000]
    if code == 429:
        return RateLimitedError(text, retry_after=retry_after)
    if code in (401, 403):
        return UnauthorizedError(text, status=code)
    if code in (400, 413):
        return RejectedError(text, status=code)
    return RetryableSinkError(text, status=code)
