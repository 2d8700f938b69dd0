"""Who an event is about: users, automations, agents and workspaces.

PostHog attributes every event to the person named by its ``distinct_id``. Getting
that right is most of what makes server-side analytics trustworthy:

* A user's events use the user's id, and carry ``email_domain`` but never the
  address (:func:`user_actor`).
* An automation's events are *not* the owner's: they belong to the person
  ``automation_<id>`` and say so in their properties (:func:`automation_actor`).
  Otherwise every scheduled run looks like the owner being active.
* An agent's events belong to ``agent:<id>`` (:func:`agent_actor`).
* A system event with no user behind it belongs to ``workspace:<id>``
  (:func:`workspace_actor`), never to a placeholder id that would merge unrelated
  events into one person.

An :class:`Actor` can be passed to ``enqueue()`` wherever a ``distinct_id`` goes;
its :attr:`Actor.properties` are added to the event (the event's own properties win).
:func:`outbox.identify_actor` gives the actor's person a name and properties.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from uuid import UUID

from outbox.config import AnalyticsConfig, get_config
from outbox.exceptions import OutboxValidationError
from outbox.validation import check_distinct_id, normalise_properties

__all__ = [
    "Actor",
    "ActorKind",
    "agent_actor",
    "automation_actor",
    "email_domain",
    "user_actor",
    "workspace_actor",
]

ActorKind = Literal["user", "automation", "agent", "workspace"]


@dataclass(frozen=True)
class Actor:
    """A distinct_id together with the properties that describe who acts.

    Build one with :func:`user_actor`, :func:`automation_actor`,
    :func:`agent_actor` or :func:`workspace_actor` rather than directly: they
    validate the ids and use the naming conventions. ``properties`` are added to
    every event enqueued with this actor; ``person_properties`` are what
    :func:`outbox.identify_actor` sets on its person. Both are read-only and hold
    no ``None`` values.
    """

    distinct_id: str
    kind: ActorKind
    properties: Mapping[str, Any] = field(default_factory=dict, hash=False)
    person_properties: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "distinct_id", check_distinct_id(self.distinct_id))
        for name in ("properties", "person_properties"):
            clean = normalise_properties(getattr(self, name), name)
            frozen = MappingProxyType({k: v for k, v in clean.items() if v is not None})
            object.__setattr__(self, name, frozen)


def _id_text(value: object, field_name: str) -> str:
    if isinstance(value, str):
        text = value.strip()
    elif (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, UUID):
        text = str(value)
    else:
        raise OutboxValidationError(
            field_name, f"must be a str, int or uuid.UUID, got {type(value).__name__}"
        )
    if not text:
        raise OutboxValidationError(field_name, "must not be empty")
    return text


def _optional_text(value: object, field_name: str) -> str | None:
    if value is None:
        return None
    return _id_text(value, field_name)


def email_domain(email: str, field_name: str = "email") -> str:
    """The lower-cased domain of ``email`` (``Ada@Example.COM`` gives ``example.com``).

    Raises :class:`OutboxValidationError` naming ``field_name`` when ``email`` is not
    a str of the form ``local@domain``.
    """
    if not isinstance(email, str):
        raise OutboxValidationError(field_name, f"must be a str, got {type(email).__name__}")
    local, at, domain = email.strip().rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    if not at or not local or not domain or any(c.isspace() for c in domain) or "@" in domain:
        raise OutboxValidationError(field_name, "is not an email address (local@domain)")
    return domain


def user_actor(
    user_id: str | int | UUID,
    *,
    email: str | None = None,
    properties: Mapping[str, Any] | None = None,
    config: AnalyticsConfig | None = None,
) -> Actor:
    """A human user: ``distinct_id`` is the user's id.

    Events carry ``user_id`` and, when ``email`` is given and the privacy mode is
    ``email`` or ``full``, ``email_domain``. The address itself never goes on an
    event: :func:`outbox.identify` stores it once on the person. ``properties`` are
    extra per-event properties for this user (a workspace id, a plan...).
    """
    distinct_id = check_distinct_id(user_id, "user_id")
    mode = (config or get_config()).privacy_mode
    props: dict[str, Any] = {"user_id": distinct_id}
    if email is not None and mode in ("email", "full"):
        props["email_domain"] = email_domain(email)
    if properties:
        props.update(normalise_properties(properties, "properties"))
    return Actor(distinct_id, "user", props)


def automation_actor(
    automation_id: str | int | UUID,
    *,
    name: str | None = None,
    trigger_id: str | int | UUID | None = None,
    owner_id: str | int | UUID | None = None,
) -> Actor:
    """An automation (a scheduled or triggered run): its own person, ``automation_<id>``.

    Events carry ``is_automation: true``, ``automation_id``, ``automation_name`` and
    ``trigger_id`` (the last two when given). The person gets ``name``,
    ``is_automation``, ``automation_id`` and ``owner_id`` from
    :func:`outbox.identify_actor`, so it shows up under its own name in PostHog
    instead of inflating its owner's activity.
    """
    ident = _id_text(automation_id, "automation_id")
    name_text = _optional_text(name, "name")
    return Actor(
        check_distinct_id(f"automation_{ident}", "automation_id"),
        "automation",
        {
            "is_automation": True,
            "automation_id": ident,
            "automation_name": name_text,
            "trigger_id": _optional_text(trigger_id, "trigger_id"),
        },
        {
            "name": name_text,
            "is_automation": True,
            "automation_id": ident,
            "owner_id": _optional_text(owner_id, "owner_id"),
        },
    )


def agent_actor(
    agent_id: str | int | UUID,
    *,
    name: str | None = None,
    owner_id: str | int | UUID | None = None,
) -> Actor:
    """An AI agent acting on its own: its own person, ``agent:<id>``.

    Events carry ``is_agent: true``, ``agent_id`` and ``agent_name`` (when given);
    the person gets ``name``, ``is_agent``, ``agent_id`` and ``owner_id``.
    """
    ident = _id_text(agent_id, "agent_id")
    name_text = _optional_text(name, "name")
    return Actor(
        check_distinct_id(f"agent:{ident}", "agent_id"),
        "agent",
        {"is_agent": True, "agent_id": ident, "agent_name": name_text},
        {
            "name": name_text,
            "is_agent": True,
            "agent_id": ident,
            "owner_id": _optional_text(owner_id, "owner_id"),
        },
    )


def workspace_actor(workspace_id: str | int | UUID, *, name: str | None = None) -> Actor:
    """The workspace itself, for system events no user caused: ``workspace:<id>``.

    Use it for events such as a daemon registering with a workspace token. Events
    carry ``workspace_id``; the person gets ``name`` and ``workspace_id``.
    """
    ident = _id_text(workspace_id, "workspace_id")
    return Actor(
        check_distinct_id(f"workspace:{ident}", "workspace_id"),
        "workspace",
        {"workspace_id": ident},
        {"name": _optional_text(name, "name"), "workspace_id": ident},
    )
