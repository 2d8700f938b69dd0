"""The event contract: the application's events, declared in code.

An :class:`EventRegistry` holds one :class:`EventSpec` per event: its name, its
category in the taxonomy (``core_loop``, ``onboarding``, ``acquisition``...), its
properties (:class:`Prop`, with types and whether they are required), a description,
whether PostHog should build person profiles for it, and whether it is a
metrics-only event that the worker counts in Prometheus instead of sending to
PostHog.

The registry is the source of truth in three places:

* ``enqueue()`` consults it (through :class:`~outbox.config.AnalyticsConfig`):
  person-less events get ``$process_person_profile: false``, metrics-only events are
  stored with ``destination = 'metrics'`` and only their label and duration
  properties, and in strict mode unknown events and missing or mistyped properties
  are refused with :class:`~outbox.exceptions.OutboxValidationError` before any
  database work.
* :func:`render_markdown` turns it into the reference document, and
  ``outbox-worker contract --check FILE`` fails CI when the committed document is
  stale.
* The worker reads :attr:`EventSpec.metric_labels`, :attr:`EventSpec.duration_property`
  and :attr:`EventSpec.duration_unit` to build its counters and histograms.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final, Literal
from uuid import UUID

from outbox._errors import OutboxConfigError
from outbox.exceptions import OutboxValidationError
from outbox.validation import MAX_NAME_LENGTH

__all__ = [
    "PROPERTY_TYPES",
    "EventRegistry",
    "EventSpec",
    "Prop",
    "render_markdown",
]

PROPERTY_TYPES: Final[Mapping[type, str]] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "list",
    dict: "object",
    UUID: "UUID",
    datetime: "datetime",
    date: "date",
}
"""The types a :class:`Prop` may declare, and how the reference document names them.

