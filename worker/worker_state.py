"""``outbox_worker_state``: each worker's own line on what it is doing, and why.

A worker writes its row (worker id, the PostHog host it sends to, never the key, a
state and a one-line reason) when its state changes and as a heartbeat from its
housekeeping connection, and deletes it when it stops cleanly. ``outbox-worker
status`` reads the rows. Writing is best effort: a database without the table
(migration 0005 not applied) or a role without the grant costs one warning, never
the worker's sending.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING

from outbox.exceptions import OutboxDatabaseError

if TYPE_CHECKING:
    from worker.storage.base import WorkerStates

log = logging.getLogger("outbox.worker")

#: A row not written for this long is shown as stale by ``status`` (heartbeats come
#: every 15 seconds from a running worker; ``run --until-empty`` writes once).
STALE_AFTER_SECONDS = 60.0
#: Rows not written for this long are deleted by the housekeeping of any worker.
EXPIRE_AFTER_SECONDS = 86400.0
#: Longest reason stored.
MAX_REASON = 500


class WorkerStateUnavailable(OutboxDatabaseError):
    """The table cannot be used: missing (migration 0005 not applied), or no grant."""


WRITE = """
INSERT INTO outbox_worker_state AS s (worker_id, host, state, reason, updated_at)
VALUES (%(worker)s, %(host)s, %(state)s, %(reason)s, now())
ON CONFLICT (worker_id) DO UPDATE
SET host = EXCLUDED.host, state = EXCLUDED.state, reason = EXCLUDED.reason,
    updated_at = EXCLUDED.updated_at
"""

DELETE = "DELETE FROM outbox_worker_state WHERE worker_id = %(worker)s"

EXPIRE = """
DELETE FROM outbox_worker_state
WHERE updated_at < now() - make_interval(secs => %(older_than)s)
"""


LIST = """
SELECT worker_id, host, state, reason, updated_at,
       extract(epoch FROM now() - updated_at)::float8
FROM outbox_worker_state
ORDER BY worker_id
"""


class WorkerStateReporter:
    """Writes one worker's row: on change (:meth:`report`) and as a heartbeat."""

    def __init__(self, store: WorkerStates, host: str) -> None:
        self.store = store
        self.host = host
        self._last: tuple[str, str] | None = None
        self._written: tuple[str, str] | None = None
        self._failing = False
        self._lock = threading.Lock()

    def report(self, state: str, reason: str, *, heartbeat: bool = False) -> None:
        """Record ``state`` and ``reason``; written at once if they changed (or for a
        heartbeat), else nothing is done."""
        reason = reason[:MAX_REASON]
        with self._lock:
            self._last = (state, reason)
            if not heartbeat and self._written == self._last:
                return
            try:
                self.store.write_worker_state(self.host, state, reason)
            except WorkerStateUnavailable as exc:
                self._written = None
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "cannot write this worker's state to outbox_worker_state (%s): "
                        "`outbox-worker status` will not list it. Run `outbox-worker "
                        "migrate`, and grant the worker's role SELECT, INSERT, UPDATE, "
                        "DELETE on outbox_worker_state",
                        exc,
                        extra={"action": "worker_state_unavailable"},
                    )
                return
            except OutboxDatabaseError:  # an outage: written again once it is over
                self._written = None
                return
            self._written = self._last
            self._failing = False

    def heartbeat(self) -> None:
        """Write the last state again, so ``updated_at`` says the worker is alive."""
        with self._lock:
            last = self._last
        if last is not None:
            self.report(*last, heartbeat=True)

    def remove(self) -> None:
        """Delete this worker's row (a clean stop)."""
        with contextlib.suppress(OutboxDatabaseError):  # a stale row expires by itself
            self.store.delete_worker_state()
        with self._lock:
            self._written = None

    def expire(self) -> int:
        """Delete the rows no worker has written for a day; returns how many."""
        try:
            return self.store.expire_worker_states(EXPIRE_AFTER_SECONDS)
        except OutboxDatabaseError:
            return 0
