"""What enqueue() sends the server: the fast encoder, the jsonb key order, the parameters.

These are the pieces tuned for speed (see docs/benchmarks.md, "Enqueue"); each must
give exactly what the straightforward version gives.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import pickle
import time
import uuid
from collections import OrderedDict
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from outbox import AnalyticsConfig, OutboxValidationError, schema
from outbox import validation as v
from outbox.enqueue import (
    _Call,
    _one_params,
    _prepare_all,
    _rows_param,
    enqueue_many,
    prepare_enqueue,
)
from outbox.validation import PreparedEvent, prepare_event

enqueue_module = importlib.import_module("outbox.enqueue")

CONFIG = AnalyticsConfig(environment="test")


class Colour(Enum):
    RED = "red"


def jsonb_sorted(keys: list[str]) -> list[str]:
    """The order PostgreSQL keeps jsonb object keys in: UTF-8 length, then bytes."""
    return sorted(keys, key=lambda k: (len(k.encode()), k.encode()))


# --------------------------------------------------------------------------- encoder

ENCODABLE: list[Any] = [
    {},
    {"a": 1},
    {"s": 'quote " backslash \\ newline \n tab \t nul-free \x01 \u2028 é 🚀'},
    {"n": [0, -1, 2**63, 1.5, -0.0, 1e-7, 1e300, True, False, None]},
    {"t": (1, "x", (2,)), "nested": {"deeper": {"list": [{"k": "v"}]}}},
    {"when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "naive": datetime(2026, 1, 2)},
    {"day": date(2026, 1, 2), "id": uuid.UUID(int=42), "dec": Decimal("1.10")},
    {"colour": Colour.RED, "set": {3, 1, 2}, "fs": frozenset({"b", "a"})},
    {"ключ": "значение", "键": "值", "😀": ["😀"]},
    {"digits": "7" * 1000, "n": 10**308, "m": -(10**200)},  # long digit runs: the walk checks
    {"$set": {"plan": "pro"}, "$unset": ["seats"], "$groups": {"company": "acme", "n": 7}},
]


@pytest.mark.parametrize("value", ENCODABLE)
def test_the_fast_path_stores_what_the_careful_walk_stores(value: Any) -> None:
    assert prepare_event("e", "u", value).properties_json == v._walk_encode(value, "properties")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"x": math.nan}, ValueError),
        ({"x": [math.inf]}, ValueError),
        ({"x": b"bytes"}, v._NeedsWalk),
        ({"x": object()}, v._NeedsWalk),
        ({(1, 2): "tuple key"}, TypeError),
    ],
)
def test_the_fast_encoder_refuses_what_the_json_encoder_refuses(
    value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        v._FAST_ENCODER.encode(value)


# --------------------------------------------------------------------------- jsonb order


def test_keys_are_put_in_jsonb_order() -> None:
    props = {
        "zeta": 1,
        "a": 2,
        "bb": 3,
        "é": 4,  # two UTF-8 bytes: sorts with the two-byte keys
        "ab": 5,
        "z": 6,
        "😀": 7,  # four bytes
        "abcd": 8,
        "B": 9,
    }
    ordered = v._jsonb_ordered(props)
    assert ordered is not None
    assert list(ordered) == jsonb_sorted(list(props))
    assert ordered == props
    assert next(iter(props)) == "zeta"  # the caller's dict is left alone


def test_keys_already_in_order_are_not_copied() -> None:
    props = {k: 1 for k in jsonb_sorted([f"k{i}" for i in range(12)])}
    assert v._jsonb_ordered(props) is props


def test_non_str_or_unhashable_keys_are_left_to_the_slow_checks() -> None:
    assert v._jsonb_ordered({**{f"k{i}": i for i in range(10)}, 1: "int"}) is None
    assert v._jsonb_ordered({**{f"k{i}": i for i in range(10)}, None: "none"}) is None


def test_the_order_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(v, "_jsonb_orders", {})
    for i in range(v._JSONB_ORDER_CACHE_SIZE + 10):
        v._jsonb_ordered({f"key{i}_{j:02}": j for j in range(8, 0, -1)})
    assert 0 < len(v._jsonb_orders) <= v._JSONB_ORDER_CACHE_SIZE


def test_a_keyed_event_goes_in_jsonb_order_and_a_plain_one_keeps_the_callers() -> None:
    # Only the keyed functions parse jsonb; a plain event is stored as json text.
    props = {f"p{'x' * (20 - i)}": i for i in range(20)}
    keyed = prepare_enqueue("e", "u", props, dedup_key="k", config=CONFIG)
    assert keyed is not None
    stored = json.loads(keyed.properties_json)
    assert list(stored) == jsonb_sorted(list(stored))
    assert stored == {**CONFIG._standard, **props}
    via_enqueue = prepare_enqueue("e", "u", props, config=CONFIG)
    assert via_enqueue is not None
    assert list(json.loads(via_enqueue.properties_json)) == list({**CONFIG._standard, **props})
    plain = prepare_event("e", "u", props)
    assert list(json.loads(plain.properties_json)) == list(props)


def test_the_reported_field_does_not_depend_on_the_order_sent() -> None:
    # Two bad values: the first in the caller's order is named, as before.
    props: dict[str, Any] = {f"k{i}": i for i in range(10)}
    props["zzzzzzzzzzzz"] = object()
    props["a"] = b"bytes"
    with pytest.raises(OutboxValidationError) as info:
        prepare_enqueue("e", "u", props, dedup_key="k", config=CONFIG)  # reordered
    assert info.value.field == "properties.zzzzzzzzzzzz"


@pytest.mark.parametrize(
    "props",
    [
        {**{f"k{i}": i for i in range(10)}, "nan": math.nan, "nul": "a\x00b"},
        {**{f"k{i}": i for i in range(10)}, "d": {1: "int key"}},
        OrderedDict((f"k{i}", i) for i in range(10)),
        {**{f"k{i}": i for i in range(10)}, "lone": "\ud800"},
    ],
    ids=["normalised", "nested-int-key", "dict-subclass", "lone-surrogate"],
)
def test_the_slow_path_gives_the_same_result_with_or_without_reordering(props: Any) -> None:
    def outcome(prepare: Any) -> tuple[str, Any]:
        try:
            prepared = prepare()
        except OutboxValidationError as exc:
            return ("error", exc.field)
        return ("ok", json.loads(prepared.properties_json))

    standard = AnalyticsConfig()._standard
    via_enqueue = outcome(
        lambda: prepare_enqueue("e", "u", props, dedup_key="k", config=AnalyticsConfig())
    )
    plain = outcome(lambda: prepare_event("e", "u", {**standard, **props}))
    assert via_enqueue == plain


# --------------------------------------------------------------------------- names


NAMES = [
    "signup",
    "  padded  ",
    "\x1f\x1ctrimmed by str.strip\x1e",
    "",
    "   ",
    "x" * 200,
    "x" * 201,
    " " + "x" * 200 + " ",
    "a\x00b",
    "café",
    "\ud800lone",
    "anonymous",
    " Anonymous ",
    "NULL",
    "null",
    "None",
    "0",
    "00",
    "[object Object]",
    "not_authenticated",
    "NOT_AUTHENTICATED",
    "distinct_id",
    "'null'",
    '"Anonymous"',
    "\x01",
    "\x01visible",
    "\x7f",
    " \x08 ",
    "~",
    "!",
    "\u200b",
    "\u200bx",
    "\ufeff",
]


def _outcome(fn: Any, *args: Any) -> tuple[str, str]:
    try:
        return ("ok", fn(*args))
    except OutboxValidationError as exc:
        return ("error", f"{exc.field}: {exc.problem}")


@pytest.mark.parametrize("name", NAMES)
def test_the_inline_name_checks_agree_with_the_full_ones(name: str) -> None:
    def inline_event(value: str) -> str:
        return v._prepare_event(value, "u", None, None, None, None, "", "posthog", True).event

    def inline_distinct_id(value: str) -> str:
        prepared = v._prepare_event("e", value, None, None, None, None, "", "posthog", True)
        return prepared.distinct_id

    assert _outcome(inline_event, name) == _outcome(v._check_event, name, "event")
    assert _outcome(inline_distinct_id, name) == _outcome(v._check_distinct_id, name, "distinct_id")


# --------------------------------------------------------------------------- parameters


def _event(**overrides: Any) -> PreparedEvent:
    base: dict[str, Any] = {
        "uuid": uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057"),
        "event": "e",
        "distinct_id": "u",
        "properties_json": '{"a":1}',
        "timestamp": None,
        "dedup_key": None,
        "destination": "posthog",
    }
    base.update(overrides)
    return PreparedEvent(**base)


def test_the_rows_parameter_is_json_with_defaults_left_out() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    events = [
        _event(),
        _event(
            event='quote " and \\ and \n and \u2028',
            distinct_id="é🚀",
            timestamp=when,
            dedup_key='k"1',
            destination="metrics",
            properties_json="{}",
        ),
    ]
    text = _rows_param(events)
    rows = json.loads(text)
    assert rows[0] == {"d": "u", "e": "e", "p": {"a": 1}, "u": events[0].uuid.hex}
    assert rows[1] == {
        "d": "é🚀",
        "e": 'quote " and \\ and \n and \u2028',
        "k": 'k"1',
        "p": {},
        "s": "metrics",
        "t": when.isoformat(),
        "u": events[1].uuid.hex,
    }
    # Keys are written in jsonb's order, so the server's sort has nothing to do.
    for row in rows:
        assert list(row) == jsonb_sorted(list(row))


def test_one_event_travels_as_one_text_parameter_per_column() -> None:
    when = datetime(2026, 1, 2, tzinfo=UTC)
    assert _one_params(_event()) == {
        "u": "01890a5dac96774bbcceb302099a8057",
        "e": "e",
        "d": "u",
        "p": '{"a":1}',
        "s": None,
        "t": None,
        "k": None,
    }
    params = _one_params(_event(timestamp=when, dedup_key="k", destination="metrics"))
    assert (params["t"], params["k"], params["s"]) == (when.isoformat(), "k", "metrics")


def test_a_call_picks_the_statement_for_its_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enqueue_module, "_wake_now", lambda: False)  # one shape at a time
    one = _Call([_event()])
    assert set(one.params) == {"u", "e", "d", "p", "s", "t", "k"}
    assert "json_array_elements" not in one.statements.psycopg
    many = _Call([_event(), _event(uuid=uuid.uuid4())])
    assert set(many.params) == {"u", "e", "d", "p"}  # no timestamp, no destination
    assert json.loads(many.params["u"]) == [e.uuid.hex for e in many.sent]
    assert json.loads(many.params["p"]) == [{"a": 1}, {"a": 1}]
    assert "json_array_elements(CAST(%(p)s AS json))" in many.statements.psycopg
    assert '"timestamp"' not in many.statements.psycopg
    # One text for any number of events, so a connection that prepares its statements
    # keeps one prepared statement for them, not one per batch size.
    for n in (3, 10, 1001, 5000):
        call = _Call([_event(uuid=uuid.uuid4()) for _ in range(n)])
        assert call.statements is many.statements, n
        assert len(json.loads(call.params["e"])) == n
    # A timestamp or a destination on any event adds its column, null for the others.
    when = datetime(2026, 1, 2, tzinfo=UTC)
    mixed = _Call([_event(), _event(uuid=uuid.uuid4(), timestamp=when, destination="metrics")])
    assert json.loads(mixed.params["t"] or "") == [None, when.isoformat()]
    assert json.loads(mixed.params["s"] or "") == [None, "metrics"]
    assert "coalesce(CAST(t AS timestamptz), now())" in mixed.statements.psycopg
    # Duplicate dedup keys are dropped first: what is left may be a single event.
    deduped = _Call([_event(dedup_key="k"), _event(uuid=uuid.uuid4(), dedup_key="k")])
    assert len(deduped.sent) == 1 and "u" in deduped.params and deduped.reads_keys
    keyed = _Call([_event(dedup_key="k"), _event(uuid=uuid.uuid4(), dedup_key="j")])
    assert set(keyed.params) == {"rows"} and keyed.reads_keys


def test_a_plain_call_writes_to_the_event_table_of_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The rule of outbox_snapshot_slot(): floor(epoch / SLOT_SECONDS) mod EVENT_TABLES.
    for slot in range(schema.EVENT_TABLES + 1):
        at = 1_700_000_000 // schema.SLOT_SECONDS * schema.SLOT_SECONDS
        at += slot * schema.SLOT_SECONDS + schema.SLOT_SECONDS - 0.001
        clock = SimpleNamespace(time=lambda at=at: at, monotonic=time.monotonic)
        monkeypatch.setattr(enqueue_module, "time", clock)
        expected = f"outbox_events_{int(at // schema.SLOT_SECONDS) % schema.EVENT_TABLES}"
        assert schema.event_table_slot(at) == int(expected[-1])
        for call in (_Call([_event()]), _Call([_event(), _event(uuid=uuid.uuid4())])):
            assert f"INSERT INTO {expected} " in call.statements.psycopg
    keyed = _Call([_event(dedup_key="k")])
    assert "INSERT" not in keyed.statements.psycopg  # the function picks the table


# --------------------------------------------------------------------------- uuids


def test_new_uuids_are_ordinary_uuid_objects() -> None:
    made = v.new_event_uuid()
    same = uuid.UUID(int=made.int)
    assert type(made) is uuid.UUID
    assert made == same and hash(made) == hash(same) and str(made) == str(same)
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert made.is_safe is uuid.SafeUUID.unknown
    assert pickle.loads(pickle.dumps(made)) == made == copy.deepcopy(made)
    with pytest.raises(TypeError):
        made.int = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- enqueue_many


class _Unused:
    """A connection enqueue_many must not reach: the check is in Python."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the connection was used ({name})")


