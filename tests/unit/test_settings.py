"""Settings: named defaults, environment in one place, flags over environment."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from worker.cli import parse_duration
from worker.settings import ENVIRONMENT, Settings, SettingsError
from worker.sinks.base import RateLimitedError, RejectedError, RetryableSinkError, UnauthorizedError
from worker.sinks.posthog import classify


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.database_url is None
    assert s.sink_name == "stdout"
    assert s.gzip is True
    assert s.max_attempts >= 10
    assert s.max_batch_bytes < 5 * 1024 * 1024


def test_environment_then_flags() -> None:
    env = {"OUTBOX_BATCH_SIZE": "25", "OUTBOX_GZIP": "0", "POSTHOG_API_KEY": "phc_x"}
    s = Settings.from_env(env)
    assert (s.batch_size, s.gzip, s.sink_name) == (25, False, "posthog")
    flagged = Settings.from_env(env, batch_size=7, poll_interval=None)
    assert flagged.batch_size == 7
    assert flagged.poll_interval == Settings().poll_interval


def test_blank_variables_mean_unset() -> None:
    assert Settings.from_env({"DATABASE_URL": "  ", "OUTBOX_BATCH_SIZE": ""}).database_url is None


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OUTBOX_BATCH_SIZE": "many"}, "OUTBOX_BATCH_SIZE"),
        ({"OUTBOX_BATCH_SIZE": "0"}, "OUTBOX_BATCH_SIZE"),
        ({"OUTBOX_GZIP": "maybe"}, "OUTBOX_GZIP"),
        ({"OUTBOX_METRICS_PORT": "70000"}, "OUTBOX_METRICS_PORT"),
        ({"OUTBOX_SINK": "kafka"}, "OUTBOX_SINK"),
        ({"OUTBOX_SINK": "posthog"}, "POSTHOG_API_KEY"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings.from_env(env)


def test_every_variable_maps_to_a_field() -> None:
    fields = set(Settings.__dataclass_fields__)
    assert all(var.field in fields for var in ENVIRONMENT)
    assert len({v.name for v in ENVIRONMENT}) == len(ENVIRONMENT)


def test_the_key_is_not_in_repr() -> None:
    assert "phc_secret" not in repr(Settings(posthog_api_key="phc_secret"))


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="7 days"):
        parse_duration("7 days")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, RateLimitedError),
        (401, UnauthorizedError),
        (403, UnauthorizedError),
        (400, RejectedError),
        (413, RejectedError),
        (500, RetryableSinkError),
        (503, RetryableSinkError),
        (404, RetryableSinkError),
        ("N/A", RetryableSinkError),
    ],
)
def test_http_status_classification(status: int | str, error: type[Exception]) -> None:
    assert type(classify(status, "msg", 3.0)) is error


def test_the_library_never_imports_the_worker() -> None:
    code = (
        "import sys, outbox, outbox.schema, outbox.validation;"
        "bad = sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
