"""How big an event is once PostHog's capture has turned it into a Kafka message.

PostHog's capture service (``rust/capture`` in PostHog/posthog) writes every event it
accepts to Kafka as one record:

* the value is the ``CapturedEvent`` envelope (``rust/common/types/src/event.rs``)
  serialised by serde_json: ``uuid``, ``distinct_id``, ``ip``, ``data``, ``now``,
  ``sent_at``, ``token``, ``event``, ``timestamp`` and two flags. ``data`` is the
  event itself (``RawEvent``: ``token``, ``distinct_id``, ``uuid``, ``event``,
  ``properties``, ``timestamp``) serialised once more *as a JSON string*
  (``events/analytics.rs``, ``process_single_event``), so inside the envelope every
  ``"`` and ``\\`` of the event costs two bytes;
* the key is ``token:distinct_id`` (``token:ip`` for a cookieless event);
* the headers (``CapturedEventHeaders``) repeat the token, distinct_id, event, uuid,
  timestamp and ``now``, plus a few flags.

librdkafka refuses a record whose worst-case wire size (36 bytes of framing, the key,
the value and the serialised headers: ``rd_kafka_msg_max_wire_size``) is over
``message.max.bytes``; capture sets that from ``KAFKA_PRODUCER_MESSAGE_MAX_BYTES``,
1,000,000 by default (``rust/capture/src/config.rs``), and answers the request with an
"event too big" error. The worker ships events as ``worker.storage.base.ClaimedEvent.outbound``
writes them: the stored properties plus ``$ignore_sent_at`` and ``$geoip_disable``,
the row's uuid and timestamp.

:func:`oversize` measures an event that way, exactly where it can be and on the large
side where capture's inputs vary (the API key, the client address, the flags), so an
event it accepts fits whatever key the worker ships it with. It is on enqueue's hot
path: an event of up to about 14,000 characters is settled by arithmetic on its
length alone, a bigger one by counting a few characters, and only an event within
a few percent of the limit is measured number by number.

Numbers are the one part of the properties whose size changes on the way. PostgreSQL
stores a JSON number as ``numeric`` and writes it back in positional notation (the
``1e-300`` Python wrote comes back as ``0.000...001``, 302 characters); capture's
serde_json then reads it as a u64, an i64 or an f64 and writes it its own way
(``1e+16``, ``0.00001``), or keeps PostgreSQL's text when built with
``arbitrary_precision``. A number is counted at the longer of the two.
"""

from __future__ import annotations

import functools
import math
import re
from decimal import Decimal
from json.encoder import encode_basestring
from typing import Final

__all__ = ["MAX_MESSAGE_BYTES", "always_fits", "message_size", "number_growth", "oversize"]

MAX_MESSAGE_BYTES: Final = 1_000_000
"""``message.max.bytes`` of capture's Kafka producer: the largest record it writes."""

# --------------------------------------------------------------------------- the record

# What capture fills in itself, at its longest.
_TOKEN: Final = "t" * 64  # rust/capture/src/token.rs: a key of more than 64 bytes is refused
_IP: Final = "f" * 45  # the longest textual IP address (INET6_ADDRSTRLEN - 1)
_UUID: Final = "0" * 36
_NOW: Final = "2000-01-01T00:00:00.000000000Z"  # chrono, RFC 3339, AutoSi: nanoseconds at most
_SENT_AT: Final = "2000-01-01T00:00:00.000000000+00:00"  # the time crate's RFC 3339
_MILLIS: Final = "9" * 15  # the timestamp header: Unix milliseconds up to the year 9999
# What the worker writes (ClaimedEvent.outbound): datetime.isoformat() of the row's
# timestamp, at its longest (microseconds, an offset with seconds).
_ROW_TIMESTAMP: Final = "2000-01-01T00:00:00.000000+00:00:00"
_WORKER_PROPERTIES: Final = ',"$ignore_sent_at":true,"$geoip_disable":true'

# The envelope and the data, without the event name, the distinct_id and the
# properties (and, for the envelope, without data).
_ENVELOPE_SKELETON: Final = (
    f'{{"uuid":"{_UUID}","distinct_id":,"ip":"{_IP}","data":,"now":"{_NOW}",'
    f'"sent_at":"{_SENT_AT}","token":"{_TOKEN}","event":,"timestamp":"{_NOW}",'
    '"is_cookieless_mode":true,"historical_migration":true}'
)
_DATA_SKELETON: Final = (
    f'{{"token":"{_TOKEN}","distinct_id":,"uuid":"{_UUID}","event":,"properties":,'
    f'"timestamp":"{_ROW_TIMESTAMP}"}}'
)
# Headers as (name, longest value); distinct_id and event are added per event.
_HEADERS: Final = (
    ("token", len(_TOKEN)),
    ("distinct_id", 0),
    ("session_id", 0),  # only session replay fills it in
    ("timestamp", len(_MILLIS)),
    ("event", 0),
    ("uuid", len(_UUID)),
    ("now", len(_NOW)),
    ("force_disable_person_processing", len("false")),
    ("historical_migration", len("false")),
    ("skip_heatmap_processing", len("false")),
    ("internal_producer", len("false")),
    ("dlq_reason", len("event_restriction")),
    ("dlq_step", len("capture")),
    ("dlq_timestamp", len("2000-01-01T00:00:00.000Z")),
)
_KAFKA_FRAMING: Final = 36  # RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD: the varints at their widest
# A name of at most 200 characters is at most 800 bytes: its header's length varint
# (zigzag-encoded, 7 bits a byte) takes at most 2 bytes.
_NAME_VARINT: Final = 2


