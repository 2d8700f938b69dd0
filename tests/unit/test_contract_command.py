"""`outbox-worker contract`: print, write and check the generated contract document."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from outbox import render_markdown
from worker.cli import main
from worker.contract_command import load_registry

MODULE = """
from outbox import EventRegistry, Prop

EVENTS = EventRegistry(title="Shop events")
EVENTS.event(
    "order_placed",
    category="core_loop",
    description="An order was paid.",
    properties=[Prop("total", float, "Order total in EUR.")],
)


def build():
    return EVENTS


NOT_A_REGISTRY = 42
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"shop_events_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    return name


def test_prints_the_document(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["contract", "--registry", f"{module}:EVENTS"]) == 0
    out = capsys.readouterr().out
    assert out == render_markdown(load_registry(f"{module}:EVENTS"))
    assert out.startswith("# Shop events\n") and "| `total` | number | yes |" in out


def test_a_factory_function_works_too(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["contract", "--registry", f"{module}:build"]) == 0
    assert "`order_placed`" in capsys.readouterr().out


def test_output_then_check(module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "events.md"
    assert main(["contract", "--registry", f"{module}:EVENTS", "--output", str(target)]) == 0
    assert target.read_text() == render_markdown(load_registry(f"{module}:EVENTS"))
    assert main(["contract", "--registry", f"{module}:EVENTS", "--check", str(target)]) == 0
    capsys.readouterr()

    target.write_text(target.read_text().replace("EUR", "USD"))
    assert main(["contract", "--registry", f"{module}:EVENTS", "--check", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is stale" in err and "--output" in err

    missing = tmp_path / "missing.md"
    assert main(["contract", "--registry", f"{module}:EVENTS", "--check", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec",
    ["no_colon", "no_such_module_xyz:EVENTS", "{module}:MISSING", "{module}:NOT_A_REGISTRY"],
)
def test_a_bad_registry_exits_2_with_one_line(
    spec: str, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["contract", "--registry", spec.format(module=module)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("outbox-worker: error: ")


def test_the_console_script(module: str, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("outbox-worker")
    result = subprocess.run(
        [str(script), "contract", "--registry", f"{module}:EVENTS", "--check", "nope.md"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "nope.md does not exist" in result.stderr
