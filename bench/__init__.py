"""Benchmarks for posthog-outbox: ``python -m bench --help``.

The harness measures the worker against posthog-python's own client, a job queue used
as an outbox (pgqueuer) and a bare ``DELETE ... RETURNING`` floor, on this machine and
against a local capture endpoint. See ``docs/benchmarks.md`` for the method and results.
"""
