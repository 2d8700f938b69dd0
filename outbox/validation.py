"""Validate and normalise an event in Python, before anything reaches the database.

:func:`prepare_event` turns what the application passed to ``enqueue`` into a
:class:`PreparedEvent` whose every field PostgreSQL will accept, or raises
:class:`~outbox.exceptions.OutboxValidationError` naming the offending field. Doing
this in Python means bad input never aborts the caller's transaction: nothing has
been sent to the server yet, so the caller can catch the error and still commit.

The module runs on every enqueue, so the common case (properties made of plain
``str``/``int``/``float``/``bool``/``None``/``dict``/``list`` values) costs one
C-level encoding (orjson, or the standard ``json`` where orjson's text would differ)
plus a few string scans. Only when that
pass finds something to fix (a NUL character, a lone surrogate, a non-finite float,
a non-string key, a suspiciously deep structure) or something to refuse does the
slower walk over the structure run, and it builds a normalised copy only then. The
caller's objects are never modified.
"""

from __future__ import annotations

import json
import json.encoder
import math
import os
import re
import threading
import time
import unicodedata
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dt_time
from decimal import Decimal
from enum import Enum
from typing import Any, Final, Literal
from uuid import UUID

import orjson

from outbox._capture_size import MAX_MESSAGE_BYTES, always_fits, oversize
from outbox.exceptions import OutboxValidationError
from outbox.schema import (
    DESTINATION_METRICS,
    DESTINATION_POSTHOG,
    TIMESTAMP_MAX_AHEAD,
    TIMESTAMP_MIN,
)

__all__ = [
    "DESTINATION_METRICS",
    "DESTINATION_POSTHOG",
    "MAX_EVENT_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_NESTING_DEPTH",
    "RESERVED_DISTINCT_IDS",
    "Destination",
    "PreparedEvent",
    "check_distinct_id",
    "new_event_uuid",
    "normalise_properties",
    "prepare_event",
]

Destination = Literal["posthog", "metrics"]
"""Where the worker sends an event: to PostHog, or into its Prometheus metrics."""

MAX_NAME_LENGTH: Final = 200
"""Longest accepted event name, distinct_id and dedup_key, in characters (after stripping)."""

MAX_EVENT_BYTES: Final = MAX_MESSAGE_BYTES
"""Largest accepted event, measured as PostHog's capture measures it: 1,000,000 bytes.

That is the Kafka record capture writes for the event, where the event (its
properties, with what the worker adds) is JSON inside a JSON string, so every ``"``
and ``\\`` costs two bytes, next to capture's envelope fields, key and headers
(see :mod:`outbox._capture_size`). About 998,700 bytes of plain text properties fit.
"""

MAX_NESTING_DEPTH: Final = 64
"""Deepest accepted nesting of containers in properties; the properties object itself is level 1."""


def _with_quoted(ids: tuple[str, ...]) -> frozenset[str]:
    return frozenset(variant for i in ids for variant in (i, f"'{i}'", f'"{i}"'))


# PostHog's isDistinctIdIllegal (nodejs/src/common/persons/person-utils.ts, mirrored
# in rust/personhog-*): ids that "stem from a bug or mistake", never allowed to
# drive a merge, also when wrapped in single or double quotes.
RESERVED_DISTINCT_IDS: Final[frozenset[str]] = _with_quoted(
    (
        "anonymous",
        "guest",
        "distinctid",
        "distinct_id",
        "id",
        "not_authenticated",
        "email",
        "undefined",
        "true",
        "false",
    )
)
"""distinct_ids PostHog refuses whatever their case; compared stripped and lower-cased.

PostHog treats these as placeholders that would merge unrelated users into one
person. A second, case-sensitive set (``"[object Object]"``, ``"NaN"``, ``"None"``,
``"none"``, ``"null"``, ``"0"``, ``"undefined"``) is compared exactly, after
stripping; a distinct_id matching either set is refused. Both sets hold each id
bare and wrapped in single and in double quotes (``'null'``, ``"anonymous"``), as
PostHog's do.
"""

_RESERVED_DISTINCT_IDS_EXACT: Final[frozenset[str]] = _with_quoted(
    ("[object Object]", "NaN", "None", "none", "null", "0", "undefined")
)

# Characters that show nothing: a name made only of these (after stripping the
# whitespace Python strips) is refused. Control and format characters (U+200B zero
# width space, U+FEFF, bidi marks...), separators and combining marks by category;
# blank letters and the Braille blank by code point.
_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_CHARACTERS: Final = frozenset("\u115f\u1160\u2800\u3164\uffa0")

