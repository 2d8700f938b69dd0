"""Ship a test's committed events to a :class:`CaptureServer` with the real worker.

For tests whose code under test commits (Django's ``TransactionTestCase``, or any test
that does not roll back): :func:`deliver` runs the worker's own drain in this process,
as ``outbox-worker run --until-empty`` does, again and again until no pending event is
left in the outbox, and returns what the server accepted meanwhile. It waits for
events the worker had to retry or defer, up to a deadline, and fails with
:class:`NotDeliveredError` saying what is left, and why, instead of hanging or
returning a partial list.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from outbox.exceptions import OutboxDatabaseError, OutboxNotInstalledError, OutboxValidationError
from worker.app import Worker
from worker.database import libpq_url
from worker.keycheck import KEY_UNREACHABLE, ApiKeyNotVerifiedError
from worker.settings import Settings

from .capture_server import CaptureServer

__all__ = ["DEFAULT_TIMEOUT", "NotDeliveredError", "deliver"]

#: How long :func:`deliver` keeps trying by default (seconds).
DEFAULT_TIMEOUT: Final = 10.0
#: The worker id the helper's workers report in ``outbox_worker_state`` while they run.
WORKER_ID: Final = "outbox-testing-deliver"
# Between two drains that shipped nothing, wait at least this long (seconds), and at
# most until the first pending event is due again.
_MIN_WAIT = 0.01
_MAX_SHOWN = 5
_MAX_TEXT = 200

# Over the view outbox_events (every undelivered event): next_attempt_at is NULL for
# an event never tried, which is due at once; retries, deferred and dead events are
# the rows of outbox_retry (their id is retry_id).
_PENDING = """
SELECT count(*) AS n,
       greatest(0, extract(epoch FROM min(next_attempt_at) - now())) AS due_in,
       (SELECT last_error FROM outbox_events
         WHERE status = 'pending' AND last_error IS NOT NULL
         ORDER BY next_attempt_at DESC LIMIT 1) AS last_error
FROM outbox_events WHERE status = 'pending'"""
_DEAD = (
    "SELECT retry_id, event, uuid, last_error FROM outbox_events"
    " WHERE status = 'dead' ORDER BY retry_id"
)


class NotDeliveredError(AssertionError):
    """:func:`deliver` could not ship every committed event to the capture server.

    The message says how many events are left and the worker's last error for them
    (or which events went dead, or that the key did not verify). ``events`` holds what
    the server accepted before the helper gave up.
    """

    def __init__(self, message: str, events: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.events = events


@dataclass(frozen=True)
class _Outbox:
    pending: int
    due_in: float
    last_error: str | None
    dead: dict[int, str]


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= _MAX_TEXT else shown[: _MAX_TEXT - 3] + "..."


def _look(url: str) -> _Outbox:
    try:
        with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
            pending = conn.execute(_PENDING).fetchone()
            assert pending is not None
            dead = {
                int(row[0]): f"{row[1]!r} {row[2]} ({_short(row[3])})"
                for row in conn.execute(_DEAD).fetchall()
            }
    except psycopg.errors.UndefinedTable as exc:
        raise OutboxNotInstalledError() from exc
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OutboxDatabaseError(f"deliver could not read the outbox: {first}") from exc
    return _Outbox(int(pending[0]), float(pending[1] or 0.0), pending[2], dead)


def deliver(
    database_url: str,
    server: CaptureServer,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    api_key: str = "phc_test",
    **settings: Any,
) -> list[dict[str, Any]]:
    """Ship every committed pending event of ``database_url`` to ``server``; return
    the events the server accepted during the call, in arrival order.

    The worker is the real one (its key check at ``/flags/`` included, which a
    :class:`CaptureServer` answers), built from
    :class:`~worker.settings.Settings` with the server as ``posthog_host``, ``api_key``
    as the key, immediate retries (``backoff_base=0``) and no LISTEN; ``settings``
    overrides any of them by field name (``gzip=False``, ``batch_size=10``...).
    Events still uncommitted are not seen (that is what :mod:`outbox.testing` is for).

    Raises :class:`NotDeliveredError` when, after ``timeout`` seconds, events are still
    pending (the message gives the worker's last error for them), at once when an
    event went dead during the call, or when the server does not verify the key;
    :class:`~outbox.exceptions.OutboxNotInstalledError` when the outbox tables are
    missing, and :class:`~outbox.exceptions.OutboxDatabaseError` when the database
    cannot be used.
    """
    if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise OutboxValidationError("timeout", f"must be a number of seconds > 0, got {timeout!r}")
    url = libpq_url(database_url)
    options: dict[str, Any] = {
        "database_url": url,
        "posthog_api_key": api_key,
        "posthog_host": server.url,
        "notify": False,
        "backoff_base": 0.0,
        "backoff_max": 0.05,
        "request_timeout": min(5.0, float(timeout)),
        "worker_id": WORKER_ID,
    }
    options.update(settings)
    built = Settings(**options)
    deadline = time.monotonic() + timeout
    first = len(server.events)
    dead_before = _look(url).dead
    pause = threading.Event()

    def accepted() -> list[dict[str, Any]]:
        return server.events[first:]

    while True:
        try:
            stats = Worker(built).run_until_empty()
        except ApiKeyNotVerifiedError as exc:
            what = (
                "could not be asked to verify the API key"
                if exc.state == KEY_UNREACHABLE
                else "did not verify the API key"
            )
            raise NotDeliveredError(
                f"the capture server at {server.url} {what} "
                f"({exc.state}: {_short(str(exc))}); nothing was sent",
                accepted(),
            ) from exc
        outbox = _look(url)
        died = [text for key, text in outbox.dead.items() if key not in dead_before]
        if died:
            shown = "; ".join(died[:_MAX_SHOWN]) + (" ..." if len(died) > _MAX_SHOWN else "")
            raise NotDeliveredError(
                f"{len(died)} event(s) went dead instead of being delivered: {shown}",
                accepted(),
            )
        if outbox.pending == 0:
            return accepted()
        left = deadline - time.monotonic()
        if left <= 0:
            why = _short(outbox.last_error) if outbox.last_error else "no error recorded"
            raise NotDeliveredError(
                f"{outbox.pending} event(s) still pending after {timeout:g}s; the worker's "
                f"last error for them: {why}",
                accepted(),
            )
        if stats.shipped == 0:
            pause.wait(min(left, max(_MIN_WAIT, outbox.due_in)))
