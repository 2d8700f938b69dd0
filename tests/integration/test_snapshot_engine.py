"""The snapshot engine's SQL core (migration 0006, worker/storage/snapshot.py) against a
real PostgreSQL, with real concurrent connections."""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import wait_for
from worker.storage import snapshot_sql
from worker.storage.snapshot import (
    Chunk,
    Failure,
    LeasedBatch,
    RetryOutcome,
    SnapshotEngine,
    SnapshotEvent,
    insert_events,
    own_keys,
    utc_iso,
)


def _events(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"uuid": uuid.uuid4(), "event": "e", "distinct_id": "u", "properties": {"n": i}, **extra}
        for i in range(n)
    ]


@pytest.fixture
def engines(database_url: str) -> Iterator[Callable[..., SnapshotEngine]]:
    """Make engines, each on its own autocommit connection; all closed at the end."""
    conns: list[psycopg.Connection[Any]] = []

    def make(worker_id: str = "w") -> SnapshotEngine:
        conn = psycopg.connect(database_url, autocommit=True)
        conns.append(conn)
        return SnapshotEngine(conn, worker_id=worker_id)

    yield make
    for conn in conns:
        conn.close()


def _commit(url: str, events: list[dict[str, Any]], table: int | None = None) -> None:
    with psycopg.connect(url) as conn:
        insert_events(conn, events, table=table)


def drain(
    engine: SnapshotEngine, chunk: int = 100, split_rows: int = 5_000, batches: int = 10**9
) -> list[uuid.UUID]:
    """Claim, read, advance until nothing is left (or ``batches`` were finished);
    returns the uuids sent, in order."""
    sent: list[uuid.UUID] = []
    while batches > 0 and (batch := engine.claim(30, split_rows=split_rows)) is not None:
        batches -= 1
        while True:
            part = engine.read(batch, chunk)
            upto = part.events[-1] if part.events else None
            assert engine.advance(batch, upto, last=part.last, delivered=part.events)
            sent.extend(e.uuid for e in part.events)
            if part.last:
                break
    return sent


def _count(db: psycopg.Connection[Any], query: str) -> int:
    row = db.execute(query).fetchone()
    assert row is not None
    return int(row[0])


# ------------------------------------------------------------------------ basics


