"""The contenders that are not ``outbox-worker``, each run as its own process.

``python -m bench.contenders NAME ...`` is started by the drain comparison (never by
hand). A contender sets itself up (imports, connections, clients), prints ``READY``,
and waits for a ``GO`` line on stdin; the parent starts its clock when it sends ``GO``
and stops it when the endpoint has accepted every event. The parent then sends
``SHUTDOWN``, the contender shuts its client down, prints ``DONE {json}`` and exits.
Its peak RSS and CPU time are read by the parent when it reaps it.

Contenders:

``client``
    posthog-python's own ``Client``: ``capture()`` of every event, from memory. Its
    queue is raised to hold all of them, so it drops nothing; otherwise defaults
    (``flush_at=100``, ``flush_interval=5``, one consumer thread, ``sync_mode`` off).
``pgqueuer``
    A job queue used as an outbox: one pgqueuer job per event (filled beforehand by
    ``pgqueuer-fill``), drained by a ``QueueManager`` whose entrypoint forwards each
    job's event to a posthog-python ``Client`` configured as above. Once every event
    has arrived, the parent stops it with SIGTERM (its drain-mode teardown takes
    seconds and is not part of the measurement).
``floor``
    No bookkeeping at all: ``DELETE ... RETURNING`` up to a batch of rows of an event
    table (by TID, from where its last batch ended, then once more from the table's
    start), build the JSON body from the rows' text (properties are never decoded),
    one POST with ``requests``; repeat until every event table is empty. Not durable
    (the rows are gone before the POST succeeds): it shows the cost of the database and
    HTTP round trips alone.

SIGINT is ignored: on Ctrl-C the parent stops its children itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.events import event_pool
from bench.procs import API_KEY

PGQUEUER_ENTRYPOINT = "posthog_event"

# The floor's whole job: take rows and ship them. JSON pieces come out of the database
# as text and are pasted into the body; nothing is decoded or re-encoded in Python.
FLOOR_CLAIM = """
DELETE FROM {table}
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {table} WHERE ctid > %(after)s::tid LIMIT %(limit)s FOR UPDATE SKIP LOCKED
))
RETURNING to_json(event)::text, to_json(distinct_id)::text, properties::text,
          uuid::text, to_json("timestamp")::text, ctid::text
"""
#: The snapshot engine's event tables (migration 0006).
FLOOR_TABLES = tuple(f"outbox_events_{t}" for t in range(4))


def _floor_batches(
    conn: psycopg.Connection[Any], limit: int
) -> Iterator[list[tuple[str, str, str, str, str, str]]]:
    """Delete and yield batches of rows until every event table is empty."""
    for table in FLOOR_TABLES:
        statement = FLOOR_CLAIM.format(table=table)
        after = start = "(0,0)"
        while True:
            rows = conn.execute(statement, {"limit": limit, "after": after}).fetchall()
            if rows:
                yield rows
                after = max(rows, key=lambda r: tuple(map(int, r[5][1:-1].split(","))))[5]
            elif after == start:
                break  # nothing from the start: empty
            else:
                after = start


def _say(word: str, payload: dict[str, Any] | None = None) -> None:
    line = word if payload is None else f"{word} {json.dumps(payload)}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _wait_for(word: str) -> None:
    for line in sys.stdin:
        if line.strip() == word:
            return
    raise SystemExit(f"stdin closed before {word!r}")


def _client(host: str, events: int, use_gzip: bool) -> Any:
    from posthog.client import Client

    return Client(
        API_KEY,
        host=host,
        max_queue_size=events + 1000,  # raised: it must drop nothing
        gzip=use_gzip,
        sync_mode=False,
    )


# -- client ----------------------------------------------------------------------------


def run_client(args: argparse.Namespace) -> None:
    """posthog-python's Client, capturing every event from memory."""
    pool = event_pool()
    client = _client(args.host, args.events, args.gzip)
    _say("READY")
    _wait_for("GO")
    started = time.monotonic()
    for i in range(args.events):
        event = pool[i % len(pool)]
        client.capture(
            event["event"], distinct_id=event["distinct_id"], properties=event["properties"]
        )
    loop_seconds = time.monotonic() - started
    _wait_for("SHUTDOWN")
    shutdown_started = time.monotonic()
    client.shutdown()
    _say(
        "DONE",
        {
            "capture_loop_seconds": loop_seconds,
            "shutdown_seconds": time.monotonic() - shutdown_started,
        },
    )


# -- pgqueuer ----------------------------------------------------------------------------


def run_pgqueuer_fill(args: argparse.Namespace) -> None:
    """Install pgqueuer's schema (if needed) and enqueue one job per event."""
    asyncio.run(_pgqueuer_fill(args.database_url, args.events))


