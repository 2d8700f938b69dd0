"""``outbox-worker migrate`` says what it did: created the tables, upgraded them from
one revision to another, or found them already up to date."""

from __future__ import annotations

import subprocess
import sys

from outbox import install
from tests.conftest import worker_env
from worker.commands import migrate_report

WORKER = [sys.executable, "-m", "worker.cli"]
#: The newest outbox migration.
HEAD = install.head()


def _migrate(url: str) -> str:
    result = subprocess.run(
        [*WORKER, "migrate"],
        env=worker_env(url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_migrate_says_it_created_the_tables_then_that_they_are_up_to_date(
    empty_database: str,
) -> None:
    assert _migrate(empty_database) == f"created the outbox tables (revision {HEAD})"
    assert _migrate(empty_database) == f"outbox tables were already up to date (revision {HEAD})"


def test_migrate_says_from_which_revision_it_upgraded(empty_database: str) -> None:
    install.upgrade(empty_database, "0006")
    assert _migrate(empty_database) == f"upgraded the outbox tables from revision 0006 to {HEAD}"


def test_the_report_of_each_case() -> None:
    assert migrate_report(None, "0005") == "created the outbox tables (revision 0005)"
    assert migrate_report("0002", "0005") == "upgraded the outbox tables from revision 0002 to 0005"
    assert migrate_report("0005", "0005") == "outbox tables were already up to date (revision 0005)"
