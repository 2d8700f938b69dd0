"""The docs name what the code does: every variable, log action and metric."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from worker.metrics import WorkerMetrics
from worker.settings import ENVIRONMENT

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_table_lists_every_variable_and_default() -> None:
    readme = (ROOT / "README.md").read_text()
    # The configuration table's rows have four cells (the ranges table's have three).
    rows = {line for line in readme.splitlines() if line.startswith("|") and line.count("|") == 5}
    for var in ENVIRONMENT:
        row = next((r for r in rows if r.startswith(f"| `{var.name}` |")), None)
        assert row is not None, f"{var.name} is missing from the README's configuration table"
        assert var.default in row, f"{var.name}'s default {var.default!r} is not in: {row}"


def test_every_log_action_is_documented() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    actions: set[str] = set()
    for path in [*(ROOT / "worker").rglob("*.py"), *(ROOT / "outbox").rglob("*.py")]:
        actions |= set(re.findall(r'"action": "([a-z_]+)"', path.read_text()))
    assert actions, "no log actions found"
    missing = sorted(a for a in actions if f"`{a}`" not in operations)
    assert not missing, f"log actions missing from docs/operations.md: {missing}"


def test_every_metric_is_documented() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    names = {m.name for m in registry.collect()}
    missing = sorted(n for n in names if n not in operations)
    assert not missing, f"metrics missing from docs/operations.md: {missing}"