_REPLACEMENT: Final = "\ufffd"
_JSON_ESCAPED_NUL: Final = "\\u0000"
# capture's serde_json reads a JSON integer past u64/i64 as an f64 and refuses the
# whole request when that overflows: an int of more than 1,023 bits may not fit, and
# one that does not has at least 309 digits.
_F64_MAX_INT_BITS: Final = 1023
_F64_OVERFLOW_DIGITS: Final = 309
# Any run of 309 digits holds two consecutive characters of text[153::154].
_DIGIT_SAMPLE_STEP: Final = (_F64_OVERFLOW_DIGITS - 1) // 2
_two_digits: Final = re.compile(r"[0-9][0-9]").search
_PLAIN_KEY: Final = re.compile(r"[\w$-]+")
_SCALAR_TYPES: Final[frozenset[type]] = frozenset({str, int, float, bool, type(None)})


# --------------------------------------------------------------------------- UUIDv7


class _Uuid7State:
    """The last UUIDv7 this process issued, so the next one can be made larger."""

    __slots__ = ("last_ms", "last_tail", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_ms = 0
        self.last_tail = 0  # 74 bits: rand_a (12) then rand_b (62)


_uuid7_state = _Uuid7State()
_TAIL_BITS: Final = 74
_RAND_B_MASK: Final = (1 << 62) - 1
_UUID7_VERSION_AND_VARIANT: Final = (0x7 << 76) | (0b10 << 62)


def _reset_uuid7_state_after_fork() -> None:
    # A forked child must not continue the parent's sequence (both would issue the
    # same next value), and must not inherit a lock another thread may have held.
    global _uuid7_state  # replaced wholesale, so the lock is new too
    _uuid7_state = _Uuid7State()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_uuid7_state_after_fork)


def _fresh_tail() -> int:
    # 73 random bits: the counter's top bit starts clear, so incrementing within one
    # millisecond has 2**73 values of headroom before it could overflow.
    return int.from_bytes(os.urandom(10), "big") >> 7


def new_event_uuid() -> UUID:
    """Return a new UUIDv7 (RFC 9562) for an event.

    The first 48 bits are the Unix time in milliseconds, then the version (7), 12
    bits of ``rand_a``, the RFC 4122 variant bits and 62 bits of ``rand_b``. The 74
    ``rand_a``/``rand_b`` bits start random in each new millisecond and act as one
    counter: a second call in the same millisecond (or after the wall clock stepped
    backwards) reuses the previous timestamp and adds one. So values returned by
    one process are strictly increasing, from any thread, even when the clock
    misbehaves; values from different processes are only roughly time-ordered. A
    forked child starts a fresh sequence rather than repeating its parent's.

    UUIDv7 sorts by creation time, which keeps the outbox's primary-key index
    append-mostly, and PostHog uses the same version for its own event ids.
    """
    state = _uuid7_state
    now_ms = time.time_ns() // 1_000_000
    with state.lock:
        if now_ms > state.last_ms:
            ms = now_ms
            tail = _fresh_tail()
        else:
            ms = state.last_ms
            tail = state.last_tail + 1
            if tail >> _TAIL_BITS:  # counter exhausted: borrow the next millisecond
                ms += 1
                tail = _fresh_tail()
        state.last_ms = ms
        state.last_tail = tail
    value = (
        ((ms & 0xFFFF_FFFF_FFFF) << 80)
        | _UUID7_VERSION_AND_VARIANT
        | ((tail >> 62) << 64)
        | (tail & _RAND_B_MASK)
    )
    return UUID(int=value)


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """An event that passed validation, normalised into exactly what gets stored.

    ``event``, ``distinct_id`` and ``dedup_key`` are stripped and contain neither NUL
    characters nor lone surrogates. ``properties_json`` is compact JSON object text
    (``separators=(",", ":")``, ``ensure_ascii=False``) that PostgreSQL's ``jsonb``
    accepts: no NUL, no lone surrogates, no NaN or Infinity, string keys only.
    ``timestamp`` is timezone-aware UTC, or ``None`` meaning "use the database's
    ``now()``" (the time of the caller's transaction). ``uuid`` is the event's id,
    either the caller's or a fresh UUIDv7. ``destination`` is ``"posthog"`` for an
    ordinary event and ``"metrics"`` for one the event contract marks metrics-only
    (see :mod:`outbox.contract`); it is stored in the row's ``destination`` column.
    """

    uuid: UUID
    event: str
    distinct_id: str
    properties_json: str
    timestamp: datetime | None
    dedup_key: str | None
    destination: Destination = "posthog"


# --------------------------------------------------------------------------- strings


def _fix_surrogates(text: str) -> str:
    # Python strings may hold surrogate code points UTF-8 cannot encode. Going through
    # UTF-16 joins correctly paired surrogates back into the character they spell and
    # turns the lone ones into U+FFFD.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _clean_text(text: str) -> str:
    """Return ``text`` with NUL and lone surrogates replaced by U+FFFD (same object if clean)."""
    if "\x00" in text:
        text = text.replace("\x00", _REPLACEMENT)
    if not text.isascii():  # O(1) in CPython: the string knows its widest character
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _fix_surrogates(text)
    return text


def _type_name(value: object) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- names


