"""posthog-outbox: analytics events that commit or roll back with your transaction.

Call :func:`enqueue` inside your own SQLAlchemy or psycopg transaction; the
``outbox-worker`` process ships committed events to PostHog. This package is what
applications import; it never imports the worker.

Beyond :func:`enqueue`:

* :func:`configure` and :class:`AnalyticsConfig`: environment, release and super
  properties stamped on every event, the off switch, the event contract.
* :class:`EventRegistry`, :class:`EventSpec`, :class:`Prop` and
  :func:`render_markdown`: the event contract, declared in code.
* :func:`identify`, :func:`set_person_properties`, :func:`group_identify`,
  :func:`alias` (and their async forms ``aidentify``, ``aset_person_properties``,
  ``agroup_identify``, ``aalias``, ``aidentify_actor``), and actors for users,
  automations, agents and workspaces.
* :class:`Posthog` and :class:`AsyncPosthog`: posthog-python's client and its
  contexts (:func:`new_context`, :func:`identify_context`, :func:`tag`), writing on
  your connection or session.
* :func:`upsert_first`, :func:`mark_first` and :func:`emit_if_first` (and their
  async forms ``aupsert_first``, ``amark_first``, ``aemit_if_first``): events that
  are emitted exactly once, however many transactions race.
* Builders for ``$exception``, ``$ai_generation`` and ``$pageview`` events, signup
  attribution and keyed IP hashing.
"""

from outbox._errors import OutboxConfigError
from outbox._version import __version__
from outbox.actors import (
    Actor,
    agent_actor,
    automation_actor,
    email_domain,
    user_actor,
    workspace_actor,
)
from outbox.batching import Batch, batch
from outbox.builders import (
    EventArgs,
    PageviewDeduper,
    ai_generation_event,
    attribution_cookie,
    exception_event,
    hash_ip,
    normalise_path,
    pageview_event,
    signup_attribution,
    truncate_payload,
)
from outbox.client import AsyncPosthog, Posthog
from outbox.config import AnalyticsConfig, configure, get_config, normalise_environment
from outbox.contexts import (
    get_tags,
    identify_context,
    new_context,
    scoped,
    set_context_session,
    tag,
)
from outbox.contract import EventRegistry, EventSpec, Prop, render_markdown
from outbox.enqueue import aenqueue, aenqueue_many, enqueue, enqueue_many
from outbox.exceptions import (
    OutboxDatabaseError,
    OutboxError,
    OutboxNotInstalledError,
    OutboxValidationError,
    UnsupportedCallError,
    UnsupportedConnectionError,
)
from outbox.guards import (
    FirstTime,
    aemit_if_first,
    amark_first,
    aupsert_first,
    emit_if_first,
    mark_first,
    upsert_first,
)
from outbox.identity import (
    aalias,
    agroup_identify,
    aidentify,
    aidentify_actor,
    alias,
    aset_person_properties,
    group_identify,
    identify,
    identify_actor,
    set_person_properties,
)

__all__ = [
    "Actor",
    "AnalyticsConfig",
    "AsyncPosthog",
    "Batch",
    "EventArgs",
    "EventRegistry",
    "EventSpec",
    "FirstTime",
    "OutboxConfigError",
    "OutboxDatabaseError",
    "OutboxError",
    "OutboxNotInstalledError",
    "OutboxValidationError",
    "PageviewDeduper",
    "Posthog",
    "Prop",
    "UnsupportedCallError",
    "UnsupportedConnectionError",
    "__version__",
    "aalias",
    "aemit_if_first",
    "aenqueue",
    "aenqueue_many",
    "agent_actor",
    "agroup_identify",
    "ai_generation_event",
    "aidentify",
    "aidentify_actor",
    "alias",
    "amark_first",
    "aset_person_properties",
    "attribution_cookie",
    "aupsert_first",
    "automation_actor",
    "batch",
    "configure",
    "email_domain",
    "emit_if_first",
    "enqueue",
    "enqueue_many",
    "exception_event",
    "get_config",
    "get_tags",
    "group_identify",
    "hash_ip",
    "identify",
    "identify_actor",
    "identify_context",
    "mark_first",
    "new_context",
    "normalise_environment",
    "normalise_path",
    "pageview_event",
    "render_markdown",
    "scoped",
    "set_context_session",
    "set_person_properties",
    "signup_attribution",
    "tag",
    "truncate_payload",
    "upsert_first",
    "user_actor",
    "workspace_actor",
]
