"""Who holds the locks an outbox statement waits for: one bounded line for a message.

Used by :mod:`outbox.install` when a migration gives up on its locks, and by the
worker when one of its statements times out on a locked table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from outbox.schema import DEDUP_TABLE, EVENT_TABLES, EVENTS_TABLE, event_table

#: The relations whose locks outbox statements wait for: the event tables enqueue
#: writes to and the view over them, the snapshot engine's bookkeeping, the retries
#: and the dedup keys.
OUTBOX_RELATIONS = (
    EVENTS_TABLE,
    *(event_table(n) for n in range(EVENT_TABLES)),
    "outbox_retry",
    "outbox_batches",
    "outbox_ticks",
    DEDUP_TABLE,
)

# The other sessions that hold, or wait for, a lock of one of :modes on an outbox
# table, as pid, table, mode, granted, application_name, seconds (its transaction's
# age). No query text: it may hold data or secrets.
LOCK_HOLDERS = """
SELECT l.pid, l.relation::regclass::text, l.mode, l.granted,
       coalesce(a.application_name, ''),
       extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))
FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a USING (pid)
WHERE l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation IN ({relations})
  AND l.mode = ANY(%(modes)s)
  AND l.pid <> pg_backend_pid()
ORDER BY l.granted DESC, 6 DESC NULLS LAST
LIMIT 5
""".replace("{relations}", ", ".join(f"to_regclass('{name}')" for name in OUTBOX_RELATIONS))

#: The lock modes that block the worker's claims and outcomes (SHARE and above).
BLOCKING_MODES = ["ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"]
#: Every table lock mode (what a migration's ACCESS EXCLUSIVE lock waits for).
ALL_MODES = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    *BLOCKING_MODES,
]


def lock_holders(conn: psycopg.Connection[Any], modes: Sequence[str] | None = None) -> str:
    """The other sessions holding (or waiting for) a lock of ``modes`` (by default
    those that block the worker) on the outbox tables, in one bounded line: pid,
    application name, lock mode, table, and how old its transaction is."""
    params = {"modes": list(modes if modes is not None else BLOCKING_MODES)}
    return describe(conn.execute(LOCK_HOLDERS, params))


def describe(rows: Iterable[Sequence[Any]]) -> str:
    """:data:`LOCK_HOLDERS`'s rows as one line."""
    sessions = [
        f"pid {pid} ({_printable(app) or 'no application_name'}) "
        f"{'holds' if granted else 'waits for'} {mode} on {relation} "
        f"for {float(age or 0):.0f}s"
        for pid, relation, mode, granted, app, age in rows
    ]
    if not sessions:
        return "the session that held the lock has let go since"
    return "; ".join(sessions)


def _printable(text: str, limit: int = 60) -> str:
    """``text`` with control characters escaped, at most ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."