``float`` accepts ints too; ``int`` refuses bools; ``list`` accepts lists, tuples
and sets; ``dict`` any mapping; ``UUID``, ``datetime`` and ``date`` accept their
objects and the strings that parse as them.
"""

DurationUnit = Literal["seconds", "milliseconds"]
_LABEL_TYPES: Final = frozenset({str, bool, int})
_NUMBER_TYPES: Final = frozenset({int, float})


def _check_identifier(value: object, setting: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OutboxConfigError(setting, f"{what} must be a non-empty str, got {value!r}")
    if value != value.strip() or len(value) > MAX_NAME_LENGTH:
        raise OutboxConfigError(
            setting,
            f"{what} {value!r} must have no surrounding whitespace and at most "
            f"{MAX_NAME_LENGTH} characters",
        )
    return value


def _types_tuple(value: object, setting: str) -> tuple[type, ...]:
    types = value if isinstance(value, tuple) else (value,)
    if not types:
        raise OutboxConfigError(setting, "declares no type")
    for t in types:
        if t not in PROPERTY_TYPES:
            known = ", ".join(t.__name__ for t in PROPERTY_TYPES)
            raise OutboxConfigError(setting, f"type {t!r} is not one of {known}")
    return types


def _parses(value: str, kind: type) -> bool:
    try:
        if kind is UUID:
            UUID(value)
        elif kind is datetime:
            datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        else:
            date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _matches(value: object, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is list:
        return isinstance(value, list | tuple | set | frozenset)
    if kind is dict:
        return isinstance(value, Mapping)
    if isinstance(value, kind):
        return True
    return isinstance(value, str) and _parses(value, kind)


def _describe_type(value: object) -> str:
    cls = type(value)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


@dataclass(frozen=True)
class Prop:
    """One property of an event in the contract.

    ``type`` is one of :data:`PROPERTY_TYPES` or a tuple of them (any may match).
    ``values``, when given, is the closed set of allowed values (an enum such as
    ``("google", "email")``); it is listed in the reference document and checked in
    strict mode. A property whose value is ``None`` counts as absent: ``enqueue()``
    drops ``None`` values, so a required property passed as ``None`` is missing.
    """

    name: str
    type: builtins.type | tuple[builtins.type, ...] = str
    description: str = ""
    required: bool = True
    values: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        _check_identifier(self.name, f"Prop({self.name!r})", "a property name")
        _types_tuple(self.type, f"Prop({self.name!r}).type")
        if self.values is not None:
            if isinstance(self.values, str) or not isinstance(self.values, Sequence):
                raise OutboxConfigError(
                    f"Prop({self.name!r}).values", "must be a sequence of allowed values"
                )
            object.__setattr__(self, "values", tuple(self.values))

    @property
    def types(self) -> tuple[builtins.type, ...]:
        """:attr:`type` as a tuple."""
        return self.type if isinstance(self.type, tuple) else (self.type,)

    @property
    def type_name(self) -> str:
        """The type as the reference document writes it: ``string``, ``integer or string``..."""
        return " or ".join(PROPERTY_TYPES[t] for t in self.types)

    def check(self, value: object, field: str, event: str) -> None:
        """Raise :class:`OutboxValidationError` naming ``field`` if ``value`` breaks this spec."""
        if not any(_matches(value, t) for t in self.types):
            raise OutboxValidationError(
                field,
                f"must be {self.type_name} by the contract of {event!r}, "
                f"got {_describe_type(value)}",
            )
        if self.values is not None and value not in self.values:
            allowed = ", ".join(repr(v) for v in self.values)
            raise OutboxValidationError(
                field,
                f"{value!r} is not one of the values the contract of {event!r} allows: {allowed}",
            )


@dataclass(frozen=True)
class EventSpec:
    """One event of the contract.

    ``category`` places the event in the taxonomy; the reference document groups
    events by it. ``person_profiles=False`` marks a high-volume server event that
    must not create or update person profiles: ``enqueue()`` adds
    ``$process_person_profile: false`` and refuses ``set=``/``set_once=`` on it.

    ``metrics_only=True`` marks an operational event (task lifecycle, heartbeats)
    that is never sent to PostHog: ``enqueue()`` stores it with ``destination =
    'metrics'`` and keeps only the properties named in ``metric_labels`` and
    ``duration_property``, and the worker counts it in Prometheus. Labels must be
    declared properties of type str, bool or int: list only low-cardinality ones
    (a provider, a mode, an outcome), never ids. ``duration_property`` must be a
    declared int or float property measured in ``duration_unit``; the worker
    observes it in a histogram.

    ``notes`` are extra lines for the reference document.
    """

    name: str
    category: str
    description: str = ""
    properties: Sequence[Prop] = ()
    person_profiles: bool = True
    metrics_only: bool = False
    metric_labels: Sequence[str] = ()
    duration_property: str | None = None
    duration_unit: DurationUnit = "seconds"
    notes: Sequence[str] = ()
    _by_name: Mapping[str, Prop] = field(init=False, repr=False, compare=False)
    _stored_keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"EventSpec({self.name!r})"
        _check_identifier(self.name, where, "an event name")
        _check_identifier(self.category, f"{where}.category", "a category")
        props = tuple(self.properties)
        by_name: dict[str, Prop] = {}
        for prop in props:
            if not isinstance(prop, Prop):
                raise OutboxConfigError(f"{where}.properties", f"{prop!r} is not a Prop")
            if prop.name in by_name:
                raise OutboxConfigError(f"{where}.properties", f"{prop.name!r} is declared twice")
            by_name[prop.name] = prop
        labels = tuple(self.metric_labels)
        if isinstance(self.metric_labels, str):
            raise OutboxConfigError(f"{where}.metric_labels", "must be a sequence of names")
        if (labels or self.duration_property is not None) and not self.metrics_only:
            raise OutboxConfigError(
                where, "metric_labels and duration_property are only for metrics_only events"
            )
        for label in labels:
            label_prop = by_name.get(label)
            if label_prop is None:
                raise OutboxConfigError(
                    f"{where}.metric_labels", f"{label!r} is not a declared property"
                )
            if not set(label_prop.types) <= _LABEL_TYPES:
                raise OutboxConfigError(
                    f"{where}.metric_labels",
                    f"{label!r} is a {label_prop.type_name}; labels must be string, boolean "
                    "or integer",
                )
        if len(set(labels)) != len(labels):
            raise OutboxConfigError(f"{where}.metric_labels", "names a property twice")
        if self.duration_property is not None:
            duration = by_name.get(self.duration_property)
            if duration is None:
                raise OutboxConfigError(
                    f"{where}.duration_property",
                    f"{self.duration_property!r} is not a declared property",
                )
            if not set(duration.types) <= _NUMBER_TYPES:
                raise OutboxConfigError(
                    f"{where}.duration_property",
                    f"{self.duration_property!r} is a {duration.type_name}; it must be a number",
                )
            if self.duration_property in labels:
                raise OutboxConfigError(
                    f"{where}.duration_property", "is also listed as a metric label"
                )
        if self.duration_unit not in ("seconds", "milliseconds"):
            raise OutboxConfigError(f"{where}.duration_unit", "must be 'seconds' or 'milliseconds'")
        notes = (self.notes,) if isinstance(self.notes, str) else tuple(self.notes)
        object.__setattr__(self, "properties", props)
        object.__setattr__(self, "metric_labels", labels)
        object.__setattr__(self, "notes", notes)
        object.__setattr__(self, "_by_name", by_name)
        stored = set(labels)
        if self.duration_property is not None:
            stored.add(self.duration_property)
        object.__setattr__(self, "_stored_keys", frozenset(stored))

    def prop(self, name: str) -> Prop | None:
        """The declared property ``name``, or ``None``."""
        return self._by_name.get(name)

    @property
    def metric_keys(self) -> frozenset[str]:
        """The properties a metrics-only event keeps: its labels and its duration."""
        return self._stored_keys

    def check(self, properties: Mapping[str, Any], field_prefix: str = "") -> None:
        """Raise :class:`OutboxValidationError` if ``properties`` break this contract.

        Every required property must be present (not ``None``), and every declared
        property that is present must have its declared type and, when the contract
        lists them, one of its allowed values. Properties the contract does not
        declare are allowed. The error's field is ``properties.<name>`` after
        ``field_prefix``.
        """
        for prop in self.properties:
            value = properties.get(prop.name)
            field_name = f"{field_prefix}properties.{prop.name}"
            if value is None:
                if prop.required:
                    raise OutboxValidationError(
                        field_name, f"is required by the contract of {self.name!r}"
                    )
                continue
            prop.check(value, field_name, self.name)

    def check_metric_values(self, properties: Mapping[str, Any], field_prefix: str = "") -> None:
        """Check the type and allowed values of the label and duration properties present.

        ``enqueue()`` runs this on metrics-only events even outside strict mode: a label
        of the wrong type, or outside its declared values, would otherwise become a
        new Prometheus time series. A missing one is not an error here.
        """
        for name in self._stored_keys:
            value = properties.get(name)
            if value is not None:
                self._by_name[name].check(value, f"{field_prefix}properties.{name}", self.name)


class EventRegistry:
    """The application's events, declared in code; see the module docstring.

    ``schema_version`` is stamped on every event as ``event_schema_version``
    (unless the configuration overrides it): raise it when the meaning of existing
    events changes, so dashboards can tell old events from new ones. ``title`` and
    ``description`` head the reference document.

    Events whose names start with ``$`` (PostHog's own: ``$pageview``,
    ``$exception``, ``$identify``...) may be declared, but strict mode never refuses
    an undeclared one.
    """

    def __init__(
        self,
        events: Iterable[EventSpec] = (),
        *,
        schema_version: int = 1,
        title: str = "Event contract",
        description: str = "",
    ) -> None:
        if (
            not isinstance(schema_version, int)
            or isinstance(schema_version, bool)
            or schema_version < 1
        ):
            raise OutboxConfigError("schema_version", "must be an int of at least 1")
        self.schema_version = schema_version
        self.title = title
        self.description = description
        self._events: dict[str, EventSpec] = {}
        for spec in events:
            self.add(spec)

    def add(self, spec: EventSpec) -> EventSpec:
        """Add ``spec``; a second spec with the same name is refused. Returns ``spec``."""
        if not isinstance(spec, EventSpec):
            raise OutboxConfigError("EventRegistry.add", f"{spec!r} is not an EventSpec")
        if spec.name in self._events:
            raise OutboxConfigError(f"EventSpec({spec.name!r})", "is declared twice")
        self._events[spec.name] = spec
        return spec

    def event(
        self,
        name: str,
        *,
        category: str,
        description: str = "",
        properties: Sequence[Prop] = (),
        person_profiles: bool = True,
        metrics_only: bool = False,
        metric_labels: Sequence[str] = (),
        duration_property: str | None = None,
        duration_unit: DurationUnit = "seconds",
        notes: Sequence[str] = (),
    ) -> EventSpec:
        """Declare an event: build an :class:`EventSpec` from the arguments and add it."""
        return self.add(
            EventSpec(
                name,
                category,
                description,
                properties,
                person_profiles,
                metrics_only,
                metric_labels,
                duration_property,
                duration_unit,
                notes,
            )
        )

    def get(self, name: str) -> EventSpec | None:
        """The spec of ``name``, or ``None`` when the event is not declared."""
        return self._events.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._events

    def __iter__(self) -> Iterator[EventSpec]:
        return iter(self._events.values())

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        return f"EventRegistry({len(self)} events, schema_version={self.schema_version})"

    @property
    def categories(self) -> list[str]:
        """The categories in the order their first event was declared."""
        return list(dict.fromkeys(spec.category for spec in self))

    @property
    def metrics_only_events(self) -> list[EventSpec]:
        """The metrics-only events, in declaration order (what the worker counts)."""
        return [spec for spec in self if spec.metrics_only]


# --------------------------------------------------------------------------- rendering


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    end = flat.find(". ")
    return flat if end < 0 else flat[: end + 1]


def _render_event(spec: EventSpec, unit_names: Mapping[str, str]) -> list[str]:
    lines = [f"### `{spec.name}`", ""]
    if spec.description:
        lines += [" ".join(spec.description.split()), ""]
    if spec.properties:
        lines += ["| Property | Type | Required | Description |", "|---|---|---|---|"]
        for prop in spec.properties:
            description = _cell(prop.description)
            if prop.values is not None:
                allowed = ", ".join(f"`{v}`" for v in prop.values)
                if description and not description.endswith((".", "!", "?")):
                    description += "."
                description = f"{description} One of: {allowed}.".strip()
            required = "yes" if prop.required else "no"
            lines.append(f"| `{prop.name}` | {prop.type_name} | {required} | {description} |")
        lines.append("")
    else:
        lines += ["No properties.", ""]
    notes: list[str] = []
    if spec.metrics_only:
        note = (
            "Metrics-only: never sent to PostHog. The outbox worker counts it in its "
            "Prometheus metrics"
        )
        if spec.metric_labels:
            note += ", labelled by " + ", ".join(f"`{label}`" for label in spec.metric_labels)
        note += "."
        if spec.duration_property is not None:
            note += (
                f" `{spec.duration_property}` ({unit_names[spec.duration_unit]}) "
                "is observed in a histogram."
            )
        note += " Only these properties are stored."
        notes.append(note)
    elif not spec.person_profiles:
        notes.append(
            "Person-less: sent with `$process_person_profile: false`, so PostHog neither "
            "creates nor updates a person profile for it."
        )
    notes += [" ".join(n.split()) for n in spec.notes]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def render_markdown(registry: EventRegistry) -> str:
    """Render the registry as the Markdown reference document.

    The document has a summary table (event, category, destination, first sentence
    of the description) and then, per category in declaration order, one section
    per event with its description, a properties table (name, type, required,
    description and allowed values) and notes (metrics-only, person-less, the
    spec's own notes). The output depends only on the registry, so a committed copy
    can be compared byte for byte (``outbox-worker contract --check``).
    """
    unit_names = {"seconds": "seconds", "milliseconds": "milliseconds"}
    lines = [
        f"# {registry.title}",
        "",
        "<!-- Generated from the event registry by `outbox-worker contract`. "
        "Do not edit by hand: change the registry and generate it again. -->",
        "",
    ]
    if registry.description:
        lines += [registry.description.strip(), ""]
    lines += [
        f"Every event carries `event_schema_version` = `{registry.schema_version}`.",
        "",
    ]
    if not len(registry):
        lines += ["No events are declared.", ""]
        return "\n".join(lines).rstrip("\n") + "\n"
    lines += [
        "## Events",
        "",
        "| Event | Category | Sent to | Description |",
        "|---|---|---|---|",
    ]
    for spec in registry:
        destination = "Prometheus only" if spec.metrics_only else "PostHog"
        lines.append(
            f"| `{spec.name}` | `{spec.category}` | {destination} | "
            f"{_cell(_first_sentence(spec.description))} |"
        )
    lines.append("")
    for category in registry.categories:
        lines += [f"## `{category}`", ""]
        for spec in registry:
            if spec.category == category:
                lines += _render_event(spec, unit_names)
    return "\n".join(lines).rstrip("\n") + "\n"
