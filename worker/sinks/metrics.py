"""The metrics sink: metrics-only events become Prometheus counters and histograms.

Operational events that the contract marks ``metrics_only`` travel through the same
outbox as everything else, so their counts are transactional (an event whose
transaction rolled back is never counted), but they are never sent to PostHog: the
worker counts them here and serves them on ``/metrics``.

For each metrics-only event of the contract (``OUTBOX_CONTRACT``) the sink declares,
at start-up:

- ``{namespace}_{event}_total``, a counter labelled by the event's ``metric_labels``;
- ``{namespace}_{event}_duration_seconds``, a histogram of its ``duration_property``
  (milliseconds are converted), when it has one.

A metrics-only row whose event the worker's contract does not know (no
``OUTBOX_CONTRACT``, or an older contract) is counted in
``{namespace}_metrics_only_events_total{event=...}``, without labels: the worker
never turns a property into a label that the contract did not list.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from outbox.contract import EventRegistry, EventSpec
from worker.sinks.base import Outbound

log = logging.getLogger("outbox.worker")

DEFAULT_NAMESPACE = "app"
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_NOT_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(namespace: str, event: str) -> str:
    """``namespace_event`` with anything Prometheus refuses turned into ``_``."""
    return _NOT_METRIC_CHARS.sub("_", f"{namespace}_{event}")


def label_value(value: Any) -> str:
    """A property value as a label: booleans as ``true``/``false``, missing as ``""``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _EventMetrics:
    def __init__(self, spec: EventSpec, namespace: str, registry: CollectorRegistry) -> None:
        name = metric_name(namespace, spec.name)
        self.labels = tuple(spec.metric_labels)
        self.counter = Counter(
            name,
            f"{spec.name} events (metrics-only). {spec.description}".strip(),
            self.labels,
            registry=registry,
        )
        self.duration_property = spec.duration_property
        self.scale = 0.001 if spec.duration_unit == "milliseconds" else 1.0
        self.histogram = (
            Histogram(
                f"{name}_duration_seconds",
                f"{spec.name}: {spec.duration_property}, in seconds.",
                self.labels,
                buckets=DURATION_BUCKETS,
                registry=registry,
            )
            if spec.duration_property
            else None
        )

    def record(self, properties: Mapping[str, Any]) -> None:
        values = [label_value(properties.get(label)) for label in self.labels]
        (self.counter.labels(*values) if self.labels else self.counter).inc()
        if self.histogram is None or self.duration_property is None:
            return
        duration = properties.get(self.duration_property)
        if isinstance(duration, int | float) and not isinstance(duration, bool):
            seconds = float(duration) * self.scale
            if math.isfinite(seconds) and seconds >= 0:
                target = self.histogram.labels(*values) if self.labels else self.histogram
                target.observe(seconds)


class MetricsSink:
    """Counts metrics-only events in a Prometheus registry; never fails, never sends."""

    name = "metrics"

    def __init__(
        self,
        registry: CollectorRegistry,
        contract: EventRegistry | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.namespace = namespace
        self._events: dict[str, _EventMetrics] = {}
        if contract is not None:
            for spec in contract.metrics_only_events:
                self._events[spec.name] = _EventMetrics(spec, namespace, registry)
        self._unknown = Counter(
            metric_name(namespace, "metrics_only_events"),
            "Metrics-only events the worker's contract does not describe, by event name.",
            ["event"],
            registry=registry,
        )
        self._warned: set[str] = set()

    def send(self, events: Sequence[Outbound]) -> None:
        """Count each event (and observe its duration)."""
        for outbound in events:
            data = outbound.data
            name = str(data.get("event", ""))
            properties = data.get("properties") or {}
            metrics = self._events.get(name)
            if metrics is not None:
                metrics.record(properties)
                continue
            self._unknown.labels(name).inc()
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "metrics-only event %r is not in the worker's contract (OUTBOX_CONTRACT); "
                    "counted without labels",
                    name,
                    extra={"action": "metrics_event_unknown", "event": name},
                )

    def close(self) -> None:
        """Nothing to release."""
