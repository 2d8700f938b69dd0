"""The event contract: declaring events, strict mode, routing, and the rendered document."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from outbox import (
    AnalyticsConfig,
    EventRegistry,
    EventSpec,
    OutboxConfigError,
    OutboxValidationError,
    Prop,
    render_markdown,
)
from outbox.enqueue import prepare_enqueue
from outbox.validation import PreparedEvent


def make_registry() -> EventRegistry:
    registry = EventRegistry(schema_version=2, title="Acme events")
    registry.event(
        "signup",
        category="acquisition",
        description="A user account was created. Fires once per user.",
        properties=[
            Prop("email_domain", str, "Lower-cased domain of the email."),
            Prop(
                "auth_method", str, "How they signed up", required=False, values=("google", "code")
            ),
        ],
    )
    registry.event(
        "issue_created",
        category="core_loop",
        description="An issue was created.",
        properties=[
            Prop("issue_id", uuid.UUID, "The issue."),
            Prop("priority", int, "1 (urgent) to 4 | none", required=False),
            Prop("estimate", float, required=False),
            Prop("due", datetime, required=False),
        ],
    )
    registry.event(
        "agent_task_completed",
        category="operational",
        description="An agent task finished.",
        metrics_only=True,
        properties=[
            Prop("provider", str),
            Prop("runtime_mode", str, values=("local", "cloud")),
            Prop("task_id", str),
            Prop("duration_ms", (int, float)),
        ],
        metric_labels=("provider", "runtime_mode"),
        duration_property="duration_ms",
        duration_unit="milliseconds",
    )
    registry.event(
        "runtime_heartbeat",
        category="operational",
        description="A runtime checked in.",
        person_profiles=False,
        properties=[Prop("runtime_id", str)],
        notes=["Sent at most once a minute per runtime."],
    )
    return registry


REGISTRY = make_registry()
LENIENT = AnalyticsConfig(registry=REGISTRY)
STRICT = AnalyticsConfig(registry=REGISTRY, strict=True)


def stored(prepared: PreparedEvent | None) -> dict[str, Any]:
    assert prepared is not None
    loaded: dict[str, Any] = json.loads(prepared.properties_json)
    return loaded


# -- declaring -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: Prop("x", bytes), "type"),
        (lambda: Prop(" x"), "whitespace"),
        (lambda: EventSpec("e", "c", properties=[Prop("a"), Prop("a")]), "twice"),
        (lambda: EventSpec("e", "c", metric_labels=["a"], properties=[Prop("a")]), "metrics_only"),
        (lambda: EventSpec("e", "c", metrics_only=True, metric_labels=["a"]), "not a declared"),
        (
            lambda: EventSpec(
                "e", "c", metrics_only=True, metric_labels=["a"], properties=[Prop("a", dict)]
            ),
            "labels must be",
        ),
        (
            lambda: EventSpec(
                "e", "c", metrics_only=True, duration_property="d", properties=[Prop("d", str)]
            ),
            "must be a number",
        ),
        (lambda: EventSpec("e", ""), "category"),
        (lambda: EventRegistry([EventSpec("e", "c"), EventSpec("e", "c")]), "twice"),
        (lambda: EventRegistry(schema_version=0), "schema_version"),
    ],
)
def test_contract_mistakes_are_refused_where_they_are_declared(make: Any, fragment: str) -> None:
    with pytest.raises(OutboxConfigError) as info:
        make()
    assert fragment in str(info.value)


def test_the_registry_exposes_what_the_worker_needs() -> None:
    spec = REGISTRY.get("agent_task_completed")
    assert spec is not None
    assert spec.metric_labels == ("provider", "runtime_mode")
    assert spec.duration_property == "duration_ms"
    assert spec.duration_unit == "milliseconds"
    assert spec.metric_keys == {"provider", "runtime_mode", "duration_ms"}
    assert [s.name for s in REGISTRY.metrics_only_events] == ["agent_task_completed"]
    assert REGISTRY.categories == ["acquisition", "core_loop", "operational"]
    assert "signup" in REGISTRY and len(REGISTRY) == 4
    assert REGISTRY.get("nope") is None


# -- strict mode ---------------------------------------------------------------------


def test_unknown_events_pass_by_default_and_are_refused_in_strict_mode() -> None:
    assert prepare_enqueue("something_new", "u", config=LENIENT) is not None
    with pytest.raises(OutboxValidationError) as info:
        prepare_enqueue("something_new", "u", config=STRICT)
    assert info.value.field == "event"
    assert "strict" in info.value.problem
    # PostHog's own events are never refused for being undeclared.
    assert prepare_enqueue("$pageview", "u", config=STRICT) is not None


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({}, "properties.email_domain"),
        ({"email_domain": None}, "properties.email_domain"),
        ({"email_domain": 3}, "properties.email_domain"),
        ({"email_domain": "x.com", "auth_method": "carrier pigeon"}, "properties.auth_method"),
    ],
)
def test_strict_mode_refuses_missing_and_mistyped_properties(
    properties: dict[str, Any], field: str
) -> None:
    with pytest.raises(OutboxValidationError) as info:
        prepare_enqueue("signup", "u", properties, config=STRICT)
    assert info.value.field == field
    # Without strict mode the same event passes.
    assert prepare_enqueue("signup", "u", properties, config=LENIENT) is not None


def test_strict_mode_in_enqueue_many_names_the_item() -> None:
    with pytest.raises(OutboxValidationError) as info:
        prepare_enqueue("signup", "u", {}, config=STRICT, field_prefix="events[4].")
    assert info.value.field == "events[4].properties.email_domain"


def test_declared_types_accept_their_natural_forms() -> None:
    good = {
        "issue_id": uuid.uuid4(),
        "priority": 2,
        "estimate": 3,  # an int is a number
        "due": datetime(2026, 1, 1, tzinfo=UTC),
    }
    assert prepare_enqueue("issue_created", "u", good, config=STRICT) is not None
    as_text = {"issue_id": str(uuid.uuid4()), "due": "2026-01-01T00:00:00Z"}
    assert prepare_enqueue("issue_created", "u", as_text, config=STRICT) is not None
    for bad in ({"issue_id": "not-a-uuid"}, {"issue_id": uuid.uuid4(), "priority": True}):
        with pytest.raises(OutboxValidationError):
            prepare_enqueue("issue_created", "u", bad, config=STRICT)


def test_a_super_property_can_satisfy_a_required_property() -> None:
    config = AnalyticsConfig(
        registry=REGISTRY, strict=True, super_properties={"email_domain": "acme.dev"}
    )
    assert prepare_enqueue("signup", "u", config=config) is not None


# -- routing -------------------------------------------------------------------------


def test_metrics_only_events_keep_only_labels_and_duration() -> None:
    prepared = prepare_enqueue(
        "agent_task_completed",
        "workspace:w1",
        {"provider": "claude", "runtime_mode": "local", "task_id": "t-9", "duration_ms": 1250},
        config=STRICT,
    )
    assert prepared is not None and prepared.destination == "metrics"
    assert stored(prepared) == {"provider": "claude", "runtime_mode": "local", "duration_ms": 1250}


def test_metric_labels_are_checked_even_outside_strict_mode() -> None:
    base = {"provider": "claude", "runtime_mode": "local", "duration_ms": 5}
    for bad, field in (
        ({"runtime_mode": "on-the-moon"}, "properties.runtime_mode"),
        ({"provider": ["a", "b"]}, "properties.provider"),
        ({"duration_ms": "5"}, "properties.duration_ms"),
    ):
        with pytest.raises(OutboxValidationError) as info:
            prepare_enqueue("agent_task_completed", "u", {**base, **bad}, config=LENIENT)
        assert info.value.field == field
    # Missing ones are only refused in strict mode; non-metric properties are not checked.
    lenient = prepare_enqueue("agent_task_completed", "u", {"task_id": 7}, config=LENIENT)
    assert lenient is not None and stored(lenient) == {}


def test_metrics_only_events_cannot_update_persons_or_groups() -> None:
    for kwargs, field in (
        ({"set": {"a": 1}}, "set"),
        ({"set_once": {"a": 1}}, "set_once"),
        ({"groups": {"org": "1"}}, "groups"),
    ):
        with pytest.raises(OutboxValidationError) as info:
            prepare_enqueue("agent_task_completed", "u", config=LENIENT, **kwargs)
        assert info.value.field == field


def test_person_less_events_ask_posthog_not_to_process_the_person() -> None:
    prepared = prepare_enqueue(
        "runtime_heartbeat", "workspace:w1", {"runtime_id": "r1"}, config=LENIENT
    )
    assert prepared is not None and prepared.destination == "posthog"
    assert stored(prepared)["$process_person_profile"] is False
    with pytest.raises(OutboxValidationError) as info:
        prepare_enqueue("runtime_heartbeat", "u", set={"a": 1}, config=LENIENT)
    assert info.value.field == "set"


def test_ordinary_events_are_untouched_by_the_contract() -> None:
    prepared = prepare_enqueue("signup", "u", {"email_domain": "x.com"}, config=STRICT)
    assert prepared is not None and prepared.destination == "posthog"
    assert "$process_person_profile" not in stored(prepared)
    assert stored(prepared)["event_schema_version"] == 2


# -- the document --------------------------------------------------------------------

EXPECTED = """\
# Acme events

