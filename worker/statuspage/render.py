"""The status page as one self-contained HTML document.

Inline CSS, charts drawn here as inline SVG, no script, no link to anything outside
the page: it works offline and behind any firewall. Every piece of text that comes
from event data, the database, a server's answer or an error goes through
:func:`text`: secrets masked (:func:`~worker.redaction.redact`), control characters
escaped and the length bounded (:func:`~worker.terminal.printable`), then
HTML-escaped. Nothing else reaches the page unescaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from worker.drain import (
    SINK_BACKING_OFF,
    SINK_OK,
    SINK_RATE_LIMITED,
    SINK_REDIRECTED,
    SINK_REQUEST_REJECTED,
    SINK_UNAUTHORIZED,
)
from worker.redaction import MASK, redact
from worker.statuspage.history import HISTORY_SECONDS, Sample
from worker.statuspage.page import LEDGER_DAYS, PageData, group_commands
from worker.terminal import age, printable

#: Longest error text shown (the store groups by its first 200 characters).
ERROR_LIMIT = 300
#: Longest name (event, worker, property) shown.
NAME_LIMIT = 200
#: Rows of the ledger's table shown (each a day, event and destination), newest first.
LEDGER_ROWS = 50

SINK_MEANINGS = {
    SINK_OK: "sending normally",
    SINK_BACKING_OFF: "the last send failed (network, timeout or a 5xx answer); "
    "its events are retried with backoff",
    SINK_RATE_LIMITED: "PostHog answered 429: sending is paused",
    SINK_UNAUTHORIZED: "capture refused the API key (401/403): nothing is sent until "
    "the key is fixed; the worker tries again after a pause",
    SINK_REDIRECTED: "capture answered with a redirect, which is never followed: "
    "check POSTHOG_HOST",
    SINK_REQUEST_REJECTED: "capture refuses the worker's requests as such (a 400 about "
    "the request): events are held, not buried",
}
KEY_MEANINGS = {
    "verified": "PostHog resolved the key to a project",
    "unchecked": "not verified yet: nothing is sent until it is",
    "rejected": "PostHog does not know this key: nothing is sent",
    "unverifiable": "the host does not serve PostHog's flags endpoint: nothing is sent "
    "(OUTBOX_VERIFY_API_KEY=0 turns the check off)",
    "unreachable": "the check could not be made; it is tried again",
    "off": "not checked",
}
SERIES = (
    ("pending", "#2563eb"),
    ("due", "#16a34a"),
    ("retrying", "#d97706"),
    ("dead", "#dc2626"),
)
AGE_COLOUR = "#7c3aed"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2937;
background:#f3f4f6}
header{background:#111827;color:#f9fafb;padding:12px 24px}
header h1{font-size:18px;margin:0}header p{margin:2px 0 0;color:#9ca3af;font-size:12px}
main{padding:16px 24px;display:grid;gap:16px;max-width:1200px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:12px 16px}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #f3f4f6;vertical-align:top}
th{font-weight:600;color:#4b5563;font-size:12px}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:8px}
.card{border:1px solid #e5e7eb;border-radius:6px;padding:6px 12px;min-width:110px}
.card b{display:block;font-size:20px}.card span{color:#6b7280;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.state{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600}
.good{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}
.warn{background:#fef3c7;color:#92400e}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;
word-break:break-all}
code{background:#f3f4f6;padding:1px 4px;border-radius:3px}
.muted{color:#6b7280}.legend span{margin-right:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
ul.cmds{margin:4px 0;padding-left:18px}
"""


#: A text that ends in this many or more leading characters of a secret is taken to
#: have been cut inside it (the store keeps the first 200 characters of an error).
CUT_SECRET_MIN = 4


def _mask_cut_secret(raw: str, secrets: Sequence[str]) -> str:
    """``raw`` with a secret cut short at its end (``... key phc_AB``) masked."""
    for secret in secrets:
        for length in range(min(len(secret) - 1, len(raw)), CUT_SECRET_MIN - 1, -1):
            if raw.endswith(secret[:length]):
                return raw[: len(raw) - length] + MASK
    return raw


def text(value: object, secrets: Sequence[str], limit: int | None = NAME_LIMIT) -> str:
    """``value`` safe for the page: secrets masked (one cut short at the end of the
    text too), control characters escaped, at most ``limit`` characters, HTML-escaped
    (quotes too)."""
    raw = "" if value is None else str(value)
    masked = _mask_cut_secret(redact(raw, secrets), secrets)
    return html.escape(printable(masked, limit), quote=True)


