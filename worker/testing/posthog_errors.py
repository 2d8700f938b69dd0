"""The status codes and error texts PostHog's services answer with, as module constants.

`CaptureServer` answers with exactly these texts, so code under test can be checked against
what PostHog really says. Each constant names the PostHog source it comes from:

- capture (``rust/capture/src/api.rs``): the ``CaptureError`` variants' messages. Capture's
  ``IntoResponse`` sends the message alone as the body, as ``text/plain; charset=utf-8``.
  Texts with a ``{}`` take a detail (`str.format`).
- key shape (``rust/capture/src/token.rs``, ``validate_token``): the reasons of
  ``InvalidTokenReason``, checked in `key_problem`.
- flags (``rust/feature-flags/src/api/errors.rs``): the ``FlagError`` answers, also plain text.

Only the texts differ between the cases the worker must tell apart: a broken request (empty
payload, undecodable or unparsable body, no events) and a bad event (no name, no distinct_id,
too large) are both 400 or 413, a key problem is 401.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BILLING_LIMIT",
    "DECODING_ERROR",
    "EMPTY_BATCH",
    "EMPTY_PAYLOAD",
    "EVENT_TOO_BIG",
    "FLAGS_DECODING_ERROR",
    "FLAGS_INVALID_KEY",
    "FLAGS_MISSING_DISTINCT_ID",
    "FLAGS_NO_KEY",
    "FLAGS_PARSING_ERROR",
    "INTERNAL_ERROR",
    "INVALID_KEY",
    "KEY_MAX_BYTES",
    "MISSING_DISTINCT_ID",
    "MISSING_EVENT_NAME",
    "MULTIPLE_KEYS",
    "NON_RETRYABLE",
    "NO_KEY",
    "PARSING_ERROR",
    "PERSONAL_KEY_PREFIX",
    "RATE_LIMITED",
    "RETRYABLE",
    "TEXT_CONTENT_TYPE",
    "UNKNOWN_KEY",
    "key_problem",
]

TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"
"""The content type of every error answer (axum's for a ``(StatusCode, String)`` response)."""

# -- capture, 400 Bad Request: the request itself is broken ------------------------------------

EMPTY_PAYLOAD: Final = "request missing data payload"
"""400: no body (and no ``data`` query parameter); what a ``GET`` without a payload gets."""

DECODING_ERROR: Final = "failed to decode request: {}"
"""400: the body could not be decoded (``invalid gzip data``, ``invalid body encoding``)."""

PARSING_ERROR: Final = "failed to parse request: {}"
"""400: the decoded body is not the JSON capture expects."""

EMPTY_BATCH: Final = "request holds no event"
"""400: the body parsed but carries no event."""

# -- capture, 400 Bad Request: an event is bad --------------------------------------------------

MISSING_EVENT_NAME: Final = "event submitted with an empty event name"
"""400: an event has no (or an empty) ``event`` name."""

MISSING_DISTINCT_ID: Final = "event submitted without a distinct_id"
"""400: an event has no ``distinct_id`` (nor ``properties.distinct_id``)."""

NON_RETRYABLE: Final = "invalid event could not be processed"
"""400: an event was refused for good (``NonRetryableSinkError``)."""

# -- capture, 413 Payload Too Large ----------------------------------------------------------

EVENT_TOO_BIG: Final = "maximum event size exceeded: {}"
"""413: the body or one event is larger than capture's limit."""

# -- capture, 401 Unauthorized: the key ----------------------------------------------------------

NO_KEY: Final = "event submitted without an api_key"
"""401: neither the body nor any event carries a key."""

MULTIPLE_KEYS: Final = "batch submitted with inconsistent api_key values"
"""401: the events of one request carry different keys (and the body names none)."""

INVALID_KEY: Final = "API key is not valid: {}"
"""401: the key has the wrong shape; the detail is a `key_problem` reason."""

UNKNOWN_KEY: Final = "api_key does not resolve to a known project"
"""401: a well-formed key of no project, where capture enforces known keys
(``rust/capture/src/known_tokens.rs``, ``TokenValidationMode::Enforce``). By default capture
does not enforce them: it answers 200 and the events are dropped later."""

# -- capture, 429 / 503 / 500 ---------------------------------------------------------------------

BILLING_LIMIT: Final = "billing limit reached"
"""429: the project is over its billing limit."""

RATE_LIMITED: Final = "rate limited"
"""429: the sender is rate-limited."""

RETRYABLE: Final = "transient error, please retry"
"""503: capture could not store the events; send them again."""

INTERNAL_ERROR: Final = "internal server error"
"""500: something broke inside capture."""

# -- key shape (rust/capture/src/token.rs) ---------------------------------------------------------

KEY_MAX_BYTES: Final = 64
"""The longest key capture accepts, in bytes, after trimming surrounding whitespace."""

PERSONAL_KEY_PREFIX: Final = "phx_"
"""Personal API keys start so; capture refuses them (a project key starts ``phc_``)."""

# -- flags (rust/feature-flags/src/api/errors.rs) --------------------------------------------------

FLAGS_NO_KEY: Final = "No API token provided. Please include a valid API token in your request."
"""401 from ``/flags``: the body has no ``api_key`` (nor ``token``)."""

FLAGS_INVALID_KEY: Final = (
    "The provided API key is invalid or has expired. Please check your API key and try again."
)
"""401 from ``/flags``: the key belongs to no project (or has the wrong shape)."""

FLAGS_MISSING_DISTINCT_ID: Final = (
    "The distinct_id field is missing from the request. Please include a valid identifier."
)
"""400 from ``/flags``: the body has no ``distinct_id``."""

FLAGS_DECODING_ERROR: Final = (
    "Failed to decode request: {}. Please check your request format and try again."
)
"""400 from ``/flags``: the body could not be decoded."""

FLAGS_PARSING_ERROR: Final = (
    "Failed to parse request: {}. Please ensure your request is properly formatted and all "
    "required fields are present."
)
"""400 from ``/flags``: the body is not the JSON ``/flags`` expects."""


def key_problem(key: str) -> str | None:
    """Why capture refuses ``key``'s shape (an `INVALID_KEY` reason), or ``None`` if it is fine.

    The checks and their order are capture's ``validate_token``: surrounding whitespace is
    trimmed first (so ``"phc_x\\n"`` is fine), then ``empty``, ``too_long`` (over
    `KEY_MAX_BYTES` bytes), ``not_ascii``, ``personal_api_key`` (starts with
    `PERSONAL_KEY_PREFIX`) and ``null_byte``. A well-formed key may still belong to no project.
    """
    key = key.strip()
    if not key:
        return "empty"
    if len(key.encode()) > KEY_MAX_BYTES:
        return "too_long"
    if not key.isascii():
        return "not_ascii"
    if key.startswith(PERSONAL_KEY_PREFIX):
        return "personal_api_key"
    if "\0" in key:
        return "null_byte"
    return None
