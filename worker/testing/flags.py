"""The answer of PostHog's ``/flags`` endpoint, as `CaptureServer` gives it.

The shape follows what the PostHog SDKs read (``posthog/types.py``, ``normalize_flags_response``
in posthog-python): from ``?v=2`` on, ``flags`` maps each flag key to a record with
``enabled``, ``variant``, ``reason`` and ``metadata``; ``?v=4`` records also carry the typed
``value``. Without ``v`` (the oldest form) the answer is ``featureFlags`` (key to value) and
``featureFlagPayloads``.
"""

from __future__ import annotations

import uuid
from typing import Any, Final
from urllib.parse import parse_qs

__all__ = ["FLAGS_PATHS", "FlagValue", "flags_document", "flags_version"]

FlagValue = bool | str
"""A flag's value: ``True``/``False``, or the name of the variant it resolves to."""

FLAGS_PATHS: Final[frozenset[str]] = frozenset({"/flags", "/flags/"})
"""Request paths answered as PostHog's feature-flags endpoint."""


def flags_version(query: str) -> int:
    """The ``v`` query parameter of a ``/flags`` request; 1 when absent or not a number."""
    values = parse_qs(query).get("v", [])
    try:
        return int(values[0]) if values else 1
    except ValueError:
        return 1


def flags_document(values: dict[str, FlagValue], version: int) -> dict[str, Any]:
    """The body answering a ``/flags?v=<version>`` request for a known key.

    Every flag in ``values`` is evaluated as given, for any distinct_id; no flag is computed
    from properties.
    """
    document: dict[str, Any]
    if version < 2:
        document = {
            "featureFlags": dict(values),
            "featureFlagPayloads": {},
        }
    else:
        document = {
            "flags": {
                key: _record(index, key, value, typed=version >= 4)
                for index, (key, value) in enumerate(values.items(), start=1)
            }
        }
    document["errorsWhileComputingFlags"] = False
    document["requestId"] = str(uuid.uuid4())
    return document


def _record(index: int, key: str, value: FlagValue, *, typed: bool) -> dict[str, Any]:
    enabled = value is not False
    record: dict[str, Any] = {
        "key": key,
        "enabled": enabled,
        "variant": value if isinstance(value, str) else None,
        "reason": {
            "code": "condition_match" if enabled else "no_condition_match",
            "condition_index": 0 if enabled else None,
            "description": "Matched condition set 1" if enabled else "No matching condition set",
        },
        "metadata": {"id": index, "version": 1, "description": None, "payload": None},
    }
    if typed:
        record["value"] = value
    return record
