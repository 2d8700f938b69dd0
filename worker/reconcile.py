"""``outbox-worker reconcile``: the delivery ledger against what PostHog counted.

The worker's ledger (``outbox_ledger``, :meth:`~worker.storage.base.Inspection.ledger`)
counts, per UTC day of the event's timestamp and event name, the events PostHog
answered 2xx for. PostHog can still drop an accepted event (a well-formed key of no
project, a billing quota: both answered 200), so this command asks PostHog what it
counted for the same days and events, through its query API, and prints both side by
side::

    POST {app_host}/api/projects/{project_id}/query/
    Authorization: Bearer <personal API key, scope query:read>
    {"query": {"kind": "HogQLQuery", "query": "SELECT event, toDate(...) AS day, count() ..."}}

What the query is, and why (read in PostHog's code, posthog/hogql and posthog/api):

- ``toDate(toTimeZone(timestamp, 'UTC'))``: HogQL shows ``timestamp`` in the project's
  time zone, so a bare ``toDate(timestamp)`` would count a project in New York by New
  York days; the ledger counts UTC days.
- ``timestamp >= toDateTime('...Z') AND timestamp < toDateTime('...Z')``: the bounds are
  instants written in UTC (HogQL's ``toDateTime`` parses text best-effort, the ``Z``
  fixes the zone), so ClickHouse can skip the partitions outside the period.
- ``LIMIT 50000``: without a LIMIT the API returns 100 rows at most; with one, up to
  50,000 (``MAX_SELECT_RETURNED_ROWS``). A cut answer (``hasMore``, or as many rows as
  the limit) is refused, never compared.
- ``count() AS total``: not ``AS events``, the table's name, which ClickHouse could read
  as the alias in ``events.event``.
- Event names are HogQL string literals, escaped as PostHog's ``escape_hogql_string``
  does (backslash escapes for ``\\``, ``'`` and the control characters).

The answer is ``{"columns": [...], "results": [[event, "YYYY-MM-DD", count], ...]}``.
PostHog limits HogQL queries through the API (``HogQLQueryThrottle``: 120 an hour per
personal key by default; 429 with ``Retry-After``); one run of this command is one query.
401 is a personal key PostHog does not know, 403 one without the ``query:read`` scope
or without access to the project, 404 a project id (or app host) that is not PostHog's.

This module keeps the protocol (:func:`hogql_string`, :func:`count_query`,
:func:`interpret`) apart from the I/O (:func:`fetch_counts`) and from the comparison
(:func:`compare`), which the command (:func:`reconcile`) puts together.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import requests
import urllib3

from outbox.exceptions import OutboxError
from worker.settings import Settings, SettingsError
from worker.sinks.base import clean_text, error_detail
from worker.terminal import json_terminal_safe, printable

#: The ledger's destination for events shipped to PostHog (the others are metrics-only).
POSTHOG_DESTINATION = "posthog"
#: Most rows the query API returns for a query with its own LIMIT (PostHog's
#: ``MAX_SELECT_RETURNED_ROWS``); one row is one (day, event).
MAX_ROWS = 50_000
#: Most bytes of PostHog's answer read (50,000 rows are about 5 MB of JSON).
MAX_ANSWER_BYTES = 32 * 1024 * 1024
#: Longest wait to connect (the read timeout is OUTBOX_REQUEST_TIMEOUT).
CONNECT_TIMEOUT = 5.0
#: The name the query carries in PostHog's query log.
QUERY_NAME = "posthog-outbox reconcile"
#: Exit status when PostHog could not be asked (network, HTTP error, unusable answer).
EXIT_POSTHOG_FAILED = 3
#: Exit status when a difference passes the threshold.
EXIT_OVER_THRESHOLD = 1
#: Width of the notes under the table.
NOTE_WIDTH = 88
#: The longest event name shown in a table cell.
EVENT_COLUMN_LIMIT = 80

_HOGQL_ESCAPES = {
    "\b": "\\b",
    "\f": "\\f",
    "\r": "\\r",
    "\n": "\\n",
    "\t": "\\t",
    "\0": "\\0",
    "\a": "\\a",
    "\v": "\\v",
    "\\": "\\\\",
    "'": "\\'",
}


class ReconcileError(OutboxError):
    """PostHog could not be asked what it counted; the message says what failed.

    One line, the personal API key never in it. ``exit_status`` is 3.
    """

    exit_status = EXIT_POSTHOG_FAILED


class LedgerRowLike(Protocol):
    """What :func:`compare` reads of a ledger row (:class:`worker.storage.base.LedgerRow`)."""

    @property
    def day(self) -> dt.date: ...
    @property
    def event(self) -> str: ...
    @property
    def destination(self) -> str: ...
    @property
    def delivered(self) -> int: ...
    @property
    def dead(self) -> int: ...


class LedgerSource(Protocol):
    """Where the command reads the ledger (a storage engine's :class:`Inspection`)."""

    def ledger(self, since: dt.date, event: str | None = None) -> Sequence[Any]: ...


# -- the protocol (no I/O) --------------------------------------------------------------


def hogql_string(text: str) -> str:
    """``text`` as a HogQL string literal, escaped as PostHog's ``escape_hogql_string``."""
    return "'" + "".join(_HOGQL_ESCAPES.get(c, c) for c in text) + "'"


def _instant(day: dt.date) -> str:
    return f"toDateTime({hogql_string(day.isoformat() + 'T00:00:00Z')})"


def count_query(start: dt.date, end: dt.date, events: Sequence[str] | None = None) -> str:
    """The HogQL query: events per (event, UTC day) with a timestamp from ``start``
    (its first instant, UTC) to before ``end``, of the ``events`` named (all if None)."""
    where = [f"timestamp >= {_instant(start)}", f"timestamp < {_instant(end)}"]
    if events is not None:
        where.append(f"event IN ({', '.join(hogql_string(e) for e in events)})")
    return (
        "SELECT event, toDate(toTimeZone(timestamp, 'UTC')) AS day, count() AS total "
        f"FROM events WHERE {' AND '.join(where)} "
        f"GROUP BY event, day ORDER BY day, event LIMIT {MAX_ROWS}"
    )


def query_url(app_host: str, project_id: int) -> str:
    """Where the query goes: the project's query endpoint on the app host."""
    return f"{app_host.rstrip('/')}/api/projects/{project_id}/query/"


def query_body(query: str) -> bytes:
    """The request body: a ``HogQLQuery`` with the command's name for PostHog's query log."""
    document = {"query": {"kind": "HogQLQuery", "query": query}, "name": QUERY_NAME}
    return json.dumps(document).encode()


def _detail(body: bytes, secrets: Sequence[str | None]) -> str:
    """PostHog's explanation (:func:`~worker.sinks.base.error_detail`), cleaned."""
    text = " ".join(error_detail(body).split())
    return clean_text(text, secrets, 300) or "(empty answer)"


def interpret(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    where: str,
    project_id: int,
    secrets: Sequence[str | None] = (),
) -> dict[tuple[dt.date, str], int]:
    """PostHog's answer read: the count per (UTC day, event), or :class:`ReconcileError`
    saying what went wrong. ``where`` names the endpoint in errors (no secret in it)."""
    if status == 200:
        return _counts(body, where)
    detail = _detail(body, secrets)
    if status == 202:
        raise ReconcileError(
            f"PostHog at {where} did not finish the query and answered 202 (queued); "
            "run reconcile again later, or for fewer days (--since)"
        )
    if 300 <= status < 400:
        location = clean_text(headers.get("Location", ""), secrets, 200)
        raise ReconcileError(
            f"PostHog at {where} answered {status}, a redirect to {location or '(nowhere)'}; "
            "set OUTBOX_POSTHOG_APP_HOST to the app host it names"
        )
    if status == 401:
        raise ReconcileError(
            f"PostHog at {where} did not accept OUTBOX_POSTHOG_PERSONAL_API_KEY (401: {detail}); "
            "it needs a personal API key (phx_...) of this PostHog instance and region"
        )
    if status == 403:
        raise ReconcileError(
            f"PostHog at {where} refused the query (403: {detail}); the personal API key "
            f"needs the query:read scope and access to project {project_id}"
        )
    if status == 404:
        raise ReconcileError(
            f"PostHog at {where} has no project {project_id} (404: {detail}); check "
            "OUTBOX_POSTHOG_PROJECT_ID and OUTBOX_POSTHOG_APP_HOST (the app host, such as "
            "https://us.posthog.com, not the ingestion host)"
        )
    if status == 429:
        retry = clean_text(headers.get("Retry-After", ""), secrets, 40)
        after = f"; try again in {retry} s" if retry else ""
        raise ReconcileError(
            f"PostHog at {where} is rate-limiting queries (429: {detail}){after}; its API "
            "allows 120 HogQL queries an hour per personal API key by default"
        )
    if status == 400:
        raise ReconcileError(f"PostHog at {where} refused the query (400: {detail})")
    raise ReconcileError(f"PostHog at {where} answered {status}: {detail}")


def _counts(body: bytes, where: str) -> dict[tuple[dt.date, str], int]:
    def bad(why: str) -> ReconcileError:
        return ReconcileError(f"PostHog at {where} answered 200, but {why}")

    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return _raise(bad("not with JSON"))
    if not isinstance(document, dict):
        return _raise(bad("not with a JSON object"))
    if isinstance(document.get("query_status"), dict) and not document.get("results"):
        return _raise(bad("with the status of a query still running, not its results"))
    results = document.get("results")
    if not isinstance(results, list):
        return _raise(bad("with no 'results' list"))
    columns = document.get("columns")
    if columns is not None and columns != ["event", "day", "total"]:
        shown = clean_text(json.dumps(columns)[:200], (), 200)
        return _raise(bad(f"with the columns {shown}, not event, day, total"))
    if document.get("hasMore") or len(results) >= MAX_ROWS:
        return _raise(
            bad(f"cut at {len(results)} rows; ask for fewer days (--since) or one --event")
        )
    counts: dict[tuple[dt.date, str], int] = {}
    for row in results:
        if not (isinstance(row, list) and len(row) == 3):
            return _raise(bad("with a row that is not [event, day, count]"))
        event, day, count = row
        if not isinstance(event, str) or not isinstance(day, str):
            return _raise(bad("with a row whose event or day is not text"))
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return _raise(bad("with a row whose count is not a whole number"))
        try:
            parsed = dt.date.fromisoformat(day[:10])
        except ValueError:
            return _raise(bad(f"with a day that is not a date: {clean_text(day, (), 40)}"))
        counts[(parsed, event)] = counts.get((parsed, event), 0) + count
    return counts


def _raise(exc: ReconcileError) -> dict[tuple[dt.date, str], int]:
    raise exc


# -- the I/O ----------------------------------------------------------------------------


def _public(url: str) -> str:
    from worker.keycheck import public_host

    return public_host(url)


def fetch_counts(
    settings: Settings, start: dt.date, end: dt.date, events: Sequence[str] | None
) -> dict[tuple[dt.date, str], int]:
    """Ask PostHog (``settings.app_host``, the project and personal key of ``settings``)
    for the count per (UTC day, event) from ``start`` to before ``end``."""
    from worker.sinks.posthog import USER_AGENT

    key, project_id = require(settings)
    url = query_url(settings.app_host, project_id)
    where = _public(url)
    secrets = (key,)
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    try:
        with requests.post(
            url,
            data=query_body(count_query(start, end, events)),
            headers=headers,
            timeout=(CONNECT_TIMEOUT, settings.request_timeout),
            allow_redirects=False,
            stream=True,
        ) as response:
            body = response.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
            status, answer_headers = response.status_code, response.headers
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        # urllib3's own errors (a read timeout, a cut connection) come from reading the body.
        reason = clean_text(" ".join(str(exc).split()), secrets, 300)
        raise ReconcileError(
            f"could not ask PostHog at {where}: {type(exc).__name__}: {reason}"
        ) from None
    if len(body) > MAX_ANSWER_BYTES:
        raise ReconcileError(f"PostHog at {where} answered more than {MAX_ANSWER_BYTES} bytes")
    return interpret(
        status, body, answer_headers, where=where, project_id=project_id, secrets=secrets
    )


# -- the comparison ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Threshold:
    """When a difference counts: over ``absolute`` events and over ``percent`` of the
    delivered ones (each only if given; neither: any difference counts)."""

    absolute: int | None = None
    percent: float | None = None

    def passed_by(self, difference: int, delivered: int) -> bool:
        """Whether ``difference`` (for ``delivered`` events) passes this threshold."""
        size = abs(difference)
        if self.absolute is None and self.percent is None:
            return size > 0
        over = True
        if self.absolute is not None:
            over = over and size > self.absolute
        if self.percent is not None:
            over = over and (size * 100 > self.percent * delivered if delivered else size > 0)
        return over

    def describe(self) -> str:
        """The threshold in words."""
        parts = []
        if self.absolute is not None:
            parts.append(f"more than {self.absolute} event{'' if self.absolute == 1 else 's'}")
        if self.percent is not None:
            parts.append(f"more than {self.percent:g}% of the delivered ones")
        return " and ".join(parts) if parts else "any difference"


@dataclass(frozen=True, slots=True)
class Line:
    """One (UTC day, event): delivered by the outbox, counted by PostHog."""

    day: dt.date
    event: str
    delivered: int
    posthog: int
    over: bool
    today: bool

    @property
    def difference(self) -> int:
        """Counted by PostHog minus delivered by the outbox."""
        return self.posthog - self.delivered


@dataclass(frozen=True, slots=True)
class Report:
    """What ``reconcile`` found for a period."""

    since: dt.date
    #: The last UTC day of the period.
    until: dt.date
    today: dt.date
    threshold: Threshold
    lines: tuple[Line, ...]
    #: (event, delivered) of the metrics-only events in the period: never sent to PostHog.
    metrics_only: tuple[tuple[str, int], ...]
    #: Events that went dead in the period (never delivered).
    dead: int
    #: Whether PostHog was asked (no delivered event in the ledger: nothing to ask).
    asked: bool

    @property
    def over(self) -> tuple[Line, ...]:
        """The lines whose difference passes the threshold."""
        return tuple(line for line in self.lines if line.over)


def compare(
    rows: Iterable[LedgerRowLike],
    counts: Mapping[tuple[dt.date, str], int],
    *,
    since: dt.date,
    until: dt.date,
    today: dt.date,
    threshold: Threshold,
    asked: bool = True,
) -> Report:
    """Put the ledger's rows (from ``since``) beside PostHog's counts, one line per
    (day, event) either side has, ordered by day and event."""
    delivered: dict[tuple[dt.date, str], int] = defaultdict(int)
    metrics: dict[str, int] = defaultdict(int)
    dead = 0
    for row in rows:
        if row.day < since:
            continue
        dead += row.dead
        if row.destination == POSTHOG_DESTINATION:
            delivered[(row.day, row.event)] += row.delivered
        else:
            metrics[row.event] += row.delivered
    lines = []
    for key in sorted(set(delivered) | set(counts)):
        day, event = key
        sent, counted = delivered.get(key, 0), counts.get(key, 0)
        lines.append(
            Line(
                day,
                event,
                sent,
                counted,
                threshold.passed_by(counted - sent, sent),
                day >= today,
            )
        )
    return Report(
        since=since,
        until=until,
        today=today,
        threshold=threshold,
        lines=tuple(lines),
        metrics_only=tuple(sorted(metrics.items())),
        dead=dead,
        asked=asked,
    )


# -- output -----------------------------------------------------------------------------

NOTE_DIFFERENCE = (
    "difference = counted by PostHog - delivered by the outbox. Negative: PostHog holds "
    "fewer events than it accepted from the outbox: it dropped them after answering 200 "
    "(a project API key of no project, a billing quota), or is still ingesting them. "
    "Positive: PostHog holds more: events sent again after a lost answer that PostHog "
    "has not merged yet (it removes copies of one uuid in the background, so a positive "
    "difference of re-sent duplicates shrinks by itself), or the same event name sent "
    "by another producer."
)
NOTE_METRICS_ONLY = (
    "Not compared: metrics-only events go to Prometheus, never to PostHog: {events}."
)


def _today_note(today: dt.date) -> str:
    return (
        f"Today ({today.isoformat()}, UTC) is still moving: PostHog ingests with a lag, so "
        "its count for today can still grow, and the outbox is still delivering."
    )


def report_json(report: Report) -> dict[str, Any]:
    """The report as a JSON-ready dict (``--json``)."""
    return {
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "today": report.today.isoformat(),
        "threshold": {
            "absolute": report.threshold.absolute,
            "percent": report.threshold.percent,
            "described": report.threshold.describe(),
        },
        "asked_posthog": report.asked,
        "rows": [
            {
                "day": line.day.isoformat(),
                "event": line.event,
                "delivered": line.delivered,
                "posthog": line.posthog,
                "difference": line.difference,
                "over_threshold": line.over,
                "still_moving": line.today,
            }
            for line in report.lines
        ],
        "over_threshold": len(report.over),
        "metrics_only": [{"event": e, "delivered": n} for e, n in report.metrics_only],
        "dead": report.dead,
        "notes": _notes(report),
    }


def _notes(report: Report) -> list[str]:
    notes = [NOTE_DIFFERENCE]
    if any(line.today for line in report.lines) or report.until >= report.today:
        notes.append(_today_note(report.today))
    if report.metrics_only:
        shown = ", ".join(f"{e} ({n})" for e, n in report.metrics_only)
        notes.append(NOTE_METRICS_ONLY.format(events=shown))
    if report.dead:
        notes.append(
            f"{report.dead} events went dead in the period: PostHog never accepted them, "
            "so they are not counted as delivered (outbox-worker ledger, outbox-worker dead)."
        )
    return notes


def render_text(report: Report, *, project: str) -> list[str]:
    """The report as lines for a terminal (every event name escaped and bounded)."""
    out = [
        f"reconcile: the outbox's ledger against PostHog {project}, UTC days "
        f"{report.since.isoformat()} to {report.until.isoformat()}"
    ]
    if not report.asked:
        out.append(
            "The ledger holds no event delivered to PostHog in the period: nothing to compare."
        )
    elif not report.lines:
        out.append("Neither the ledger nor PostHog has an event in the period.")
    else:
        headers = ("day", "event", "delivered", "posthog", "difference", "")
        rows = [
            (
                line.day.isoformat(),
                printable(line.event, EVENT_COLUMN_LIMIT),
                str(line.delivered),
                str(line.posthog),
                f"{line.difference:+d}" if line.difference else "0",
                ", ".join(
                    part
                    for part, on in (("over threshold", line.over), ("still moving", line.today))
                    if on
                ),
            )
            for line in report.lines
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        right = {2, 3, 4}

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out.append(fmt(headers))
        out.extend(fmt(r) for r in rows)
    for note in _notes(report):
        out.append("")
        out.extend(textwrap.wrap(note, NOTE_WIDTH, break_on_hyphens=False))
    over = report.over
    out.append("")
    if over:
        out.append(
            f"{len(over)} of {len(report.lines)} rows pass the threshold (a difference of "
            f"{report.threshold.describe()}): exit status {EXIT_OVER_THRESHOLD}."
        )
    else:
        out.append(f"Every row is within the threshold ({report.threshold.describe()}).")
    return out


# -- the command ------------------------------------------------------------------------


def require(settings: Settings) -> tuple[str, int]:
    """The personal key and project id, or :class:`SettingsError` naming the missing one."""
    key, project_id = settings.posthog_personal_api_key, settings.posthog_project_id
    if not key:
        raise SettingsError(
            "reconcile needs OUTBOX_POSTHOG_PERSONAL_API_KEY: a PostHog personal API key "
            "(phx_...) with the query:read scope, from your PostHog user settings",
            setting="OUTBOX_POSTHOG_PERSONAL_API_KEY",
        )
    if project_id is None:
        raise SettingsError(
            "reconcile needs OUTBOX_POSTHOG_PROJECT_ID: the id of your PostHog project, "
            "in its settings",
            setting="OUTBOX_POSTHOG_PROJECT_ID",
        )
    return key, project_id


def run_reconcile(
    settings: Settings,
    ledger: LedgerSource,
    *,
    since: dt.date,
    today: dt.date,
    event: str | None,
    threshold: Threshold,
) -> Report:
    """Read the ledger from ``since``, ask PostHog for the same days and events, compare."""
    require(settings)
    rows = list(ledger.ledger(since, event))
    last = max([today, *(row.day for row in rows)])
    end = last + dt.timedelta(days=1)
    if event is not None:
        names: list[str] | None = [event]
    else:
        names = sorted(
            {r.event for r in rows if r.destination == POSTHOG_DESTINATION and r.delivered}
        )
    if not names:
        return compare(
            rows, {}, since=since, until=last, today=today, threshold=threshold, asked=False
        )
    counts = fetch_counts(settings, since, end, names)
    return compare(rows, counts, since=since, until=last, today=today, threshold=threshold)


def reconcile(
    settings: Settings,
    *,
    since: dt.date,
    event: str | None,
    threshold: int | None,
    threshold_percent: float | None,
    as_json: bool,
) -> int:
    """``outbox-worker reconcile``: print the comparison from the UTC day ``since``;
    0 within the threshold, 1 past it.

    Raises :class:`SettingsError` (exit 2) for a missing setting, and
    :class:`ReconcileError` (exit 3) when PostHog could not be asked.
    """
    today = dt.datetime.now(dt.UTC).date()
    if since > today:
        raise SettingsError(
            f"--since={since.isoformat()} is after today ({today.isoformat()}, UTC)",
            setting="--since",
        )
    _, project_id = require(settings)
    from worker.commands import STATUS_STATEMENT_TIMEOUT, _store

    store = _store(settings, statement_timeout=STATUS_STATEMENT_TIMEOUT)
    try:
        report = run_reconcile(
            settings,
            store,
            since=since,
            today=today,
            event=event,
            threshold=Threshold(threshold, threshold_percent),
        )
    finally:
        store.close()
    if as_json:
        document = report_json(report)
        document["project_id"] = project_id
        document["app_host"] = _public(settings.app_host)
        print(json_terminal_safe(json.dumps(document, indent=2)))
    else:
        project = f"project {project_id} at {_public(settings.app_host)}"
        for line in render_text(report, project=project):
            print(line)
    return EXIT_OVER_THRESHOLD if report.over else 0
