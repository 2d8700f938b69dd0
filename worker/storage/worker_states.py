"""The worker-state rows (``outbox_worker_state``, see :mod:`worker.worker_state`)
as a part of a storage: :class:`StoredWorkerStates` implements
:class:`worker.storage.base.WorkerStates` over the storage's
:class:`worker.storage.connection.Connection` (``_db``) for its ``worker_id``."""

from __future__ import annotations

from typing import Any

import psycopg

from worker import worker_state
from worker.storage.connection import Connection, first_line


class StoredWorkerStates:
    """The :class:`worker.storage.base.WorkerStates` half of a storage; the class it is
    mixed into provides ``_db`` and ``worker_id``."""

    _db: Connection
    worker_id: str

    def write_worker_state(self, host: str, state: str, reason: str) -> None:
        """See :meth:`worker.storage.base.WorkerStates.write_worker_state`."""
        params = {"worker": self.worker_id, "host": host, "state": state, "reason": reason}
        self._state_statement(worker_state.WRITE, params)

    def delete_worker_state(self) -> None:
        """See :meth:`worker.storage.base.WorkerStates.delete_worker_state`."""
        self._state_statement(worker_state.DELETE, {"worker": self.worker_id})

    def expire_worker_states(self, older_than_seconds: float) -> int:
        """See :meth:`worker.storage.base.WorkerStates.expire_worker_states`."""
        params = {"older_than": float(older_than_seconds)}
        return self._state_statement(worker_state.EXPIRE, params)[1]

    def worker_states(self) -> list[dict[str, Any]]:
        """See :meth:`worker.storage.base.WorkerStates.worker_states`."""
        columns = ("worker", "host", "state", "reason", "updated_at", "age_seconds")
        rows = self._state_statement(worker_state.LIST, None)[0]
        return [dict(zip(columns, row, strict=True)) for row in rows]

    def _state_statement(self, query: str, params: dict[str, Any] | None) -> tuple[list[Any], int]:
        try:
            return self._db.run(query, params)
        except psycopg.Error as exc:  # no table (migration 0005), no grant
            raise worker_state.WorkerStateUnavailable(
                f"outbox_worker_state: {first_line(exc)}"
            ) from exc
