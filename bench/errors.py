"""The benchmark's one error type."""

from __future__ import annotations


class BenchFailed(RuntimeError):
    """A run did not produce a valid measurement: lost events, a crashed or stuck
    process, an endpoint that stopped answering. The command reports it and exits 1."""