def test_committed_events_are_delivered_once_rolled_back_never(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    committed = _events(250)
    _commit(database_url, committed[:100])
    with psycopg.connect(database_url) as conn:
        insert_events(conn, _events(5, event="rolled_back"))
        conn.rollback()
        insert_events(conn, committed[100:])
    sent = drain(engines(), chunk=70)
    assert Counter(sent) == Counter(e["uuid"] for e in committed)
    # Nothing more, however often it ticks.
    assert drain(engines()) == []


def test_a_chunk_is_read_in_order_and_progress_is_kept_across_leases(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    committed = _events(30)
    _commit(database_url, committed)
    first = engines("a")
    batch = first.claim(30)
    assert batch is not None
    part = first.read(batch, 10)
    assert [e.uuid for e in part.events] == [e["uuid"] for e in committed[:10]]
    assert first.advance(batch, part.events[-1], last=False, delivered=part.events)
    assert first.release(batch)
    # Another worker takes it from where the first left it.
    second = engines("b")
    again = second.claim(30)
    assert again is not None and again.batch_id == batch.batch_id and again.sent == 10
    rest = second.read(again, 100)
    assert rest.last
    assert [e.uuid for e in rest.events] == [e["uuid"] for e in committed[10:]]


def test_a_batch_over_several_tables_is_read_in_table_order_in_chunks(
    database_url: str, engines: Callable[..., SnapshotEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch with rows in two tables, read in chunks of 4 while one scan finds at
    most 7 positions: the engine scans again where its positions run out."""
    monkeypatch.setattr(snapshot_sql, "POSITIONS_CAP", 7)
    in_three, in_one = _events(12), _events(9)
    _commit(database_url, in_three, table=3)
    _commit(database_url, in_one, table=1)
    sent = drain(engines(), chunk=4)
    assert sent == [e["uuid"] for e in in_one + in_three]
    # A chunk bigger than the cap is read whole.
    more = _events(20)
    _commit(database_url, more, table=2)
    engine = engines()
    batch = engine.claim(30)
    assert batch is not None
    part = engine.read(batch, 15)
    assert [e.uuid for e in part.events] == [e["uuid"] for e in more[:15]]
    assert not part.last


def test_positions_kept_by_one_worker_follow_what_another_sent(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    committed = _events(30)
    _commit(database_url, committed)
    a, b = engines("a"), engines("b")
    batch = a.claim(30)
    assert batch is not None
    first = a.read(batch, 10)  # a keeps the batch's positions
    assert a.advance(batch, first.events[-1], last=False, delivered=first.events)
    assert a.release(batch)
    taken = b.claim(30, tick=False)
    assert taken is not None
    second = b.read(taken, 10)
    assert b.advance(taken, second.events[-1], last=False, delivered=second.events)
    assert b.release(taken)
    again = a.claim(30, tick=False)
    assert again is not None and again.batch_id == batch.batch_id
    rest = a.read(again, 100)
    assert rest.last
    assert [e.uuid for e in first.events + second.events + rest.events] == [
        e["uuid"] for e in committed
    ]


def test_a_stale_worker_reads_nothing_of_a_table_truncated_and_written_again(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    """The positions a worker kept point at other rows once the table was truncated and
    written again: it reads none of them (they are not its batch's)."""
    _commit(database_url, _events(30), table=2)
    slow, other = engines("slow"), engines("other")
    batch = slow.claim(0.2)
    assert batch is not None
    slow.read(batch, 10)
    taken: LeasedBatch = wait_for(lambda: other.claim(30, tick=False), what="the re-claim")
    rest = other.read(taken, 100)
    assert other.advance(taken, rest.events[-1], last=True, delivered=rest.events)
    assert other.rotate(current=True) >= 1
    newer = _events(30)
    _commit(database_url, newer, table=2)
    late = slow.read(batch, 10)
    assert late.events == [] and late.last
    assert not slow.advance(batch, None, last=True)
    assert drain(other) == [e["uuid"] for e in newer]


def test_a_range_below_the_earlier_snapshot_leaves_out_what_it_saw(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    """A batch whose txid range starts below the earlier tick's xmax (the tick never
    makes one; a batch written by hand could) holds only what that tick did not see."""
    engine = engines()
    seen = _events(5)
    _commit(database_url, seen)
    assert drain(engine) == [e["uuid"] for e in seen]
    later = _events(5)
    _commit(database_url, later)
    assert engine.tick() is not None
    db.execute("UPDATE outbox_batches SET txid_lo = 1")
    assert drain(engine, chunk=3) == [e["uuid"] for e in later]


def test_an_open_transaction_is_delivered_after_it_commits(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    """A transaction open across several ticks lands in the interval it commits in,
    although its txid is older than those of transactions that committed before."""
    engine = engines()
    early = _events(3)
    with psycopg.connect(database_url) as slow:
        insert_events(slow, early)  # open, not committed
        later = _events(4)
        _commit(database_url, later)
        assert sorted(drain(engine)) == sorted(e["uuid"] for e in later)
        slow.commit()
    assert sorted(drain(engine)) == sorted(e["uuid"] for e in early)
    assert drain(engine) == []


def test_the_worker_own_keys_are_found_as_keys_only() -> None:
    assert own_keys('{"a": "has \\"$ip\\" in it"}') == ('{"a": "has \\"$ip\\" in it"}', False)
    assert own_keys('{"a": {"$ip": "1.2.3.4"}}') == ('{"a": {"$ip": "1.2.3.4"}}', False)
    props, has_ip = own_keys('{"$ip": "1.2.3.4", "$ignore_sent_at": false}')
    assert (props, has_ip) == ('{"$ip": "1.2.3.4"}', True)
    props, has_ip = own_keys('{"\\u0024geoip_disable": false, "x": 1}')
    assert (props, has_ip) == ('{"x": 1}', False)
    assert own_keys('{"$ip": 5}') == ('{"$ip": 5}', False)


def test_outbound_sets_the_worker_keys_once(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    import json

    _commit(
        database_url,
        [
            {"uuid": uuid.uuid4(), "event": "a", "distinct_id": "u", "properties": {}},
            {
                "uuid": uuid.uuid4(),
                "event": "b",
                "distinct_id": "u",
                "properties": {"$ip": "1.2.3.4", "$geoip_disable": False, "s": '"$ip"'},
            },
        ],
    )
    engine = engines()
    batch = engine.claim(30)
    assert batch is not None
    a, b = (json.loads(e.outbound().json) for e in engine.read(batch, 10).events)
    assert a["properties"] == {"$ignore_sent_at": True, "$geoip_disable": True}
    assert b["properties"] == {
        "$ip": "1.2.3.4",
        "$geoip_disable": False,
        "s": '"$ip"',
        "$ignore_sent_at": True,
    }
    assert a["timestamp"].endswith("+00:00")


# -------------------------------------------------------------- exactness, sharing


def test_producers_around_ticks_and_consumers_deliver_exactly_once(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    """N producer threads commit (or roll back) in random order, some holding their
    transaction open across ticks; 3 consumer threads tick, claim, read and advance.
    Every committed event is delivered exactly once, no rolled-back one ever."""
    producers, rounds = 6, 25
    committed: list[uuid.UUID] = []
    rolled_back: set[uuid.UUID] = set()
    delivered: list[uuid.UUID] = []
    lock = threading.Lock()
    producing = threading.Event()
    producing.set()
    errors: list[BaseException] = []

    def ticks(conn: psycopg.Connection[Any]) -> int:
        with psycopg.connect(database_url, autocommit=True) as c:
            return _count(c, "SELECT max(tick_id) FROM outbox_ticks")

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(database_url) as conn:
                for _ in range(rounds):
                    batch = _events(rng.randint(1, 20))
                    insert_events(conn, batch, table=rng.randrange(4))
                    choice = rng.random()
                    if choice < 0.3:  # stay open until a tick has passed
                        seen = ticks(conn)
                        # Something newer commits meanwhile (so there is a tick to wait
                        # for, even when every producer is waiting).
                        newer = _events(1)
                        _commit(database_url, newer)
                        with lock:
                            committed.extend(e["uuid"] for e in newer)
                        wait_for(lambda s=seen: ticks(conn) > s, what="a tick")
                    if choice > 0.9:
                        conn.rollback()
                        with lock:
                            rolled_back.update(e["uuid"] for e in batch)
                    else:
                        conn.commit()
                        with lock:
                            committed.extend(e["uuid"] for e in batch)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def consume(engine: SnapshotEngine) -> None:
        try:
            while True:
                still = producing.is_set()
                got = drain(engine, chunk=rng_chunk(engine), split_rows=40)
                with lock:
                    delivered.extend(got)
                if not still and not got:
                    return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def rng_chunk(engine: SnapshotEngine) -> int:
        return 7 + (hash(engine.worker_id) % 30)

    consumers = [threading.Thread(target=consume, args=(engines(f"c{i}"),)) for i in range(3)]
    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for t in consumers + threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    producing.clear()
    for t in consumers:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in consumers + threads)
    # A last drain after every producer is done: nothing is left over.
    delivered.extend(drain(engines("last")))
    assert len(delivered) == len(set(delivered)), "an event was delivered twice"
    assert set(delivered) == set(committed)
    assert not rolled_back & set(delivered)


def test_a_big_interval_is_split_and_shared_by_workers(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    committed = _events(3000)
    for i in range(0, 3000, 100):  # one transaction per 100, as bench does
        _commit(database_url, committed[i : i + 100])
    first = engines("a")
    assert first.tick(split_rows=500) is not None
    batches = _count(db, "SELECT count(*) FROM outbox_batches")
    assert batches >= 4
    claimed: dict[int, str] = {}
    delivered: list[uuid.UUID] = []
    lock = threading.Lock()

    def work(engine: SnapshotEngine) -> None:
        while (batch := engine.claim(30, tick=False)) is not None:
            with lock:
                assert batch.batch_id not in claimed, "a batch was claimed twice"
                claimed[batch.batch_id] = engine.worker_id
            while True:
                part = engine.read(batch, 100)
                upto = part.events[-1] if part.events else None
                assert engine.advance(batch, upto, last=part.last, delivered=part.events)
                with lock:
                    delivered.extend(e.uuid for e in part.events)
                if part.last:
                    break

    threads = [threading.Thread(target=work, args=(engines(f"w{i}"),)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(claimed) == batches
    assert Counter(delivered) == Counter(e["uuid"] for e in committed)


# ------------------------------------------------------------------------ crashes


def test_a_lease_that_ran_out_is_fenced_and_the_chunk_is_sent_again(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    committed = _events(20)
    _commit(database_url, committed)
    slow, other = engines("slow"), engines("other")
    batch = slow.claim(0.2)
    assert batch is not None
    part = slow.read(batch, 10)
    # The lease runs out while "slow" is sending; "other" claims the batch.
    taken: LeasedBatch = wait_for(lambda: other.claim(30, tick=False), what="the re-claim")
    assert taken.batch_id == batch.batch_id
    # The slow worker's outcome is refused and writes nothing.
    assert not slow.advance(batch, part.events[-1], last=False, delivered=part.events)
    again = other.read(taken, 100)
    assert [e.uuid for e in again.events] == [e["uuid"] for e in committed]
    assert other.advance(taken, again.events[-1], last=True, delivered=again.events)
    assert not slow.advance(batch, None, last=True)
    assert drain(other) == []


def test_a_killed_connection_mid_batch_loses_nothing(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    committed = _events(50)
    _commit(database_url, committed)
    victim = engines("victim")
    batch = victim.claim(0.5)
    assert batch is not None
    part = victim.read(batch, 20)
    assert victim.advance(
        batch, part.events[-1], last=False, delivered=part.events, lease_seconds=0.5
    )
    second = victim.read(batch, 20)  # read, never acknowledged
    pid = victim.conn.info.backend_pid
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        victim.read(batch, 20)
    heir = engines("heir")
    taken: LeasedBatch = wait_for(lambda: heir.claim(30, tick=False), what="the re-claim")
    rest: Chunk = heir.read(taken, 100)
    assert [e.uuid for e in rest.events][:20] == [e.uuid for e in second.events]
    assert {e.uuid for e in part.events} | {e.uuid for e in rest.events} == {
        e["uuid"] for e in committed
    }
    assert not {e.uuid for e in part.events} & {e.uuid for e in rest.events}


# ----------------------------------------------------------------------- rotation


def _size(db: psycopg.Connection[Any], relation: str) -> int:
    return _count(db, f"SELECT pg_relation_size('{relation}')")


def test_rotation_truncates_a_drained_table_and_only_then(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    engine = engines()
    for _ in range(20):
        _commit(database_url, _events(200), table=1)
    assert _size(db, "outbox_events_1") > 200_000
    # Committed but not delivered: not truncated.
    assert engine.rotate(current=True) == 0
    batch = engine.claim(30, split_rows=1_000_000)
    assert batch is not None
    part = engine.read(batch, 10)
    assert engine.advance(batch, part.events[-1], last=False, delivered=part.events)
    assert engine.rotate(current=True) == 0  # a batch over it is unfinished
    assert engine.release(batch)
    assert len(drain(engine, chunk=1000)) == 4000 - 10
    # An open transaction that wrote to the table: left alone, without waiting.
    with psycopg.connect(database_url) as open_tx:
        insert_events(open_tx, _events(1), table=1)
        assert engine.rotate(current=True) == 0
    # That one committed: not delivered yet, so still not.
    assert engine.rotate(current=True) == 0
    assert len(drain(engine)) == 1
    assert engine.rotate(current=True) == 1
    assert _size(db, "outbox_events_1") == 0
    # The BRIN index is back to an empty one (metapage, revmap, one regular page),
    # without REINDEX.
    assert _size(db, "outbox_events_1_txid_idx") <= 3 * 8192
    assert drain(engine) == []


def test_rotation_while_producers_insert_loses_nothing(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    """Producers keep committing into the table the test points them at (as enqueue
    follows the clock); the test moves them to the other table, drains and rotates:
    the table they left is truncated (some of their transactions may still be
    writing to it: those are waited for by LOCK NOWAIT failing, not lost)."""
    committed: list[uuid.UUID] = []
    delivered: list[uuid.UUID] = []
    current = [0]
    truncations = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(database_url) as conn:
                # A bounded number, so that the drain catches up with them (nothing is
                # truncated while their rows are undelivered).
                for _ in range(150):
                    if stop.is_set():
                        return
                    batch = _events(rng.randint(1, 10))
                    insert_events(conn, batch, table=current[0])
                    conn.commit()
                    committed.extend(e["uuid"] for e in batch)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    producers = [threading.Thread(target=produce, args=(i,)) for i in range(3)]
    for t in producers:
        t.start()
    engine = engines()
    try:
        for _ in range(4):
            left = current[0]
            current[0] = 1 - left

            def truncated(table: int = left) -> bool:
                nonlocal truncations
                delivered.extend(drain(engine, chunk=50, batches=3))
                assert not errors, errors
                truncations += engine.rotate(current=True)
                with psycopg.connect(database_url) as c:
                    return _size(c, f"outbox_events_{table}") == 0

            wait_for(truncated, timeout=60, what=f"outbox_events_{left} truncated")
    finally:
        stop.set()
        for t in producers:
            t.join(timeout=60)
    delivered.extend(drain(engine))
    assert len(committed) > 100
    assert truncations >= 1
    assert len(delivered) == len(set(delivered))
    assert set(delivered) == set(committed)


# ------------------------------------------------------------------------ retries


def test_failed_events_move_to_outbox_retry_and_die_after_their_attempts(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    events = _events(5)
    events[0]["dedup_key"] = "k0"
    events[1]["dedup_key"] = "k1"
    db.execute(
        "INSERT INTO outbox_dedup_keys (dedup_key, expires_at)"
        " VALUES ('k0', 'infinity'), ('k1', 'infinity')"
    )
    _commit(database_url, events)
    engine = engines()
    batch = engine.claim(30)
    assert batch is not None
    part = engine.read(batch, 100)
    by_uuid = {e.uuid: e for e in part.events}
    bad: SnapshotEvent = by_uuid[events[1]["uuid"]]
    refused: SnapshotEvent = by_uuid[events[2]["uuid"]]
    ok = [e for e in part.events if e not in (bad, refused)]
    failed = [Failure(bad, "503 from PostHog"), Failure(refused, "400: bad event", dead=True)]
    assert engine.advance(
        batch, part.events[-1], last=True, delivered=ok, failed=failed, dedup_window=60
    )
    # The batch is finished; the failures wait in outbox_retry, findable by one query.
    assert _count(db, "SELECT count(*) FROM outbox_batches") == 0
    rows = dict(db.execute("SELECT uuid, status FROM outbox_retry").fetchall())
    assert rows == {bad.uuid: "pending", refused.uuid: "dead"}
    keys = dict(db.execute("SELECT dedup_key, expires_at < 'infinity' FROM outbox_dedup_keys"))
    assert keys == {"k0": True, "k1": False}  # k1's window starts when it is delivered
    # Retried until its attempts are used up.
    for attempt in (2, 3):
        lease, due = wait_for(lambda: _due(engine), what="the retry to be due")
        assert [e.uuid for e in due] == [bad.uuid]
        retrying, dead = (1, 0) if attempt < 3 else (0, 1)
        assert engine.finish_retries(
            lease,
            RetryOutcome(failed=[(int(due[0].position), f"attempt {attempt}", False)]),
            max_attempts=3,
            backoff_base=0.0,
            backoff_max=0.0,
        ) == (0, retrying, dead)
    row = db.execute(
        "SELECT status, attempts, last_error FROM outbox_retry WHERE uuid = %s", (bad.uuid,)
    ).fetchone()
    assert row == ("dead", 3, "attempt 3")
    assert engine.claim_retries(10, 30)[1] == []


def _due(engine: SnapshotEngine) -> tuple[uuid.UUID, list[SnapshotEvent]] | None:
    lease, due = engine.claim_retries(10, 30)
    return (lease, due) if due else None


def test_a_retry_is_delivered_once_and_starts_its_dedup_window(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    event = _events(1, dedup_key="k")
    db.execute("INSERT INTO outbox_dedup_keys VALUES ('k', 'infinity')")
    _commit(database_url, event)
    engine = engines()
    batch = engine.claim(30)
    assert batch is not None
    part = engine.read(batch, 10)
    assert engine.advance(batch, part.events[-1], last=True, failed=[Failure(part.events[0], "x")])
    lease, due = wait_for(lambda: _due(engine), what="the retry")
    assert due[0].uuid == event[0]["uuid"] and due[0].attempts == 1
    # A second worker cannot take it while it is leased, nor finish it with another lease.
    assert engines("other").claim_retries(10, 30)[1] == []
    assert engine.finish_retries(
        uuid.uuid4(),
        RetryOutcome(shipped=[int(due[0].position)]),
        max_attempts=3,
        backoff_base=0,
        backoff_max=0,
    ) == (0, 0, 0)
    assert engine.finish_retries(
        lease,
        RetryOutcome(shipped=[int(due[0].position)]),
        max_attempts=3,
        backoff_base=0,
        backoff_max=0,
        dedup_window=60,
    ) == (1, 0, 0)
    assert _count(db, "SELECT count(*) FROM outbox_retry") == 0
    assert _count(db, "SELECT count(*) FROM outbox_dedup_keys WHERE expires_at < 'infinity'") == 1


def test_rotation_leaves_the_table_enqueue_writes_to_unless_asked(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    engine = engines()
    _commit(database_url, _events(10))  # into outbox_snapshot_slot()'s table
    assert len(drain(engine)) == 10
    slot = _count(db, "SELECT outbox_snapshot_slot()")
    if engine.rotate() == 0:  # the slot may have moved on meanwhile (every 10 minutes)
        assert _size(db, f"outbox_events_{slot}") > 0
    assert engine.rotate(current=True) <= 1
    assert _size(db, f"outbox_events_{slot}") == 0


# ------------------------------------------------------------------------ one statement


def _recording(engine: SnapshotEngine) -> list[str]:
    """The statements ``engine`` runs from now on."""
    seen: list[str] = []
    run = engine._run

    def record(query: str, params: dict[str, Any] | None = None) -> list[Any]:
        seen.append(query)
        return run(query, params)

    engine._run = record  # type: ignore[method-assign]
    return seen


def _chunk_statements() -> set[str]:
    """The one-statement reads of a batch from table 0 on (the batch may list older
    transactions: any open on the server at the previous tick)."""
    return {
        snapshot_sql.chunk_statement(0, extra=extra, snap1=snap1)
        for extra in (False, True)
        for snap1 in (False, True)
    }


def test_a_batch_expected_in_one_chunk_is_read_with_one_statement_in_order(
    database_url: str, engines: Callable[..., SnapshotEngine]
) -> None:
    in_three, in_one = _events(30), _events(20)
    _commit(database_url, in_three, table=3)
    _commit(database_url, in_one, table=1)
    engine = engines()
    batch = engine.claim(30)
    assert batch is not None and batch.rows_estimate is not None
    assert 50 <= batch.rows_estimate <= 100
    seen = _recording(engine)
    part = engine.read(batch, 100)
    assert part.last
    assert [e.uuid for e in part.events] == [e["uuid"] for e in in_one + in_three]
    assert len(seen) == 1 and seen[0] in _chunk_statements()


def test_a_batch_bigger_than_its_estimate_is_read_by_positions(
    database_url: str, db: psycopg.Connection[Any], engines: Callable[..., SnapshotEngine]
) -> None:
    committed = _events(40)
    _commit(database_url, committed)
    engine = engines()
    assert engine.tick() is not None
    db.execute("UPDATE outbox_batches SET rows_estimate = 5")
    seen = _recording(engine)
    sent = drain(engine, chunk=10)
    assert sent == [e["uuid"] for e in committed]
    reads = [q for q in seen if q not in (snapshot_sql.CLAIM, snapshot_sql.ADVANCE_PAST)]
    assert reads[0] in _chunk_statements()
    assert "ORDER BY t, c" in reads[1]  # the positions, then each chunk by TID


def test_timestamps_are_read_as_iso_in_utc_whatever_the_session_datestyle(
    database_url: str,
) -> None:
    stamps = {
        "2026-03-04T05:06:07+00:00": "2026-03-04T05:06:07.000000+00:00",
        "2026-03-04T05:06:07.89+00:00": "2026-03-04T05:06:07.890000+00:00",
        "2026-03-04T07:06:07.123456+02:00": "2026-03-04T05:06:07.123456+00:00",
        "1970-01-01T00:00:00.000001+00:00": "1970-01-01T00:00:00.000001+00:00",
    }
    events = [dict(e, timestamp=t) for e, t in zip(_events(len(stamps)), stamps, strict=True)]
    _commit(database_url, events)
    options = "-c DateStyle=German -c TimeZone=America/New_York"
    with psycopg.connect(database_url, autocommit=True, options=options) as conn:
        engine = SnapshotEngine(conn)
        batch = engine.claim(30)
        assert batch is not None
        part = engine.read(batch, 100)
    assert [e.timestamp for e in part.events] == list(stamps.values())
    assert [utc_iso(t[:10] + " " + t[11:-6].rstrip("0").rstrip(".")) for t in stamps.values()] == [
        *stamps.values()
    ]