def _varint_len(n: int) -> int:
    """Bytes of librdkafka's zigzag varint for a non-negative length ``n``."""
    return max(1, ((2 * n).bit_length() + 6) // 7)


def _escaped_len(text: str) -> int:
    """Bytes ``text`` (ASCII JSON) takes as a JSON string's contents."""
    return len(text) + text.count('"') + text.count("\\")


_FIXED: Final = (
    _KAFKA_FRAMING
    + len(_TOKEN)
    + 1  # the key: token, ":", then the distinct_id (see oversize)
    + sum(len(name) + _varint_len(len(name)) + size + _varint_len(size) for name, size in _HEADERS)
    - 2 * _varint_len(0)  # distinct_id's and event's value varints are counted per event
    + len(_ENVELOPE_SKELETON)
    + 2  # data's quotes in the envelope
    + _escaped_len(_DATA_SKELETON)
    + _escaped_len(_WORKER_PROPERTIES)
)
"""Bytes of the record that do not depend on the event, at their largest."""


def _name_cost(text: str) -> int:
    """Bytes a name takes in the record: as a header value, in the envelope and in data.

    (The distinct_id is in the key too; the callers add that.)
    """
    literal = encode_basestring(text)  # serde_json escapes exactly as Python's json does
    if text.isascii():
        size, once = len(text), len(literal)
    else:
        size, once = len(text.encode()), len(literal.encode())
    twice = once + literal.count('"') + literal.count("\\")
    return size + (1 if size < 64 else _NAME_VARINT) + once + twice  # 1-byte varint to 63


# Per character of a name at most 16 bytes (4 bytes of UTF-8 in each of the key, a
# header, the envelope and data; a control character's \u00XX is 1 + 1 + 6 + 7), and
# per name at most 8 more (the length varint and the quotes, once and twice escaped).
_NAME_CHAR_MAX: Final = 16
_NAME_MAX: Final = _NAME_VARINT + 2 + 4


# --------------------------------------------------------------------------- numbers

# Python's json writes a float in scientific notation (1e+16, 1.5e-07) when its
# decimal exponent is below -4 or above 15; that is the only way a number's text
# grows on the way to the record, by at most this many bytes: 5e-324 (6 characters)
# comes back from PostgreSQL as 0.000...005 (326).
_MAX_NUMBER_GROWTH: Final = 320
# An integer of 20 characters or more, past u64 or i64, becomes an f64 in serde_json
# and takes at most two bytes more: 18446744073709551616 -> 1.8446744073709552e+19.
_BIG_INT_DIGITS: Final = 20
_BIG_INT_GROWTH: Final = 2
_I64_MIN: Final = -(2**63)
_U64_MAX: Final = 2**64 - 1

_TOKENS: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(-?[0-9][0-9.eE+-]*)')


def _serde_float_len(value: float) -> int:
    """Length of serde_json's text for a finite f64: ryu's layout, zmij's ``e+``.

    Fixed notation for a decimal exponent from -5 to 15 (``1000000000000000.0``,
    ``12.34``, ``0.00001``), else ``d.ddde+NN`` / ``de-N`` with the shortest digits
    that read back as the same double (the digits Python's ``repr`` finds).
    """
    if value == 0:
        return 3  # "0.0" (PostgreSQL never writes a negative zero)
    digits = Decimal(repr(abs(value))).normalize()
    length = len(digits.as_tuple().digits)
    exponent = digits.adjusted()
    sign = 1 if value < 0 else 0
    if -5 <= exponent <= 15:
        if length - 1 <= exponent:
            return sign + exponent + 3  # 1234e7 -> 12340000000.0
        if exponent >= 0:
            return sign + length + 1  # 12.34
        return sign + length + 1 - exponent  # 0.001234
    mantissa = length + 1 if length > 1 else 1
    return sign + mantissa + 2 + len(str(abs(exponent)))


@functools.lru_cache(maxsize=1024)  # the same values come back: 0.0, 1e-05...
def number_growth(token: str) -> int:
    """How many bytes more than ``token`` (a JSON number as Python's json writes it)
    the number takes in capture's record: PostgreSQL's text or serde_json's, the
    longer."""
    number = Decimal(token)
    sign, _, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # a finite number
    scale = max(0, -exponent)
    integer_digits = number.adjusted() + 1 if number and number.adjusted() >= 0 else 1
    negative = 1 if sign and number else 0
    postgres = negative + integer_digits + (scale + 1 if scale else 0)
    if scale == 0 and _I64_MIN <= number <= _U64_MAX:
        serde = postgres  # read as an integer and written back as it came
    else:
        as_float = float(number)
        # Past f64's range serde_json refuses the number (validation refuses it first).
        serde = _serde_float_len(as_float) if math.isfinite(as_float) else postgres
    return max(postgres, serde) - len(token)


def _float_growth(token: str) -> int:
    """:func:`number_growth` of a float as Python writes it in scientific notation
    (``-d.ddde-XX``: the shortest digits, none trailing), by counting characters."""
    negative = 1 if token[0] == "-" else 0
    mantissa, _, exponent_text = token[negative:].partition("e")
    exponent = int(exponent_text)
    digits = len(mantissa) - 1 if len(mantissa) > 1 else 1  # "d.ddd" or "d"
    if exponent < 0:
        postgres = negative + digits + 1 - exponent  # 0.000ddd
        if exponent == -5:
            serde = postgres  # serde_json writes 0.0000ddd too
        else:
            serde = negative + (digits + 1 if digits > 1 else 1) + 2 + len(str(-exponent))
    else:  # at least 16: PostgreSQL writes every digit of the integer
        postgres = negative + exponent + 1
        if exponent <= 17:
            serde = postgres  # an i64 or u64: written back as it came
        elif exponent <= 19:
            return number_growth(token)  # near the i64/u64 bounds
        else:
            serde = negative + (digits + 1 if digits > 1 else 1) + 2 + len(str(exponent))
    return max(postgres, serde) - len(token)


def _numbers_growth(properties_json: str) -> int:
    """The growth of every number in ``properties_json``, added up."""
    growth = 0
    for match in _TOKENS.finditer(properties_json):
        token = match.group(1)
        if token is None:
            continue
        if "e" in token:
            growth += _float_growth(token)
        elif len(token) >= _BIG_INT_DIGITS or "E" in token:
            growth += number_growth(token)
    return growth


# --------------------------------------------------------------------------- measure


def message_size(event: str, distinct_id: str, properties_json: str) -> int:
    """The largest record capture can write for this event, in bytes.

    ``properties_json`` is the compact JSON enqueue stores. Exact for the event's own
    parts; capture's parts (API key, client address, flags) are counted at their
    largest.
    """
    return (
        _FIXED
        + max(len(distinct_id.encode()), len(_IP))
        + _name_cost(distinct_id)
        + _name_cost(event)
        + (len(properties_json) if properties_json.isascii() else len(properties_json.encode()))
        + properties_json.count('"')
        + properties_json.count("\\")
        + _numbers_growth(properties_json)
    )


# Per character of the properties at most 4 bytes (UTF-8; a `"` or `\` costs 2), and a
# number in scientific notation (5 characters or more, and one apart) grows by at most
# _MAX_NUMBER_GROWTH, an integer of 20 characters (and one apart) by 2: 69 per
# character bounds all three.
_CHAR_MAX: Final = 69


def always_fits(name_chars: int) -> int:
    """The longest properties JSON (in characters) that fits with any names of at most
    ``name_chars`` characters together, whatever it holds: below it, :func:`oversize`
    need not be asked."""
    worst = _FIXED + len(_IP) + 2 * _NAME_MAX + _NAME_CHAR_MAX * name_chars
    return (MAX_MESSAGE_BYTES - worst) // _CHAR_MAX


def oversize(event: str, distinct_id: str, properties_json: str) -> int | None:
    """``None`` when the event fits in capture's record, else its size in bytes."""
    chars = len(properties_json)
    if chars <= always_fits(len(event) + len(distinct_id)):
        return None
    # A bigger event: its strings exactly, its numbers at their worst.
    bound = (
        _FIXED
        + max(len(distinct_id.encode()), len(_IP))
        + _name_cost(distinct_id)
        + _name_cost(event)
        + (chars if properties_json.isascii() else len(properties_json.encode()))
        + properties_json.count('"')
        + properties_json.count("\\")
        + (properties_json.count("e+") + properties_json.count("e-")) * _MAX_NUMBER_GROWTH
        + (chars // _BIG_INT_DIGITS) * _BIG_INT_GROWTH
    )
    if bound <= MAX_MESSAGE_BYTES:
        return None
    exact = message_size(event, distinct_id, properties_json)
    return None if exact <= MAX_MESSAGE_BYTES else exact
