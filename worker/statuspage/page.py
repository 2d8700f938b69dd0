"""What the status page shows, gathered from the worker and the database."""

from __future__ import annotations

import datetime
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from outbox.exceptions import OutboxError
from outbox.schema import STATUS_DEAD, STATUS_PENDING
from worker.statuspage.history import BacklogHistory, Sample
from worker.statuspage.privacy import Privacy
from worker.storage.base import Backlog, LedgerRow
from worker.terminal import has_control_characters

#: Error groups the page lists.
GROUP_LIMIT = 20
#: A group of at most this many rows gets a ``retry --id`` command naming each row.
RETRY_IDS_MAX = 50
#: Pending event names the page lists.
TOP_PENDING_LIMIT = 10
#: The days of the delivery ledger the page shows (today, UTC, included).
LEDGER_DAYS = 7
#: Seconds each of the page's statements may take (statement_timeout): six of them
#: (9 s) stay within the probe server's handler timeout (10 s).
STATUS_STATEMENT_TIMEOUT = 1.5
#: What a load of the page answers while another one is still reading the database:
#: one load at a time, so the page never takes both of the probe server's handler
#: threads from /readyz and /metrics.
BUSY_PAGE = (
    b'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>outbox status'
    b"</title></head><body><p>Another load of this page is still reading the database: "
    b"reload in a moment.</p></body></html>"
)


class PageStore(Protocol):
    """The store methods the page reads (each one statement)."""

    def backlog_capped(self, cap: int = ...) -> Backlog: ...
    def in_flight(self) -> list[dict[str, Any]]: ...
    def worker_states(self) -> list[dict[str, Any]]: ...
    def error_groups(self, limit: int = ..., ids: int = ...) -> list[dict[str, Any]]: ...
    def top_events(self, status: str, limit: int = ...) -> list[tuple[str, int]]: ...
    def ledger(self, since: datetime.date, event: str | None = ...) -> list[LedgerRow]: ...


class SinkSource(Protocol):
    """The drainer's view of the sink."""

    sink_state: str
    last_error: str | None

    def pause_remaining(self) -> float: ...


