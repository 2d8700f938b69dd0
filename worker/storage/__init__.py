"""Where the worker's events live: the storage protocol and its engines.

:mod:`worker.storage.base` holds the protocols every engine implements and the
engine-neutral types the drainer and the commands see. Engines: the snapshot engine,
:class:`worker.storage.snapshot_storage.SnapshotStorage` (the worker's), and
:class:`worker.storage.memory.MemoryStorage` (in memory, for tests). One behaviour
suite, ``tests/storage``, runs against each.
"""

from worker.storage.base import (
    Backlog,
    Batch,
    BatchLostError,
    BatchOutcome,
    ClaimedEvent,
    ConnectionReset,
    DatabaseTimeout,
    DatabaseUnavailable,
    DrainStorage,
    Finished,
    Housekeeping,
    Inspection,
    LedgerRow,
    LockTimeout,
    Requeued,
    StatementTimeout,
    Storage,
    WorkerStates,
)

__all__ = [
    "Backlog",
    "Batch",
    "BatchLostError",
    "BatchOutcome",
    "ClaimedEvent",
    "ConnectionReset",
    "DatabaseTimeout",
    "DatabaseUnavailable",
    "DrainStorage",
    "Finished",
    "Housekeeping",
    "Inspection",
    "LedgerRow",
    "LockTimeout",
    "Requeued",
    "StatementTimeout",
    "Storage",
    "WorkerStates",
]
