"""The PostHog sink over capture v1: ``POST /i/v1/analytics/events``, answered per event.

``OUTBOX_POSTHOG_TRANSPORT=v1`` selects it; ``direct`` (``/batch/``) stays the default.
What the protocol says, and where it was read:

- PostHog's capture service, ``rust/capture/src/v1/``: ``context.rs`` (the project key
  comes as ``Authorization: Bearer``; ``PostHog-Sdk-Info``, ``PostHog-Attempt`` (1 or
  more), ``PostHog-Request-Id`` (a UUID), ``PostHog-Request-Timestamp`` (RFC 3339),
  ``Content-Type: application/json`` and ``User-Agent`` are required), ``constants.rs``
  (gzip, deflate, br and zstd bodies), ``analytics/types.rs`` (the body is
  ``{"created_at", "batch": [...]}``; an event is ``event``, ``uuid``, ``distinct_id``,
  ``timestamp`` as strings, ``options`` and ``properties``; the option
  ``disable_skew_correction`` is what ``$ignore_sent_at`` was, and the server writes
  ``$ignore_sent_at``, ``$session_id`` and ``$lib`` back into the properties),
  ``analytics/process.rs`` (a missing, malformed or duplicate ``uuid`` refuses the whole
  request with 400; other bad events are dropped one by one), ``analytics/response.rs``
  (200 with ``{"results": {uuid: {"result": "ok"|"warning"|"drop"|"retry",
  "details": ...}}}``, ``Retry-After: 1`` when an event is to be retried),
  ``quota_limiter_shim.rs`` and ``error.rs`` (a project over its billing limit gets
  ``billing_limit_exceeded`` for the whole request: 402 in the current code, 429 with
  ``Retry-After`` in earlier versions; 429 ``rate_limited`` is a plain rate limit).
- posthog-python 7.91, ``posthog/capture_v1.py``: the same transform of a legacy event
  (sentinel properties become ``options``, ``$session_id``/``$window_id`` go top level,
  ``$lib`` is left to the server), ``ok``/``warning``/absent count as delivered, and only
  the ``retry`` events are sent again.

How the worker maps the answers (the drainer never splits a request over a bad event):

================================  ====================================================
200, an event ``ok``/``warning``  delivered (warnings are logged: ``v1_event_warnings``)
200, an event ``drop``            dead at once, ``last_error`` naming PostHog's reason
200, an event ``retry``           retried with backoff (an attempt counted), alone
402, or 429 ``billing_limit``     :class:`BillingLimitedError`: a pause, and every event
                                  counts an attempt (dead after ``OUTBOX_MAX_ATTEMPTS``)
429                               :class:`RateLimitedError` with ``Retry-After``
401/403                           :class:`UnauthorizedError`
400, 415                          :class:`RequestRejectedError`: about the request's form
                                  (v1 drops bad events one by one), so everything stays
                                  pending; splitting would bury every event
413                               :class:`RejectedError`: too large a request, split by
                                  the drainer (one event too large dies)
3xx                               :class:`RedirectError`, never followed
anything else                     :class:`RetryableSinkError` (a 404 says the host may
                                  not serve capture v1)
================================  ====================================================

Events PostHog would refuse the whole request for are dropped here, one by one, before
sending: a missing or malformed ``uuid``, an event name that is not a string. Two events
with the same ``uuid`` go in separate requests.

Like the ``direct`` transport, the request is pasted together from the JSON text the
store made (`_splice`); only an event in another form, or carrying a property v1 moves
(``$session_id``, ``$lib``, ...), is decoded and rebuilt by `to_v1_event`.
"""

from __future__ import annotations

import gzip as gzip_module
import json
import logging
import re
import uuid as uuid_module
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import requests
from posthog import request as ph_request

from outbox import __version__
from worker.sinks.base import (
    BillingLimitedError,
    EventResultsError,
    Outbound,
    RateLimitedError,
    RedirectError,
    RejectedError,
    RequestRejectedError,
    RetryableSinkError,
    SinkError,
    UnauthorizedError,
    clean_text,
)
from worker.sinks.posthog import GZIP_LEVEL, USER_AGENT, retry_after

__all__ = ["SDK_INFO", "V1_PATH", "PostHogV1Sink", "to_v1_event"]

log = logging.getLogger("outbox.worker")

V1_PATH: Final = "/i/v1/analytics/events"
#: ``PostHog-Sdk-Info``: PostHog sets ``$lib``/``$lib_version`` of every event from it.
SDK_INFO: Final = f"posthog-outbox/{__version__}"

