"""A second, independent build of the Kafka record PostHog's capture writes for an event.

outbox._capture_size counts bytes; this builds the record's text the way capture does
(rust/capture: CapturedEvent serialised by serde_json, its ``data`` the event
serialised again, the key ``token:distinct_id``, the headers) from what the worker
sends (``ClaimedEvent.outbound()``), and measures it. Capture's own values (API key,
client address, flags) are filled in at their longest, as the library assumes.

serde_json may read numbers two ways: as u64/i64/f64 written back by its float
formatter, or (``arbitrary_precision``) keeping the text. :func:`record_size` builds the
record both ways and returns the larger.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

TOKEN = "t" * 64
IP = "f" * 45
UUID_TEXT = "0" * 36
NOW = "2000-01-01T00:00:00.000000000Z"
SENT_AT = "2000-01-01T00:00:00.000000000+00:00"
MILLIS = "9" * 15
KAFKA_FRAMING = 36


class Number:
    """A JSON number kept as its text."""

    def __init__(self, text: str) -> None:
        self.text = text


def _zmij(value: float) -> str:
    """serde_json's text for an f64 (zmij: fixed for exponents -5..15, else d.ddde+N)."""
    if value == 0:
        return "0.0"
    sign = "-" if value < 0 else ""
    text = repr(abs(value))
    if "e" in text:
        mantissa, exp_text = text.split("e")
        exponent = int(exp_text)
        digits = mantissa.replace(".", "")
    else:
        whole, _, fraction = text.partition(".")
        if whole != "0":
            exponent = len(whole) - 1
            digits = whole + fraction
        else:
            stripped = fraction.lstrip("0")
            exponent = -(len(fraction) - len(stripped)) - 1
            digits = stripped
    digits = digits.lstrip("0").rstrip("0") or "0"
    if -5 <= exponent <= 15:
        if len(digits) - 1 <= exponent:
            return sign + digits + "0" * (exponent - len(digits) + 1) + ".0"
        if exponent >= 0:
            return sign + digits[: exponent + 1] + "." + digits[exponent + 1 :]
        return sign + "0." + "0" * (-exponent - 1) + digits
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent)}"


def _serde_number(text: str) -> str:
    if re.fullmatch(r"-?[0-9]+", text) and -(2**63) <= int(text) <= 2**64 - 1:
        return str(int(text))
    return _zmij(float(text))


def _dumps(value: Any, keep_numbers: bool) -> str:
    if isinstance(value, Number):
        return value.text if keep_numbers else _serde_number(value.text)
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(
                json.dumps(k, ensure_ascii=False) + ":" + _dumps(v, keep_numbers)
                for k, v in value.items()
            )
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v, keep_numbers) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _varint(n: int) -> int:
    zigzag, size = 2 * n, 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


def _record(outbound: dict[str, Any], keep_numbers: bool) -> int:
    distinct_id = outbound["distinct_id"]
    event = outbound["event"]
    data = _dumps(
        {
            "token": TOKEN,
            "distinct_id": distinct_id,
            "uuid": outbound["uuid"],
            "event": event,
            "properties": outbound["properties"],
            "timestamp": outbound["timestamp"],
        },
        keep_numbers,
    )
    value = json.dumps(
        {
            "uuid": UUID_TEXT,
            "distinct_id": distinct_id,
            "ip": IP,
            "data": data,
            "now": NOW,
            "sent_at": SENT_AT,
            "token": TOKEN,
            "event": event,
            "timestamp": NOW,
            "is_cookieless_mode": True,
            "historical_migration": True,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )
    headers = {
        "token": TOKEN,
        "distinct_id": distinct_id,
        "session_id": "",
        "timestamp": MILLIS,
        "event": event,
        "uuid": UUID_TEXT,
        "now": NOW,
        "force_disable_person_processing": "false",
        "historical_migration": "false",
        "skip_heatmap_processing": "false",
        "internal_producer": "false",
        "dlq_reason": "event_restriction",
        "dlq_step": "capture",
        "dlq_timestamp": "2000-01-01T00:00:00.000Z",
    }
    header_bytes = sum(
        len(k) + _varint(len(k)) + len(v.encode()) + _varint(len(v.encode()))
        for k, v in headers.items()
    )
    key = len(TOKEN) + 1 + max(len(distinct_id.encode()), len(IP))  # token:distinct_id or :ip
    return KAFKA_FRAMING + key + header_bytes + len(value.encode())


def record_size(outbound_json: str) -> int:
    """The size of capture's record for an event the worker sends as ``outbound_json``."""
    outbound = json.loads(outbound_json, parse_float=Number, parse_int=Number)
    return max(_record(outbound, keep_numbers=True), _record(outbound, keep_numbers=False))


def postgres_number(token: str) -> str:
    """How PostgreSQL's jsonb writes back a JSON number: ``numeric``, positional."""
    number = Decimal(token)
    text = format(number, "f")
    return text[1:] if number == 0 and text.startswith("-") else text  # no negative zero


def outbound_for(event: str, distinct_id: str, properties_json: str) -> str:
    """What the worker would send for a row, without a database: the properties as
    PostgreSQL gives them back (numbers positional), plus the worker's own, and the
    longest timestamp ``isoformat()`` writes."""
    properties = json.loads(
        properties_json,
        parse_float=lambda t: Number(postgres_number(t)),
        parse_int=lambda t: Number(postgres_number(t)),
    )
    properties["$ignore_sent_at"] = True
    if "$ip" not in properties:
        properties["$geoip_disable"] = True
    return _dumps(
        {
            "event": event,
            "distinct_id": distinct_id,
            "properties": properties,
            "uuid": UUID_TEXT,
            "timestamp": "2000-01-01T00:00:00.000000+00:00:00",
        },
        keep_numbers=True,
    )