def _time(at: float | None) -> str:
    if at is None or not math.isfinite(at):
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _stamp(value: object) -> str:
    """An ISO 8601 UTC text from the store, to the second (other text as it is)."""
    shown = "" if value is None else str(value)
    if len(shown) >= 19 and shown[10] == "T" and shown.endswith("+00:00"):
        return shown[:10] + " " + shown[11:19] + " UTC"
    return shown


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def _nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def chart(
    samples: Sequence[Sample],
    series: Sequence[tuple[str, str]],
    now: float,
    *,
    title: str,
    unit: str = "",
    width: int = 540,
    height: int = 170,
) -> str:
    """An SVG line chart of the ``series`` (attribute name, colour) over the last
    hour, drawn from ``samples``; a single sample is a dot."""
    left, right, top, bottom = 56, 8, 8, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    start = now - HISTORY_SECONDS
    values = [float(getattr(s, name)) for s in samples for name, _ in series]
    peak = _nice_max(max(values, default=0.0))

    def x(at: float) -> float:
        return left + plot_w * min(max((at - start) / HISTORY_SECONDS, 0.0), 1.0)

    def y(value: float) -> float:
        return top + plot_h * (1 - min(max(value / peak, 0.0), 1.0))

    label = age(peak) if unit == "age" else f"{peak:g}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#e5e7eb"/>',
    ]
    for fraction in (0.25, 0.5, 0.75):
        gy = top + plot_h * fraction
        parts.append(
            f'<line x1="{left}" y1="{gy:.1f}" x2="{left + plot_w}" y2="{gy:.1f}" stroke="#eeeeee"/>'
        )
    parts += [
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end" font-size="11" '
        f'fill="#6b7280">{label}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11" '
        'fill="#6b7280">0</text>',
        f'<text x="{left}" y="{height - 6}" font-size="11" fill="#6b7280">-60 min</text>',
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" '
        'font-size="11" fill="#6b7280">-30 min</text>',
        f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end" font-size="11" '
        'fill="#6b7280">now</text>',
    ]
    for name, colour in series:
        points = [(x(s.at), y(float(getattr(s, name)))) for s in samples]
        if len(points) == 1:
            px, py = points[0]
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>')
        elif points:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _problem(why: str, secrets: Sequence[str]) -> str:
    return f'<p class="bad state">could not read: {text(why, secrets, ERROR_LIMIT)}</p>'


def _backlog(data: PageData, secrets: Sequence[str]) -> str:
    out = ['<section id="backlog"><h2>Backlog</h2>']
    if data.backlog is None:
        out.append(_problem(data.backlog_problem or "no answer", secrets))
    else:
        b = data.backlog
        cards = [
            ("pending", f"{b.pending:,}", "waiting, backing off or in flight"),
            ("due", f"{b.due:,}", "time to send now"),
            ("retrying", f"{b.retrying:,}", "failed at least once"),
            ("dead", f"{b.dead:,}", "gave up"),
            ("oldest pending", age(b.oldest_pending_age_seconds), "age"),
        ]
        out.append('<div class="cards">')
        for name, value, hint in cards:
            out.append(
                f'<div class="card" id="now-{name.replace(" ", "-")}"><b>{value}</b>'
                f"<span>{name} · {hint}</span></div>"
            )
        out.append("</div>")
    samples = data.history
    out.append('<div class="legend">')
    for name, colour in SERIES:
        out.append(f'<span><i style="background:{colour}"></i>{name}</span>')
    out.append(f'<span><i style="background:{AGE_COLOUR}"></i>oldest pending age</span></div>')
    out.append('<div class="charts">')
    out.append(chart(samples, SERIES, data.generated_at, title="events over the last hour"))
    out.append(
        chart(
            samples,
            (("oldest_pending_age_seconds", AGE_COLOUR),),
            data.generated_at,
            title="oldest pending age over the last hour",
            unit="age",
        )
    )
    out.append("</div>")
    first = _time(samples[0].at) if samples else ""
    out.append(
        f'<p class="muted">{_plural(len(samples), "sample")} taken by this worker at each backlog '
        f"refresh{' since ' + first if first else ''} (counts are exact up to 100,000).</p>"
    )
    out.append("</section>")
    return "".join(out)