#: Legacy sentinel properties and the v1 option each becomes (``analytics/types.rs``).
_BOOL_OPTIONS: Final = (
    ("$ignore_sent_at", "disable_skew_correction"),
    ("$cookieless_mode", "cookieless_mode"),
    ("$process_person_profile", "process_person_profile"),
)
_TOP_LEVEL: Final = (("$session_id", "session_id"), ("$window_id", "window_id"))
#: The server writes these from ``PostHog-Sdk-Info``; both SDKs leave them out.
_SERVER_SET: Final = ("$lib", "$lib_version")
#: Longest reason or detail from PostHog kept for one event or one log line.
_MAX_DETAIL: Final = 300
#: Most of an error body read (a proxy's HTML page can be large).
_MAX_BODY: Final = 64 * 1024


class PostHogV1Sink:
    """Ships batches to ``{host}/i/v1/analytics/events`` and maps PostHog's answer for
    each event onto the drainer's outcome (see the module docstring)."""

    name = "posthog"
    transport = "v1"

    def __init__(
        self, api_key: str, host: str, *, gzip: bool = True, timeout: float = 15.0
    ) -> None:
        self._api_key = api_key
        self.host = ph_request.determine_server_host(host).rstrip("/")
        self.gzip = gzip
        self.timeout = timeout
        self._url = self.host + V1_PATH
        self._session = requests.Session()

    def __repr__(self) -> str:  # never show the key
        return f"PostHogV1Sink(host={self.host!r}, gzip={self.gzip})"

    def send(self, events: Sequence[Outbound]) -> None:
        """POST the events; return when PostHog kept every one of them.

        Raises :class:`EventResultsError` when some were dropped or are to be retried,
        and the other :class:`SinkError` subclasses for a refusal of the whole request.
        """
        accepted: list[int] = []
        retry: list[int] = []
        retry_details: Counter[str] = Counter()
        dropped: list[tuple[int, str]] = []
        rounds: list[list[tuple[int, str, str]]] = []  # (index, uuid, wire JSON)
        seen: Counter[str] = Counter()
        for index, outbound in enumerate(events):
            uid, wire = _prepare(outbound)
            if uid is None:
                dropped.append(
                    (index, f"not sent: capture v1 refuses a whole request for it ({wire})")
                )
                continue
            turn = seen[uid]
            seen[uid] += 1
            if turn == len(rounds):
                rounds.append([])
            rounds[turn].append((index, uid, wire))

        for number, batch in enumerate(rounds):
            try:
                results = self._post([wire for _, _, wire in batch])
            except SinkError as exc:
                if number == 0:
                    raise  # nothing was delivered (events dropped here are dropped again)
                # A later round (the same uuid twice in one send): what went before
                # stands, what this request carried is sent again later.
                retry.extend(index for index, _, _ in batch)
                retry_details[str(exc)] += len(batch)
                continue
            warnings: Counter[str] = Counter()
            for index, uid, _ in batch:
                verdict = results.get(uid)
                result = verdict.get("result") if isinstance(verdict, Mapping) else None
                details = verdict.get("details") if isinstance(verdict, Mapping) else None
                detail = self._clean(details, _MAX_DETAIL) if details is not None else None
                if result == "drop":
                    dropped.append((index, f"dropped by PostHog: {detail or 'no reason given'}"))
                elif result == "retry":
                    retry.append(index)
                    retry_details[detail or "no reason given"] += 1
                else:  # ok, warning, absent or unknown: delivered (as both SDKs do)
                    accepted.append(index)
                    if result == "warning":
                        warnings[detail or "no reason given"] += 1
            if warnings:
                log.info(
                    "PostHog accepted %d events with a warning: %s",
                    sum(warnings.values()),
                    _tally(warnings),
                    extra={"action": "v1_event_warnings", "events": sum(warnings.values())},
                )

        if not retry and not dropped:
            return
        retry_error = (
            f"PostHog capture v1 asked to send {len(retry)} event(s) again: {_tally(retry_details)}"
            if retry
            else ""
        )
        message = (
            f"PostHog capture v1 accepted {len(accepted)} of {len(events)} events"
            f" ({len(dropped)} dropped, {len(retry)} to retry)"
        )
        raise EventResultsError(
            message, accepted=accepted, retry=retry, retry_error=retry_error, dropped=dropped
        )

    def _post(self, batch: list[str]) -> dict[str, Any]:
        """One request of events (their wire JSON); the ``results`` map of a 2xx answer,
        else a SinkError."""
        now = datetime.now(UTC).isoformat()
        body = ('{"created_at":"' + now + '","batch":[' + ",".join(batch) + "]}").encode()
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "PostHog-Sdk-Info": SDK_INFO,
            # Each request is a first attempt: the drainer, not the sink, sends again,
            # and then as a new request with a new id.
            "PostHog-Attempt": "1",
            "PostHog-Request-Id": str(uuid_module.uuid4()),
            "PostHog-Request-Timestamp": now,
        }
        if self.gzip:
            body = gzip_module.compress(body, compresslevel=GZIP_LEVEL)
            headers["Content-Encoding"] = "gzip"
        try:
            response = self._session.post(
                self._url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.exceptions.Timeout as exc:
            raise RetryableSinkError(
                f"timed out after {self.timeout}s: {self._clean(exc)}"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise RetryableSinkError(f"connection error: {self._clean(exc)}") from exc
        status = response.status_code
        if 200 <= status < 300:
            try:
                results = response.json()["results"]
            except (ValueError, KeyError, TypeError):
                results = None
            if not isinstance(results, dict):
                # A success without a readable answer: PostHog took the request, and
                # sending it again cannot give a better one (posthog-python stops too).
                log.warning(
                    "PostHog capture v1 answered %d without per-event results; "
                    "counting the events as delivered",
                    status,
                    extra={"action": "v1_unreadable_answer", "events": len(batch)},
                )
                return {}
            return results
        raise self._refusal(response)

    def _refusal(self, response: requests.Response) -> SinkError:
        """The SinkError for a non-2xx answer of the whole request."""
        status = response.status_code
        tag, description = _error_fields(response)
        text = f"HTTP {status} {tag}: {description}" if tag else f"HTTP {status}: {description}"
        text = self._clean(text.rstrip(": "))
        if tag == "billing_limit_exceeded" or status == 402:
            return BillingLimitedError(text, status=status, retry_after=retry_after(response))
        if status == 429:
            return RateLimitedError(text, retry_after=retry_after(response))
        if status in (401, 403):
            return UnauthorizedError(text, status=status)
        if 300 <= status < 400:
            location = response.headers.get("Location")
            where = self._clean(location, _MAX_DETAIL) if location else None
            return RedirectError(
                f"HTTP {status}: redirected to {where or '(no Location header)'}; redirects "
                "are not followed: set POSTHOG_HOST to the URL the events should go to",
                status=status,
                location=where,
            )
        if status in (400, 415):
            return RequestRejectedError(text, status=status, detail=tag or text)
        if status == 413:
            return RejectedError(text, status=status, detail=tag or text)
        if status == 404:
            text += f" ({self.host} may not serve capture v1: OUTBOX_POSTHOG_TRANSPORT=direct)"
        return RetryableSinkError(text, status=status)

    def _clean(self, text: object, limit: int | None = None) -> str:
        """Network text made safe to log and store (``clean_text``), the key masked."""
        if limit is None:
            return clean_text(str(text), (self._api_key,))
        return clean_text(str(text), (self._api_key,), limit)

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def to_v1_event(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored (v0-shaped) event as capture v1 wants it.

    ``$ignore_sent_at``, ``$cookieless_mode``, ``$process_person_profile`` and
    ``$product_tour_id`` move into ``options``, ``$session_id``/``$window_id`` to the top
    level, ``$lib``/``$lib_version`` are left out (PostHog sets them from
    ``PostHog-Sdk-Info``), and top-level ``$set``/``$set_once`` move into the
    properties. Properties that are not an object are passed as they are: PostHog drops
    that event alone (``malformed_event_properties``).
    """
    raw_properties = data.get("properties")
    options: dict[str, Any] = {}
    top: dict[str, str] = {}
    properties: Any
    if raw_properties is None or isinstance(raw_properties, Mapping):
        properties = dict(raw_properties or {})
        for legacy, option in _BOOL_OPTIONS:
            if legacy in properties:
                value = _coerce_bool(properties.pop(legacy))
                if value is not None:
                    options[option] = value
        if "$product_tour_id" in properties:
            tour = properties.pop("$product_tour_id")
            if isinstance(tour, str):
                options["product_tour_id"] = tour
        for legacy, field in _TOP_LEVEL:
            if legacy in properties:
                value = properties.pop(legacy)
                if isinstance(value, str):
                    top[field] = value
        for key in _SERVER_SET:
            properties.pop(key, None)
        for key in ("$set", "$set_once"):
            if data.get(key) is not None and key not in properties:
                properties[key] = data[key]
    else:
        properties = raw_properties
    distinct_id = data.get("distinct_id")
    event: dict[str, Any] = {
        "event": data.get("event"),
        "uuid": data.get("uuid"),
        "distinct_id": "" if distinct_id is None else str(distinct_id),
        "timestamp": _timestamp(data.get("timestamp")),
        **top,
        "options": options,
        "properties": properties,
    }
    return event


def _prepare(outbound: Outbound) -> tuple[str | None, str]:
    """``(uuid, wire JSON)`` of an event, or ``(None, why)`` when PostHog would refuse the
    whole request for it."""
    fast = _splice(outbound.json)
    if fast is not None:
        return fast
    wire = to_v1_event(outbound.data)
    uid = wire["uuid"]
    if uid is None or (isinstance(uid, str) and not uid.strip()):
        return None, "missing_event_uuid"
    try:
        wire["uuid"] = str(uuid_module.UUID(str(uid).strip()))
    except ValueError:
        return None, "invalid_event_uuid"
    if not isinstance(wire["event"], str):
        return None, "missing_event_name"
    return wire["uuid"], json.dumps(wire, separators=(",", ":"), ensure_ascii=False)


#: What ``ClaimedEvent.outbound()`` appends to the stored properties, and what of it stays.
_STORE_SUFFIXES: Final = (
    (', "$ignore_sent_at": true, "$geoip_disable": true}', ', "$geoip_disable": true}'),
    (', "$ignore_sent_at": true}', "}"),
)
_STORE_EMPTY: Final = {
    '{"$ignore_sent_at": true, "$geoip_disable": true}': '{"$geoip_disable": true}',
    '{"$ignore_sent_at": true}': "{}",
}
_STORE_TAIL: Final = re.compile(
    r', "uuid": "([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", '
    r'"timestamp": "(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?[+-]\d\d:\d\d)"\}\Z'
)
#: Properties whose presence sends an event down the decoding path (``to_v1_event``).
_SENTINEL: Final = re.compile(
    r'"\$(?:ignore_sent_at|cookieless_mode|process_person_profile|product_tour_id'
    r'|session_id|window_id|lib|lib_version)"'
)
_JSON_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"')


def _splice(text: str) -> tuple[str, str] | None:
    """The v1 wire JSON of an event in the store's form (``ClaimedEvent.outbound()``), cut
    and pasted without decoding the properties; None for any other form, which then goes
    through `to_v1_event`. A sentinel property anywhere in the text also gives None."""
    if not text.startswith('{"event": "'):
        return None
    cut = text.rfind(', "uuid": "')
    tail = _STORE_TAIL.match(text, cut) if cut > 0 else None
    if tail is None:
        return None
    name = _JSON_STRING.match(text, 10)
    if name is None or not text.startswith(', "distinct_id": "', name.end()):
        return None
    distinct_id = _JSON_STRING.match(text, name.end() + 17)
    if distinct_id is None or not text.startswith(', "properties": {', distinct_id.end()):
        return None
    props = text[distinct_id.end() + 16 : cut]
    kept = _STORE_EMPTY.get(props)
    if kept is None:
        for suffix, rest in _STORE_SUFFIXES:
            if props.endswith(suffix):
                kept = props[: -len(suffix)] + rest
                break
        else:
            return None
    if _SENTINEL.search(kept):
        return None
    uid, stamp = tail.group(1), tail.group(2)
    return uid, (
        '{"event":'
        + name.group()
        + ',"uuid":"'
        + uid
        + '","distinct_id":'
        + distinct_id.group()
        + ',"timestamp":"'
        + stamp
        + '","options":{"disable_skew_correction":true},"properties":'
        + kept
        + "}"
    )


def _timestamp(value: object) -> str:
    """An RFC 3339 timestamp with a zone (the v1 server refuses naive ones)."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return value  # PostHog drops this one event: invalid_event_timestamp
    else:
        when = datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.isoformat()


def _coerce_bool(value: object) -> bool | None:
    """PostHog's reading of a boolean option; None leaves the option out."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
    return None


def _error_fields(response: requests.Response) -> tuple[str, str]:
    """``error`` and ``error_description`` of a v1 error body (``error.rs``), not yet clean."""
    text = response.text[:_MAX_BODY]
    try:
        payload = json.loads(text)
    except ValueError:
        return "", text
    if not isinstance(payload, dict):
        return "", text
    tag = payload.get("error")
    description = payload.get("error_description") or payload.get("detail") or ""
    return (str(tag)[:_MAX_DETAIL] if tag else ""), str(description)


def _tally(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} ({n})" for reason, n in counts.most_common())
