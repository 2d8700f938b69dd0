"""A real PgBouncer in transaction pooling mode in front of the test server.

The server is the one ``tests.conftest.server_url`` gives: the machine's PostgreSQL
(``DATABASE_URL``, over TCP) or the embedded one (a Unix socket); PgBouncer listens
on a free local TCP port either way. Tests that need it skip, naming the package to
install, where Debian's ``pgbouncer`` binary is absent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from worker.testing.pgbouncer import MISSING, PgBouncer, pgbouncer_binary

#: Server connections PgBouncer shares among all clients of one database: fewer than
#: the tests' concurrent clients, so a client's next transaction often runs on another
#: server connection than its last (what breaks server-side prepared statements).
POOL_SIZE = 3


@pytest.fixture(scope="session")
def pgbouncer(server_url: str) -> Iterator[PgBouncer]:
    """PgBouncer (pool_mode = transaction, auth_type = trust) for this test session."""
    if pgbouncer_binary() is None:
        pytest.skip(MISSING)
    with PgBouncer(server_url, pool_size=POOL_SIZE) as bouncer:
        yield bouncer


@pytest.fixture
def bounced_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """The test's fresh database, through PgBouncer."""
    return pgbouncer.url(database_url)
