"""The inspection and repair commands behind ``outbox-worker``."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from outbox import install
from outbox.schema import STATUS_DEAD, STATUS_PENDING
from worker.database import connect, resolve_database_url
from worker.database import migrate as apply_migrations
from worker.settings import Settings
from worker.storage.base import DatabaseTimeout, Inspection, LedgerRow, WorkerStates
from worker.storage.snapshot_storage import SnapshotStorage
from worker.terminal import DEFAULT_LIMIT, age, printable
from worker.worker_state import STALE_AFTER_SECONDS, WorkerStateUnavailable

#: Longest stored error shown in a table row (``dead``, ``status``).
ERROR_COLUMN_LIMIT = 120

#: Longest event name shown in a ``ledger`` table row (names are up to 200 characters).
EVENT_COLUMN_LIMIT = 60

#: Each of ``status``'s queries gives up after this long (statement_timeout), and
#: after :data:`~worker.storage.connection.LOCK_TIMEOUT` when an outbox table is
#: locked, as every statement of the commands does: status answers in bounded time,
#: saying why.
STATUS_STATEMENT_TIMEOUT = 30.0


class StatusSource(Inspection, WorkerStates, Protocol):
    """What ``status`` reads: the storage's counts and the workers' own lines."""


def _store(settings: Settings, *, statement_timeout: float | None = None) -> SnapshotStorage:
    url = resolve_database_url(settings.database_url, settings.data_dir)
    return SnapshotStorage(
        url, log_outages=False, statement_timeout=statement_timeout, pooler=settings.pooler
    )


def migrate(settings: Settings) -> int:
    """Apply the outbox migrations and say what that did: created the tables,
    upgraded them from one revision to another, or found them up to date."""
    url = resolve_database_url(settings.database_url, settings.data_dir)
    with connect(url):
        pass  # the one-line error for a bad URL or an unreachable server, first
    before = install.current(url)
    applied = apply_migrations(url)
    print(migrate_report(before, applied[-1] if applied else before))
    return 0


def migrate_report(before: str | None, after: str | None) -> str:
    """The line ``migrate`` prints, from the revisions before and after it ran."""
    if before == after:
        return f"outbox tables were already up to date (revision {after})"
    if before is None:
        return f"created the outbox tables (revision {after})"
    return f"upgraded the outbox tables from revision {before} to {after}"


def status_report(store: StatusSource) -> dict[str, Any]:
    """The backlog and what is stuck, as a JSON-ready dict."""
    backlog = store.backlog()
    return {
        "pending": backlog.pending,
        "due": backlog.due,
        "retrying": backlog.retrying,
        "dead": backlog.dead,
        "oldest_pending_age_seconds": round(backlog.oldest_pending_age_seconds, 3),
        "in_flight": [
            {"worker": b["worker"], "held_seconds": round(b["held_seconds"], 3)}
            for b in store.in_flight()
        ],
        "top_pending": [{"event": e, "count": n} for e, n in store.top_events(STATUS_PENDING)],
        "top_dead": [{"event": e, "count": n} for e, n in store.top_events(STATUS_DEAD)],
        "errors": [
            {
                "status": row["status"],
                "error": row["error"],
                "count": row["count"],
                "oldest_created_at": row["since"],
            }
            for row in store.top_errors()
        ],
        **_workers(store),
    }


def _workers(store: WorkerStates) -> dict[str, Any]:
    """What each worker last reported (``outbox_worker_state``), or why it is unknown."""
    try:
        rows = store.worker_states()
    except WorkerStateUnavailable as exc:
        return {"workers": None, "workers_unavailable": str(exc)}
    return {
        "workers": [
            {
                "worker": r["worker"],
                "host": r["host"],
                "state": r["state"],
                "reason": r["reason"],
                "updated_at": r["updated_at"].isoformat(),
                "age_seconds": round(r["age_seconds"], 3),
                "stale": r["age_seconds"] > STALE_AFTER_SECONDS,
            }
            for r in rows
        ]
    }


def status(settings: Settings, *, as_json: bool) -> int:
    """Print the backlog: counts, oldest age, top events, grouped errors."""
    store = _store(settings, statement_timeout=STATUS_STATEMENT_TIMEOUT)
    try:
        report = status_report(store)
    except DatabaseTimeout as exc:
        raise type(exc)(f"status could not read the outbox tables: {exc}") from exc
    finally:
        store.close()
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print("outbox backlog")
    rows = [
        ("pending", str(report["pending"]), "waiting, backing off or being shipped"),
        ("due now", str(report["due"]), "time to send (includes batches in flight)"),
        ("in flight", str(len(report["in_flight"])), "batches a worker is shipping now"),
        ("retrying", str(report["retrying"]), "failed at least once, will retry"),
        ("dead", str(report["dead"]), "gave up: see `outbox-worker dead`"),
        ("oldest pending", age(report["oldest_pending_age_seconds"]), ""),
    ]
    _table(["", "count", ""], rows)
    if report["workers"] is None:
        print(f"\nworkers: unknown ({report['workers_unavailable']}; run `outbox-worker migrate`)")
    elif report["workers"]:
        print("\nworkers (as each last reported)")
        _table(
            ["worker", "posthog host", "state", "reported", "reason"],
            [
                (
                    w["worker"],
                    w["host"],
                    w["state"],
                    f"{age(w['age_seconds'])} ago" + (" (stale)" if w["stale"] else ""),
                    w["reason"],
                )
                for w in report["workers"]
            ],
        )
    if report["in_flight"]:
        print("\nbatches in flight")
        _table(
            ["worker", "held for"],
            [(b["worker"], f"{b['held_seconds']:.1f}s") for b in report["in_flight"]],
        )
    for title, key in (("top pending events", "top_pending"), ("top dead events", "top_dead")):
        if report[key]:
            print(f"\n{title}")
            _table(["event", "count"], [(r["event"], str(r["count"])) for r in report[key]])
    if report["errors"]:
        print("\nlast errors (grouped)")
        _table(
            ["status", "count", "oldest event", "error"],
            [
                (
                    r["status"],
                    str(r["count"]),
                    (r["oldest_created_at"] or "")[:19],
                    r["error"],
                )
                for r in report["errors"]
            ],
        )
    return 0


def dead(settings: Settings, *, event: str | None, limit: int, as_json: bool) -> int:
    """List dead events with their last error (``id`` is the ``outbox_retry`` row's,
    what ``retry --id`` takes)."""
    store = _store(settings)
    try:
        rows = store.dead(limit=limit, event=event)
    finally:
        store.close()
    if as_json:
        print(json.dumps(rows, indent=2, default=_json_value))
        return 0
    if not rows:
        print("no dead events")
        return 0
    _table(
        ["id", "event", "distinct_id", "attempts", "created_at", "last_error"],
        [
            (
                str(r["id"]),
                r["event"],
                r["distinct_id"],
                str(r["attempts"]),
                (r["created_at"] or "")[:19],
                r["last_error"] or "",
            )
            for r in rows
        ],
        limits={5: ERROR_COLUMN_LIMIT},
    )
    return 0


def retry(settings: Settings, *, all_: bool, ids: Sequence[int] | None, event: str | None) -> int:
    """Requeue dead events (all, by id, or by event name)."""
    store = _store(settings)
    try:
        done = store.requeue_dead(ids=None if all_ else ids, event=event)
    finally:
        store.close()
    print(f"requeued {done.requeued} dead events")
    if done.unsendable:
        print(
            f"left {done.unsendable} dead: their stored content cannot be sent "
            "(see `outbox-worker dead`); remove them with `outbox-worker purge --dead`"
        )
    return 0


def purge(settings: Settings, *, older_than: float) -> int:
    """Delete dead events older than the given number of seconds."""
    store = _store(settings)
    try:
        count = store.purge_dead(older_than)
    finally:
        store.close()
    print(f"purged {count} dead events")
    return 0


def ledger_report(
    rows: Sequence[LedgerRow], since: datetime.date, event: str | None
) -> dict[str, Any]:
    """The ledger's rows and their totals, as a JSON-ready dict."""
    totals = {
        "delivered": sum(r.delivered for r in rows),
        "dead": sum(r.dead for r in rows),
        "purged": sum(r.purged for r in rows),
    }
    return {
        "since": since.isoformat(),
        "event": event,
        "rows": [
            {
                "day": r.day.isoformat(),
                "event": r.event,
                "destination": r.destination,
                "delivered": r.delivered,
                "dead": r.dead,
                "purged": r.purged,
            }
            for r in rows
        ],
        "totals": totals,
    }


