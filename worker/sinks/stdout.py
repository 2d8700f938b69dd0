"""The stdout sink: one JSON line per event, for running without a PostHog key."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import TextIO

from worker.sinks.base import Outbound, RetryableSinkError
from worker.terminal import json_terminal_safe


class StdoutSink:
    """Prints each event as one JSON line; the default when ``POSTHOG_API_KEY`` is unset."""

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def send(self, events: Sequence[Outbound]) -> None:
        """Write one line per event; a closed or broken stream is a retryable failure."""
        stream = self.stream or sys.stdout
        try:
            # Event data may hold terminal escapes (JSON leaves DEL, C1 controls, bidi
            # overrides raw): written as JSON escapes, the lines decode to the same events.
            stream.write("".join(json_terminal_safe(e.json) + "\n" for e in events))
            stream.flush()
        except (OSError, ValueError) as exc:
            raise RetryableSinkError(f"cannot write to stdout: {exc}") from exc

    def close(self) -> None:
        """Flush the stream."""
        stream = self.stream or sys.stdout
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
