"""Analytics semantics end to end: what is stored, and what reaches the capture endpoint."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox import AnalyticsConfig, EventRegistry, OutboxValidationError, Prop
from worker.app import Worker
from worker.database import sqlalchemy_url
from worker.settings import Settings
from worker.testing import CaptureServer

REGISTRY = EventRegistry(schema_version=2)
REGISTRY.event(
    "signup",
    category="acquisition",
    properties=[Prop("email_domain", str), Prop("auth_method", str, required=False)],
)
REGISTRY.event("order_placed", category="core_loop", properties=[Prop("total", float)])
REGISTRY.event(
    "agent_task_completed",
    category="operational",
    metrics_only=True,
    properties=[
        Prop("provider", str),
        Prop("status", str),
        Prop("task_id", str),
        Prop("duration_ms", int),
    ],
    metric_labels=("provider", "status"),
    duration_property="duration_ms",
    duration_unit="milliseconds",
)
REGISTRY.event(
    "runtime_heartbeat",
    category="operational",
    person_profiles=False,
    properties=[Prop("runtime_id", str)],
)

CONFIG = AnalyticsConfig(
    environment="prod",
    release="2026.11.2",
    super_properties={"service": "api"},
    registry=REGISTRY,
)


@pytest.fixture(autouse=True)
def configured() -> Iterator[None]:
    previous = outbox.get_config()
    outbox.configure(CONFIG)
    yield
    outbox.configure(previous)


def stored(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT event, distinct_id, properties, destination FROM outbox_events ORDER BY uuid"
    ).fetchall()
    return [
        {"event": e, "distinct_id": d, "properties": p, "destination": x} for e, d, p, x in rows
    ]


def ship(capture: CaptureServer, settings_for: Callable[..., Settings]) -> list[dict[str, Any]]:
    settings = settings_for(posthog_api_key="phc_test", posthog_host=capture.url, gzip=False)
    Worker(settings).run_until_empty()
    return list(capture.events)


def test_identity_calls_reach_posthog_in_the_shape_it_expects(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    cookie = outbox.attribution_cookie({"utm_source": "newsletter", "referrer": "https://x.io/a"})
    with psycopg.connect(database_url) as conn:
        ada = outbox.user_actor("user-42", email="Ada@Example.COM")
        outbox.identify(conn, "user-42", email="Ada@Example.COM", name="Ada Lovelace")
        outbox.enqueue(
            conn,
            "signup",
            ada,
            {"auth_method": "google"},
            set_once=outbox.signup_attribution(cookie),
            groups={"organization": 7},
        )
        outbox.group_identify(conn, "organization", 7, {"name": "Acme", "plan": "team"})
        outbox.set_person_properties(conn, "user-42", set={"role": "founder"})
        outbox.alias(conn, "legacy-9", "user-42")
        conn.commit()
    events = {e["event"]: e for e in ship(capture, settings_for)}
    assert set(events) == {"$identify", "signup", "$groupidentify", "$set", "$create_alias"}

    identify = events["$identify"]
    assert identify["distinct_id"] == "user-42"
    assert identify["properties"]["$set_once"] == {"email": "Ada@Example.COM"}
    assert identify["properties"]["$set"] == {"email_domain": "example.com"}  # no name

    signup = events["signup"]["properties"]
    assert signup["email_domain"] == "example.com" and signup["user_id"] == "user-42"
    assert signup["$groups"] == {"organization": "7"}
    assert signup["$set_once"] == {
        "initial_utm_source": "newsletter",
        "initial_referrer": "https://x.io",
    }
    for key, value in {
        "environment": "production",
        "release": "2026.11.2",
        "event_schema_version": 2,
        "$lib": "posthog-outbox",
        "$lib_version": outbox.__version__,
        "service": "api",
    }.items():
        assert signup[key] == value, key

    group = events["$groupidentify"]
    assert group["distinct_id"] == "$organization_7"
    assert group["properties"]["$group_type"] == "organization"
    assert group["properties"]["$group_key"] == "7"
    assert group["properties"]["$group_set"] == {"name": "Acme", "plan": "team"}

    assert events["$set"]["properties"]["$set"] == {"role": "founder"}
    alias = events["$create_alias"]
    assert alias["distinct_id"] == "legacy-9"
    assert alias["properties"]["alias"] == "user-42"

    # The address is on the person, once; never on an event.
    for name, event in events.items():
        if name != "$identify":
            assert "Ada@Example.COM" not in json.dumps(event), name


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("none", None),
        ("id", {}),
        ("email", {"$set_once": {"email": "a@b.co"}, "$set": {"email_domain": "b.co"}}),
        (
            "full",
            {"$set_once": {"email": "a@b.co"}, "$set": {"email_domain": "b.co", "name": "Ada"}},
        ),
    ],
)
def test_privacy_modes(
    mode: str, expected: dict[str, Any] | None, database_url: str, db: psycopg.Connection[Any]
) -> None:
    outbox.configure(CONFIG.with_options(privacy_mode=mode))
    with psycopg.connect(database_url) as conn:
        result = outbox.identify(conn, "u-1", email="a@b.co", name="Ada")
        actor = outbox.user_actor("u-1", email="a@b.co")
        conn.commit()
    rows = stored(db)
    if expected is None:
        assert result is None and rows == []
    else:
        [row] = rows
        person = {k: v for k, v in row["properties"].items() if k in ("$set", "$set_once")}
        assert person == expected
    assert ("email_domain" in actor.properties) is (mode in ("email", "full"))


def test_actors_for_automations_agents_and_workspaces(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    automation = outbox.automation_actor(
        "a1", name="Nightly triage", trigger_id="t-5", owner_id="user-42"
    )
    with psycopg.connect(database_url) as conn:
        outbox.identify_actor(conn, automation)
        outbox.enqueue(conn, "issue_created", automation, {"issue_id": "i-1"})
        outbox.enqueue(conn, "chat_message_sent", outbox.agent_actor("g7", name="Reviewer"))
        outbox.enqueue(conn, "daemon_connected", outbox.workspace_actor("w-3"))
        conn.commit()
    ident, issue, chat, daemon = stored(db)
    assert ident["distinct_id"] == "automation_a1"
    assert ident["properties"]["$set"] == {
        "name": "Nightly triage",
        "is_automation": True,
        "automation_id": "a1",
        "owner_id": "user-42",
    }
    assert issue["distinct_id"] == "automation_a1"
    assert {k: issue["properties"][k] for k in ("is_automation", "automation_id")} == {
        "is_automation": True,
        "automation_id": "a1",
    }
    assert issue["properties"]["automation_name"] == "Nightly triage"
    assert issue["properties"]["trigger_id"] == "t-5"
    assert chat["distinct_id"] == "agent:g7" and chat["properties"]["agent_name"] == "Reviewer"
    assert daemon["distinct_id"] == "workspace:w-3"
    assert daemon["properties"]["workspace_id"] == "w-3"


def test_metrics_only_events_are_stored_for_the_worker_not_for_posthog(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    task = {"provider": "claude", "status": "ok", "task_id": "t-1", "duration_ms": 840}
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "agent_task_completed", "workspace:w1", task)
        conn.commit()
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "agent_task_completed", "workspace:w1", task)
        conn.rollback()  # never counted
    with psycopg.connect(database_url) as conn:
        outbox.enqueue_many(
            conn,
            [
                {"event": "order_placed", "distinct_id": "u", "properties": {"total": 9.5}},
                {"event": "agent_task_completed", "distinct_id": "u", "properties": task},
            ],
        )
        conn.commit()
    rows = stored(db)
    assert [(r["event"], r["destination"]) for r in rows] == [
        ("agent_task_completed", "metrics"),
        ("order_placed", "posthog"),
        ("agent_task_completed", "metrics"),
    ]
    assert rows[0]["properties"] == {"provider": "claude", "status": "ok", "duration_ms": 840}


def test_person_less_events_are_marked(database_url: str, db: psycopg.Connection[Any]) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "runtime_heartbeat", "workspace:w1", {"runtime_id": "r1"})
        conn.commit()
    [row] = stored(db)
    assert row["properties"]["$process_person_profile"] is False


def test_strict_mode_refuses_before_the_database_and_the_transaction_survives(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    outbox.configure(CONFIG.with_options(strict=True))
    db.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with Session(engine) as session:
            session.execute(text("INSERT INTO orders VALUES (1)"))
            with pytest.raises(OutboxValidationError) as info:
                outbox.enqueue(session, "order_placd", "u", {"total": 3.0})
            assert info.value.field == "event"
            with pytest.raises(OutboxValidationError) as info:
                outbox.enqueue(session, "order_placed", "u", {"total": "3"})
            assert info.value.field == "properties.total"
            with pytest.raises(OutboxValidationError) as info:
                outbox.enqueue(session, "order_placed", "u", {"total": 3}, set={"pic": b"x"})
            assert info.value.field == "set.pic"
            session.execute(text("INSERT INTO orders VALUES (2)"))
            outbox.enqueue(session, "order_placed", "u", {"total": 3})
            session.commit()
    finally:
        engine.dispose()
    assert db.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    assert [r["event"] for r in stored(db)] == ["order_placed"]


def test_analytics_disabled_writes_nothing_and_never_touches_the_connection(
    database_url: str, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANALYTICS_DISABLED", "1")
    outbox.configure(registry=REGISTRY)
    conn = psycopg.connect(database_url)
    conn.close()  # a closed connection would fail on any use
    assert outbox.enqueue(conn, "signup", "u", {"email_domain": "x.io"}) is None
    assert outbox.identify(conn, "u", email="a@x.io") is None
    assert outbox.enqueue_many(conn, [{"event": "e", "distinct_id": "u"}] * 2) == [None, None]
    assert stored(db) == []


async def test_aenqueue_stamps_the_same_way(database_url: str, db: psycopg.Connection[Any]) -> None:
    engine = create_async_engine(sqlalchemy_url(database_url))
    try:
        async with engine.begin() as conn:
            await outbox.aenqueue(
                conn, "order_placed", "u", {"total": 1.5}, set={"plan": "pro"}, groups={"org": "o1"}
            )
            await outbox.aenqueue_many(
                conn,
                [
                    {
                        "event": "runtime_heartbeat",
                        "distinct_id": "w",
                        "properties": {"runtime_id": "r"},
                    }
                ],
            )
    finally:
        await engine.dispose()
    order, heartbeat = stored(db)
    assert order["properties"]["$set"] == {"plan": "pro"}
    assert order["properties"]["$groups"] == {"org": "o1"}
    assert order["properties"]["environment"] == "production"
    assert heartbeat["properties"]["$process_person_profile"] is False


def test_builders_enqueue_as_they_are_built(
    database_url: str,
    db: psycopg.Connection[Any],
    capture: CaptureServer,
    settings_for: Callable[..., Settings],
) -> None:
    try:
        raise ValueError("bad input")
    except ValueError as exc:
        error = outbox.exception_event(exc, "user-1", properties={"component": "cli"})
    generation = outbox.ai_generation_event(
        "user-1", provider="openai", model="gpt-x", latency=0.8, input_tokens=10, output_tokens=2
    )
    pageview = outbox.pageview_event(
        "user-1",
        "https://app.example.com/acme/issues/ACME-3?token=t",
        deduper=outbox.PageviewDeduper(),
    )
    assert pageview is not None
    with psycopg.connect(database_url) as conn:
        outbox.enqueue_many(conn, [error, generation, pageview])
        conn.commit()
    shipped = {e["event"]: e["properties"] for e in ship(capture, settings_for)}
    assert shipped["$exception"]["$exception_list"][0]["value"] == "bad input"
    assert shipped["$ai_generation"]["$ai_model"] == "gpt-x"
    assert shipped["$pageview"]["$current_url"] == "https://app.example.com/acme/issues"
