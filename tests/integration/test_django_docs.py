"""docs/django.md runs: its files are written out as a Django project (each Python
block starts with a comment naming its file; one named ``FILE, at the end`` adds its
lines to the end of that file), its ``python manage.py`` commands run in order
(``makemigrations``, ``migrate``, ``test`` with Django's test runner), then the views
(sync and async) are called once each and the page's worker command ships what they
enqueued."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import capture_requests, drop_database, worker_env
from worker.testing import CaptureServer

pytest.importorskip("django", reason="Django is a test dependency: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "django.md"
BLOCK = re.compile(r"^```(python|sh)\n(.*?)^```", re.DOTALL | re.MULTILINE)
#: The URL the page's worker command connects with.
PAGE_URL = "postgresql://app:secret@localhost:5432/shop"

MANAGE_PY = """\
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
from django.core.management import execute_from_command_line

execute_from_command_line(sys.argv)
"""
#: What the page leaves to `django-admin startproject`, before its own settings.
SETTINGS_BEFORE = """\
SECRET_KEY = "the-docs-project"
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
ROOT_URLCONF = "mysite.urls"
MIDDLEWARE = []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
"""
#: After the page's settings (before the lines it adds at their end): its database,
#: pointed at the test's.
SETTINGS_AFTER = """
import os

from psycopg.conninfo import conninfo_to_dict

_info = conninfo_to_dict(os.environ["DATABASE_URL"])
assert DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
DATABASES["default"] = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": _info.pop("dbname"),
    "USER": _info.pop("user", ""),
    "PASSWORD": _info.pop("password", ""),
    "HOST": _info.pop("host", ""),
    "PORT": _info.pop("port", ""),
    "OPTIONS": _info,
}
"""


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(PAGE.read_text())


def write_project(root: Path) -> None:
    """The page's files under ``root``, with what ``startproject`` would add."""
    (root / "manage.py").write_text(MANAGE_PY)
    for package in ("mysite", "shop"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    files = [code for kind, code in blocks() if kind == "python"]
    assert len(files) >= 9, "docs/django.md lost a file"
    written: dict[str, str] = {}
    added: dict[str, list[str]] = {}
    for code in files:
        first, _, _ = code.partition("\n")
        name, _, where = first.removeprefix("# ").strip().partition(", ")
        assert re.fullmatch(r"[a-z]+/[a-z_]+\.py", name), f"a block does not name its file: {first}"
        if where:
            assert where == "at the end" and name in written, f"added to what? {first}"
            added.setdefault(name, []).append(code)
        else:
            assert name not in written, f"{name} is written twice"
            written[name] = code
    # The page's settings, between what startproject writes and the test's database.
    written["mysite/settings.py"] = SETTINGS_BEFORE + written["mysite/settings.py"] + SETTINGS_AFTER
    for name, code in written.items():
        (root / name).write_text("\n".join([code, *added.get(name, [])]))


def commands() -> list[list[str]]:
    """Each ``python manage.py ...`` line of the page, in order."""
    lines = [line for kind, code in blocks() if kind == "sh" for line in code.splitlines()]
    found = [shlex.split(line)[1:] for line in lines if line.startswith("python manage.py ")]
    assert [c[1] for c in found] == ["makemigrations", "migrate", "test"], found
    return found


def run(root: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "OUTBOX_"))}
    env["DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_the_django_guide_runs(
    server_url: str, empty_database: str, tmp_path: Path, capture: CaptureServer
) -> None:
    write_project(tmp_path)
    test_db = "test_" + conninfo_to_dict(empty_database)["dbname"]
    try:
        for command in commands():
            result = run(tmp_path, empty_database, *command)
            assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
            if command[1] == "test":
                assert "Ran 4 tests" in result.stderr and "\nOK" in result.stderr, result.stderr
    finally:
        drop_database(server_url, test_db)
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)

    # Each view, once, through Django's test clients: the event commits with the order.
    call = (
        "import asyncio; from django.test import AsyncClient, Client;"
        " r = Client().post('/orders/', {'user_id': 'user-42', 'total': 1250},"
        " content_type='application/json');"
        " assert r.status_code == 201, r.content;"
        " r = asyncio.run(AsyncClient().post('/async/orders/', {'user_id': 'user-7',"
        " 'total': 900}, content_type='application/json'));"
        " assert r.status_code == 201, r.content"
    )
    result = run(tmp_path, empty_database, "manage.py", "shell", "-c", call)
    assert result.returncode == 0, result.stderr

    # The page's worker command, with `--until-empty` so that it returns.
    [worker_line] = [
        line
        for kind, code in blocks()
        if kind == "sh"
        for line in code.splitlines()
        if "outbox-worker run" in line
    ]
    assert PAGE_URL in worker_line
    worker = Path(sys.executable).with_name("outbox-worker")
    shipped = subprocess.run(
        [str(worker), "run", "--until-empty"],
        env=worker_env(empty_database, capture),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shipped.returncode == 0, shipped.stderr
    shipped_events = sorted(
        (e["event"], e["distinct_id"], e["properties"]["total_cents"])
        for r in capture_requests(capture)
        for e in r.events
    )
    assert shipped_events == [("order_placed", "user-42", 1250), ("order_placed", "user-7", 900)]
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)
