"""The PostHog sink: batches to the capture API's ``/batch/`` endpoint.

Two transports, one behaviour:

``direct`` (the default)
    Builds the request body from the JSON text PostgreSQL returns for each event and
    POSTs it on a keep-alive session. Nothing is decoded and encoded again: the
    events were validated (finite numbers, no NUL) when they were enqueued.
``posthog``
    ``posthog.request.batch_post``, the posthog package's own request layer. It
    decodes every event and walks it for non-finite floats before encoding it again;
    docs/benchmarks.md measures what that costs.

Either way each event keeps the outbox row's ``uuid`` and ``timestamp`` and carries
``$ignore_sent_at``, so a re-send keeps its identity and time and PostHog can drop
the duplicate.
"""

from __future__ import annotations

import gzip as gzip_module
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
from posthog import request as ph_request
from posthog.version import VERSION as POSTHOG_VERSION

from outbox import __version__
from worker.sinks.base import (
    Outbound,
    RateLimitedError,
    RejectedError,
    RetryableSinkError,
    UnauthorizedError,
)

TRANSPORTS = ("direct", "posthog")
USER_AGENT = f"posthog-outbox/{__version__} (posthog-python/{POSTHOG_VERSION})"
#: zlib level 5: most of level 9's ratio on JSON at a fraction of the CPU.
GZIP_LEVEL = 5


class PostHogSink:
    """Ships batches to ``{host}/batch/``; raises a SinkError for anything but 200."""

    name = "posthog"

    def __init__(
        self,
        api_key: str,
        host: str,
        *,
        gzip: bool = True,
        timeout: float = 15.0,
        transport: str = "direct",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self._api_key = api_key
        self.host = ph_request.determine_server_host(host).rstrip("/")
        self.gzip = gzip
        self.timeout = timeout
        self.transport = transport
        self._url = self.host + ph_request.EVENTS_ENDPOINT
        self._key_json = json.dumps(api_key)
        self._session = requests.Session()

    def __repr__(self) -> str:  # never show the key
        return f"PostHogSink(host={self.host!r}, gzip={self.gzip}, transport={self.transport!r})"

    def send(self, events: Sequence[Outbound]) -> None:
        """POST the events as one batch."""
        try:
            if self.transport == "posthog":
                self._send_with_posthog(events)
            else:
                self._send_direct(events)
        except requests.exceptions.Timeout as exc:
            raise RetryableSinkError(f"timed out after {self.timeout}s: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise RetryableSinkError(f"connection error: {exc}") from exc

    def _send_direct(self, events: Sequence[Outbound]) -> None:
        sent_at = datetime.now(UTC).isoformat()
        body = (
            '{"api_key":'
            + self._key_json
            + ',"batch":['
            + ",".join(e.json for e in events)
            + '],"sent_at":"'
            + sent_at
            + '"}'
        ).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if self.gzip:
            body = gzip_module.compress(body, compresslevel=GZIP_LEVEL)
            headers["Content-Encoding"] = "gzip"
        response = self._session.post(self._url, data=body, headers=headers, timeout=self.timeout)
        if response.status_code != 200:
            raise classify(response.status_code, _detail(response), retry_after(response))

    def _send_with_posthog(self, events: Sequence[Outbound]) -> None:
        try:
            ph_request.batch_post(
                self._api_key,
                host=self.host,
                gzip=self.gzip,
                timeout=self.timeout,
                batch=[e.data for e in events],
            )
        except ph_request.APIError as exc:
            raise classify(exc.status, str(exc.message), exc.retry_after) from exc

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def _detail(response: requests.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(payload, dict) and "detail" in payload:
        return str(payload["detail"])
    return response.text[:500]


def retry_after(response: requests.Response) -> float | None:
    """The ``Retry-After`` header in seconds (it may be a number or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


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