<!-- Generated from the event registry by `outbox-worker contract`. Do not edit by hand: \
change the registry and generate it again. -->

Every event carries `event_schema_version` = `2`.

## Events

| Event | Category | Sent to | Description |
|---|---|---|---|
| `signup` | `acquisition` | PostHog | A user account was created. |
| `issue_created` | `core_loop` | PostHog | An issue was created. |
| `agent_task_completed` | `operational` | Prometheus only | An agent task finished. |
| `runtime_heartbeat` | `operational` | PostHog | A runtime checked in. |

## `acquisition`

### `signup`

A user account was created. Fires once per user.

| Property | Type | Required | Description |
|---|---|---|---|
| `email_domain` | string | yes | Lower-cased domain of the email. |
| `auth_method` | string | no | How they signed up. One of: `google`, `code`. |

## `core_loop`

### `issue_created`

An issue was created.

| Property | Type | Required | Description |
|---|---|---|---|
| `issue_id` | UUID | yes | The issue. |
| `priority` | integer | no | 1 (urgent) to 4 \\| none |
| `estimate` | number | no |  |
| `due` | datetime | no |  |

## `operational`

### `agent_task_completed`

An agent task finished.

| Property | Type | Required | Description |
|---|---|---|---|
| `provider` | string | yes |  |
| `runtime_mode` | string | yes | One of: `local`, `cloud`. |
| `task_id` | string | yes |  |
| `duration_ms` | integer or number | yes |  |

Notes:

- Metrics-only: never sent to PostHog. The outbox worker counts it in its Prometheus \
metrics, labelled by `provider`, `runtime_mode`. `duration_ms` (milliseconds) is observed \
in a histogram. Only these properties are stored.

### `runtime_heartbeat`

A runtime checked in.

| Property | Type | Required | Description |
|---|---|---|---|
| `runtime_id` | string | yes |  |

Notes:

- Person-less: sent with `$process_person_profile: false`, so PostHog neither creates nor \
updates a person profile for it.
- Sent at most once a minute per runtime.
"""


def test_the_document_is_rendered_from_the_registry() -> None:
    assert render_markdown(REGISTRY) == EXPECTED
    # Deterministic: a second, separately built registry renders the same bytes.
    assert render_markdown(make_registry()) == EXPECTED


def test_an_empty_registry_renders_a_valid_document() -> None:
    text = render_markdown(EventRegistry())
    assert text.startswith("# Event contract\n")
    assert "No events are declared." in text and text.endswith("\n")
