"""Unit tests for outbox.validation: pure Python, no database."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import json
import math
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

from outbox import AnalyticsConfig, validation
from outbox import _capture_size as capture_size
from outbox.enqueue import prepare_enqueue
from outbox.exceptions import OutboxError, OutboxValidationError
from outbox.schema import TIMESTAMP_MAX_AHEAD, TIMESTAMP_MIN
from outbox.validation import (
    MAX_EVENT_BYTES,
    MAX_NAME_LENGTH,
    RESERVED_DISTINCT_IDS,
    PreparedEvent,
    new_event_uuid,
    prepare_event,
)
from tests.capture_record import outbound_for, record_size

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
        "'anonymous'",  # PostHog's list has each id bare and in single and double quotes
        '"Anonymous"',
        ' "guest" ',
    ],
)
def test_reserved_distinct_ids_case_insensitive(distinct_id: str) -> None:
    exc = _error(distinct_id=distinct_id)
    assert exc.field == "distinct_id"
    assert "reserved by PostHog" in exc.problem
    assert "merge" in exc.problem


@pytest.mark.parametrize(
    "distinct_id",
    [
        "[object Object]",
        "NaN",
        "None",
        "none",
        "null",
        "0",
        0,
        " null ",
        "undefined",
        "'null'",
        '"null"',
        "'NaN'",
        "'0'",
    ],
)
def test_reserved_distinct_ids_case_sensitive(distinct_id: object) -> None:
    exc = _error(distinct_id=distinct_id)
    assert exc.field == "distinct_id"
    assert "reserved" in exc.problem


@pytest.mark.parametrize(
    "distinct_id",
    [
        "\u200b",  # zero width space: not whitespace to Python, PostHog or JavaScript
        "\u200b\u200c\u200d",
        " \u200b ",
        "\ufeff",  # byte order mark
        "\u2060",  # word joiner
        "\u00ad",  # soft hyphen
        "\u200e\u200f",  # bidi marks
        "\u3164",  # Hangul filler
        "\u2800",  # Braille blank
        "\ufe0f",  # a variation selector alone
        "\x01",
        "\x7f",
        "\x00",
        "\x00\u200b",
    ],
)
def test_invisible_distinct_ids_are_refused(distinct_id: str) -> None:
    exc = _error(distinct_id=distinct_id)
    assert exc.field == "distinct_id"
    assert "no visible character" in exc.problem
    assert "U+" in exc.problem


@pytest.mark.parametrize("name", ["\u200b", "\ufeff\u200b", "\x01\x02"])
def test_invisible_event_names_and_dedup_keys_are_refused(name: str) -> None:
    assert "no visible character" in _error(event=name).problem
    assert _error(dedup_key=name).field == "dedup_key"


@pytest.mark.parametrize(
    "distinct_id", ["user\u200b", "\u200bx", "é", "🚀", "\x01a", "ユーザー", "0x0", "nul\x00l"]
)
def test_ids_with_a_visible_character_are_kept_as_they_are(distinct_id: str) -> None:
    assert prepare_event("e", distinct_id).distinct_id == distinct_id.replace("\x00", "\ufffd")


@pytest.mark.parametrize(
    "distinct_id", ["nan", "NULL", "NONE", "[OBJECT OBJECT]", "00", "id-1", "'NULL'", '"nan"']
)
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


# --------------------------------------------------------------------------- $set, $groups


@pytest.mark.parametrize(
    "properties",
    [
        {"$set": {"plan": "pro"}, "$set_once": {"first_seen": "2024-01-01"}},
        {"$set": None, "$set_once": {}},  # None reads as absent in PostHog
        {"$unset": ["plan", "seats"]},
        {"$unset": ("plan",)},
        {"$unset": frozenset({"plan"})},
        {"$unset": {"plan": True}},  # PostHog takes the keys of an object
        {"$unset": []},
        {"$groups": {"company": "acme", "team": 42, "project": uuid.UUID(int=1)}},
        {"$groups": {}},
        {"$groups": None},
        {"set": "not the person", "groups": "plain properties"},
    ],
)
def test_person_and_group_properties_accepted(properties: dict[str, Any]) -> None:
    prepare_event("e", "u", properties)
    prepare_event("e", "u", types.MappingProxyType(properties))  # the general path


@pytest.mark.parametrize(
    ("properties", "field", "says"),
    [
        ({"$set": "pro"}, "properties.$set", "mapping of person property names"),
        ({"$set": ["plan", "pro"]}, "properties.$set", "got list"),
        ({"$set_once": 1}, "properties.$set_once", "got int"),
        ({"$unset": "plan"}, "properties.$unset", "one property per character"),
        ({"$unset": 5}, "properties.$unset", "list of person property names"),
        ({"$unset": ["plan", 3]}, "properties.$unset[1]", "str property name"),
        ({"$groups": "acme"}, "properties.$groups", "mapping of group type to group key"),
        ({"$groups": {"company": None}}, "properties.$groups.company", "got NoneType"),
        ({"$groups": {"company": True}}, "properties.$groups.company", "got bool"),
        ({"$groups": {"company": 1.5}}, "properties.$groups.company", "got float"),
        ({"$groups": {"company": {"id": 1}}}, "properties.$groups.company", "got dict"),
        ({"$groups": {"company": "  "}}, "properties.$groups.company", "must not be empty"),
        ({"$groups": {"": "acme"}}, "properties.$groups", "non-empty str"),
        ({"$groups": {1: "acme"}}, "properties.$groups", "non-empty str"),
    ],
)
def test_person_and_group_properties_of_the_wrong_shape_are_refused(
    properties: dict[str, Any], field: str, says: str
) -> None:
    for given in (properties, types.MappingProxyType(properties)):
        exc = _error(properties=given)
        assert exc.field == field
        assert says in exc.problem
    assert _error(properties=properties, field_prefix="events[4].").field == "events[4]." + field


# --------------------------------------------------------------------------- size
#
# An event is measured as PostHog's capture builds its Kafka record (see
# outbox._capture_size); tests.capture_record builds that record's text independently.


def _record(prepared: PreparedEvent) -> int:
    return record_size(outbound_for(prepared.event, prepared.distinct_id, prepared.properties_json))


def _filler(unit: str, count: int) -> dict[str, Any]:
    return {"p": unit * count}


def _largest_accepted(unit: str, event: str = "e", distinct_id: str = "u") -> int:
    """The largest ``count`` for which ``{"p": unit * count}`` is accepted."""
    low, high = 0, MAX_EVENT_BYTES
    while low < high:
        mid = (low + high + 1) // 2
        try:
            prepare_event(event, distinct_id, _filler(unit, mid))
        except OutboxValidationError:
            high = mid - 1
        else:
            low = mid
    return low


@pytest.mark.parametrize(
    ("unit", "cost"),
    [
        ("x", 1),  # one byte
        ('"', 4),  # \" in the stored JSON, each of the two escaped again inside data
        ("\\", 4),
        ("\n", 3),  # \n, then its backslash escaped again
        ("\x01", 7),  # \u0001, then its backslash escaped again
        ("é", 2),  # UTF-8 bytes, never escaped
        ("€", 3),
        ("🚀", 4),
    ],
    ids=["ascii", "quote", "backslash", "newline", "control", "2-byte", "3-byte", "4-byte"],
)
def test_size_limit_edge_is_capture_record_size(unit: str, cost: int) -> None:
    count = _largest_accepted(unit)
    under = prepare_event("e", "u", _filler(unit, count))
    measured = capture_size.message_size("e", "u", under.properties_json)
    assert MAX_EVENT_BYTES - cost < measured <= MAX_EVENT_BYTES  # one more would not fit
    assert _record(under) == measured
    exc = _error(event="e", distinct_id="u", properties=_filler(unit, count + 1))
    assert exc.field == "properties"
    over = capture_size.message_size("e", "u", v_json(_filler(unit, count + 1)))
    assert f"would be {over} bytes" in exc.problem
    assert f"{MAX_EVENT_BYTES} byte limit" in exc.problem
    assert over > MAX_EVENT_BYTES


def v_json(properties: dict[str, Any]) -> str:
    return json.dumps(properties, separators=(",", ":"), ensure_ascii=False)


def test_plain_text_gets_almost_the_whole_megabyte() -> None:
    # Capture's envelope, key and headers, and the worker's two properties, cost
    # about 1.3 kB; the rest is the event's.
    assert 998_650 < _largest_accepted("x") < 998_750
    assert 249_600 < _largest_accepted('"') < 249_700


def test_what_the_readme_says_fits() -> None:
    # "About 998,600 bytes of plain text fit, or about 249,600 double quotes."
    config = AnalyticsConfig()

    def largest(unit: str) -> int:
        low, high = 0, MAX_EVENT_BYTES
        while low < high:
            mid = (low + high + 1) // 2
            try:
                prepare_enqueue("signup", "user-42", {"p": unit * mid}, config=config)
            except OutboxValidationError:
                high = mid - 1
            else:
                low = mid
        return low

    assert 998_550 <= largest("x") <= 998_650
    assert 249_550 <= largest('"') <= 249_650


def test_names_take_their_share_of_the_limit() -> None:
    plain = _largest_accepted("x")
    event, person = 'e"' * 100, "é\\" * 100
    with_names = _largest_accepted("x", event, person)
    prepared = prepare_event(event, person, _filler("x", with_names))
    assert MAX_EVENT_BYTES - 1 <= _record(prepared) <= MAX_EVENT_BYTES
    # Each name is in a header and twice in the record's value (once escaped again);
    # the distinct_id is in the key too.
    assert plain - with_names > 1500


@pytest.mark.parametrize(
    ("properties", "slack"),
    [
        ({"s": 'quote " backslash \\ newline \n tab \t \x01 \u2028 é 🚀 ' * 20}, 0),
        ({"nested": {"deeper": [{"k": 'v"\\'}, ["1e-300"]]}, "é": {"😀": ["😀"]}}, 0),
        ({}, 1),  # "{}" gains one comma less than counted
        # Each number is counted at the longer of PostgreSQL's text and serde_json's,
        # while capture writes all of them one way: 2**64 and -(2**63) - 1 are 2 bytes
        # longer as serde_json floats, the others longer as PostgreSQL wrote them; and
        # -0.0 comes back a byte shorter (0.0), which is not looked for.
        ({"n": [0, -1, 2**63, 2**64, -(2**63) - 1, 10**25, 1.5, -0.0, 1e-5, 1e-7, 1e300]}, 5),
        ({"n": [5e-324, 1.7976931348623157e308, 2.2250738585072014e-308, 1.5e-10]}, 0),
    ],
    ids=["escapes", "nested", "empty", "numbers", "extreme-floats"],
)
def test_measure_matches_the_record(properties: dict[str, Any], slack: int) -> None:
    prepared = prepare_event('ev"ent\\', "pérson\x01", properties)
    measured = capture_size.message_size(
        prepared.event, prepared.distinct_id, prepared.properties_json
    )
    assert measured == _record(prepared) + slack


def _numbers(token: str, count: int) -> str:
    return '{"p":[' + ",".join([token] * count) + "]}"


def test_numbers_are_counted_as_they_come_back_from_postgresql() -> None:
    # 5e-324 takes 6 characters in the stored JSON, but PostgreSQL writes it back as
    # 0.000...005 (326 characters) and capture may keep that text: 3,100 of them are
    # about 22 kB stored and over 1 MB in capture.
    properties = {"p": [5e-324] * 3100}
    text = v_json(properties)
    assert len(text) < 22_000
    assert record_size(outbound_for("e", "u", text)) > 3100 * 326 > MAX_EVENT_BYTES
    exc = _error(properties=properties)
    assert exc.field == "properties"
    assert _record(prepare_event("e", "u", {"p": [5e-324] * 3000})) <= MAX_EVENT_BYTES


def _boundary(make: Any) -> int:
    """The largest ``count`` whose ``make(count)`` measures at most the limit (the
    measure grows linearly with ``count``)."""
    one = capture_size.message_size("e", "u", make(1))
    step = capture_size.message_size("e", "u", make(2)) - one
    return 1 + (MAX_EVENT_BYTES - one) // step


def test_the_cheap_tiers_never_accept_what_the_exact_measure_refuses() -> None:
    # Up to always_fits() characters nothing is measured: the worst content there is
    # (the most growing number, 4-byte characters, 200 control characters as names).
    worst_name = "\x01" * MAX_NAME_LENGTH
    chars = validation._ALWAYS_FITS
    numbers = _numbers("5e-324", (chars - 8) // 7)
    assert len(numbers) <= chars
    assert capture_size.message_size(worst_name, worst_name, numbers) <= MAX_EVENT_BYTES
    emoji = '{"p":"' + "🚀" * (chars - 8) + '"}'
    assert capture_size.message_size(worst_name, worst_name, emoji) <= MAX_EVENT_BYTES
    # Past it, the counting tier and the exact one agree on either side of the limit.
    makers = [
        lambda n: '{"p":"' + "x" * n + '"}',
        lambda n: '{"p":"' + '\\"' * n + '"}',
        lambda n: '{"p":"' + "é" * n + '"}',
        lambda n: '{"p":"' + "1e+16 " * n + '"}',  # looks like numbers, in a string
        lambda n: _numbers("1e+16", n),
        lambda n: _numbers("5e-324", n),
        lambda n: _numbers("18446744073709551616", n),
        lambda n: _numbers("1.5", n),
    ]
    for make in makers:
        edge = _boundary(make)
        for count, fits in ((edge, True), (edge + 1, False)):
            text = make(count)
            assert (capture_size.message_size("e", "u", text) <= MAX_EVENT_BYTES) is fits
            assert (capture_size.oversize("e", "u", text) is None) is fits


@pytest.mark.parametrize(
    ("token", "growth"),
    [
        ("123", 0),
        ("-9223372036854775808", 0),  # i64::MIN stays an integer
        ("18446744073709551615", 0),  # u64::MAX too
        ("18446744073709551616", 2),  # past u64: 1.8446744073709552e+19
        ("1.5", 0),
        ("1000000000000000.0", 0),
        ("-0.0", -1),  # PostgreSQL writes 0.0
        ("1e-05", 2),  # 0.00001 from PostgreSQL and from serde_json
        ("1.5e-07", 3),  # 0.00000015
        ("1e+16", 12),  # 10000000000000000
        ("1e+308", 303),
        ("5e-324", 320),
    ],
)
def test_number_growth(token: str, growth: int) -> None:
    assert capture_size.number_growth(token) == growth


def test_no_number_grows_more_than_the_bound() -> None:
    worst = 0
    for exponent in range(-324, 309):
        for mantissa in ("1", "5", "9.999999999999999", "1.2345678901234567"):
            try:
                value = float(f"{mantissa}e{exponent}")
            except OverflowError:
                continue
            if value in (0.0, math.inf):
                continue
            for number in (value, -value):
                worst = max(worst, capture_size.number_growth(json.dumps(number)))
    assert worst == capture_size._MAX_NUMBER_GROWTH
    # The per-character bound of the cheapest tier covers it.
    assert capture_size._CHAR_MAX * 5 >= 4 * 5 + capture_size._MAX_NUMBER_GROWTH + 2


def test_the_counting_float_growth_agrees_with_the_decimal_one() -> None:
    values = [10.0**e for e in range(-323, 309)] + [
        1.2345678901234567 * 10.0**e for e in range(-300, 300)
    ]
    values += [9.223372036854776e18, 1.8446744073709552e19, 9.999999999999999e19, 5e-324]
    for value in values:
        for number in (value, -value):
            token = json.dumps(number)
            if "e" in token:
                assert capture_size._float_growth(token) == capture_size.number_growth(token), token


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e15, "1000000000000000.0"),
        (1e16, "1e+16"),
        (1e-5, "0.00001"),
        (1e-6, "1e-6"),
        (0.1, "0.1"),
        (0.3, "0.3"),
        (1.234e33, "1.234e+33"),
        (12.34, "12.34"),
        (-0.001234, "-0.001234"),
        (5e-324, "5e-324"),
    ],
)
def test_serde_float_length_follows_its_formatter(value: float, text: str) -> None:
    # serde_json's formatter (zmij; ryu before it, without the "+"), as its tests spell it.
    assert capture_size._serde_float_len(value) == len(text)


def test_integers_past_f64_are_refused_naming_the_field() -> None:
    assert _props({"n": 10**308}) == {"n": 10**308}  # still an f64 to PostHog
    for properties, field in [
        ({"n": 2**1024}, "properties.n"),
        ({"a": [1, -(10**400)]}, "properties.a[1]"),
        ({"deep": {"x": 10**5000}}, "properties.deep.x"),  # too long to print at all
    ]:
        exc = _error(properties=properties)
        assert exc.field == field
        assert "1.8e308" in exc.problem


def test_long_digit_strings_are_not_integers() -> None:
    digits = "7" * 1000
    assert _props({"s": digits, "n": 5}) == {"s": digits, "n": 5}


@pytest.mark.parametrize("offset", range(0, 700, 13))
def test_the_long_digit_run_sample_never_misses(offset: int) -> None:
    text = "x" * offset + "1" * validation._F64_OVERFLOW_DIGITS + "]"
    sample = text[153::154]
    assert validation._has_long_digit_run(text, sample, validation._two_digits(sample))
    # A run must span step + 1 = 155 digits to be looked at more closely.
    short = "x" * offset + ("1" * 150 + ",") * 6
    sample = short[153::154]
    assert not validation._has_long_digit_run(short, sample, validation._two_digits(sample))


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


def test_timestamp_range_is_epoch_to_23_hours_ahead() -> None:
    now = datetime.now(UTC)
    accepted = [
        TIMESTAMP_MIN,
        "1970-01-01T00:00:00Z",
        datetime(1970, 1, 1),  # naive: UTC
        datetime(1970, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1))),  # the epoch, in +01:00
        now - timedelta(days=3650),
        now + TIMESTAMP_MAX_AHEAD - timedelta(minutes=1),
    ]
    for timestamp in accepted:
        assert prepare_event("e", "u", timestamp=timestamp).timestamp is not None
    assert datetime(1970, 1, 1, tzinfo=UTC) == TIMESTAMP_MIN
    assert timedelta(hours=23) == TIMESTAMP_MAX_AHEAD


@pytest.mark.parametrize(
    ("timestamp", "says"),
    [
        (datetime.min, "before 1970-01-01"),
        (datetime(1, 1, 1, tzinfo=UTC), "before 1970-01-01"),
        ("0001-01-01T00:00:00Z", "before 1970-01-01"),
        (datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), "before 1970-01-01"),
        (datetime(1970, 1, 1, 0, 59, tzinfo=timezone(timedelta(hours=1))), "before 1970-01-01"),
        (datetime.max, "more than 23 hours ahead"),  # the usual "never"
        ("9999-12-31T23:59:59Z", "more than 23 hours ahead"),
        (datetime.max.replace(tzinfo=UTC), "more than 23 hours ahead"),
        (datetime(2200, 1, 1, tzinfo=UTC), "more than 23 hours ahead"),
    ],
)
def test_timestamp_outside_what_posthog_keeps_is_refused(timestamp: Any, says: str) -> None:
    exc = _error(timestamp=timestamp)
    assert exc.field == "timestamp"
    assert says in exc.problem
    assert "PostHog" in exc.problem


def test_timestamp_just_past_23_hours_ahead_is_refused() -> None:
    soon = datetime.now(UTC) + TIMESTAMP_MAX_AHEAD + timedelta(minutes=1)
    assert "more than 23 hours ahead" in _error(timestamp=soon).problem
    assert _error(timestamp=soon.isoformat(), field_prefix="events[2].").field == (
        "events[2].timestamp"
    )


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


def test_nan_and_infinity_are_stored_as_null_without_the_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # orjson writes them as null, which is what the walk stores for them.
    properties = {"bad": NAN, "worse": [math.inf, {"x": -math.inf}], "none": None}
    expected = validation._walk_encode(properties, "properties")
    assert expected == '{"bad":null,"worse":[null,{"x":null}],"none":null}'

    def no_walk(*args: Any) -> Any:
        raise AssertionError("the normalising walk ran")

    monkeypatch.setattr(validation, "_normalise_mapping", no_walk)
    assert prepare_event("e", "u", properties).properties_json == expected


@pytest.mark.parametrize(
    "properties",
    [
        {"nul": "\x00"},
        {"lone": "\ud800"},
        {"nested": {1: "int key"}},
        {"raw": b"x"},
        _nested(validation.MAX_NESTING_DEPTH + 1),
        {"huge": [1, 2**1100]},
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