def test_a_uuid_repeated_in_enqueue_many_is_refused_before_the_database() -> None:
    given = uuid.uuid4()
    items: list[dict[str, Any]] = [
        {"event": "a", "distinct_id": "u", "uuid": given},
        {"event": "b", "distinct_id": "u"},
        {"event": "c", "distinct_id": "u", "uuid": str(given).upper()},  # the same uuid
    ]
    with pytest.raises(OutboxValidationError) as info:
        enqueue_many(_Unused(), items, config=CONFIG)
    assert info.value.field == "events[2].uuid"
    assert "events[0]" in info.value.problem
    assert str(given) in info.value.problem


def test_distinct_given_uuids_pass_the_check() -> None:
    items = [{"event": "e", "distinct_id": "u", "uuid": uuid.uuid4()} for _ in range(3)]
    prepared = _prepare_all(CONFIG, items)
    assert [p.uuid for p in prepared] == [i["uuid"] for i in items]


# --------------------------------------------------------------------------- orjson


def _stdlib(value: Any) -> str | None:
    try:
        return v._FAST_ENCODER.encode(value)
    except (v._NeedsWalk, ValueError, TypeError, RecursionError):
        return None


def test_orjson_writes_every_code_point_as_the_json_module_does() -> None:
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(points), 4096):
        text = "".join(points[start : start + 4096])
        value = {text: [text]}
        assert orjson.dumps(value).decode() == _stdlib(value)
        assert v._orjson_encode(value) in (None, _stdlib(value))


