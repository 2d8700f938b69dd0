"""Fixtures shared by the integration tests of the first-time guards (sync and async)."""

from __future__ import annotations

import psycopg
import pytest

# The application's tables the guard examples write to.
GUARD_TABLES = """
CREATE TABLE agent_runtime (
    id bigserial PRIMARY KEY,
    workspace_id text NOT NULL,
    daemon_id text NOT NULL,
    provider text NOT NULL,
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, daemon_id, provider)
);
CREATE TABLE issue (
    id bigint PRIMARY KEY,
    workspace_id text NOT NULL,
    first_executed_at timestamptz
);
INSERT INTO issue (id, workspace_id) VALUES (1, 'w1'), (2, 'w1');
"""


@pytest.fixture
def schema(database_url: str) -> str:
    """The test database with the guard examples' tables; returns its URL."""
    with psycopg.connect(database_url) as conn:
        conn.execute(GUARD_TABLES)
    return database_url
