"""Unit tests for outbox.validation: pure Python, no database."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import json
import threading
import time
import types
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import Decimal
from typing import Any

import pytest

from outbox import validation
from outbox.exceptions import OutboxError, OutboxValidationError
from outbox.validation import (
    MAX_EVENT_BYTES,
    MAX_NAME_LENGTH,
    RESERVED_DISTINCT_IDS,
    PreparedEvent,
    new_event_uuid,
    prepare_event,
)

NAN = float("nan")
INF = float("inf")


def _props(properties: Any, **kwargs: Any) -> Any:
    """prepare_event with fixed valid event/distinct_id; returns the decoded properties."""
    prepared = prepare_event("signed_up", "user-1", properties, **kwargs)
    return _strict_loads(prepared.properties_json)


def _strict_loads(text: str) -> Any:
    def refuse_constant(name: str) -> Any:
        raise AssertionError(f"non-finite number {name} in JSON")

    return json.loads(text, parse_constant=refuse_constant)


def _error(**kwargs: Any) -> OutboxValidationError:
    args: dict[str, Any] = {"event": "signed_up", "distinct_id": "user-1", "properties": None}
    args.update(kwargs)
    with pytest.raises(OutboxValidationError) as info:
        prepare_event(args.pop("event"), args.pop("distinct_id"), args.pop("properties"), **args)
    return info.value


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 3


class Mood(enum.StrEnum):
    HAPPY = "happy"


class Shape(enum.Enum):
    SQUARE = (4, "sides")
    ODD = NAN
    NESTED = {"a": 1}  # noqa: RUF012 - an Enum value, not a mutable class attribute


class ReadOnly(Mapping[Any, Any]):
    """A Mapping that is not a dict."""

    def __init__(self, data: dict[Any, Any]) -> None:
        self._data = data

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------- basics


def test_plain_event_round_trips() -> None:
    props = {"plan": "pro", "seats": 3, "price": 9.5, "trial": False, "coupon": None}
    prepared = prepare_event("  signed_up ", " user-1 ", props)
    assert isinstance(prepared, PreparedEvent)
    assert prepared.event == "signed_up"
    assert prepared.distinct_id == "user-1"
    assert prepared.properties_json == (
        '{"plan":"pro","seats":3,"price":9.5,"trial":false,"coupon":null}'
    )
    assert prepared.timestamp is None
    assert prepared.dedup_key is None
    assert prepared.uuid.version == 7


def test_prepared_event_is_frozen() -> None:
    prepared = prepare_event("e", "u")
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.event = "other"  # type: ignore[misc]


def test_validation_error_is_an_outbox_error_and_value_error() -> None:
    exc = _error(event="")
    assert isinstance(exc, OutboxError)
    assert isinstance(exc, ValueError)
    assert str(exc).startswith("event: ")


def test_non_ascii_text_is_kept_verbatim() -> None:
    prepared = prepare_event("achat effectué", "utilisateur-é", {"ville": "Zürich 🚀"})
    assert prepared.properties_json == '{"ville":"Zürich 🚀"}'
    assert prepared.event == "achat effectué"


# --------------------------------------------------------------------------- event


@pytest.mark.parametrize("event", [None, 1, b"signed_up", ["signed_up"]])
def test_event_must_be_str(event: object) -> None:
    exc = _error(event=event)
    assert exc.field == "event"
    assert "str" in exc.problem


@pytest.mark.parametrize("event", ["", "   ", "\t\n"])
def test_event_must_not_be_blank(event: str) -> None:
    assert _error(event=event).field == "event"


def test_event_length_limit() -> None:
    assert prepare_event("e" * MAX_NAME_LENGTH, "u").event == "e" * MAX_NAME_LENGTH
    assert prepare_event(f"  {'e' * MAX_NAME_LENGTH}  ", "u").event == "e" * MAX_NAME_LENGTH
    exc = _error(event="e" * (MAX_NAME_LENGTH + 1))
    assert exc.field == "event"
    assert str(MAX_NAME_LENGTH) in exc.problem


def test_event_nul_replaced() -> None:
    assert prepare_event("sign\x00up", "u").event == "sign\ufffdup"


# --------------------------------------------------------------------------- distinct_id


@pytest.mark.parametrize(
    ("distinct_id", "expected"),
    [
        ("user-1", "user-1"),
        ("  user-1\n", "user-1"),
        (42, "42"),
        (-7, "-7"),
        (
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            "12345678-1234-5678-1234-567812345678",
        ),
        ("a\x00b", "a\ufffdb"),
    ],
)
def test_distinct_id_accepted(distinct_id: object, expected: str) -> None:
    assert prepare_event("e", distinct_id).distinct_id == expected


@pytest.mark.parametrize("distinct_id", [None, True, False, 1.5, b"user", ["u"]])
def test_distinct_id_wrong_type(distinct_id: object) -> None:
    exc = _error(distinct_id=distinct_id)
    assert exc.field == "distinct_id"


@pytest.mark.parametrize("distinct_id", ["", "   "])
def test_distinct_id_blank(distinct_id: str) -> None:
    assert _error(distinct_id=distinct_id).field == "distinct_id"


def test_distinct_id_length_limit() -> None:
    assert prepare_event("e", "u" * MAX_NAME_LENGTH).distinct_id == "u" * MAX_NAME_LENGTH
    assert _error(distinct_id="u" * (MAX_NAME_LENGTH + 1)).field == "distinct_id"
    assert _error(distinct_id=10**MAX_NAME_LENGTH).field == "distinct_id"  # 201 digits
    assert _error(distinct_id=10**10_000).field == "distinct_id"  # too long to even print


@pytest.mark.parametrize(
    "distinct_id",
    [
        "anonymous",
        "Anonymous",
        "GUEST",
        " guest ",
        "distinctid",
        "DistinctId",
        "distinct_id",
        "ID",
        "not_authenticated",
        "Email",
        "undefined",
        "UNDEFINED",
        "true",
        "True",
        "FALSE",
    ],
)
def test_reserved_distinct_ids_case_insensitive(distinct_id: str) -> None:
    exc = _error(distinct_id=distinct_id)
    assert exc.field == "distinct_id"
    assert "reserved by PostHog" in exc.problem
    assert "merge" in exc.problem


@pytest.mark.parametrize(
    "distinct_id", ["[object Object]", "NaN", "None", "none", "null", "0", 0, " null ", "undefined"]
)
def test_reserved_distinct_ids_case_sensitive(distinct_id: object) -> None:
    exc = _error(distinct_id=distinct_id)
    assert exc.field == "distinct_id"
    assert "reserved" in exc.problem


@pytest.mark.parametrize("distinct_id", ["nan", "NULL", "NONE", "[OBJECT OBJECT]", "00", "id-1"])
def test_case_sensitive_reserved_ids_only_match_exactly(distinct_id: str) -> None:
    assert prepare_event("e", distinct_id).distinct_id == distinct_id


def test_reserved_set_is_public_and_lower_case() -> None:
    assert "anonymous" in RESERVED_DISTINCT_IDS
    assert all(item == item.lower().strip() for item in RESERVED_DISTINCT_IDS)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("properties", [None, {}, types.MappingProxyType({})])
def test_empty_properties(properties: Any) -> None:
    assert prepare_event("e", "u", properties).properties_json == "{}"


@pytest.mark.parametrize("properties", [[("a", 1)], "a=1", 3, {"a", "b"}])
def test_properties_must_be_a_mapping(properties: Any) -> None:
    exc = _error(properties=properties)
    assert exc.field == "properties"
    assert "mapping" in exc.problem


def test_non_dict_mappings_become_objects() -> None:
    props = types.MappingProxyType({"a": ReadOnly({"b": 1}), "c": [ReadOnly({})]})
    assert _props(props) == {"a": {"b": 1}, "c": [{}]}


@pytest.mark.parametrize(
    ("properties", "field", "key_text"),
    [
        ({1: "x"}, "properties", "1"),
        ({None: "x"}, "properties", "None"),
        ({"plan": {True: "x"}}, "properties.plan", "True"),
        ({"plan": {"items": [{"ok": 1}, {2.5: "x"}]}}, "properties.plan.items[1]", "2.5"),
        ({"plan": {("a", "b"): 1}}, "properties.plan", "('a', 'b')"),
        ({"plan": ReadOnly({3: 1})}, "properties.plan", "3"),
        ({"plan": [Shape.NESTED, {"x": {7: 1}}]}, "properties.plan[1].x", "7"),
    ],
)
def test_non_str_keys_refused(properties: Any, field: str, key_text: str) -> None:
    exc = _error(properties=properties)
    assert exc.field == field
    assert key_text in exc.problem
    assert "str" in exc.problem


def test_non_str_key_behind_an_enum_value_is_refused() -> None:
    class Weird(enum.Enum):
        MAP = {1: "one"}  # noqa: RUF012 - an Enum value

    assert _error(properties={"w": Weird.MAP}).field == "properties.w"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC), "2024-05-01T12:30:15+00:00"),
        (
            datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2))),
            "2024-05-01T12:30:00+02:00",
        ),
        (datetime(2024, 5, 1, 12, 30, 0, 500), "2024-05-01T12:30:00.000500+00:00"),
        (date(2024, 5, 1), "2024-05-01"),
        (dt_time(8, 15), "08:15:00"),
        (
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            "12345678-1234-5678-1234-567812345678",
        ),
        (Decimal("49.99"), 49.99),
        (Decimal("0.1"), 0.1),
        (Decimal("-0"), -0.0),
        (Decimal("12"), 12.0),
        (Decimal("0.1000000000000000000001"), "0.1000000000000000000001"),
        (Decimal("123456789012345678901234567890"), "123456789012345678901234567890"),
        (Decimal("NaN"), None),
        (Decimal("sNaN"), None),
        (Decimal("Infinity"), None),
        (Decimal("-Infinity"), None),
        (Color.RED, "red"),
        (Size.LARGE, 3),
        (Mood.HAPPY, "happy"),
        (Shape.SQUARE, [4, "sides"]),
        (Shape.ODD, None),
        (Shape.NESTED, {"a": 1}),
        ({3, 1, 2}, [1, 2, 3]),
        (frozenset({"b", "a"}), ["a", "b"]),
        (set(), []),
        ((1, "two", (3,)), [1, "two", [3]]),
        ([Color.BLUE, {Size.SMALL}], ["blue", [1]]),
        (NAN, None),
        (INF, None),
        (-INF, None),
        ([1.5, NAN, {"x": -INF}], [1.5, None, {"x": None}]),
        (True, True),
        (10**30, 10**30),
        ("", ""),
    ],
)
def test_value_coercions(value: object, expected: object) -> None:
    assert _props({"v": value}) == {"v": expected}


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=-5))),
        Decimal("49.99"),
        Decimal("0.1000000000000000000001"),
        Color.RED,
        Size.SMALL,
        Mood.HAPPY,
        Shape.SQUARE,
        {"b", "a", "c"},
        {1, "mixed"},
        (1, (2, 3)),
        {"deep": [{"x": date(2020, 1, 2)}]},
        types.MappingProxyType({"k": uuid.UUID(int=5)}),
    ],
)
def test_fast_and_walked_encodings_agree(value: object) -> None:
    """A NaN elsewhere forces the normalising walk; the value must encode the same way."""
    fast = prepare_event("e", "u", {"v": value}).properties_json
    walked = _strict_loads(prepare_event("e", "u", {"v": value, "z": NAN}).properties_json)
    assert walked.pop("z") is None
    assert _strict_loads(fast) == walked


def test_unsortable_set_keeps_every_element() -> None:
    result = _props({"v": {1, "a", None}})["v"]
    assert sorted(result, key=repr) == sorted([1, "a", None], key=repr)


@pytest.mark.parametrize(
    ("properties", "field", "type_name"),
    [
        ({"raw": b"bytes"}, "properties.raw", "bytes"),
        ({"raw": bytearray(b"x")}, "properties.raw", "bytearray"),
        ({"obj": object()}, "properties.obj", "object"),
        ({"fn": len}, "properties.fn", "builtin_function_or_method"),
        ({"c": 1j}, "properties.c", "complex"),
        ({"plan": {"items": [1, 2, b"x"]}}, "properties.plan.items[2]", "bytes"),
        ({"a.b": [{"c d": object()}]}, 'properties["a.b"][0]["c d"]', "object"),
        ({"$set": {"when": timedelta(1)}}, "properties.$set.when", "datetime.timedelta"),
        ({"tags": {object()}}, "properties.tags[0]", "object"),
    ],
)
def test_unsupported_values_refused(properties: Any, field: str, type_name: str) -> None:
    exc = _error(properties=properties)
    assert exc.field == field
    assert type_name in exc.problem
    assert "has no faithful JSON form" in exc.problem


def test_huge_int_refused_with_its_path() -> None:
    exc = _error(properties={"n": [10**10_000]})
    assert exc.field == "properties.n[0]"


def test_nul_replaced_in_nested_keys_and_values() -> None:
    props = {
        "a\x00": "v\x00",
        "outer": {"in\x00ner": ["x\x00y", {"\x00": "\x00\x00"}]},
        "set": {"s\x00"},
        "enum": Mood.HAPPY,
    }
    prepared = prepare_event("e", "u", props)
    assert "\x00" not in prepared.properties_json
    assert "\\u0000" not in prepared.properties_json
    assert _strict_loads(prepared.properties_json) == {
        "a\ufffd": "v\ufffd",
        "outer": {"in\ufffdner": ["x\ufffdy", {"\ufffd": "\ufffd\ufffd"}]},
        "set": ["s\ufffd"],
        "enum": "happy",
    }


def test_literal_backslash_u0000_text_is_not_mangled() -> None:
    assert _props({"k": "\\u0000"}) == {"k": "\\u0000"}


def test_lone_surrogates_replaced_and_pairs_joined() -> None:
    props = {"lone\ud800": "x\udc00y", "pair": "\ud83d\ude00", "list": ["\udfff"]}
    prepared = prepare_event("e\ud800", "u\udc00", props)
    prepared.properties_json.encode("utf-8")  # must not raise
    assert _strict_loads(prepared.properties_json) == {
        "lone\ufffd": "x\ufffdy",
        "pair": "😀",
        "list": ["\ufffd"],
    }
    assert prepared.event == "e\ufffd"
    assert prepared.distinct_id == "u\ufffd"


def test_caller_objects_are_not_modified() -> None:
    inner = {"s": {3, 1}, "bad": NAN}
    props = {"inner": inner, "text": "a\x00"}
    prepare_event("e", "u", props)
    assert props["text"] == "a\x00"
    assert props["inner"] is inner
    assert inner["s"] == {1, 3}
    assert inner["bad"] != inner["bad"]  # still NaN


def _nested(levels: int, leaf: object = 1) -> Any:
    """A properties dict whose innermost container sits ``levels`` levels deep."""
    value: Any = leaf
    for index in range(levels - 1):
        value = {"k": value} if index % 2 else [value]
    return {"k": value}


def test_nesting_limit_boundary() -> None:
    deepest_ok = _nested(validation.MAX_NESTING_DEPTH)
    assert prepare_event("e", "u", deepest_ok).properties_json.count("1") == 1
    exc = _error(properties=_nested(validation.MAX_NESTING_DEPTH + 1))
    assert exc.field.startswith("properties.k")
    assert "deeper than 64" in exc.problem


def test_very_deep_nesting_refused_without_recursion_error() -> None:
    assert "deeper" in _error(properties=_nested(5_000)).problem


def test_many_brackets_but_shallow_is_accepted() -> None:
    props = {f"k{i}": [{"a": [1]}] for i in range(50)}
    assert _props(props) == props


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    props = {"text": "[{" * 200}
    assert _props(props) == props


def test_cycle_in_dict_refused() -> None:
    props: dict[str, Any] = {"a": {"b": {}}}
    props["a"]["b"]["loop"] = props["a"]
    exc = _error(properties=props)
    assert exc.field == "properties.a.b.loop"
    assert "cycle" in exc.problem


def test_cycle_in_list_refused() -> None:
    items: list[Any] = [1]
    items.append(items)
    exc = _error(properties={"items": items})
    assert exc.field == "properties.items[1]"
    assert "cycle" in exc.problem


def test_cycle_through_top_level_refused() -> None:
    props: dict[str, Any] = {}
    props["self"] = props
    assert _error(properties=props).field == "properties.self"


def test_shared_reference_is_not_a_cycle() -> None:
    shared = {"x": 1}
    assert _props({"a": shared, "b": [shared, shared]}) == {
        "a": {"x": 1},
        "b": [{"x": 1}, {"x": 1}],
    }
    assert _props({"a": shared, "b": shared, "bad": NAN})["b"] == {"x": 1}


# --------------------------------------------------------------------------- size


def _sized_event(total: int, event: str = "e", distinct_id: str = "u") -> dict[str, str]:
    """Properties making (properties JSON bytes + event + distinct_id) exactly ``total``."""
    overhead = len('{"p":""}') + len(event.encode()) + len(distinct_id.encode())
    return {"p": "x" * (total - overhead)}


def test_size_limit_boundary() -> None:
    at_limit = prepare_event("e", "u", _sized_event(MAX_EVENT_BYTES))
    assert len(at_limit.properties_json.encode()) + 2 == MAX_EVENT_BYTES
    exc = _error(event="e", distinct_id="u", properties=_sized_event(MAX_EVENT_BYTES + 1))
    assert exc.field == "properties"
    assert str(MAX_EVENT_BYTES + 1) in exc.problem
    assert str(MAX_EVENT_BYTES) in exc.problem


def test_size_counts_event_and_distinct_id() -> None:
    event, person = "e" * 150, "u" * 150
    prepare_event(event, person, _sized_event(MAX_EVENT_BYTES, event, person))
    over = _sized_event(MAX_EVENT_BYTES, event, person)
    assert _error(event=event + "e", distinct_id=person, properties=over).field == "properties"


def test_size_counts_utf8_bytes() -> None:
    half = (MAX_EVENT_BYTES - 20) // 2  # each "é" is two bytes
    prepare_event("e", "u", {"p": "é" * half})
    assert _error(properties={"p": "é" * (half + 20)}).field == "properties"


# --------------------------------------------------------------------------- timestamp


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (None, None),
        (datetime(2024, 5, 1, 12, 0, tzinfo=UTC), datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
        (
            datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
            datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        ),
        (datetime(2024, 5, 1, 12, 0), datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
        ("2024-05-01T12:00:00z", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
        (" 2024-05-01T12:00:00.250Z ", datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)),
        ("2024-05-01T09:00:00-03:00", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
        ("2024-05-01 12:00:00", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
    ],
)
def test_timestamp_accepted(timestamp: Any, expected: datetime | None) -> None:
    result = prepare_event("e", "u", timestamp=timestamp).timestamp
    assert result == expected
    if result is not None:
        assert result.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "timestamp",
    [
        date(2024, 5, 1),
        "2024-05-01",
        "yesterday",
        "",
        "2024-13-01T00:00:00",
        1714564800,
        1714564800.0,
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
    ],
)
def test_timestamp_refused(timestamp: Any) -> None:
    assert _error(timestamp=timestamp).field == "timestamp"


# --------------------------------------------------------------------------- uuid


def test_uuid_default_is_fresh_uuid7() -> None:
    first = prepare_event("e", "u").uuid
    second = prepare_event("e", "u").uuid
    assert first.version == 7
    assert second > first


def test_uuid_given_is_kept() -> None:
    given = uuid.uuid4()
    assert prepare_event("e", "u", uuid=given).uuid is given
    assert prepare_event("e", "u", uuid=f" {given} ").uuid == given
    assert prepare_event("e", "u", uuid=given.hex.upper()).uuid == given


@pytest.mark.parametrize("value", ["not-a-uuid", "", "1234", 12345, b"x" * 16])
def test_uuid_refused(value: Any) -> None:
    assert _error(uuid=value).field == "uuid"


# --------------------------------------------------------------------------- dedup_key


@pytest.mark.parametrize(
    ("dedup_key", "expected"),
    [
        (None, None),
        ("order-1", "order-1"),
        ("  order-1 ", "order-1"),
        (123, "123"),
        ("k\x00", "k\ufffd"),
        ("k" * MAX_NAME_LENGTH, "k" * MAX_NAME_LENGTH),
    ],
)
def test_dedup_key_accepted(dedup_key: Any, expected: str | None) -> None:
    assert prepare_event("e", "u", dedup_key=dedup_key).dedup_key == expected


@pytest.mark.parametrize(
    "dedup_key", ["", "   ", "k" * (MAX_NAME_LENGTH + 1), True, 1.5, b"k", uuid.uuid4()]
)
def test_dedup_key_refused(dedup_key: Any) -> None:
    assert _error(dedup_key=dedup_key).field == "dedup_key"


# --------------------------------------------------------------------------- field_prefix


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"event": ""}, "events[3].event"),
        ({"distinct_id": "anonymous"}, "events[3].distinct_id"),
        ({"properties": [1]}, "events[3].properties"),
        ({"properties": {"a": [b"x"]}}, "events[3].properties.a[0]"),
        ({"properties": {"p": "x" * MAX_EVENT_BYTES}}, "events[3].properties"),
        ({"timestamp": "never"}, "events[3].timestamp"),
        ({"uuid": "nope"}, "events[3].uuid"),
        ({"dedup_key": ""}, "events[3].dedup_key"),
    ],
)
def test_field_prefix_names_every_field(kwargs: dict[str, Any], field: str) -> None:
    exc = _error(field_prefix="events[3].", **kwargs)
    assert exc.field == field
    assert str(exc).startswith(f"{field}: ")


# --------------------------------------------------------------------------- UUIDv7


def _uuid7_ms(value: uuid.UUID) -> int:
    return value.int >> 80


def test_uuid7_version_and_variant() -> None:
    for _ in range(100):
        value = new_event_uuid()
        assert value.version == 7
        assert value.variant == uuid.RFC_4122


def test_uuid7_strictly_increasing() -> None:
    values = [new_event_uuid() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert all(a.bytes < b.bytes for a, b in itertools.pairwise(values))
    assert all(str(a) < str(b) for a, b in itertools.pairwise(values))


def test_uuid7_timestamp_is_now() -> None:
    before = time.time() * 1000
    value = new_event_uuid()
    after = time.time() * 1000
    # A value may run a little ahead after a burst of same-millisecond calls.
    assert before - 5 <= _uuid7_ms(value) <= after + 5


def test_uuid7_monotonic_when_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_event_uuid()
    monkeypatch.setattr(
        "outbox.validation.time.time_ns", lambda: (_uuid7_ms(first) - 60_000) * 10**6
    )
    following = [new_event_uuid() for _ in range(100)]
    assert all(a < b for a, b in zip([first, *following], following, strict=False))
    assert all(v.version == 7 and v.variant == uuid.RFC_4122 for v in following)


def test_uuid7_counter_overflow_moves_to_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    first = new_event_uuid()
    ms = _uuid7_ms(first)
    monkeypatch.setattr("outbox.validation.time.time_ns", lambda: ms * 10**6)
    validation._uuid7_state.last_tail = (1 << 74) - 1
    after = new_event_uuid()
    assert _uuid7_ms(after) == ms + 1
    assert after > first
    assert after.version == 7
    assert after.variant == uuid.RFC_4122


def test_uuid7_unique_and_increasing_per_thread_across_threads() -> None:
    results: list[list[uuid.UUID]] = [[] for _ in range(8)]

    def work(bucket: list[uuid.UUID]) -> None:
        bucket.extend(new_event_uuid() for _ in range(2_000))

    threads = [threading.Thread(target=work, args=(bucket,)) for bucket in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [value for bucket in results for value in bucket]
    assert len(set(everything)) == len(everything)
    for bucket in results:
        assert all(a < b for a, b in itertools.pairwise(bucket))


def test_uuid7_fork_reset_starts_a_fresh_sequence() -> None:
    new_event_uuid()
    before = validation._uuid7_state
    validation._reset_uuid7_state_after_fork()
    assert validation._uuid7_state is not before
    assert validation._uuid7_state.last_ms == 0
    assert new_event_uuid().version == 7


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize(
    "properties",
    [
        {"plan": "pro", "seats": 3, "tags": ["a", "b"], "$set": {"company": "Acme"}},
        {"when": datetime(2024, 5, 1, tzinfo=UTC), "id": uuid.UUID(int=1), "n": Decimal("1.5")},
        {"color": Color.RED, "size": Size.SMALL, "set": {2, 1}, "pair": (1, 2)},
        _nested(validation.MAX_NESTING_DEPTH),
    ],
)
def test_plain_properties_take_the_fast_path(
    monkeypatch: pytest.MonkeyPatch, properties: dict[str, Any]
) -> None:
    def no_walk(*args: Any) -> Any:
        raise AssertionError("the normalising walk ran")

    monkeypatch.setattr(validation, "_normalise_mapping", no_walk)
    prepare_event("e", "u", properties)


@pytest.mark.parametrize(
    "properties",
    [
        {"bad": NAN},
        {"nul": "\x00"},
        {"lone": "\ud800"},
        {"nested": {1: "int key"}},
        {"raw": b"x"},
        _nested(validation.MAX_NESTING_DEPTH + 1),
    ],
)
def test_properties_needing_work_take_the_walk(
    monkeypatch: pytest.MonkeyPatch, properties: dict[str, Any]
) -> None:
    walked: list[object] = []
    real = validation._normalise_mapping

    def spy(*args: Any) -> Any:
        walked.append(args[0])
        return real(*args)

    monkeypatch.setattr(validation, "_normalise_mapping", spy)
    with contextlib.suppress(OutboxValidationError):
        prepare_event("e", "u", properties)
    assert walked