def _is_blank(text: str) -> bool:
    """True when no character of ``text`` shows anything (see ``_INVISIBLE_CATEGORIES``)."""
    for char in text:
        if char not in _BLANK_CHARACTERS and unicodedata.category(char) not in (
            _INVISIBLE_CATEGORIES
        ):
            return False
    return True


def _code_points(text: str, limit: int = 5) -> str:
    shown = " ".join(f"U+{ord(c):04X}" for c in text[:limit])
    return shown + (" ..." if len(text) > limit else "")


def _check_name(value: str, field: str, what: str) -> str:
    """Strip, refuse empty, invisible or over-long, and clean a name-like string."""
    stripped = value.strip()
    if not stripped:
        raise OutboxValidationError(field, f"{what} must not be empty or only whitespace")
    text = _clean_text(stripped)
    if len(text) > MAX_NAME_LENGTH:
        raise OutboxValidationError(
            field, f"{what} is {len(text)} characters long, over the {MAX_NAME_LENGTH} limit"
        )
    if _is_blank(stripped):  # before cleaning: a NUL shows nothing either
        raise OutboxValidationError(
            field,
            f"{what} has no visible character ({_code_points(stripped)}), only "
            "invisible format, control or blank ones",
        )
    return text


def _int_to_str(value: int, field: str) -> str:
    try:
        return int.__repr__(value)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows
        raise OutboxValidationError(
            field, f"integer is far over the {MAX_NAME_LENGTH} character limit"
        ) from None


def _check_event(event: object, field: str) -> str:
    if not isinstance(event, str):
        raise OutboxValidationError(field, f"must be a str, got {_type_name(event)}")
    return _check_name(event, field, "event name")


def _check_distinct_id(distinct_id: object, field: str) -> str:
    if isinstance(distinct_id, str):
        text = distinct_id
    elif isinstance(distinct_id, int) and not isinstance(distinct_id, bool):
        text = _int_to_str(distinct_id, field)
    elif isinstance(distinct_id, UUID):
        text = str(distinct_id)
    else:
        raise OutboxValidationError(
            field, f"must be a str, int or uuid.UUID, got {_type_name(distinct_id)}"
        )
    text = _check_name(text, field, "distinct_id")
    if text in _RESERVED_DISTINCT_IDS_EXACT or text.lower() in RESERVED_DISTINCT_IDS:
        raise OutboxValidationError(
            field,
            f"{text!r} is reserved by PostHog as a placeholder id; sending it would merge "
            "unrelated users into one person",
        )
    return text


def _check_dedup_key(dedup_key: object, field: str) -> str | None:
    if dedup_key is None:
        return None
    if isinstance(dedup_key, str):
        return _check_name(dedup_key, field, "dedup_key")
    if isinstance(dedup_key, int) and not isinstance(dedup_key, bool):
        return _check_name(_int_to_str(dedup_key, field), field, "dedup_key")
    raise OutboxValidationError(field, f"must be a str, int or None, got {_type_name(dedup_key)}")


# --------------------------------------------------------------------------- timestamp


def _check_timestamp(timestamp: object, field: str) -> datetime | None:
    if timestamp is None:
        return None
    if isinstance(timestamp, str):
        text = timestamp.strip()
        try:
            date.fromisoformat(text)
        except ValueError:
            pass
        else:
            raise OutboxValidationError(
                field,
                f"{_short_repr(timestamp)} is a date without a time of day; "
                "pass a full ISO 8601 datetime",
            )
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise OutboxValidationError(
                field, f"{_short_repr(timestamp)} is not an ISO 8601 datetime"
            ) from None
    elif isinstance(timestamp, datetime):
        parsed = timestamp
    elif isinstance(timestamp, date):
        raise OutboxValidationError(
            field, "a date without a time of day is ambiguous; pass a datetime"
        )
    else:
        raise OutboxValidationError(
            field, f"must be a datetime, an ISO 8601 str or None, got {_type_name(timestamp)}"
        )
    try:
        when = parsed.replace(tzinfo=UTC) if parsed.utcoffset() is None else parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise OutboxValidationError(
            field, f"{_short_repr(timestamp)} cannot be expressed in UTC"
        ) from None
    return _check_timestamp_range(when, field)


def _check_timestamp_range(when: datetime, field: str) -> datetime:
    """Refuse a UTC timestamp PostHog would not keep (see ``outbox.schema.TIMESTAMP_MIN``)."""
    if when < TIMESTAMP_MIN:
        raise OutboxValidationError(
            field,
            f"{when.isoformat()} is before {TIMESTAMP_MIN.isoformat()}: PostHog puts the "
            "timestamps it cannot use at the Unix epoch, so an earlier one is a mistake "
            "(datetime.min, a zero Unix time)",
        )
    latest = datetime.now(UTC) + TIMESTAMP_MAX_AHEAD
    if when > latest:
        hours = TIMESTAMP_MAX_AHEAD.total_seconds() / 3600
        raise OutboxValidationError(
            field,
            f"{when.isoformat()} is more than {hours:g} hours ahead of now: PostHog would "
            "replace it with the time it receives the event (pass None for now; datetime.max "
            "is no event time)",
        )
    return when


