"""outbox.Posthog / AsyncPosthog and the contexts, checked without a database: how
posthog-python's arguments become the stored event, and what is refused before any I/O.

The clients here are bound to a SQLAlchemy Session / AsyncSession with no engine: any
attempt to execute on one raises, so a test that passes through a refusal or a
disabled configuration also shows that nothing reached the connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import outbox
from outbox import (
    AnalyticsConfig,
    OutboxValidationError,
    UnsupportedCallError,
    UnsupportedConnectionError,
)
from outbox.client import capture_event, exception_properties, set_event
from outbox.enqueue import prepare_enqueue
from outbox.identity import alias_event, group_identify_event
from outbox.validation import PreparedEvent

CONFIG = AnalyticsConfig(environment="test", release="r1")
STANDARD = {"environment", "release", "event_schema_version", "$lib", "$lib_version"}


def props(prepared: PreparedEvent | None) -> dict[str, Any]:
    assert prepared is not None
    loaded: dict[str, Any] = json.loads(prepared.properties_json)
    return {k: v for k, v in loaded.items() if k not in STANDARD}


def capture(event: str = "e", **kwargs: Any) -> PreparedEvent:
    prepared = capture_event(event, config=CONFIG, **kwargs)
    assert prepared is not None
    return prepared


# -- capture: posthog-python's arguments ---------------------------------------------


def test_capture_maps_posthog_pythons_arguments() -> None:
    given = uuid.UUID("01890000-0000-7000-8000-000000000001")
    when = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    prepared = capture(
        "order_placed",
        distinct_id="user-42",
        properties={"total": 12},
        groups={"organization": "org-7"},
        timestamp=when,
        uuid=given,
    )
    assert (prepared.event, prepared.distinct_id) == ("order_placed", "user-42")
    assert (prepared.uuid, prepared.timestamp) == (given, when)
    assert props(prepared) == {"total": 12, "$groups": {"organization": "org-7"}}


@pytest.mark.parametrize(
    ("disable_geoip", "stored"), [(True, {"$geoip_disable": True}), (False, {}), (None, {})]
)
def test_disable_geoip_is_stored_as_geoip_disable_only_when_true(
    disable_geoip: bool | None, stored: dict[str, Any]
) -> None:
    assert props(capture(distinct_id="u", disable_geoip=disable_geoip)) == stored


def test_disable_geoip_must_be_a_bool() -> None:
    with pytest.raises(OutboxValidationError) as caught:
        capture(distinct_id="u", disable_geoip="yes")  # type: ignore[arg-type]
    assert caught.value.field == "disable_geoip"


def test_a_capture_without_distinct_id_is_person_less_with_a_random_id() -> None:
    first, second = capture(), capture()
    assert props(first) == {"$process_person_profile": False}
    assert first.distinct_id != second.distinct_id
    assert uuid.UUID(first.distinct_id).version == 4  # as posthog-python makes it


def test_a_person_less_capture_keeps_the_callers_process_person_profile() -> None:
    prepared = capture(properties={"$process_person_profile": True})
    assert props(prepared) == {"$process_person_profile": True}


def test_an_invalid_uuid_is_refused_not_replaced() -> None:
    with pytest.raises(OutboxValidationError) as caught:
        capture(distinct_id="u", uuid="not-a-uuid")
    assert caught.value.field == "uuid"


def test_properties_must_be_a_mapping() -> None:
    with pytest.raises(OutboxValidationError) as caught:
        capture(distinct_id="u", properties=[("a", 1)])  # type: ignore[arg-type]
    assert caught.value.field == "properties"


# -- set / set_once --------------------------------------------------------------------


@pytest.mark.parametrize(("once", "key"), [(False, "$set"), (True, "$set_once")])
def test_set_and_set_once_are_their_posthog_events(once: bool, key: str) -> None:
    prepared = set_event(once=once, distinct_id="user-42", properties={"a": 1}, config=CONFIG)
    assert prepared is not None
    assert (prepared.event, prepared.distinct_id) == (key, "user-42")
    assert props(prepared) == {key: {"a": 1}}


def test_set_with_empty_properties_writes_nothing_as_posthog_python() -> None:
    assert set_event(once=False, distinct_id="u", properties={}, config=CONFIG) is None
    assert set_event(once=False, distinct_id="u", properties={"a": None}, config=CONFIG) is None


def test_set_without_any_id_is_refused() -> None:
    with pytest.raises(OutboxValidationError, match="identify_context") as caught:
        set_event(once=False, properties={"plan": "team"}, config=CONFIG)
    assert caught.value.field == "distinct_id"


def test_a_bad_person_property_is_named_under_properties() -> None:
    with pytest.raises(OutboxValidationError) as caught:
        set_event(once=True, distinct_id="u", properties={"avatar": b"\x89"}, config=CONFIG)
    assert caught.value.field == "properties.avatar"


# -- group_identify / alias / capture_exception -----------------------------------------


def test_group_identify_with_geoip_and_uuid() -> None:
    given = uuid.uuid4()
    prepared = group_identify_event(
        "organization", "org-7", {"name": "Acme"}, uuid=given, extra={"$geoip_disable": True}
    )
    assert prepared is not None and prepared.uuid == given
    assert prepared.distinct_id == "$organization_org-7"
    assert props(prepared) == {
        "$geoip_disable": True,
        "$group_type": "organization",
        "$group_key": "org-7",
        "$group_set": {"name": "Acme"},
    }


def test_alias_event() -> None:
    prepared = alias_event("legacy-1", "user-42", config=CONFIG)
    assert prepared is not None
    assert (prepared.event, prepared.distinct_id) == ("$create_alias", "legacy-1")
    assert props(prepared) == {"distinct_id": "legacy-1", "alias": "user-42"}


def test_capture_exception_builds_the_exception_list_of_the_handled_exception() -> None:
    try:
        raise KeyError("cart-9")
    except KeyError:
        handled = exception_properties(None, {"component": "checkout"})
    assert handled["$exception_type"] == "KeyError"
    assert handled["component"] == "checkout"
    assert handled["$exception_list"][0]["type"] == "KeyError"


def test_capture_exception_with_nothing_to_capture_is_refused() -> None:
    with pytest.raises(OutboxValidationError) as caught:
        exception_properties(None, None)
    assert caught.value.field == "exception"


# -- the clients: refusals before any I/O ------------------------------------------------


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_the_old_capture_order_is_refused_naming_the_new_form() -> None:
    client = outbox.Posthog(Session())
    with pytest.raises(UnsupportedCallError) as caught:
        client.capture("user-42", "signed_up")  # type: ignore[misc]
    text = one_line(caught.value)
    assert "capture(event, distinct_id=..., properties=...)" in text
    assert "capture(distinct_id, event" in text


@pytest.mark.parametrize(
    ("call", "form"),
    [
        (lambda c: c.set("user-42", {"plan": "team"}), "set(distinct_id=..., properties=...)"),
        (lambda c: c.set_once("user-42", {"a": 1}), "set_once(distinct_id=..., properties=...)"),
        (
            lambda c: c.capture_exception(ValueError("x"), "user-42"),
            "capture_exception(exception, distinct_id=..., properties=...)",
        ),
    ],
)
def test_the_old_positional_forms_are_refused(
    call: Callable[[outbox.Posthog], object], form: str
) -> None:
    with pytest.raises(UnsupportedCallError) as caught:
        call(outbox.Posthog(Session()))
    assert form in one_line(caught.value)


def test_group_identify_and_alias_take_no_positional_timestamp() -> None:
    client = outbox.Posthog(Session())
    with pytest.raises(TypeError):
        client.group_identify("organization", "org-7", {}, {"old": "context"})  # type: ignore[misc]
    with pytest.raises(TypeError):
        client.alias("legacy-1", "user-42", {"old": "context"})  # type: ignore[misc]


@pytest.mark.parametrize(
    "name",
    [
        "feature_enabled",
        "get_feature_flag",
        "get_feature_flag_payload",
        "get_feature_flag_result",
        "get_all_flags",
        "get_all_flags_and_payloads",
        "evaluate_flags",
        "load_feature_flags",
        "get_remote_config_payload",
    ],
)
@pytest.mark.parametrize("cls", [outbox.Posthog, outbox.AsyncPosthog])
def test_feature_flag_calls_point_to_posthog_python(name: str, cls: type[Any]) -> None:
    conn = Session() if cls is outbox.Posthog else AsyncSession()
    with pytest.raises(UnsupportedCallError) as caught:
        getattr(cls(conn), name)("new-checkout", "user-42")
    text = one_line(caught.value)
    assert text.startswith(f"{name}() is a feature-flag call")
    assert "keep posthog-python" in text


def test_capture_ai_points_to_the_ai_builder() -> None:
    with pytest.raises(UnsupportedCallError, match="ai_generation_event"):
        outbox.Posthog(Session()).capture_ai("$ai_generation", distinct_id="u")


@pytest.mark.parametrize("kwargs", [{"flags": object()}, {"send_feature_flags": True}])
def test_flag_arguments_of_capture_are_refused(kwargs: dict[str, Any]) -> None:
    client = outbox.Posthog(Session())
    with pytest.raises(UnsupportedCallError, match="no outbox form"):
        client.capture("e", distinct_id="u", **kwargs)
    with pytest.raises(UnsupportedCallError, match="no outbox form"):
        client.capture_exception(ValueError("x"), distinct_id="u", **kwargs)


def test_the_clients_refuse_the_other_kind_of_connection_by_name() -> None:
    with pytest.raises(UnsupportedConnectionError) as sync_caught:
        outbox.Posthog(AsyncSession())
    assert one_line(sync_caught.value).startswith(
        "outbox.Posthog() got sqlalchemy.ext.asyncio.session.AsyncSession;"
    )
    assert str(sync_caught.value).endswith("(use outbox.AsyncPosthog() for async connections)")
    with pytest.raises(UnsupportedConnectionError) as async_caught:
        outbox.AsyncPosthog(Session())
    assert str(async_caught.value).endswith("(use outbox.Posthog() for sync connections)")


def test_an_api_key_given_as_the_connection_is_refused_without_echoing_it() -> None:
    with pytest.raises(UnsupportedConnectionError) as caught:
        outbox.Posthog("phc_secret_key_value")
    text = one_line(caught.value)
    assert "not an API key" in text
    assert "phc_secret" not in text and "phc_secret" not in repr(caught.value)


def test_disabled_analytics_writes_nothing_and_returns_none() -> None:
    client = outbox.Posthog(Session(), config=AnalyticsConfig(disabled=True))
    assert client.capture("e", distinct_id="u") is None
    assert client.set(distinct_id="u", properties={"a": 1}) is None
    assert client.group_identify("organization", "org-7") is None
    assert client.alias("a", "b") is None
    assert client.capture_exception(ValueError("x"), distinct_id="u") is None


async def test_the_async_client_checks_arguments_before_the_await() -> None:
    client = outbox.AsyncPosthog(AsyncSession(), config=AnalyticsConfig(disabled=True))
    with pytest.raises(UnsupportedCallError):
        client.capture("user-42", "signed_up")  # type: ignore[misc]
    assert await client.capture("e", distinct_id="u") is None
    assert await client.set(distinct_id="u", properties={"a": 1}) is None
    assert await client.flush() is None
    assert await client.shutdown() is None


def test_flush_join_and_shutdown_do_nothing() -> None:
    client = outbox.Posthog(Session())
    client.flush()
    client.join()
    client.shutdown()


def test_the_sync_and_async_identity_calls_have_the_same_signatures() -> None:
    for name in ("identify", "identify_actor", "set_person_properties", "group_identify", "alias"):
        sync, async_ = getattr(outbox, name), getattr(outbox, "a" + name)
        assert inspect.iscoroutinefunction(async_)
        assert inspect.signature(sync) == inspect.signature(async_), name


# -- contexts ---------------------------------------------------------------------------


def test_a_context_gives_its_id_and_tags_and_the_call_wins() -> None:
    with outbox.new_context():
        outbox.identify_context("user-42")
        outbox.tag("request_id", "r-1")
        outbox.tag("plan", "team")
        prepared = capture(properties={"plan": "enterprise"})
    assert prepared.distinct_id == "user-42"
    assert props(prepared) == {
        "request_id": "r-1",
        "plan": "enterprise",
        "$context_tags": ["plan", "request_id"],
    }


def test_outbox_enqueue_takes_the_context_too() -> None:
    with outbox.new_context():
        outbox.identify_context("user-42")
        outbox.tag("request_id", "r-1")
        outbox.set_context_session("s-9")
        prepared = prepare_enqueue("order_placed", None, {"total": 3}, config=CONFIG)
        named = prepare_enqueue("order_placed", "user-7", config=CONFIG)
    assert prepared is not None and prepared.distinct_id == "user-42"
    assert props(prepared) == {
        "total": 3,
        "request_id": "r-1",
        "$context_tags": ["request_id"],
        "$session_id": "s-9",
    }
    assert named is not None and named.distinct_id == "user-7"


def test_enqueue_without_an_id_outside_a_context_names_identify_context() -> None:
    with pytest.raises(OutboxValidationError, match="identify_context") as caught:
        prepare_enqueue("order_placed", None, config=CONFIG)
    assert caught.value.field == "distinct_id"


def test_nested_contexts_inherit_and_restore_and_fresh_starts_empty() -> None:
    with outbox.new_context():
        outbox.identify_context("user-42")
        outbox.tag("a", 1)
        with outbox.new_context():
            outbox.tag("b", 2)
            assert outbox.get_tags() == {"a": 1, "b": 2}
            assert capture().distinct_id == "user-42"
        assert outbox.get_tags() == {"a": 1}
        with outbox.new_context(fresh=True):
            assert outbox.get_tags() == {}
            assert props(capture()) == {"$process_person_profile": False}
        assert capture().distinct_id == "user-42"
    assert outbox.get_tags() == {}


def test_outside_a_context_tag_and_identify_context_do_nothing() -> None:
    outbox.tag("a", 1)
    outbox.identify_context("user-42")
    assert outbox.get_tags() == {}
    assert props(capture()) == {"$process_person_profile": False}


def test_context_arguments_are_validated_at_once() -> None:
    with outbox.new_context():
        with pytest.raises(OutboxValidationError) as caught:
            outbox.identify_context("  ")
        assert caught.value.field == "distinct_id"
        with pytest.raises(OutboxValidationError) as caught:
            outbox.tag(1, "x")  # type: ignore[arg-type]
        assert caught.value.field == "key"


def test_capture_exceptions_true_is_refused() -> None:
    with (
        pytest.raises(UnsupportedCallError, match="rolls back"),
        outbox.new_context(capture_exceptions=True),
    ):
        pass  # pragma: no cover
    with outbox.new_context(capture_exceptions=False):
        pass


def test_the_client_context_methods_are_the_module_functions() -> None:
    client = outbox.Posthog(Session())
    with client.new_context():
        client.identify_context("user-42")
        client.tag("a", 1)
        client.set_context_session("s-1")
        assert client.get_tags() == {"a": 1}
        prepared = capture()
    assert prepared.distinct_id == "user-42"
    assert props(prepared) == {"a": 1, "$context_tags": ["a"], "$session_id": "s-1"}

    @client.scoped(fresh=True)
    def handler() -> PreparedEvent:
        client.tag("b", 2)
        return capture()

    with client.new_context():
        client.tag("a", 1)
        assert props(handler()) == {
            "b": 2,
            "$context_tags": ["b"],
            "$process_person_profile": False,
        }
        assert client.get_tags() == {"a": 1}


def test_an_empty_distinct_id_is_refused_not_taken_as_missing() -> None:
    with pytest.raises(OutboxValidationError) as caught:
        capture(distinct_id="")
    assert caught.value.field == "distinct_id"


async def test_scoped_gives_each_call_its_own_context() -> None:
    @outbox.scoped()
    def sync_handler(user: str) -> PreparedEvent:
        outbox.identify_context(user)
        return capture()

    @outbox.scoped()
    async def async_handler(user: str) -> PreparedEvent:
        outbox.identify_context(user)
        await asyncio.sleep(0)
        return capture()

    assert sync_handler("u-1").distinct_id == "u-1"
    assert (await async_handler("u-2")).distinct_id == "u-2"
    assert outbox.get_tags() == {} and props(capture()) == {"$process_person_profile": False}


def test_threads_have_their_own_contexts() -> None:
    barrier = threading.Barrier(2)
    seen: dict[str, tuple[str, dict[str, Any]]] = {}

    def handle(user: str) -> None:
        with outbox.new_context():
            outbox.identify_context(user)
            outbox.tag("user", user)
            barrier.wait(timeout=10)  # both contexts are open at once
            prepared = capture()
            seen[user] = (prepared.distinct_id, props(prepared))

    threads = [threading.Thread(target=handle, args=(u,)) for u in ("u-1", "u-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert seen == {u: (u, {"user": u, "$context_tags": ["user"]}) for u in ("u-1", "u-2")}


def test_a_thread_started_with_copy_context_inherits_the_context() -> None:
    result: list[PreparedEvent] = []
    with outbox.new_context():
        outbox.identify_context("user-42")
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(lambda: result.append(capture()),))
        t.start()
        t.join(timeout=10)
    assert result[0].distinct_id == "user-42"


async def test_tasks_inherit_the_context_and_keep_their_own_tags() -> None:
    async def sub(name: str, gate: asyncio.Event) -> dict[str, Any]:
        outbox.tag("step", name)
        await gate.wait()  # the other task has tagged too
        return props(capture())

    with outbox.new_context():
        outbox.identify_context("user-42")
        outbox.tag("request_id", "r-1")
        gate = asyncio.Event()
        tasks = [asyncio.create_task(sub(n, gate)) for n in ("a", "b")]
        await asyncio.sleep(0)
        gate.set()
        a, b = await asyncio.gather(*tasks)
        parent = props(capture())
    assert a == {"request_id": "r-1", "step": "a", "$context_tags": ["request_id", "step"]}
    assert b == {"request_id": "r-1", "step": "b", "$context_tags": ["request_id", "step"]}
    assert parent == {"request_id": "r-1", "$context_tags": ["request_id"]}
