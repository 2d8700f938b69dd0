"""ClaimedEvent.outbound(): the JSON the worker sends for one claimed row."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from worker.storage.base import ClaimedEvent


def claimed(timestamp: str, properties: str = "{}", has_ip: bool = False) -> ClaimedEvent:
    return ClaimedEvent(
        id=1,
        uuid=uuid.UUID(int=7),
        event="signup",
        distinct_id="user-1",
        properties_json=properties,
        timestamp=timestamp,
        attempts=0,
        has_ip=has_ip,
    )


@pytest.mark.parametrize(
    ("stored", "when"),
    [
        # PostgreSQL's text for a timestamptz in UTC (DateStyle ISO) drops trailing zeros
        # of the fraction, and the fraction itself when it is zero.
        ("2026-03-04 05:06:07.890123+00", datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)),
        ("2026-03-04 05:06:07.89+00", datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)),
        ("2026-03-04 05:06:07.000001+00", datetime(2026, 3, 4, 5, 6, 7, 1, tzinfo=UTC)),
        ("2026-03-04 05:06:07+00", datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)),
        ("1970-01-01 00:00:00+00", datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_the_timestamp_is_sent_as_isoformat_writes_it(stored: str, when: datetime) -> None:
    sent = json.loads(claimed(stored).outbound().json)
    assert sent["timestamp"] == when.isoformat()
    assert datetime.fromisoformat(sent["timestamp"]) == when


def test_the_event_as_sent() -> None:
    sent: dict[str, Any] = json.loads(claimed("2026-03-04 05:06:07+00", '{"a": 1}').outbound().json)
    assert sent == {
        "event": "signup",
        "distinct_id": "user-1",
        "properties": {"a": 1, "$ignore_sent_at": True, "$geoip_disable": True},
        "uuid": str(uuid.UUID(int=7)),
        "timestamp": "2026-03-04T05:06:07+00:00",
    }


def test_an_event_with_its_own_ip_keeps_geoip() -> None:
    event = claimed("2026-03-04 05:06:07+00", '{"$ip": "203.0.113.7"}', has_ip=True)
    sent = json.loads(event.outbound().json)
    assert sent["properties"] == {"$ip": "203.0.113.7", "$ignore_sent_at": True}


def test_empty_properties() -> None:
    sent = json.loads(claimed("2026-03-04 05:06:07+00").outbound().json)
    assert sent["properties"] == {"$ignore_sent_at": True, "$geoip_disable": True}