# --------------------------------------------------------------------------- uuid


def _check_uuid(value: object, field: str) -> UUID:
    if value is None:
        return new_event_uuid()
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value.strip())
        except ValueError:
            raise OutboxValidationError(field, f"{_short_repr(value)} is not a UUID") from None
    raise OutboxValidationError(
        field, f"must be a uuid.UUID, a str or None, got {_type_name(value)}"
    )


# --------------------------------------------------------------------------- properties


class _NeedsWalk(Exception):
    """Raised inside the fast encoder: fall back to the normalising walk."""


_NOT_COERCIBLE: Final = object()


def _coerce_leaf(value: object) -> object:
    """Map a non-JSON leaf type to its JSON-ready form, or return ``_NOT_COERCIBLE``.

    Shared by the fast encoder hook and the walk, so both produce identical JSON.
    """
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    if isinstance(value, date | dt_time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        as_float = float(value)
        if Decimal(repr(as_float)) == value:
            return as_float
        return str(value)
    return _NOT_COERCIBLE


def _sorted_if_possible(items: AbstractSet[Any]) -> list[Any]:
    try:
        return sorted(items)
    except Exception:  # unorderable elements (mixed types...): any order will do
        return list(items)


def _fast_default(value: object) -> object:
    """``default=`` hook of the fast encoder: coerce the easy cases, punt the rest."""
    coerced = _coerce_leaf(value)
    if coerced is not _NOT_COERCIBLE:
        return coerced
    if isinstance(value, Enum):
        inner = value.value
        if type(inner) in _SCALAR_TYPES:
            return inner
    elif isinstance(value, set | frozenset):
        return _sorted_if_possible(value)
    # Containers reached through an Enum or a non-dict Mapping may hide non-str keys
    # the fast checks would not see; those, and every unsupported type, take the walk.
    raise _NeedsWalk


_FAST_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    check_circular=True,
    separators=(",", ":"),
    default=_fast_default,
)
_PLAIN_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
)
# orjson first, for the text ``_FAST_ENCODER`` would write (about a sixth of its time on
# the benchmark's events). It writes the same text for str, int, bool, list, tuple,
# dict and uuid.UUID (every code point but a lone surrogate, which it refuses; ints of
# up to 64 bits, refusing bigger ones) and hands datetimes and subclasses of the
# built-in types to the same hook. It differs in three ways, each caught so that
# ``_FAST_ENCODER`` decides instead: NaN and infinity come out as ``null`` (so any
# ``null`` in the output), and a float Python writes with an exponent comes out with a
# lowercase ``e`` of its own or as ``0.0000...`` (so any digit before ``e``, or
# ``0.0000``). tests/unit/test_enqueue_encoding.py compares the two on every code
# point and on floats of every magnitude.
_ORJSON_OPTIONS: Final = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_orjson_dumps: Final = orjson.dumps
#: Every digit as ``0``: ``b"0e" in raw.translate(...)`` finds a digit before an ``e``
#: in one C pass (a regular expression takes ten times as long).
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")


def _orjson_suspect(raw: bytes) -> bool:
    """Whether orjson's text may differ from ``_FAST_ENCODER``'s (see above)."""
    return b"null" in raw or b"0.0000" in raw or b"0e" in raw.translate(_DIGITS_AS_ZERO)


def _orjson_encode(properties: dict[Any, Any]) -> str | None:
    """``properties`` as ``_FAST_ENCODER`` would write them, or ``None``: ask it."""
    try:
        raw = _orjson_dumps(properties, default=_fast_default, option=_ORJSON_OPTIONS)
    except (TypeError, ValueError, _NeedsWalk):  # orjson.JSONEncodeError is a TypeError
        return None
    if _orjson_suspect(raw):
        return None
    return raw.decode()


