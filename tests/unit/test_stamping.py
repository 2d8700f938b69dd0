"""What enqueue() stamps on an event before validating it, checked without a database.

``prepare_enqueue`` is the exact pipeline ``enqueue()`` runs before its INSERT.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

import outbox
from outbox import AnalyticsConfig, OutboxValidationError
from outbox.enqueue import prepare_enqueue
from outbox.validation import PreparedEvent

CONFIG = AnalyticsConfig(
    environment="production",
    release="2026.11.1",
    super_properties={"app": "api", "region": "eu"},
)


def props(prepared: PreparedEvent | None) -> dict[str, Any]:
    assert prepared is not None
    loaded: dict[str, Any] = json.loads(prepared.properties_json)
    return loaded


def prepare(*args: Any, **kwargs: Any) -> PreparedEvent | None:
    kwargs.setdefault("config", CONFIG)
    return prepare_enqueue(*args, **kwargs)


def test_standard_and_super_properties_are_stamped() -> None:
    assert props(prepare("order_placed", "user-1", {"total": 12})) == {
        "environment": "production",
        "event_schema_version": 1,
        "release": "2026.11.1",
        "$lib": "posthog-outbox",
        "$lib_version": outbox.__version__,
        "app": "api",
        "region": "eu",
        "total": 12,
    }
    assert props(prepare("ping", "user-1"))["environment"] == "production"


def test_the_events_own_properties_win_over_super_and_standard_ones() -> None:
    stamped = props(prepare("e", "u", {"app": "worker", "environment": "staging"}))
    assert stamped["app"] == "worker"
    assert stamped["environment"] == "staging"


def test_none_is_dropped_never_shipped_as_null() -> None:
    stamped = props(prepare("e", "u", {"plan": None, "seats": 3, "region": None}))
    assert "plan" not in stamped
    assert stamped["seats"] == 3
    # None means "not given", so the super property stays.
    assert stamped["region"] == "eu"


def test_the_callers_properties_are_never_modified() -> None:
    mine = {"plan": None, "n": 1}
    prepare("e", "u", mine, set={"a": 1})
    assert mine == {"plan": None, "n": 1}


def test_set_set_once_and_groups_become_reserved_properties() -> None:
    stamped = props(
        prepare(
            "signup",
            "user-1",
            {"plan": "free"},
            set={"role": "founder"},
            set_once={"email": "ada@example.com"},
            groups={"organization": 42, "workspace": "w-1"},
        )
    )
    assert stamped["$set"] == {"role": "founder"}
    assert stamped["$set_once"] == {"email": "ada@example.com"}
    assert stamped["$groups"] == {"organization": "42", "workspace": "w-1"}
    # Empty mappings add nothing.
    assert "$set" not in props(prepare("e", "u", set={}))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"set": {"email": b"x"}}, "set.email"),
        ({"set_once": {"first": {"deep": object()}}}, "set_once.first.deep"),
        ({"set": ["email"]}, "set"),
        ({"groups": {"organization": None}}, "groups.organization"),
        ({"groups": {"organization": " "}}, "groups.organization"),
        ({"groups": "org-1"}, "groups"),
        ({"properties": {"$set": {"a": 1}}, "set": {"b": 2}}, "set"),
    ],
)
def test_person_and_group_arguments_are_validated_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    properties = kwargs.pop("properties", None)
    with pytest.raises(OutboxValidationError) as info:
        prepare("e", "u", properties, **kwargs)
    assert info.value.field == field


def test_enqueue_many_names_the_item_and_the_keyword() -> None:
    with pytest.raises(OutboxValidationError) as info:
        outbox.enqueue_many(
            object(),
            [
                {"event": "a", "distinct_id": "u"},
                {"event": "b", "distinct_id": "u", "set": {"avatar": b"\x89"}},
            ],
            config=CONFIG,
        )
    assert info.value.field == "events[1].set.avatar"


def test_an_actor_supplies_the_distinct_id_and_its_properties() -> None:
    actor = outbox.automation_actor(7, name="Nightly triage", trigger_id="cron-1")
    prepared = prepare("issue_created", actor, {"automation_name": "renamed"})
    assert prepared is not None and prepared.distinct_id == "automation_7"
    stamped = props(prepared)
    assert stamped["is_automation"] is True
    assert stamped["automation_id"] == "7"
    assert stamped["trigger_id"] == "cron-1"
    assert stamped["automation_name"] == "renamed"  # the event's own value wins


def test_disabled_does_nothing_at_all() -> None:
    off = AnalyticsConfig(disabled=True)
    assert prepare("e", "u", config=off) is None
    # Not even validation, and the "connection" is never used.
    not_a_connection = object()
    assert outbox.enqueue(not_a_connection, "", "anonymous", config=off) is None
    items = ({"event": "e", "distinct_id": "u"} for _ in range(3))
    assert outbox.enqueue_many(not_a_connection, items, config=off) == [None, None, None]


def test_the_process_wide_config_is_used_by_default() -> None:
    previous = outbox.get_config()
    try:
        outbox.configure(AnalyticsConfig(disabled=True))
        assert outbox.enqueue(object(), "e", "u") is None
        outbox.configure(AnalyticsConfig(release="r1"))
        assert props(prepare_enqueue("e", "u"))["release"] == "r1"
    finally:
        outbox.configure(previous)


def test_non_mapping_properties_are_reported_as_before() -> None:
    with pytest.raises(OutboxValidationError) as info:
        prepare("e", "u", ["not", "a", "dict"])
    assert info.value.field == "properties"


def test_timestamp_dedup_key_and_uuid_pass_through() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    prepared = prepare("e", "u", timestamp=when, dedup_key="k-1")
    assert prepared is not None
    assert prepared.timestamp == when and prepared.dedup_key == "k-1"
    assert prepared.destination == "posthog"
