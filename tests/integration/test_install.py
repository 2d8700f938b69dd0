"""outbox.install: the library's migration runner, on a URL and on a SQLAlchemy Connection."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import psycopg
import pytest
from sqlalchemy import create_engine, pool, text

import outbox
from outbox import install
from outbox.exceptions import OutboxDatabaseError, OutboxError, UnsupportedConnectionError
from outbox.schema import VERSION_TABLE

ALL = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010"]


def test_upgrade_on_a_url_returns_what_it_applied_then_nothing(empty_database: str) -> None:
    assert install.current(empty_database) is None
    assert install.upgrade(empty_database) == ALL
    assert install.current(empty_database) == install.head() == ALL[-1]
    assert install.upgrade(empty_database) == []
    with psycopg.connect(empty_database) as conn:
        assert outbox.enqueue(conn, "e", "u", dedup_key="k") is not None  # the keyed function


def test_upgrade_in_steps_and_downgrade_name_their_revisions(empty_database: str) -> None:
    assert install.upgrade(empty_database, "0003") == ["0001", "0002", "0003"]
    assert install.upgrade(empty_database) == [
        "0004",
        "0005",
        "0006",
        "0007",
        "0008",
        "0009",
        "0010",
    ]
    assert install.downgrade(empty_database, "0002") == [
        "0010",
        "0009",
        "0008",
        "0007",
        "0006",
        "0005",
        "0004",
        "0003",
    ]
    assert install.current(empty_database) == "0002"
    assert install.downgrade(empty_database, "base") == ["0002", "0001"]
    assert install.current(empty_database) is None


def test_upgrade_on_a_connection_leaves_it_usable_with_its_lock_timeout(
    empty_database: str,
) -> None:
    engine = create_engine(install.sqlalchemy_url(empty_database), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SET lock_timeout = '7s'"))
            connection.commit()
            assert install.upgrade(connection) == ALL
            assert not connection.in_transaction()
            assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "7s"
            assert install.current(connection) == ALL[-1]
            count = connection.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}"))
            assert count.scalar_one() == 1
    finally:
        engine.dispose()


def test_a_connection_inside_a_transaction_is_refused_untouched(empty_database: str) -> None:
    engine = create_engine(install.sqlalchemy_url(empty_database), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("CREATE TABLE mine (id int)"))
            with pytest.raises(UnsupportedConnectionError, match="no transaction open") as raised:
                install.upgrade(connection)
            assert "\n" not in str(raised.value)
            connection.commit()  # the caller's transaction was left as it was
        assert install.current(empty_database) is None
        with psycopg.connect(empty_database) as conn:
            assert conn.execute("SELECT to_regclass('mine') IS NOT NULL").fetchone() == (True,)
    finally:
        engine.dispose()


def test_something_else_is_refused_in_one_line() -> None:
    expected = "takes a database URL, a SQLAlchemy Engine or a SQLAlchemy Connection"
    with pytest.raises(UnsupportedConnectionError, match=expected):
        install.upgrade(42)  # type: ignore[arg-type]


def test_a_bad_or_unreachable_url_is_one_line_without_the_password(server_url: str) -> None:
    with pytest.raises(OutboxDatabaseError, match="not a valid PostgreSQL URL") as bad:
        install.upgrade("postgresql://user:hunter2@host:notaport/db")
    assert "hunter2" not in str(bad.value)
    with pytest.raises(OutboxDatabaseError, match="cannot connect to PostgreSQL") as down:
        install.upgrade("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(down.value) and "\n" not in str(down.value)


def test_an_unknown_revision_is_one_line(empty_database: str) -> None:
    with pytest.raises(OutboxError, match=r"^migrate failed: .*'nonsense'") as raised:
        install.upgrade(empty_database, "nonsense")
    assert "\n" not in str(raised.value)
    assert install.current(empty_database) is None


def test_a_refused_statement_is_one_line_naming_the_privilege(empty_database: str) -> None:
    role = f"outbox_install_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
    separator = "&" if "?" in empty_database else "?"
    as_role = f"{empty_database}{separator}options={quote(f'-c role={role}')}"
    try:
        with pytest.raises(OutboxDatabaseError, match="lacks a privilege") as raised:
            install.upgrade(as_role)
        assert str(raised.value).startswith("migrate failed: the database refused it: ")
        assert "permission denied" in str(raised.value) and "\n" not in str(raised.value)
    finally:
        with psycopg.connect(empty_database, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_on_a_connection_a_held_lock_is_retried_then_named(empty_database: str) -> None:
    """The retries run on the caller's connection too: each try rolled back, the lock
    holders named when they are over, and the connection left usable. (The lock is
    what a worker of before 0007 holds on the old table while a batch is on the wire;
    0007 drops that table.)"""
    install.upgrade(empty_database, "0006")
    engine = create_engine(install.sqlalchemy_url(empty_database), poolclass=pool.NullPool)
    separator = "&" if "?" in empty_database else "?"
    holder = psycopg.connect(f"{empty_database}{separator}application_name=holding_a_batch")
    try:
        holder.execute("SELECT id FROM outbox_events FOR UPDATE")  # RowShareLock
        with engine.connect() as connection:
            connection.execute(text("SET lock_timeout = '3s'"))
            connection.commit()
            with pytest.raises(OutboxDatabaseError, match="could not take its locks") as raised:
                install.upgrade(connection, lock_timeout=0.1, retry_for=0.5)
            assert "(holding_a_batch) holds RowShareLock on outbox_events" in str(raised.value)
            assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "3s"
            connection.rollback()
            holder.rollback()  # the batch ends
            assert install.upgrade(connection, lock_timeout=0.1) == ["0007", "0008", "0009", "0010"]
    finally:
        holder.close()
        engine.dispose()


def test_upgrade_on_an_engine_takes_its_connections_and_leaves_it_open(
    empty_database: str,
) -> None:
    engine = create_engine(install.sqlalchemy_url(empty_database))  # a pool that keeps them
    try:
        with engine.connect() as connection:
            default = connection.execute(text("SHOW lock_timeout")).scalar_one()
        assert install.upgrade(engine) == ALL
        assert install.current(engine) == ALL[-1]
        assert install.upgrade(engine) == []
        assert engine.pool.checkedout() == 0  # each try's connection went back
        with engine.connect() as connection:  # the pooled connection the tries used
            assert connection.execute(text("SHOW lock_timeout")).scalar_one() == default
    finally:
        engine.dispose()
