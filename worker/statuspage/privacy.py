"""What of an event's personal data the status page may show."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.settings import Settings

#: What stands in for a property value the settings do not show.
HIDDEN = "(hidden)"
#: Most properties listed for one example event.
MAX_PROPERTIES = 20
#: Longest property value shown (characters of its JSON).
MAX_VALUE = 120


def property_names(setting: str | None) -> frozenset[str] | None:
    """``OUTBOX_STATUS_PROPERTIES`` as a set of names; None means every property
    (``*``); an unset setting is the empty set (no value shown)."""
    if setting is None:
        return frozenset()
    if setting.strip() == "*":
        return None
    return frozenset(name.strip() for name in setting.split(",") if name.strip())


@dataclass(frozen=True)
class Privacy:
    """Event names are always shown. Property names are shown, their values only for
    the names in ``shown_properties`` (None: all). Distinct ids are shown as stored
    with ``show_distinct_ids``, else as a keyed hash: the key is made when the worker
    starts, so the same id has the same hash on every load of the page while this
    worker runs, and a hash cannot be looked up anywhere else."""

    shown_properties: frozenset[str] | None = frozenset()
    show_distinct_ids: bool = False
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Privacy:
        """The privacy the settings ask for."""
        return cls(
            shown_properties=property_names(settings.status_properties),
            show_distinct_ids=settings.status_distinct_ids == "shown",
        )

    def distinct_id(self, value: str) -> str:
        """The distinct id as the page shows it."""
        if self.show_distinct_ids:
            return value
        digest = hmac.new(self.key, value.encode("utf-8", "replace"), hashlib.sha256)
        return "hash:" + digest.hexdigest()[:12]

    def properties(self, properties: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        """(name, value as the page shows it) for the first properties by name."""
        if not isinstance(properties, Mapping):
            return []
        shown: list[tuple[str, str]] = []
        for name in sorted(properties)[:MAX_PROPERTIES]:
            if self.shown_properties is None or name in self.shown_properties:
                text = json.dumps(properties[name], ensure_ascii=False, default=str)
                if len(text) > MAX_VALUE:
                    text = text[: MAX_VALUE - 3] + "..."
                shown.append((name, text))
            else:
                shown.append((name, HIDDEN))
        return shown