def test_orjson_is_used_only_where_its_floats_are_written_as_python_writes_them() -> None:
    import random

    rng = random.Random(12)
    floats = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30) for _ in range(20_000)]
    floats += [0.0001, 0.00009, 1e15, 1.5e15, 9.999999999999999e15, 1e16, 5e-324, -0.0]
    used = 0
    for number in floats:
        text = v._orjson_encode({"x": number})
        if text is not None:
            used += 1
            assert text == _stdlib({"x": number})
    assert used > len(floats) // 10  # it is used for the ordinary magnitudes


@pytest.mark.parametrize(
    "value",
    [
        {"nan": math.nan},
        {"inf": [math.inf]},
        {"text": "null is a word", "nothing": None},
        {"text": "a 3e-5 in a string", "id": "ab3e9f"},
    ],
)
def test_what_orjson_writes_as_the_walk_would_is_kept(value: Any) -> None:
    # NaN and infinity: null, as the walk stores them; an e after a digit in a string.
    text = v._orjson_encode(value)
    assert text is not None and text == v._walk_encode(value, "properties")


@pytest.mark.parametrize(
    "value",
    [
        {"big": 2**64},
        {"small": -(2**63) - 1},
        {"lone": "\ud800"},
        {"bytes": b"x"},
        {"nested": {1: "int key"}},
        {"dict": OrderedDict(a=1)},
        {"e": 1e-7, "f": 1e300},
        {"g": [1.5e-10]},
        {"h": {"x": -2e22}},
    ],
)
def test_what_orjson_would_write_differently_goes_to_the_json_module(value: Any) -> None:
    def outcome(encode: Any) -> tuple[str, str]:
        try:
            return ("stored", encode())
        except OutboxValidationError as exc:
            return ("refused", str(exc))

    assert v._orjson_encode(value) is None
    assert outcome(lambda: prepare_event("e", "u", value).properties_json) == outcome(
        lambda: v._walk_encode(value, "properties")
    )


def test_orjson_and_the_hook_agree_on_datetimes_uuids_decimals_enums_and_sets() -> None:
    value = {
        "when": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        "naive": datetime(2026, 1, 2),
        "day": date(2026, 1, 2),
        "id": uuid.UUID(int=42),
        "dec": Decimal("1.10"),
        "colour": Colour.RED,
        "set": {3, 1, 2},
        "big": 2**63,
    }
    assert v._orjson_encode(value) == _stdlib(value)
