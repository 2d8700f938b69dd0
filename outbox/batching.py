"""Several events, one statement: collect them as you go, write them at the end.

``enqueue()`` costs one round trip per call. When one transaction records several
events in different places, collect them in a :class:`Batch` instead: each call
validates at once (a bad event raises where it is made, naming its field), and the
whole batch is written with one ``enqueue_many`` statement when the ``with`` block
ends without an exception.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from outbox.config import AnalyticsConfig, get_config
from outbox.enqueue import DistinctId, awrite, prepare_enqueue, write
from outbox.exceptions import OutboxValidationError
from outbox.validation import PreparedEvent

__all__ = ["Batch", "batch"]

# How the wrong-kind error names the two forms.
_SYNC = "`with outbox.batch(conn)`"
_ASYNC = "`async with outbox.batch(conn)`"


class Batch:
    """Events collected for one ``enqueue_many`` statement on ``conn``.

    Use :func:`batch` (``with``) for sync connections and ``async with batch(...)``
    for async ones. :meth:`enqueue` takes exactly what :func:`outbox.enqueue` takes
    (without ``conn``) and returns the uuid the event will have; :attr:`results`
    holds, after the block, each event's uuid or ``None`` (a duplicate dedup key,
    or analytics disabled). If the block raises, nothing is written.
    """

    def __init__(self, conn: Any, *, config: AnalyticsConfig | None = None) -> None:
        self.conn = conn
        self.config = config
        self._events: list[PreparedEvent] = []
        self._order: list[int | None] = []
        self.results: list[uuid_module.UUID | None] = []
        self._done = False
        self._uuids: set[uuid_module.UUID] = set()

    def enqueue(
        self,
        event: str,
        distinct_id: DistinctId | None,
        properties: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> uuid_module.UUID | None:
        """Validate one event now and hold it for the batch's statement."""
        if self._done:
            raise RuntimeError("this batch was already written; start a new one")
        cfg = self.config or get_config()
        prepared = prepare_enqueue(event, distinct_id, properties, config=cfg, **options)
        if prepared is None:  # analytics is disabled
            self._order.append(None)
            return None
        if prepared.uuid in self._uuids:
            # Two events of one batch with one uuid are a mistake (PostHog would keep
            # one of them): refuse it here, as enqueue_many does.
            raise OutboxValidationError(
                "uuid", f"{prepared.uuid} is already the uuid of an event in this batch"
            )
        self._uuids.add(prepared.uuid)
        self._order.append(len(self._events))
        self._events.append(prepared)
        return prepared.uuid

    def __len__(self) -> int:
        return len(self._events)

    def flush(self) -> list[uuid_module.UUID | None]:
        """Write the collected events now (one statement); returns :attr:`results`."""
        written = write(self.conn, self._events, call=_SYNC, instead=_ASYNC) if self._events else []
        return self._finish(written)

    async def aflush(self) -> list[uuid_module.UUID | None]:
        """The async twin of :meth:`flush`."""
        written = (
            await awrite(self.conn, self._events, call=_ASYNC, instead=_SYNC)
            if self._events
            else []
        )
        return self._finish(written)

    def _finish(self, written: list[uuid_module.UUID | None]) -> list[uuid_module.UUID | None]:
        self._done = True
        self.results = [None if i is None else written[i] for i in self._order]
        return self.results

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._done:
            self.flush()

    async def __aenter__(self) -> Batch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._done:
            await self.aflush()


def batch(conn: Any, *, config: AnalyticsConfig | None = None) -> Batch:
    """Collect events for ``conn`` and write them with one statement at the end of the
    ``with`` (or ``async with``) block. See :class:`Batch`."""
    return Batch(conn, config=config)
