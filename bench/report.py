"""Printing results: the machine, aligned (or Markdown) tables, and target checks."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

Cell = str | int | float | None


def machine_info() -> dict[str, str]:
    """CPU count and model, memory, kernel, Python and the libraries that matter."""
    info = {
        "cpus": str(os.cpu_count() or "?"),
        "cpu model": _cpu_model(),
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    versions = []
    for package in ("posthog", "psycopg", "SQLAlchemy", "requests", "pgqueuer", "psutil"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    info["packages"] = ", ".join(versions)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def now_label() -> str:
    """The time of a run, for 'as of' labels."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


class Reporter:
    """Writes a run's output: plain aligned tables, or Markdown with ``--markdown``."""

    def __init__(self, *, markdown: bool = False) -> None:
        self.markdown = markdown

    def line(self, text: str = "") -> None:
        """One line of output."""
        print(text, flush=True)

    def progress(self, text: str) -> None:
        """A progress note, on stderr so stdout stays the report."""
        print(f"  .. {text}", file=sys.stderr, flush=True)

    def heading(self, text: str) -> None:
        """A section heading."""
        self.line()
        self.line(f"### {text}" if self.markdown else f"== {text}")
        self.line()

    def facts(self, facts: dict[str, str]) -> None:
        """``key: value`` lines."""
        for key, value in facts.items():
            self.line(f"- {key}: {value}" if self.markdown else f"  {key}: {value}")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
        """A table; numbers right-aligned."""
        cells = [[_cell(value) for value in row] for row in rows]
        numeric = [
            all(isinstance(row[i], int | float) or row[i] is None for row in rows) and bool(rows)
            for i in range(len(headers))
        ]
        if self.markdown:
            self.line("| " + " | ".join(headers) + " |")
            self.line("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
            for row in cells:
                self.line("| " + " | ".join(row) + " |")
            self.line()
            return
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

        def fmt(values: Sequence[str]) -> str:
            return "  ".join(
                v.rjust(w) if n else v.ljust(w)
                for v, w, n in zip(values, widths, numeric, strict=True)
            ).rstrip()

        self.line(fmt(headers))
        self.line("  ".join("-" * w for w in widths))
        for row in cells:
            self.line(fmt(row))
        self.line()

    def target(self, name: str, met: bool | None, detail: str) -> None:
        """One target, said plainly: met, missed (and by how much), or not measured."""
        verdict = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[met]
        self.line(f"- target {name}: {verdict}: {detail}")


def _cell(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def mb(n_bytes: int | float | None) -> float | None:
    """Bytes as MB (10^6 bytes would mislead next to MiB limits: this is MiB)."""
    return None if n_bytes is None else n_bytes / (1024 * 1024)


def ratio(value: float | None, base: float | None) -> str | None:
    """``value / base`` as ``1.23x``."""
    if value is None or not base:
        return None
    return f"{value / base:.2f}x"


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values`` (linear interpolation)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * p / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