def _sink(data: PageData, secrets: Sequence[str]) -> str:
    s = data.sink
    good = s.state == SINK_OK and s.key_allows_sending
    css = "good" if good else ("warn" if s.state in (SINK_BACKING_OFF,) else "bad")
    out = [
        '<section id="sink"><h2>Sink</h2><p>',
        f'<span class="state {css}" id="sink-state">{text(s.state, secrets)}</span> ',
        text(SINK_MEANINGS.get(s.state, ""), secrets, None),
    ]
    if s.paused_until is not None:
        out.append(
            f' — <b id="paused-until">paused until {_time(s.paused_until)}</b> '
            f"(in {age(s.paused_until - data.generated_at)})"
        )
    out.append("</p>")
    if s.last_error and s.state != SINK_OK:
        out.append(
            f'<p>last error: <span class="mono" id="sink-error">'
            f"{text(s.last_error, secrets, ERROR_LIMIT)}</span></p>"
        )
    key_css = "good" if s.key_allows_sending else "bad"
    out.append(
        f'<p>API key: <span class="state {key_css}" id="key-state">'
        f"{text(s.key_state, secrets)}</span> "
        f"{text(KEY_MEANINGS.get(s.key_state, ''), secrets, None)}"
    )
    if s.key_reason:
        out.append(f' <span class="muted">({text(s.key_reason, secrets, ERROR_LIMIT)})</span>')
    out.append("</p></section>")
    return "".join(out)


def _workers(data: PageData, secrets: Sequence[str]) -> str:
    out = ['<section id="workers"><h2>Batches in flight and workers</h2>']
    if data.in_flight_problem:
        out.append(_problem(data.in_flight_problem, secrets))
    elif data.in_flight:
        out.append("<table><tr><th>worker</th><th>batch held for</th><th>connection</th></tr>")
        for b in data.in_flight:
            out.append(
                f"<tr><td>{text(b.get('worker'), secrets)}</td>"
                f'<td class="n">{float(b.get("held_seconds") or 0):.1f}s</td>'
                f"<td>{text(b.get('state'), secrets)}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>No batch in flight.</p>")
    if data.workers_problem:
        out.append(_problem(data.workers_problem, secrets))
    elif data.workers:
        out.append(
            "<table><tr><th>worker</th><th>posthog host</th><th>state</th>"
            "<th>reported</th><th>reason</th></tr>"
        )
        for w in data.workers:
            out.append(
                f"<tr><td>{text(w.get('worker'), secrets)}</td>"
                f"<td>{text(w.get('host'), secrets)}</td>"
                f"<td>{text(w.get('state'), secrets)}</td>"
                f"<td>{age(float(w.get('age_seconds') or 0))} ago</td>"
                f'<td class="mono">{text(w.get("reason"), secrets, ERROR_LIMIT)}</td></tr>'
            )
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def _example(group: dict[str, Any], data: PageData, secrets: Sequence[str]) -> str:
    privacy = data.privacy
    props = privacy.properties(group.get("properties"))
    shown = ", ".join(f"{text(k, secrets)}: {text(v, secrets)}" for k, v in props)
    stored = group.get("properties")
    if isinstance(stored, dict) and len(stored) > len(props):
        shown += f", and {len(stored) - len(props)} more"
    return (
        f"row {int(group.get('example_id') or 0)}: "
        f"<b>{text(group.get('event'), secrets)}</b> "
        f"distinct id <code>{text(privacy.distinct_id(str(group.get('distinct_id'))), secrets)}"
        f"</code>, {_plural(int(group.get('attempts') or 0), 'attempt')}"
        + (f'<br><span class="mono">{{{shown}}}</span>' if props else "")
    )


