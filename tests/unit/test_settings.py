"""Settings: named defaults, environment in one place, flags over environment."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import parse_duration
from worker.settings import ENVIRONMENT, Choice, EnvVar, Number, Settings, SettingsError
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


def test_repr_masks_the_database_password_and_the_key() -> None:
    settings = Settings(
        database_url="postgresql://app:hunter2@db:5432/app",
        posthog_api_key="phc_secret",
        posthog_host="https://proxy:pw0rd@ph.example.com",
    )
    text = repr(settings)
    assert "postgresql://app:***@db:5432/app" in text
    assert "posthog_api_key='***'" in text
    assert "https://proxy:***@ph.example.com" in text
    for secret in ("hunter2", "phc_secret", "pw0rd"):
        assert secret not in text and secret not in str(settings)


# -- every setting's range -----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
NUMBERS = [var for var in ENVIRONMENT if isinstance(var.accepts, Number)]
NUMERIC_FIELDS = {
    name for name, f in Settings.__dataclass_fields__.items() if f.type in ("int", "float")
} | {"metrics_port", "poll_interval", "posthog_project_id"}
# A lease must be more than twice the request timeout: checking the lease's or the
# timeout's bounds alone needs the other out of the way.
ROOM = {
    "lease_seconds": {"request_timeout": 0.1},
    "request_timeout": {"lease_seconds": 86400.0},
}


def test_every_numeric_setting_declares_a_finite_range_with_a_reason() -> None:
    assert {var.field for var in NUMBERS} == NUMERIC_FIELDS
    for var in NUMBERS:
        spec = var.accepts
        assert isinstance(spec, Number)
        assert math.isfinite(spec.low) and math.isfinite(spec.high) and spec.low <= spec.high
        assert len(spec.why) > 15, f"{var.name} needs a reason for its range"


def test_a_variable_declared_with_a_bare_parser_is_reported_as_having_no_range() -> None:
    legacy = EnvVar("OUTBOX_X", "batch_size", int, "legacy declaration")
    assert legacy.accepts.describe() == "(no range declared)"
    assert all(var.accepts.describe() != "(no range declared)" for var in ENVIRONMENT)


def _bad_numbers(spec: Number) -> list[str]:
    step = 1 if spec.whole else 0.001
    values = [
        repr(spec.low - step),
        repr(spec.high + step),
        "99999999999999999999",
        "-99999999999999999999",
        "nan",
        "inf",
        "-inf",
        "1e400",
        "ten",
    ]
    if spec.whole:
        values.append("1.5")
    return values


def _one_line_naming(exc: SettingsError, name: str) -> str:
    message = str(exc)
    assert exc.setting == name
    assert message.startswith(name), message
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize("var", NUMBERS, ids=lambda v: v.name)
def test_numbers_out_of_range_are_refused_naming_the_variable(var: EnvVar) -> None:
    spec = var.accepts
    assert isinstance(spec, Number)
    room = {variable_of(k): str(v) for k, v in ROOM.get(var.field, {}).items()}
    for raw in _bad_numbers(spec):
        with pytest.raises(SettingsError) as info:
            Settings.from_env({**room, var.name: raw})
        message = _one_line_naming(info.value, var.name)
        assert spec.describe() in message, message
    for bound in (spec.low, spec.high):
        raw = str(int(bound)) if float(bound).is_integer() else repr(bound)
        value = getattr(Settings.from_env({**room, var.name: raw}), var.field)
        assert value == float(raw) and type(value) is (int if spec.whole else float)


@pytest.mark.parametrize("var", NUMBERS, ids=lambda v: v.name)
def test_numbers_given_in_code_are_checked_the_same(var: EnvVar) -> None:
    spec = var.accepts
    assert isinstance(spec, Number)
    room = ROOM.get(var.field, {})
    for value in (spec.low - 1, spec.high + 1, math.nan, math.inf, True, "5"):
        if spec.whole and isinstance(value, float) and math.isfinite(value):
            value = int(value)
        with pytest.raises(SettingsError) as info:
            Settings(**{**room, var.field: value})
        _one_line_naming(info.value, var.name)
    if not spec.whole:  # an int is a fine float, and is kept as one
        value = getattr(Settings(**{**room, var.field: int(spec.high)}), var.field)
        assert type(value) is float


def variable_of(field_name: str) -> str:
    return next(var.name for var in ENVIRONMENT if var.field == field_name)


def test_a_flag_out_of_range_is_named_as_the_flag() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({}, flags={"batch_size": 0})
    assert info.value.setting == "--batch-size"
    assert str(info.value).startswith("--batch-size=0 must be from 1 to 100000")


@pytest.mark.parametrize(
    ("lease", "timeout", "ok"),
    [("30", "15", False), ("30.5", "15", True), ("1", "0.5", False), ("2", "0.9", True)],
)
def test_the_lease_must_be_more_than_twice_the_request_timeout(
    lease: str, timeout: str, ok: bool
) -> None:
    env = {"OUTBOX_LEASE_SECONDS": lease, "OUTBOX_REQUEST_TIMEOUT": timeout}
    if ok:
        assert Settings.from_env(env).lease_seconds == float(lease)
        return
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = _one_line_naming(info.value, "OUTBOX_LEASE_SECONDS")
    assert "more than twice OUTBOX_REQUEST_TIMEOUT" in message
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env, flags={"lease_seconds": float(lease)})
    assert str(info.value).startswith("--lease-seconds (")
    with pytest.raises(SettingsError):
        Settings(lease_seconds=float(lease), request_timeout=float(timeout))


CHOICES = [var for var in ENVIRONMENT if isinstance(var.accepts, Choice)]


@pytest.mark.parametrize("var", CHOICES, ids=lambda v: v.name)
def test_choices_are_read_in_any_case_and_anything_else_is_refused(var: EnvVar) -> None:
    spec = var.accepts
    assert isinstance(spec, Choice)
    key = {"POSTHOG_API_KEY": "phc_x"}
    for option in spec.options:
        assert getattr(Settings.from_env({**key, var.name: option.swapcase()}), var.field) == option
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var.name: "bogus\x1b[2J"})
    message = _one_line_naming(info.value, var.name)
    assert "\x1b" not in message and "\\x1b[2J" in message


def test_log_level_bogus_is_refused_and_debug_is_normalised() -> None:
    with pytest.raises(SettingsError, match="OUTBOX_LOG_LEVEL=bogus is not one of DEBUG"):
        Settings.from_env({"OUTBOX_LOG_LEVEL": "bogus"})
    assert Settings.from_env({"OUTBOX_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert Settings(log_level="warning").log_level == "WARNING"


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("OUTBOX_WORKER_ID", "w\x1b]0;pwned\x07"),
        ("OUTBOX_WORKER_ID", "wörker"),
        ("OUTBOX_WORKER_ID", "w" * 201),
        ("OUTBOX_METRICS_NAMESPACE", "my-app"),
        ("OUTBOX_METRICS_HOST", "0.0.0.0 extra"),
        ("OUTBOX_CONTRACT", "myapp.analytics"),
        ("POSTHOG_HOST", "us.i.posthog.com"),
        ("POSTHOG_HOST", "ftp://us.i.posthog.com"),
        ("POSTHOG_HOST", "https://"),
        ("POSTHOG_HOST", "https://h:99999"),
        ("OUTBOX_GZIP", "maybe"),
        ("OUTBOX_BATCH_SIZE", "\udcff"),  # an undecodable byte, as os.environ holds it
        ("DATABASE_URL", "postgres://::::\udcff"),
    ],
)
def test_text_settings_are_checked(name: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: raw})
    message = _one_line_naming(info.value, name)
    assert "\x1b" not in message and "\x07" not in message


def test_a_secret_is_never_echoed_when_refused() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"POSTHOG_API_KEY": "phc_sec\x1bret"})
    assert "sec" not in str(info.value)
    assert _one_line_naming(info.value, "POSTHOG_API_KEY")


# -- DATABASE_URL --------------------------------------------------------------------

SECRET = "hunter2-s3cret"


@pytest.mark.parametrize(
    "url",
    [
        "postgres://::::",
        f"postgresql//app:{SECRET}@db:5432/app",  # missing colon
        f"postgresq://app:{SECRET}@db:5432/app",  # mistyped scheme
        f"app:{SECRET}@db:5432/app",  # no scheme
        f"mysql://app:{SECRET}@db/app",
        f"postgresql+asyncpg://app:{SECRET}@db/app",
        f"postgresql://app:{SECRET}@[::1/app",  # an unclosed [
        f"postgresql://app:{SECRET}@db:port/app",
        f"postgresql://app:{SECRET}@db:70000/app",
        f"host=db1,db2 port=5432,5433,5434 password={SECRET}",
        f"postgresql://app:{SECRET}@db/app?sslmode=bogus",
        f"postgresql://app:{SECRET}@db/app?connect_timeout=soon",
        f"postgresql://app:{SECRET}@db/app?target_session_attrs=fast",
        f"postgresql://app:{SECRET}@db/app?nonsense=1",
        f"postgresql://app:{SECRET[:4]}%zz{SECRET[4:]}@db/app",  # a bad percent escape
        f"host=db password={SECRET} port=nope",
        f"host=db password='{SECRET}",  # unterminated quote
        f"host=db password={SECRET} dbname",
        "localhost",
    ],
)
def test_malformed_database_urls_are_refused_with_the_password_masked(url: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"DATABASE_URL": url})
    message = _one_line_naming(info.value, "DATABASE_URL")
    assert SECRET not in message and SECRET[:4] not in message
    with pytest.raises(SettingsError) as flagged:
        Settings.from_env({}, flags={"database_url": url})
    assert flagged.value.setting == "--database-url" and SECRET not in str(flagged.value)
    with pytest.raises(SettingsError) as built:
        Settings(database_url=url)
    assert SECRET not in str(built.value) and SECRET not in repr(built.value)
    assert info.value.__cause__ is None or SECRET not in str(info.value.__cause__)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@db:5432/app",
        "postgres://app@db/app",
        "postgresql+psycopg://app:pw@db/app",
        "postgresql://app:pw@db1,db2:5432,5433/app?target_session_attrs=read-write",
        "postgresql://app@db/app?sslmode=verify-full&connect_timeout=5",
        "postgresql://app@db/app?options=-c%20role%3Doutbox_worker",
        "postgresql:///app?host=/var/run/postgresql",
        "host=db port=5432 dbname=app user=app password='p w'",
        "dbname=app",
    ],
)
def test_good_database_urls_are_accepted(url: str) -> None:
    assert Settings.from_env({"DATABASE_URL": f"  {url} "}).database_url == url


# -- the README documents every range and flag ---------------------------------------


def _readme_rows() -> list[list[str]]:
    rows = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_readme_states_each_range_and_its_reason() -> None:
    ranges = {r[0].strip("`"): r for r in _readme_rows() if len(r) == 3}
    assert set(ranges) == {var.name for var in NUMBERS}
    for var in NUMBERS:
        _, accepted, why = ranges[var.name]
        assert accepted == var.accepts.describe()
        assert why.rstrip(".").lower() == var.accepts.why.lower()


def test_the_readme_names_each_flag() -> None:
    table = {r[0].strip("`"): r for r in _readme_rows() if len(r) == 4}
    for var in ENVIRONMENT:
        assert table[var.name][2].strip("`") == (var.flag or ""), var.name


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


def test_check_passes_for_built_settings() -> None:
    settings = Settings.from_env({"OUTBOX_BATCH_SIZE": "10"})
    settings.check()
    assert settings.with_overrides(batch_size=20, poll_interval=None).batch_size == 20
    with pytest.raises(SettingsError, match="OUTBOX_BATCH_SIZE"):
        settings.with_overrides(batch_size=0)