async def _pgqueuer_fill(url: str, events: int) -> None:
    from pgqueuer import PsycopgDriver, Queries

    pool = event_pool()
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        queries = Queries(PsycopgDriver(conn))
        if await queries.has_table("pgqueuer"):
            await queries.uninstall()  # a fresh queue for every run
        await queries.install()
        started = time.monotonic()
        for first in range(0, events, 1000):
            n = min(1000, events - first)
            payloads: list[bytes | None] = [
                json.dumps(pool[i % len(pool)]).encode() for i in range(first, first + n)
            ]
            await queries.enqueue([PGQUEUER_ENTRYPOINT] * n, payloads, [0] * n)
        _say("DONE", {"fill_seconds": time.monotonic() - started})
    finally:
        await conn.close()


def run_pgqueuer(args: argparse.Namespace) -> None:
    """Drain the pgqueuer jobs, forwarding each event to a posthog-python Client."""
    asyncio.run(_pgqueuer_drain(args))


async def _pgqueuer_drain(args: argparse.Namespace) -> None:
    from pgqueuer import Job, PsycopgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    client = _client(args.host, args.events, args.gzip)
    conn = await psycopg.AsyncConnection.connect(args.database_url, autocommit=True)
    try:
        manager = QueueManager(Queries(PsycopgDriver(conn)))

        @manager.entrypoint(PGQUEUER_ENTRYPOINT)
        async def forward(job: Job) -> None:
            event = json.loads(job.payload or b"{}")
            client.capture(
                event["event"], distinct_id=event["distinct_id"], properties=event["properties"]
            )

        _say("READY")
        _wait_for("GO")
        started = time.monotonic()
        await manager.run(
            mode=QueueExecutionMode.drain,
            batch_size=args.batch_size,
            dequeue_timeout=timedelta(seconds=1),
        )
        run_seconds = time.monotonic() - started
    finally:
        await conn.close()
    _wait_for("SHUTDOWN")
    client.shutdown()
    _say("DONE", {"queue_run_seconds": run_seconds})


# -- floor ------------------------------------------------------------------------------


def run_floor(args: argparse.Namespace) -> None:
    """DELETE ... RETURNING a batch, POST it, repeat: no leases, no acks, no retries."""
    import requests

    url = args.host.rstrip("/") + "/batch/"
    headers = {"Content-Type": "application/json", "User-Agent": "outbox-bench-floor"}
    if args.gzip:
        headers["Content-Encoding"] = "gzip"
    session = requests.Session()
    requests_sent = 0
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        _say("READY")
        _wait_for("GO")
        for rows in _floor_batches(conn, args.batch_size):
            body = _floor_body(rows).encode()
            if args.gzip:
                body = gzip.compress(body)  # level 9, as posthog's request layer does
            response = session.post(url, data=body, headers=headers, timeout=30)
            if response.status_code != 200:
                raise SystemExit(f"the endpoint answered {response.status_code}: {response.text}")
            requests_sent += 1
    _wait_for("SHUTDOWN")
    session.close()
    _say("DONE", {"requests": requests_sent})


def _floor_body(rows: Sequence[tuple[str, str, str, str, str, str]]) -> str:
    parts = []
    for event, distinct_id, properties, uuid, timestamp, _ in rows:
        # The worker's $ignore_sent_at, spliced into the properties object as text.
        marked = (
            '{"$ignore_sent_at": true}'
            if properties == "{}"
            else properties[:-1] + ', "$ignore_sent_at": true}'
        )
        parts.append(
            f'{{"event":{event},"distinct_id":{distinct_id},"properties":{marked},'
            f'"uuid":"{uuid}","timestamp":{timestamp}}}'
        )
    sent_at = datetime.now(UTC).isoformat()
    return f'{{"api_key":"{API_KEY}","sent_at":"{sent_at}","batch":[{",".join(parts)}]}}'


# -- entry point ------------------------------------------------------------------------

PROGRAMS: dict[str, Callable[[argparse.Namespace], None]] = {
    "client": run_client,
    "pgqueuer-fill": run_pgqueuer_fill,
    "pgqueuer": run_pgqueuer,
    "floor": run_floor,
}


def _exit_with_parent() -> None:
    """Exit if the benchmark process goes away without stopping us (SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> None:
    """Run one contender program (started by the benchmark, not by hand)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    parser = argparse.ArgumentParser(prog="python -m bench.contenders")
    parser.add_argument("program", choices=sorted(PROGRAMS))
    parser.add_argument("--host", default="", help="the capture endpoint's base URL")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args(argv)
    PROGRAMS[args.program](args)


if __name__ == "__main__":
    main()