def _groups(data: PageData, secrets: Sequence[str]) -> str:
    out = ['<section id="errors"><h2>Dead and retrying events, by error</h2>']
    if data.groups_problem:
        out.append(_problem(data.groups_problem, secrets))
    elif not data.groups:
        out.append("<p>No dead or retrying event.</p>")
    else:
        dead_total = data.backlog.dead if data.backlog is not None else None
        out.append(
            "<table><tr><th>status</th><th>events</th><th>first / last created</th>"
            "<th>error and example</th></tr>"
        )
        for g in data.groups:
            css = "bad" if g["status"] == "dead" else "warn"
            status = "dead" if g["status"] == "dead" else "retrying"
            commands = group_commands(g, dead_total)
            cmds = "".join(
                f"<li><code>{text(c.command, secrets, 2000)}</code> "
                f'<span class="muted">{text(c.note, secrets, 600)}</span></li>'
                for c in commands
            )
            if not commands:
                cmds = '<li class="muted">pending: the worker tries these again itself</li>'
            out.append(
                f'<tr class="group"><td><span class="state {css}">{status}</span></td>'
                f'<td class="n">{int(g["count"]):,}</td>'
                f"<td>{text(_stamp(g.get('first_at')), secrets, 40)}<br>"
                f"{text(_stamp(g.get('last_at')), secrets, 40)}</td>"
                f'<td><span class="mono error">{text(g.get("error"), secrets, ERROR_LIMIT)}'
                f"</span><br>{_example(g, data, secrets)}"
                f'<ul class="cmds">{cmds}</ul></td></tr>'
            )
        out.append("</table>")
        out.append(
            '<p class="muted">The page changes nothing: run a command yourself (with the '
            "worker's DATABASE_URL). First and last are the oldest and newest "
            "created_at among the group's events.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _top_pending(data: PageData, secrets: Sequence[str]) -> str:
    out = ['<section id="pending"><h2>Top pending events</h2>']
    if data.top_pending_problem:
        out.append(_problem(data.top_pending_problem, secrets))
    elif not data.top_pending:
        out.append("<p>Nothing pending.</p>")
    else:
        out.append("<table><tr><th>event</th><th>pending</th></tr>")
        for name, count in data.top_pending:
            out.append(f'<tr><td>{text(name, secrets)}</td><td class="n">{count:,}</td></tr>')
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def _ledger(data: PageData, secrets: Sequence[str]) -> str:
    out = [f'<section id="ledger"><h2>Ledger (last {LEDGER_DAYS} days)</h2>']
    if data.ledger_problem:
        out.append(_problem(data.ledger_problem, secrets))
        out.append("</section>")
        return "".join(out)
    rows = data.ledger
    totals = (
        ("delivered", sum(r.delivered for r in rows)),
        ("dead", sum(r.dead for r in rows)),
        ("purged", sum(r.purged for r in rows)),
    )
    out.append('<div class="cards">')
    for name, count in totals:
        out.append(
            f'<div class="card" id="ledger-{name}"><b>{count:,}</b><span>{name}</span></div>'
        )
    out.append("</div>")
    if not rows:
        out.append("<p>Nothing delivered, dead or purged in these days.</p>")
    else:
        newest = sorted(rows, key=lambda r: (-r.day.toordinal(), r.event, r.destination))
        out.append(
            "<table><tr><th>day (UTC)</th><th>event</th><th>destination</th>"
            "<th>delivered</th><th>dead</th><th>purged</th></tr>"
        )
        for r in newest[:LEDGER_ROWS]:
            out.append(
                f'<tr class="ledger-row"><td>{r.day.isoformat()}</td>'
                f"<td>{text(r.event, secrets)}</td><td>{text(r.destination, secrets)}</td>"
                f'<td class="n">{r.delivered:,}</td><td class="n">{r.dead:,}</td>'
                f'<td class="n">{r.purged:,}</td></tr>'
            )
        out.append("</table>")
        if len(newest) > LEDGER_ROWS:
            out.append(
                f'<p class="muted">and {_plural(len(newest) - LEDGER_ROWS, "more row")}: '
                f"<code>outbox-worker ledger --since {LEDGER_DAYS}d</code> lists them all.</p>"
            )
    out.append(
        '<p class="muted">Counted by the UTC day of each event\'s timestamp, in the '
        "transaction that recorded its outcome (docs/operations.md, "
        '"The delivery ledger").</p></section>'
    )
    return "".join(out)


def _privacy_note(data: PageData) -> str:
    p = data.privacy
    if p.shown_properties is None:
        props = "every property value is shown"
    elif p.shown_properties:
        props = "values shown only for " + ", ".join(sorted(p.shown_properties))
    else:
        props = "property values hidden (OUTBOX_STATUS_PROPERTIES)"
    ids = "distinct ids shown" if p.show_distinct_ids else "distinct ids hashed"
    return f"{html.escape(props)}; {ids} (OUTBOX_STATUS_DISTINCT_IDS)"


def render(data: PageData, secrets: Sequence[str] = ()) -> str:
    """The whole page; ``secrets`` (API key, database password) are masked wherever
    they would appear."""
    secrets = tuple(s for s in secrets if s)
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>outbox status</title><style>",
            _CSS,
            "</style></head><body><header><h1>posthog-outbox status</h1>",
            f"<p>worker {text(data.worker_id, secrets)} · {_time(data.generated_at)} · "
            f"read-only · {_privacy_note(data)}</p></header><main>",
            _backlog(data, secrets),
            _sink(data, secrets),
            _groups(data, secrets),
            _top_pending(data, secrets),
            _ledger(data, secrets),
            _workers(data, secrets),
            "</main></body></html>",
        ]
    )
