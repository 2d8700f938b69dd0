"""Migration 0002: outbox_events.destination, up and down (through 0007's view and back)."""

from __future__ import annotations

import psycopg
import pytest

import outbox
from worker.database import downgrade, migrate


def columns(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'outbox_events'"
        ).fetchall()
    return {r[0] for r in rows}


def test_destination_defaults_to_posthog_and_allows_only_two_values(empty_database: str) -> None:
    migrate(empty_database, "0002")
    db = psycopg.connect(empty_database, autocommit=True)
    db.execute(
        "INSERT INTO outbox_events (uuid, event, distinct_id) VALUES (gen_random_uuid(), 'e', 'u')"
    )
    assert db.execute("SELECT destination FROM outbox_events").fetchone() == ("posthog",)
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO outbox_events (uuid, event, distinct_id, destination)"
            " VALUES (gen_random_uuid(), 'e', 'u', 'elsewhere')"
        )
    db.close()


def test_downgrade_drops_the_column_and_the_metrics_rows(empty_database: str) -> None:
    migrate(empty_database)
    registry = outbox.EventRegistry()
    registry.event(
        "tick",
        category="operational",
        metrics_only=True,
        properties=[outbox.Prop("kind", str)],
        metric_labels=["kind"],
    )
    config = outbox.AnalyticsConfig(registry=registry)
    with psycopg.connect(empty_database) as conn:
        # Keyed: the functions write the snapshot engine's tables whatever enqueue's
        # own INSERT names.
        outbox.enqueue(conn, "tick", "w", {"kind": "a"}, config=config, dedup_key="t")
        outbox.enqueue(conn, "signup", "u", config=config, dedup_key="s")
        conn.commit()
    downgrade(empty_database, "0001")
    assert "destination" not in columns(empty_database)
    with psycopg.connect(empty_database) as conn:
        # Only the PostHog event is left: a metrics row must never reach PostHog.
        assert conn.execute("SELECT event FROM outbox_events").fetchall() == [("signup",)]
    migrate(empty_database)
    assert "destination" in columns(empty_database)
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT destination FROM outbox_events").fetchall() == [("posthog",)]