class KeySource(Protocol):
    """The API key gate."""

    state: str
    reason: str

    @property
    def enabled(self) -> bool: ...

    def allows_sending(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class SinkView:
    """The sink's state and why, and the API key's."""

    state: str
    last_error: str | None = None
    #: Seconds since the epoch until which sending is paused (None: not paused).
    paused_until: float | None = None
    key_state: str = "off"
    key_reason: str = ""
    key_allows_sending: bool = True


@dataclass(frozen=True, slots=True)
class Command:
    """A command an operator may run for a group, and what it does."""

    command: str
    note: str


@dataclass(frozen=True)
class PageData:
    """Everything one rendering of the page shows; a section the database could not
    give has its ``*_problem`` set instead."""

    generated_at: float
    worker_id: str
    sink: SinkView
    history: Sequence[Sample] = ()
    backlog: Backlog | None = None
    backlog_problem: str | None = None
    in_flight: Sequence[dict[str, Any]] = ()
    in_flight_problem: str | None = None
    workers: Sequence[dict[str, Any]] = ()
    workers_problem: str | None = None
    groups: Sequence[dict[str, Any]] = ()
    groups_problem: str | None = None
    top_pending: Sequence[tuple[str, int]] = ()
    top_pending_problem: str | None = None
    #: The delivery ledger's rows of the last :data:`LEDGER_DAYS` days.
    ledger: Sequence[LedgerRow] = ()
    ledger_problem: str | None = None
    privacy: Privacy = field(default_factory=Privacy)


def group_commands(group: dict[str, Any], dead_total: int | None) -> list[Command]:
    """The CLI commands that retry or purge a dead group (none for a retrying group:
    its events are pending and are tried again on their own).

    ``retry`` takes row ids, one event name or ``--all``; ``purge`` only an age. The
    narrowest exact choice is given, and the note says what else it touches."""
    if group["status"] != STATUS_DEAD:
        return []
    count = int(group["count"])
    ids = [int(i) for i in group.get("ids") or ()]
    name = group.get("name")
    commands: list[Command] = []
    if count <= len(ids):
        commands.append(
            Command(
                "outbox-worker retry " + " ".join(f"--id {i}" for i in ids),
                f"requeues exactly this group's {count} events",
            )
        )
    elif group.get("names") == 1 and isinstance(name, str) and not has_control_characters(name):
        others = int(group.get("dead_of_name") or count) - count
        note = f"requeues every dead {name!r} event: this group's {count}"
        commands.append(
            Command(
                f"outbox-worker retry --event {shlex.quote(name)}",
                note + (f" and {others} with other errors" if others > 0 else ""),
            )
        )
    else:
        total = f" ({dead_total} in all)" if dead_total is not None else ""
        commands.append(
            Command(
                "outbox-worker retry --all",
                f"this group has several event names and too many rows to name: "
                f"--all requeues every dead event{total}",
            )
        )
    age = int(float(group.get("last_age_seconds") or 0.0))
    commands.append(
        Command(
            f"outbox-worker purge --dead --older-than {age}s",
            "deletes this group's events (its newest was created "
            f"{age}s ago) and every other dead event at least as old; purge has no "
            "filter by error",
        )
    )
    return commands


class StatusPage:
    """Gathers :class:`PageData` for the worker's ``/status`` (each load reads the
    database afresh through ``store``, one statement per section)."""

    def __init__(
        self,
        store: PageStore,
        sink: SinkSource,
        key: KeySource,
        history: BacklogHistory,
        privacy: Privacy,
        *,
        worker_id: str,
        secrets: Sequence[str | None] = (),
        clock: Any = time.time,
    ) -> None:
        self.store = store
        self.sink = sink
        self.key = key
        self.history = history
        self.privacy = privacy
        self.worker_id = worker_id
        self.secrets = tuple(s for s in secrets if s)
        self.clock = clock
        self._one_at_a_time = threading.Lock()

    def sink_view(self, now: float) -> SinkView:
        """The drainer's and the key gate's state now."""
        remaining = self.sink.pause_remaining()
        return SinkView(
            state=self.sink.sink_state,
            last_error=self.sink.last_error,
            paused_until=now + remaining if remaining > 0 else None,
            key_state=self.key.state if self.key.enabled else "off",
            key_reason=self.key.reason,
            key_allows_sending=self.key.allows_sending(),
        )

    def gather(self) -> PageData:
        """Read everything the page shows; a section that fails says why."""
        now = float(self.clock())
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        since = today - datetime.timedelta(days=LEDGER_DAYS - 1)
        values: dict[str, Any] = {}
        for name, read in (
            ("backlog", self.store.backlog_capped),
            ("in_flight", self.store.in_flight),
            ("workers", self.store.worker_states),
            ("groups", lambda: self.store.error_groups(GROUP_LIMIT, RETRY_IDS_MAX)),
            ("top_pending", lambda: self.store.top_events(STATUS_PENDING, TOP_PENDING_LIMIT)),
            ("ledger", lambda: self.store.ledger(since)),
        ):
            try:
                values[name] = read()
            except OutboxError as exc:
                values[f"{name}_problem"] = str(exc) or type(exc).__name__
        return PageData(
            generated_at=now,
            worker_id=self.worker_id,
            sink=self.sink_view(now),
            history=self.history.samples(now),
            privacy=self.privacy,
            **values,
        )

    def html(self) -> bytes:
        """The page, rendered now (:data:`BUSY_PAGE` while another load runs)."""
        from worker.statuspage.render import render

        if not self._one_at_a_time.acquire(blocking=False):
            return BUSY_PAGE
        try:
            data = self.gather()
        finally:
            self._one_at_a_time.release()
        return render(data, self.secrets).encode("utf-8")