def ledger(settings: Settings, *, since: datetime.date, event: str | None, as_json: bool) -> int:
    """Print the delivery ledger from ``since`` on: per UTC day (of the events'
    timestamps), event and destination, the events delivered, dead and purged."""
    store = _store(settings, statement_timeout=STATUS_STATEMENT_TIMEOUT)
    try:
        rows = store.ledger(since, event)
    finally:
        store.close()
    report = ledger_report(rows, since, event)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    which = f" for event {printable(event, EVENT_COLUMN_LIMIT)}" if event is not None else ""
    if not rows:
        print(f"no delivered, dead or purged events since {report['since']}{which}")
        return 0
    print(f"delivery ledger since {report['since']}{which} (UTC days of the events' timestamps)")
    totals = report["totals"]
    _table(
        ["day", "event", "destination", "delivered", "dead", "purged"],
        [
            (r["day"], r["event"], r["destination"], r["delivered"], r["dead"], r["purged"])
            for r in report["rows"]
        ]
        + [("total", "", "", totals["delivered"], totals["dead"], totals["purged"])],
        limits={1: EVENT_COLUMN_LIMIT},
    )
    return 0


def demo(settings: Settings) -> int:
    """Run the demo application (see :mod:`worker.demo`)."""
    from worker.demo import run_demo

    return run_demo(settings)


def _json_value(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    limits: Mapping[int, int] | None = None,
) -> None:
    """Print rows under headers in aligned columns. Every cell, raw as the database
    holds it, goes through :func:`~worker.terminal.printable`: one line, control
    characters escaped, at most ``limits[column]`` (default 200) characters."""
    limits = limits or {}
    cells = [
        [printable(c, limits.get(i, DEFAULT_LIMIT)) for i, c in enumerate(row)] for row in rows
    ]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    if any(headers):
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
