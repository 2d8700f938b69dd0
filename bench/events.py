"""The events every contender sends: realistic server-side analytics events.

Each event carries about 450 bytes of JSON properties, the kind a backend attaches to
an event: ids, the account's plan, where the call came from, timings, a few feature
flags and a short list of tags. The benchmark builds a pool of distinct events from a
fixed seed and cycles through it, so every contender sends exactly the same events
and building them costs nothing inside a timed loop.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any, Final, TypedDict

POOL_SIZE: Final = 1000
SEED: Final = 5

_EVENT_NAMES: Final = (
    "order_placed",
    "invoice_paid",
    "user_signed_up",
    "subscription_renewed",
    "report_exported",
    "api_key_created",
    "seat_added",
    "payment_failed",
)
_PLANS: Final = ("free", "starter", "growth", "enterprise")
_SOURCES: Final = ("api", "web", "worker", "webhook", "cron")
_REGIONS: Final = ("eu-west-1", "us-east-1", "us-west-2", "ap-southeast-2")
_CURRENCIES: Final = ("EUR", "USD", "GBP")
_TAGS: Final = ("checkout", "web", "returning", "mobile", "promo", "b2b", "trial", "annual")
_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class BenchEvent(TypedDict):
    """One event as an application would capture it."""

    event: str
    distinct_id: str
    properties: dict[str, Any]


def _token(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def make_event(rng: random.Random) -> BenchEvent:
    """One realistic event, drawn from ``rng``."""
    user = f"user_{_token(rng, 20)}"
    properties: dict[str, Any] = {
        "order_id": f"ord_{_token(rng, 26)}",
        "account_id": rng.randint(10_000, 9_999_999),
        "request_id": f"req_{_token(rng, 16).lower()}",
        "plan": rng.choice(_PLANS),
        "source": rng.choice(_SOURCES),
        "region": rng.choice(_REGIONS),
        "duration_ms": round(rng.uniform(2, 900), 3),
        "db_time_ms": round(rng.uniform(0.2, 80), 3),
        "items": rng.randint(1, 12),
        "total": round(rng.uniform(5, 2500), 2),
        "currency": rng.choice(_CURRENCIES),
        "is_trial": rng.random() < 0.2,
        "retries": rng.choice((0, 0, 0, 1, 2)),
        "coupon": rng.choice((None, None, "SPRING24", "WELCOME10")),
        "flags": {
            "new_checkout": rng.random() < 0.5,
            "beta_search": rng.random() < 0.3,
            "fast_invoices": rng.random() < 0.7,
        },
        "tags": rng.sample(_TAGS, 3),
        "app_version": f"2.{rng.randint(0, 40)}.{rng.randint(0, 9)}",
        "referrer": rng.choice(
            ("https://example.com/pricing", "https://example.com/blog/launch", None)
        ),
    }
    return {"event": rng.choice(_EVENT_NAMES), "distinct_id": user, "properties": properties}


def event_pool(size: int = POOL_SIZE, seed: int = SEED) -> list[BenchEvent]:
    """``size`` distinct events, the same for every contender and every run."""
    rng = random.Random(seed)
    return [make_event(rng) for _ in range(size)]


def iter_events(n: int, pool: list[BenchEvent] | None = None) -> Iterator[BenchEvent]:
    """The benchmark's ``n`` events: the pool, cycled."""
    events = pool if pool is not None else event_pool()
    for i in range(n):
        yield events[i % len(events)]


def mean_properties_bytes(pool: list[BenchEvent] | None = None) -> float:
    """Average size of an event's properties as compact UTF-8 JSON."""
    events = pool if pool is not None else event_pool()
    sizes = [len(json.dumps(e["properties"], separators=(",", ":")).encode()) for e in events]
    return sum(sizes) / len(sizes)


def mean_wire_bytes(pool: list[BenchEvent] | None = None) -> float:
    """Average size of a whole event (name, id, properties) as ``json.dumps`` writes it."""
    events = pool if pool is not None else event_pool()
    return sum(len(json.dumps(e).encode()) for e in events) / len(events)
