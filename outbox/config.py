"""The library's one settings object, and the process-wide current one.

:class:`AnalyticsConfig` holds everything the library's behaviour depends on:
the environment and release stamped on every event, super properties, the off
switch, the event contract and strict mode, the privacy mode for identification,
the ``$ai_generation`` payload options and the key for hashing IP addresses.

There is one current configuration per process. :func:`configure` sets it (call it
once at startup); :func:`get_config` returns it, and until :func:`configure` is
called it is ``AnalyticsConfig.from_env()``. Every function that uses it also
takes ``config=`` to use another one for a single call (tests, multi-tenant code).

The library reads exactly three environment variables, here and nowhere else, and
only in :meth:`AnalyticsConfig.from_env` (so in :func:`configure` and in the default
configuration):

``ANALYTICS_DISABLED``
    ``1``/``true``/``yes``/``on`` turns enqueueing off: nothing is written and every
    enqueue returns ``None``. ``0``/``false``/``no``/``off`` or empty: on.
``ANALYTICS_ENVIRONMENT``
    The ``environment`` property, normalised (see :func:`normalise_environment`).
``APP_ENV``
    Used for ``environment`` when ``ANALYTICS_ENVIRONMENT`` is unset or empty.

An argument passed to :meth:`AnalyticsConfig.from_env` or :func:`configure` wins
over the environment, which wins over the default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal

from outbox._errors import OutboxConfigError
from outbox._version import __version__
from outbox.contract import EventRegistry
from outbox.validation import normalise_properties

__all__ = [
    "DEFAULT_AI_PAYLOAD_MAX_CHARS",
    "ENVIRONMENTS",
    "LIB_NAME",
    "PRIVACY_MODES",
    "AnalyticsConfig",
    "Environment",
    "OutboxConfigError",
    "PrivacyMode",
    "configure",
    "get_config",
    "normalise_environment",
]

Environment = Literal["production", "staging", "dev"]
PrivacyMode = Literal["none", "id", "email", "full"]

ENVIRONMENTS: Final[tuple[Environment, ...]] = ("production", "staging", "dev")
PRIVACY_MODES: Final[tuple[PrivacyMode, ...]] = ("none", "id", "email", "full")
LIB_NAME: Final = "posthog-outbox"
"""The ``$lib`` property of every event."""
DEFAULT_AI_PAYLOAD_MAX_CHARS: Final = 30_000
MIN_IP_HASH_KEY_BYTES: Final = 16

_PRODUCTION: Final = frozenset({"prod", "production", "live"})
_STAGING: Final = frozenset({"stage", "staging", "preview"})
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})


def normalise_environment(value: str | None) -> Environment:
    """Map a free-form environment name to ``production``, ``staging`` or ``dev``.

    Case and surrounding whitespace are ignored. ``prod``, ``production`` and
    ``live`` are production; ``stage``, ``staging`` and ``preview`` are staging;
    anything else (``dev``, ``local``, ``test``, ``ci``, empty, ``None``) is dev. So
    an unknown name can never be mistaken for production data.
    """
    name = (value or "").strip().lower()
    if name in _PRODUCTION:
        return "production"
    if name in _STAGING:
        return "staging"
    return "dev"


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value is not None and value.strip() else None


def _parse_flag(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise OutboxConfigError(name, f"{value!r} is not a boolean; use 1 or 0")


@dataclass(frozen=True)
class AnalyticsConfig:
    """The library's settings; immutable. Build one with :meth:`from_env` or directly.

    Constructing it directly uses exactly the arguments (no environment variables).
    The fields:

    ``environment``
        Stamped on every event; normalised with :func:`normalise_environment`.
    ``release``
        Stamped on every event as ``release`` when set (your version or git sha).
    ``super_properties``
        Stamped on every event; the event's own properties win over them. Checked
        once, here: a bad value raises :class:`~outbox.exceptions.OutboxValidationError`
        naming ``super_properties.<key>``. ``None`` values are dropped.
    ``disabled``
        When true, enqueueing writes nothing and returns ``None`` for every event,
        without validating it or touching the connection.
    ``registry`` and ``strict``
        The event contract (:class:`~outbox.contract.EventRegistry`). Without strict
        mode it routes metrics-only and person-less events; with it, undeclared
        events (other than PostHog's own ``$`` events) and missing or mistyped
        declared properties are refused. ``strict`` needs a registry.
    ``event_schema_version``
        Stamped as ``event_schema_version``; default: the registry's
        ``schema_version``, or 1 without a registry.
    ``lib_name`` and ``lib_version``
        Stamped as ``$lib`` and ``$lib_version``.
    ``privacy_mode``
        How :func:`outbox.identify` and :func:`outbox.user_actor` treat a user's
        email and name: ``none``, ``id``, ``email`` (the default) or ``full``.
    ``ai_payloads`` and ``ai_payload_max_chars``
        Whether :func:`outbox.ai_generation_event` includes prompt and completion
        bodies (off by default), and where it truncates them (30,000 characters).
    ``ip_hash_key``
        The secret key of :func:`outbox.hash_ip` (at least 16 bytes; a str is
        encoded as UTF-8). Never shown in ``repr``.
    """

    environment: str = "dev"
    release: str | None = None
    super_properties: Mapping[str, Any] = field(default_factory=dict, hash=False)
    disabled: bool = False
    registry: EventRegistry | None = None
    strict: bool = False
    event_schema_version: int | None = None
    lib_name: str = LIB_NAME
    lib_version: str = __version__
    privacy_mode: PrivacyMode = "email"
    ai_payloads: bool = False
    ai_payload_max_chars: int = DEFAULT_AI_PAYLOAD_MAX_CHARS
    ip_hash_key: bytes | str | None = field(default=None, repr=False)
    _standard: dict[str, Any] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "environment", normalise_environment(self.environment))
        if self.release is not None and (
            not isinstance(self.release, str) or not self.release.strip()
        ):
            raise OutboxConfigError("release", "must be a non-empty str or None")
        if self.registry is not None and not isinstance(self.registry, EventRegistry):
            raise OutboxConfigError("registry", "must be an outbox.EventRegistry or None")
        if self.strict and self.registry is None:
            raise OutboxConfigError("strict", "strict mode needs a registry of declared events")
        version = self.event_schema_version
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 1
        ):
            raise OutboxConfigError("event_schema_version", "must be an int of at least 1")
        if self.privacy_mode not in PRIVACY_MODES:
            raise OutboxConfigError(
                "privacy_mode", f"{self.privacy_mode!r} is not one of {', '.join(PRIVACY_MODES)}"
            )
        limit = self.ai_payload_max_chars
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise OutboxConfigError("ai_payload_max_chars", "must be a positive int")
        key = self.ip_hash_key
        if isinstance(key, str):
            key = key.encode("utf-8")
            set_(self, "ip_hash_key", key)
        if key is not None:
            if not isinstance(key, bytes):
                raise OutboxConfigError("ip_hash_key", "must be bytes, a str or None")
            if len(key) < MIN_IP_HASH_KEY_BYTES:
                raise OutboxConfigError(
                    "ip_hash_key",
                    f"is {len(key)} bytes; use a random secret of at least "
                    f"{MIN_IP_HASH_KEY_BYTES} bytes",
                )
        for name in ("lib_name", "lib_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise OutboxConfigError(name, "must be a non-empty str")
        supers = normalise_properties(self.super_properties, "super_properties")
        supers = {k: v for k, v in supers.items() if v is not None}
        set_(self, "super_properties", MappingProxyType(supers))
        standard: dict[str, Any] = {
            "environment": self.environment,
            "event_schema_version": self.schema_version,
        }
        if self.release is not None:
            standard["release"] = self.release.strip()
        standard["$lib"] = self.lib_name
        standard["$lib_version"] = self.lib_version
        standard.update(supers)
        # A plain dict: enqueue() merges it into every event ({**standard, ...}), which
        # is fastest from a dict. Never mutated after this point.
        set_(self, "_standard", standard)

    @property
    def schema_version(self) -> int:
        """The ``event_schema_version`` stamped on events (see the class docstring)."""
        if self.event_schema_version is not None:
            return self.event_schema_version
        return self.registry.schema_version if self.registry is not None else 1

    @property
    def standard_properties(self) -> Mapping[str, Any]:
        """What every event is stamped with: standard properties, then super properties.

        Computed once per configuration. An event's own properties win over these.
        """
        return MappingProxyType(self._standard)

    @classmethod
    def from_env(cls, **overrides: Any) -> AnalyticsConfig:
        """Build a configuration from ``overrides`` and the documented variables.

        ``disabled`` comes from the argument if given (not ``None``), else
        ``ANALYTICS_DISABLED``, else false. ``environment`` from the argument, else
        ``ANALYTICS_ENVIRONMENT``, else ``APP_ENV``, else ``dev``. Every other
        field is only ever an argument. An unreadable ``ANALYTICS_DISABLED`` raises
        :class:`OutboxConfigError` naming it.
        """
        values = {k: v for k, v in overrides.items() if v is not None}
        if "disabled" not in values:
            raw = _env("ANALYTICS_DISABLED")
            values["disabled"] = False if raw is None else _parse_flag("ANALYTICS_DISABLED", raw)
        if "environment" not in values:
            values["environment"] = _env("ANALYTICS_ENVIRONMENT") or _env("APP_ENV") or "dev"
        try:
            return cls(**values)
        except TypeError as exc:  # an unknown keyword
            raise OutboxConfigError("configure", str(exc)) from None

    def with_options(self, **changes: Any) -> AnalyticsConfig:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return replace(self, **changes)


_current: AnalyticsConfig | None = None


def get_config() -> AnalyticsConfig:
    """The process-wide configuration: the last :func:`configure`'s, else ``from_env()``."""
    global _current
    config = _current
    if config is None:
        config = _current = AnalyticsConfig.from_env()
    return config


def configure(config: AnalyticsConfig | None = None, /, **settings: Any) -> AnalyticsConfig:
    """Set (and return) the process-wide configuration.

    ``configure(release="1.4.2", registry=EVENTS)`` builds it with
    :meth:`AnalyticsConfig.from_env`, so the documented environment variables apply
    where an argument is not given. ``configure(config)`` installs a ready-made
    configuration as it is. ``configure()`` with nothing reads the environment again.
    Call it at startup, before the first event; it is safe to call again (each call
    replaces the whole configuration).
    """
    global _current
    if config is not None:
        if settings:
            raise OutboxConfigError(
                "configure", "pass either an AnalyticsConfig or settings, not both"
            )
        if not isinstance(config, AnalyticsConfig):
            raise OutboxConfigError(
                "configure", "the positional argument must be an AnalyticsConfig"
            )
        _current = config
    else:
        _current = AnalyticsConfig.from_env(**settings)
    return _current
