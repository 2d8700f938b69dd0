"""outbox.testing is importable by an application's test suite on its own: it loads
neither pytest nor the worker, and worker.testing loads the worker only for deliver."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import {module}
loaded = sorted(m for m in sys.modules if m == "pytest" or m.split(".")[0] in {banned})
print(",".join(loaded))
"""


def loaded_by(module: str, banned: tuple[str, ...]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module, banned=banned)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [name for name in result.stdout.strip().split(",") if name]


def test_outbox_testing_loads_neither_pytest_nor_the_worker() -> None:
    assert loaded_by("outbox.testing", ("worker", "_pytest")) == []


def test_worker_testing_loads_the_worker_only_when_deliver_is_used() -> None:
    assert loaded_by("worker.testing", ("apscheduler", "_pytest")) == []
    script = (
        "import sys, worker.testing\nworker.testing.deliver\nprint('apscheduler' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "True"
