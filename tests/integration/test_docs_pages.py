"""The analytics guides: every Python block runs, in order, against a real database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import outbox

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "contract.md",
    "identity.md",
    "first-time-events.md",
    "metrics-only-events.md",
    "builders.md",
]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_of(page: str) -> str:
    blocks = BLOCK.findall((ROOT / "docs" / page).read_text())
    assert blocks, f"docs/{page} has no Python example"
    return "\n\n".join(blocks)


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_examples_run(page: str, database_url: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(python_of(page))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANALYTICS_", "APP_ENV"))}
    env["DATABASE_URL"] = database_url
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"docs/{page}:\n{result.stderr}"


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
