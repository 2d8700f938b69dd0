"""The docs' examples run: every Python block of the analytics guides and of the README,
in order, against a real database; the testing guide's blocks as a pytest module."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import outbox

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "contract.md",
    "identity.md",
    "first-time-events.md",
    "metrics-only-events.md",
    "builders.md",
    "posthog-python.md",
    "reconciliation.md",
]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
SQL_BLOCK = re.compile(r"^```sql\n(.*?)^```", re.DOTALL | re.MULTILINE)
#: The URL the README's examples connect with, as psycopg and as SQLAlchemy take it.
README_URL = "postgresql://app:secret@localhost:5432/app"
README_SQLALCHEMY_URL = "postgresql+psycopg://app:secret@localhost:5432/app"


def python_of(page: str) -> str:
    blocks = BLOCK.findall((ROOT / "docs" / page).read_text())
    assert blocks, f"docs/{page} has no Python example"
    return "\n\n".join(blocks)


def run_script(script: Path, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANALYTICS_", "APP_ENV"))}
    env["DATABASE_URL"] = database_url
    # The testing guide starts `outbox-worker` by name: the one of this environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(
        [sys.executable, *args, str(script)],
        capture_output=True,
        text=True,
        cwd=script.parent,
        env=env,
        timeout=240,
        check=False,
    )


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_examples_run(page: str, database_url: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(python_of(page))
    result = run_script(script, database_url)
    assert result.returncode == 0, f"docs/{page}:\n{result.stderr}"


def test_the_readmes_examples_run(database_url: str, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    [orders] = [s for s in SQL_BLOCK.findall(readme) if "CREATE TABLE orders" in s]
    with psycopg.connect(database_url) as conn:
        conn.execute(orders)
    code = "\n\n".join(BLOCK.findall(readme))
    assert README_URL in code
    # The examples' URL, pointed at the test database (psycopg's and SQLAlchemy's form).
    sqlalchemy_url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    code = code.replace(README_SQLALCHEMY_URL, sqlalchemy_url)
    code = code.replace(README_URL, database_url)
    script = tmp_path / "readme.py"
    script.write_text(code)
    result = run_script(script, database_url)
    assert result.returncode == 0, f"README.md:\n{result.stderr}"
    # "When an event is refused": the two lines the comments show.
    field, message = result.stdout.splitlines()[-2:]
    assert field == "properties.avatar"
    assert message.startswith("properties.avatar: bytes has no faithful JSON form; convert it")
    with psycopg.connect(database_url) as conn:
        # The view has no row number: each example is a transaction of its own, in
        # order, and the events of one transaction come in name order.
        rows = conn.execute("SELECT event FROM outbox_events ORDER BY txid, event")
        names = [r[0] for r in rows]
    assert names == [
        "order_placed",  # SQLAlchemy Session
        "order_placed",  # psycopg
        "item_added",  # enqueue_many
        "item_added",
        "cart_viewed",  # outbox.batch()
        "item_added",
        "order_placed",  # aenqueue
        "invoice_paid",  # deduplication: one of the two
    ]


def test_the_testing_guides_examples_pass_under_pytest(database_url: str, tmp_path: Path) -> None:
    script = tmp_path / "test_guide.py"
    script.write_text(python_of("testing.md"))
    result = run_script(script, database_url, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    assert result.returncode == 0, f"docs/testing.md:\n{result.stdout}\n{result.stderr}"
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed is not None and int(passed.group(1)) >= 6, result.stdout
    assert "skipped" not in result.stdout and "failed" not in result.stdout, result.stdout


def test_every_new_public_name_is_documented() -> None:
    text = "\n".join((ROOT / "docs" / page).read_text() for page in PAGES)
    core = {
        "OutboxDatabaseError",
        "OutboxError",
        "OutboxNotInstalledError",
        "UnsupportedConnectionError",
        "__version__",
        "aenqueue",
        "aenqueue_many",
        "enqueue_many",
        "Batch",  # batch() and Batch are in the README's quickstart
        "batch",
    }
    missing = sorted(n for n in outbox.__all__ if n not in core and n not in text)
    assert not missing, f"not in the analytics guides: {missing}"
