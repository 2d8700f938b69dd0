"""OUTBOX_POOLER: the worker's pooler mode, its flag, and the defaults it changes."""

from __future__ import annotations

import pytest

from worker.cli import build_parser
from worker.database import connect_options
from worker.settings import (
    DEFAULT_POLL_INTERVAL,
    DEFAULT_POLL_ONLY_INTERVAL,
    Settings,
    SettingsError,
)


def test_by_default_the_worker_listens_and_polls_every_second() -> None:
    settings = Settings.from_env({})
    assert settings.pooler == "none"
    assert settings.listen
    assert settings.poll_seconds == DEFAULT_POLL_INTERVAL == 1.0
    assert connect_options(settings.pooler) == {}


def test_poll_only_polls_faster_by_default() -> None:
    settings = Settings.from_env({"OUTBOX_NOTIFY": "0"})
    assert not settings.listen
    assert settings.poll_seconds == DEFAULT_POLL_ONLY_INTERVAL == 0.1


@pytest.mark.parametrize("notify", [None, "0", "1"])
def test_behind_a_transaction_pooler_nothing_is_prepared_and_nothing_listens(
    notify: str | None,
) -> None:
    env = {"OUTBOX_POOLER": "Transaction"}
    if notify is not None:
        env["OUTBOX_NOTIFY"] = notify
    settings = Settings.from_env(env)
    assert settings.pooler == "transaction"
    assert not settings.listen
    assert settings.poll_seconds == DEFAULT_POLL_ONLY_INTERVAL
    assert connect_options(settings.pooler) == {"prepare_threshold": None}


def test_an_explicit_poll_interval_wins() -> None:
    settings = Settings.from_env({"OUTBOX_POOLER": "transaction", "OUTBOX_POLL_INTERVAL": "2"})
    assert settings.poll_seconds == 2.0


def test_a_bad_pooler_is_one_line_naming_the_variable() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OUTBOX_POOLER": "session"})
    assert info.value.setting == "OUTBOX_POOLER"
    assert "not one of none or transaction" in str(info.value)


def test_the_pooler_flag() -> None:
    args = build_parser().parse_args(["run", "--pooler", "transaction"])
    assert args.pooler == "transaction"


def test_a_bad_pooler_flag_is_one_line_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--pooler", "session"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--pooler=session" in err
