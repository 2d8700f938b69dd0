"""``python -m bench encode``: the Python side of ``enqueue``, per event, no database.

What ``enqueue()`` and ``enqueue_many()`` do before their one statement (stamping,
validation, the properties JSON, the uuid, the statement's parameters) on the
benchmark's events, with the properties encoded by orjson (where its text is the
``json`` module's: `outbox.validation`) and by the ``json`` module alone. The two
variants run in interleaved rounds of ``calls`` calls each; CPU time
(``time.process_time``), so other processes' load counts only through shared caches,
and the minimum over the rounds is reported.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from bench.events import iter_events
from bench.harness import Context
from outbox import validation

DEFAULT_ROUNDS = 40
QUICK_ROUNDS = 2
CALLS = 300


def run(ctx: Context, *, rounds: int) -> dict[tuple[str, str], float]:
    """The table: µs of Python per event, by encoder and call shape."""
    enqueue: Any = importlib.import_module("outbox.enqueue")
    from outbox.config import get_config

    cfg = get_config()
    items = [
        {"event": e["event"], "distinct_id": e["distinct_id"], "properties": e["properties"]}
        for e in iter_events(1000)
    ]

    def one(k: int) -> object:
        e = items[k % 1000]
        prepared = enqueue._prepare(
            cfg, e["event"], e["distinct_id"], e["properties"], *([None] * 6), ""
        )
        return enqueue._Call([prepared])

    def ten(k: int) -> object:
        j = (k * 10) % 1000
        return enqueue._Call(enqueue._prepare_all(cfg, items[j : j + 10]))

    orjson_encode = validation._orjson_encode
    variants: dict[str, Callable[[dict[Any, Any]], str | None]] = {
        "orjson where it writes json's text": orjson_encode,
        "json module only": lambda properties: None,
    }
    shapes: list[tuple[str, Callable[[int], object], int]] = [
        ("enqueue(), 1 event", one, 1),
        ("enqueue_many(), 10 events", ten, 10),
    ]
    best: dict[tuple[str, str], float] = {}
    try:
        for r in range(rounds):
            order = list(variants.items())
            for name, encode in order if r % 2 == 0 else order[::-1]:
                validation._orjson_encode = encode  # type: ignore[assignment]
                for shape, call, per in shapes:
                    started = time.process_time()
                    for k in range(CALLS):
                        call(k)
                    us = (time.process_time() - started) / CALLS / per * 1e6
                    best[name, shape] = min(best.get((name, shape), us), us)
    finally:
        validation._orjson_encode = orjson_encode
    ctx.out.heading(f"enqueue's Python per event: {rounds} interleaved rounds of {CALLS} calls")
    ctx.out.table(
        ["properties encoded by", *[shape for shape, _, _ in shapes]],
        [[name, *[round(best[name, shape], 2) for shape, _, _ in shapes]] for name in variants],
    )
    ctx.out.line(
        "- µs of CPU per event (the minimum over the rounds): stamping, validation, the "
        "properties JSON, the uuid and the statement's parameters; no database"
    )
    ctx.out.line()
    return best
