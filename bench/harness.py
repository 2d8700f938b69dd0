"""What every benchmark command shares: the database server, the output, the logs."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.db import Server, server_info
from bench.events import mean_properties_bytes, mean_wire_bytes
from bench.report import Reporter, machine_info, now_label


@dataclass
class Context:
    """One invocation of ``python -m bench``."""

    server: Server
    out: Reporter
    log_dir: Path
    quick: bool = False
    failures: list[str] = field(default_factory=list)
    _described: bool = False

    def describe(self, database_url: str) -> None:
        """Print the machine, the database and the events (once per invocation)."""
        if self._described:
            return
        self._described = True
        self.out.heading(f"outbox benchmark, as of {now_label()}")
        self.out.facts(machine_info())
        pg = server_info(database_url)
        self.out.facts({"database": self.server.description, "postgresql": pg.pop("version")})
        self.out.facts({"postgresql settings": ", ".join(f"{k}={v}" for k, v in pg.items())})
        self.out.facts(
            {
                "events": f"{mean_properties_bytes():.0f} bytes of properties JSON on average "
                f"({mean_wire_bytes():.0f} bytes with name and distinct_id), 1,000 distinct "
                "events cycled",
                "logs": str(self.log_dir),
                "load average at start (1, 5, 15 min)": ", ".join(
                    f"{x:.2f}" for x in os.getloadavg()
                ),
                "OUTBOX_* set in the environment": ", ".join(
                    f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("OUTBOX_")
                )
                or "none",
            }
        )

    def fail(self, message: str) -> None:
        """Record a failed measurement; the command exits non-zero at the end."""
        self.failures.append(message)
        self.out.line(f"FAILED: {message}")


@contextlib.contextmanager
def context(
    database_url: str | None, *, markdown: bool, quick: bool, keep_logs: bool
) -> Iterator[Context]:
    """Open the server and a log directory for one invocation; clean both up after."""
    log_dir = Path(tempfile.mkdtemp(prefix="outbox-bench-logs-"))
    ok = False
    ctx: Context | None = None
    try:
        server = Server.open(database_url)
        ctx = Context(server=server, out=Reporter(markdown=markdown), log_dir=log_dir, quick=quick)
        yield ctx
        ok = not ctx.failures
    finally:
        if ok and not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"logs kept in {log_dir}", file=sys.stderr)