def _nested_keys_are_str(value: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> bool:
    """True when every dict inside ``value`` has only str keys.

    Only dicts, lists and tuples are entered: anything else reaching a dict went
    through the fast encoder's hook, which sends such containers to the walk. Called
    once the encoded text showed at most ``MAX_NESTING_DEPTH`` brackets, so the
    recursion is shallow.
    """
    if isinstance(value, dict):
        for key in value:
            if type(key) is not str and not isinstance(key, str):
                return False
        items: Any = value.values()
    else:
        items = value
    for item in items:
        if type(item) in _SCALAR_TYPES:
            continue
        if isinstance(item, dict | list | tuple) and not _nested_keys_are_str(item):
            return False
    return True


def _has_long_digit_run(text: str, sample: str, match: re.Match[str] | None) -> bool:
    """Whether ``text`` may hold ``_F64_OVERFLOW_DIGITS`` digits in a row (never a
    false ``False``). Such a run covers two consecutive characters of ``sample``
    (``text[step - 1 :: step]``; ``match`` is the first such pair in it) and every
    character between them."""
    step = _DIGIT_SAMPLE_STEP
    while match is not None:
        start = step - 1 + step * match.start()
        if text[start : start + step + 1].isdigit():
            return True
        match = _two_digits(sample, match.start() + 1)
    return False


def _try_fast_encode(properties: dict[Any, Any], keys_checked: bool = False) -> str | None:
    """Encode plain properties in one C-level pass; ``None`` means "walk instead".

    ``keys_checked`` says the caller already knows every top-level key is a str.
    """
    text = _orjson_encode(properties)
    # orjson refuses a key that is not a plain str at any depth, and lone surrogates:
    # what it wrote needs neither check below.
    keys_known = text is not None
    if text is None:
        if not keys_checked:
            for key in properties:
                if type(key) is not str and not isinstance(key, str):
                    return None
        try:
            text = _FAST_ENCODER.encode(properties)
        except (_NeedsWalk, ValueError, TypeError, RecursionError):
            # ValueError: NaN/Infinity, a cycle, or an int too long to print;
            # TypeError: a nested key json cannot even coerce.
            return None
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate somewhere
                return None
    if _JSON_ESCAPED_NUL in text:
        return None
    if len(text) >= _F64_OVERFLOW_DIGITS:
        sample = text[_DIGIT_SAMPLE_STEP - 1 :: _DIGIT_SAMPLE_STEP]
        match = _two_digits(sample)
        if match is not None and _has_long_digit_run(text, sample, match):
            return None  # perhaps an integer too large for PostHog: the walk checks each
    objects = text.count("{")
    # Brackets inside strings only over-count, so this bound is safe.
    if objects + text.count("[") > MAX_NESTING_DEPTH:
        return None
    # json silently turns int/float/bool/None keys into strings; refuse them properly.
    # The top-level keys were checked above; look deeper only if there are nested objects.
    if objects > 1 and not keys_known:
        for item in properties.values():
            if type(item) in _SCALAR_TYPES:
                continue
            if isinstance(item, dict | list | tuple) and not _nested_keys_are_str(item):
                return None
    return text


def _key_path(path: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def _normalise(value: object, path: str, depth: int, active: set[int]) -> object:
    """Return a JSON-ready copy of ``value`` or raise naming ``path``.

    ``depth`` is the nesting level ``value`` would occupy if it is a container;
    ``active`` holds the ids of the containers currently being walked (a cycle is
    a container that contains itself, not merely one shared twice).
    """
    if isinstance(value, str):
        # str subclasses (str-valued Enums included) are stored as their plain text.
        return _clean_text(value if type(value) is str else str.__str__(value))
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):  # int subclasses (IntEnum, IntFlag) as their plain number
        return _check_int(value if type(value) is int else int.__int__(value), path)
    if isinstance(value, float):
        number = value if type(value) is float else float.__float__(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return _normalise_mapping(value, path, depth, active)
    if isinstance(value, list | tuple):
        return _normalise_sequence(value, path, depth, active)
    coerced = _coerce_leaf(value)
    if coerced is not _NOT_COERCIBLE:
        return coerced
    if isinstance(value, Enum):
        return _normalise(value.value, path, depth, active)
    if isinstance(value, set | frozenset):
        return _normalise_sequence(_sorted_if_possible(value), path, depth, active, value)
    raise OutboxValidationError(
        path,
        f"{_type_name(value)} has no faithful JSON form; convert it to a str, int, float, "
        "bool, None, list or dict first",
    )


def _check_int(value: int, path: str) -> int:
    if value.bit_length() > _F64_MAX_INT_BITS:
        try:
            float(value)
        except OverflowError:  # also what is too long to print at all
            raise OutboxValidationError(
                path,
                "integer is beyond ±1.8e308, the largest number PostHog's capture reads "
                "(it would refuse the whole request); send it as a str",
            ) from None
    return value


def _enter(container: object, path: str, depth: int, active: set[int]) -> int:
    if depth > MAX_NESTING_DEPTH:
        raise OutboxValidationError(
            path, f"nesting is deeper than {MAX_NESTING_DEPTH} levels; flatten the structure"
        )
    marker = id(container)
    if marker in active:
        raise OutboxValidationError(path, "contains itself (a reference cycle)")
    active.add(marker)
    return marker


def _normalise_mapping(
    value: Mapping[Any, Any], path: str, depth: int, active: set[int]
) -> dict[str, object]:
    marker = _enter(value, path, depth, active)
    result: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise OutboxValidationError(
                path,
                f"key {_short_repr(key)} is a {_type_name(key)}; property names must be str",
            )
        clean_key = _clean_text(str.__str__(key))
        result[clean_key] = _normalise(item, _key_path(path, key), depth + 1, active)
    active.discard(marker)
    return result


def _normalise_sequence(
    value: list[Any] | tuple[Any, ...],
    path: str,
    depth: int,
    active: set[int],
    identity: object = None,
) -> list[object]:
    marker = _enter(value if identity is None else identity, path, depth, active)
    result = [
        _normalise(item, f"{path}[{index}]", depth + 1, active) for index, item in enumerate(value)
    ]
    active.discard(marker)
    return result


# --------------------------------------------------------------------------- $set, $groups

_GROUP_KEY_TYPES: Final = (str, int, UUID)


def _check_person_and_groups(properties: Mapping[Any, Any], field: str) -> None:
    """Refuse ``$set``, ``$set_once``, ``$unset`` and ``$groups`` of a shape PostHog
    cannot use (``None`` is left alone: PostHog reads it as absent).

    ``$set``/``$set_once`` must be mappings; ``$unset`` a list (tuple, set) of
    property names or a mapping whose keys are the names, never a str (PostHog would
    unset one property per character); ``$groups`` a mapping of non-empty group types
    to non-empty str, int or UUID group keys.
    """
    for key in ("$set", "$set_once"):
        value = properties.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise OutboxValidationError(
                _key_path(field, key),
                f"must be a mapping of person property names to values, got {_type_name(value)}",
            )
    unset = properties.get("$unset")
    if unset is not None and not isinstance(unset, Mapping):
        where = _key_path(field, "$unset")
        if not isinstance(unset, list | tuple | set | frozenset):
            raise OutboxValidationError(
                where,
                f"must be a list of person property names, got {_type_name(unset)}"
                + (
                    " (PostHog would unset one property per character)"
                    if isinstance(unset, str)
                    else ""
                ),
            )
        for index, name in enumerate(unset):
            if not isinstance(name, str):
                raise OutboxValidationError(
                    f"{where}[{index}]", f"must be a str property name, got {_type_name(name)}"
                )
    groups = properties.get("$groups")
    if groups is None:
        return
    where = _key_path(field, "$groups")
    if not isinstance(groups, Mapping):
        raise OutboxValidationError(
            where, f"must be a mapping of group type to group key, got {_type_name(groups)}"
        )
    for group_type, group_key in groups.items():
        if not isinstance(group_type, str) or not group_type.strip():
            raise OutboxValidationError(
                where, f"group type {_short_repr(group_type)} must be a non-empty str"
            )
        if isinstance(group_key, bool) or not isinstance(group_key, _GROUP_KEY_TYPES):
            raise OutboxValidationError(
                _key_path(where, group_type),
                f"must be a str, int or uuid.UUID group key, got {_type_name(group_key)}",
            )
        if isinstance(group_key, str) and not group_key.strip():
            raise OutboxValidationError(_key_path(where, group_type), "must not be empty")


# --------------------------------------------------------------------------- jsonb order

# PostgreSQL's jsonb input sorts the keys of every object (shorter keys first, then
# bytewise), and its sort returns after one pass when they already are in that
# order. For a typical 20-key properties object that sort is about a third of the
# server's cost of parsing the event, so the events enqueue() sends to the keyed
# functions (whose parameter is jsonb) list their keys in jsonb's order; a plain
# event is stored as json text, never parsed into jsonb, and keeps the caller's
# order. The order of a key set is computed once: applications send the same shapes
# over and over. Smaller objects are left alone (PostgreSQL sorts them
# with an insertion sort, which costs next to nothing either way).
_JSONB_ORDER_MIN_KEYS: Final = 8
_JSONB_ORDER_CACHE_SIZE: Final = 4096
#: Key tuple -> the same keys in jsonb's order, or () when they already are in it.
#: Only shapes whose keys are all str are cached.
_jsonb_orders: dict[tuple[Any, ...], tuple[str, ...]] = {}


def _jsonb_key(key: str) -> tuple[int, str]:
    # Code point order is UTF-8 byte order, so the str itself breaks length ties.
    return (len(key) if key.isascii() else len(key.encode("utf-8", "surrogatepass")), key)


def _jsonb_order(shape: tuple[Any, ...]) -> tuple[str, ...] | None:
    """Compute and cache the jsonb order of ``shape``; ``None`` if a key is not a str."""
    for key in shape:
        if not isinstance(key, str):
            return None
    order = tuple(sorted(shape, key=_jsonb_key))
    result = () if order == shape else order
    if len(_jsonb_orders) >= _JSONB_ORDER_CACHE_SIZE:
        _jsonb_orders.clear()  # shapes churn: start over rather than grow
    _jsonb_orders[shape] = result
    return result


def _jsonb_ordered(properties: dict[Any, Any]) -> dict[Any, Any] | None:
    """``properties`` with its keys in jsonb's order (a new dict, or itself if they
    already are), for a dict of at least ``_JSONB_ORDER_MIN_KEYS`` keys.

    ``None`` when a key is not a str: the caller must check the keys the slow way.
    Otherwise every key is known to be a str. Only the order changes, so the stored
    jsonb value is the same; PostgreSQL just parses it faster.
    """
    shape = tuple(properties)
    try:
        order = _jsonb_orders.get(shape)
    except TypeError:  # an unhashable key
        return None
    if order is None:
        order = _jsonb_order(shape)
        if order is None:
            return None
    if not order:
        return properties
    try:
        return {key: properties[key] for key in order}
    except KeyError:  # keys equal to the cached ones but hashing differently
        return properties


# --------------------------------------------------------------------------- properties entry


def _encode_properties(properties: object, field: str) -> str:
    if properties is None:
        return "{}"
    if isinstance(properties, dict):
        if not properties:
            return "{}"
        text = _try_fast_encode(properties)
        if text is not None:
            return text
    elif not isinstance(properties, Mapping):
        raise OutboxValidationError(
            field,
            f"must be a mapping of property names to values (a dict), got {_type_name(properties)}",
        )
    return _walk_encode(properties, field)


def _walk_encode(properties: Mapping[Any, Any], field: str) -> str:
    """The slow path: normalise a copy, naming the first problem, then encode it."""
    return _PLAIN_ENCODER.encode(_normalise_mapping(properties, field, 1, set()))


# --------------------------------------------------------------------------- entry point


def prepare_event(
    event: object,
    distinct_id: object,
    properties: Mapping[str, Any] | None = None,
    *,
    timestamp: datetime | str | None = None,
    dedup_key: object = None,
    uuid: UUID | str | None = None,
    field_prefix: str = "",
    destination: Destination = "posthog",
) -> PreparedEvent:
    """Validate and normalise one event; raise before anything reaches the database.

    Raises :class:`~outbox.exceptions.OutboxValidationError` whose ``field`` names the
    input at fault: ``event``, ``distinct_id``, ``timestamp``, ``uuid``,
    ``dedup_key``, ``properties`` or a path inside it such as
    ``properties.plan.items[2]`` (keys that are not plain words are quoted:
    ``properties["a.b"]``). ``field_prefix`` is put in front of every such name, e.g.
    ``"events[3]."`` gives ``events[3].distinct_id``.

    What is accepted, and how it is normalised:

    * ``event``: a str, stripped, 1 to ``MAX_NAME_LENGTH`` characters, at least one
      of them visible (not only format, control or blank characters such as U+200B).
    * ``distinct_id``: a str, an int (not bool) or a UUID, turned into a str,
      stripped, 1 to ``MAX_NAME_LENGTH`` characters, one of them visible, and not one
      of PostHog's placeholder ids (see :data:`RESERVED_DISTINCT_IDS`).
    * ``properties``: ``None`` (meaning ``{}``) or a mapping with str keys. Values
      may be str, int, float, bool, None, list, tuple and mappings, nested at most
      ``MAX_NESTING_DEPTH`` levels and without cycles. Converted: datetime to ISO 8601
      (naive ones are taken as UTC), date and time to ISO 8601, UUID to str, Decimal
      to float when that float is exactly the same number and to a str otherwise
      (non-finite Decimals to null), Enum to its value, set and frozenset to a list
      (sorted when the elements can be ordered), tuple to a list. NaN and infinite
      floats become null. Anything else (bytes, arbitrary objects...) is refused, and
      so is an int beyond ±1.8e308, which PostHog's capture cannot read.
    * ``$set`` and ``$set_once`` in properties must be mappings, ``$unset`` a list,
      tuple or set of str (or a mapping), ``$groups`` a mapping of non-empty str
      group types to non-empty str, int or UUID group keys; ``None`` passes.
    * Every string (event, distinct_id, dedup_key, property keys and values) has NUL
      characters and lone surrogates replaced with U+FFFD, which PostgreSQL requires;
      surrogate pairs are joined into the character they encode.
    * The event must fit in the Kafka message PostHog's capture makes of it, at most
      ``MAX_EVENT_BYTES`` with what the worker and capture add (error on
      ``properties``; see :mod:`outbox._capture_size`).
    * ``timestamp``: ``None`` (the database's ``now()``), a datetime (naive means UTC;
      aware ones are converted to UTC) or an ISO 8601 str with a time of day
      (a trailing ``Z`` is accepted), from ``outbox.schema.TIMESTAMP_MIN`` (the Unix
      epoch) to ``TIMESTAMP_MAX_AHEAD`` (23 hours) after now. A bare date is refused
      as ambiguous.
    * ``uuid``: ``None`` for a fresh :func:`new_event_uuid`, a UUID, or a str UUID.
    * ``dedup_key``: ``None``, a str (stripped, 1 to ``MAX_NAME_LENGTH`` characters)
      or an int turned into a str.
    * ``destination`` is copied as it is (the caller, not the user, chooses it).

    The caller's objects are never modified. When properties need no change they are
    not copied either; they are encoded directly.
    """
    return _prepare_event(
        event,
        distinct_id,
        properties,
        timestamp,
        dedup_key,
        uuid,
        field_prefix,
        destination,
        False,
    )


# Properties JSON up to this many characters fits in PostHog's capture whatever it
# holds (about 14,000); only a longer one is measured.
_ALWAYS_FITS: Final = always_fits(2 * MAX_NAME_LENGTH)
_LONGEST_RESERVED: Final = max(map(len, RESERVED_DISTINCT_IDS | _RESERVED_DISTINCT_IDS_EXACT))


def _prepare_event(
    event: object,
    distinct_id: object,
    properties: object,
    timestamp: object,
    dedup_key: object,
    uuid: object,
    field_prefix: str,
    destination: Destination,
    jsonb_order: bool,
) -> PreparedEvent:
    """:func:`prepare_event`; with ``jsonb_order`` the properties JSON lists its keys
    in jsonb's order (see :func:`_jsonb_ordered`), which only the database sees.

    Runs on every enqueue, so the common case (plain ASCII names, no timestamp, no
    dedup key, no uuid, a dict of plain properties) is tested inline first; anything
    else goes to the same checks as always, and field names are built only for them.
    """
    # Cheap checks first, so a bad scalar is reported without encoding properties.
    # In ASCII, a name whose first character is printable has a visible one.
    if type(event) is str and event.isascii() and "\x00" not in event:
        name = event.strip()
        if not name or len(name) > MAX_NAME_LENGTH or not "!" <= name[0] <= "~":
            name = _check_event(event, field_prefix + "event")
    else:
        name = _check_event(event, field_prefix + "event")
    if type(distinct_id) is str and distinct_id.isascii() and "\x00" not in distinct_id:
        person = distinct_id.strip()
        if (
            not person
            or len(person) > MAX_NAME_LENGTH
            or not "!" <= person[0] <= "~"
            or (
                len(person) <= _LONGEST_RESERVED
                and (
                    person in _RESERVED_DISTINCT_IDS_EXACT
                    or person.lower() in RESERVED_DISTINCT_IDS
                )
            )
        ):
            person = _check_distinct_id(distinct_id, field_prefix + "distinct_id")
    else:
        person = _check_distinct_id(distinct_id, field_prefix + "distinct_id")
    when = None if timestamp is None else _check_timestamp(timestamp, field_prefix + "timestamp")
    dedup = None if dedup_key is None else _check_dedup_key(dedup_key, field_prefix + "dedup_key")
    if type(properties) is dict and properties:
        if (
            "$set" in properties
            or "$set_once" in properties
            or "$unset" in properties
            or "$groups" in properties
        ):
            _check_person_and_groups(properties, field_prefix + "properties")
        if jsonb_order and len(properties) >= _JSONB_ORDER_MIN_KEYS:
            ordered = _jsonb_ordered(properties)
            fast = None if ordered is None else _try_fast_encode(ordered, keys_checked=True)
        else:
            fast = _try_fast_encode(properties)
        if fast is None:
            properties_json = _walk_encode(properties, field_prefix + "properties")
        else:
            properties_json = fast
    else:
        if isinstance(properties, Mapping):
            _check_person_and_groups(properties, field_prefix + "properties")
        properties_json = _encode_properties(properties, field_prefix + "properties")
    if len(properties_json) > _ALWAYS_FITS and (size := oversize(name, person, properties_json)):
        raise OutboxValidationError(
            field_prefix + "properties",
            f"the event would be {size} bytes in PostHog's capture, over its "
            f"{MAX_EVENT_BYTES} byte limit (the properties travel as JSON inside a JSON "
            'string there, so each " and \\ counts twice)',
        )
    return PreparedEvent(
        new_event_uuid() if uuid is None else _check_uuid(uuid, field_prefix + "uuid"),
        name,
        person,
        properties_json,
        when,
        dedup,
        destination,
    )


def check_distinct_id(distinct_id: object, field: str = "distinct_id") -> str:
    """Validate a distinct_id as :func:`prepare_event` does and return its stored form.

    Raises :class:`~outbox.exceptions.OutboxValidationError` naming ``field``.
    """
    return _check_distinct_id(distinct_id, field)


def normalise_properties(properties: object, field: str) -> dict[str, object]:
    """Return a JSON-ready copy of a properties mapping, or raise naming ``field``.

    The same rules as :func:`prepare_event`'s ``properties`` (conversions, depth,
    str keys), for values that are checked once and reused, such as super
    properties. ``field`` is the name errors start with, e.g. ``super_properties``
    gives ``super_properties.plan``. ``None`` is refused: pass ``{}``.
    """
    if not isinstance(properties, Mapping):
        raise OutboxValidationError(
            field,
            f"must be a mapping of property names to values (a dict), got {_type_name(properties)}",
        )
    return _normalise_mapping(properties, field, 1, set())
