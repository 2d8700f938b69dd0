"""No secret in any output: URLs masked (malformed ones too), driver errors scrubbed."""

from __future__ import annotations

import traceback

import psycopg
import pytest

from outbox.exceptions import OutboxDatabaseError
from worker.database import connect, describe_url, scrub
from worker.redaction import mask_url, redact, url_secrets

PW = "hunter2-s3cret"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"postgresql://app:{PW}@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            f"postgres://app:{PW}@db/app?sslmode=require",
            "postgres://app:***@db/app?sslmode=require",
        ),
        (f"postgresql//app:{PW}@db/app", "postgresql//app:***@db/app"),
        (f"app:{PW}@db/app", "app:***@db/app"),
        (f"postgresql://app:{PW}@[::1/app", "postgresql://app:***@[::1/app"),
        ("postgresql://app:p@ss@db/app", "postgresql://app:***@db/app"),  # a raw @
        (f"postgresql://app@db/app?password={PW}&x=1", "postgresql://app@db/app?password=***&x=1"),
        (f"host=db password={PW} dbname=app", "host=db password=*** dbname=app"),
        (f"host=db password = '{PW} x\\' y' dbname=app", "host=db password = *** dbname=app"),
        (f"host=db password='{PW}", "host=db password=***"),  # unterminated
        (f"host=db sslpassword={PW}", "host=db sslpassword=***"),
        ("postgresql://app@db:5432/app", "postgresql://app@db:5432/app"),  # nothing to mask
        ("postgres://::::", "postgres://::::"),
        ("https://user:pw@proxy.example.com", "https://user:***@proxy.example.com"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_url_secrets_include_the_decoded_forms() -> None:
    assert url_secrets("postgresql://app:p%40ss@db/app") == ("p%40ss", "p@ss")
    assert url_secrets("host=db password='a\\'b'") == ("a\\'b", "a'b")
    assert url_secrets("postgresql://app@db/app") == ()
    assert url_secrets(None) == ()


def test_redact_masks_urls_in_free_text_and_every_given_secret() -> None:
    text = (
        f'missing "=" after "postgresql//app:{PW}@db/app" in connection info string\n'
        f"invalid percent-encoded token: {PW}; key phc_abc; other://u:pw@h"
    )
    out = redact(text, [PW, "phc_abc", None, ""])
    assert PW not in out and "phc_abc" not in out and "u:pw@" not in out
    assert 'after "postgresql//app:***@db/app" in connection' in out
    assert out.count("\n") == 1  # the shape of the text is kept


def test_describe_url_never_shows_the_password() -> None:
    assert describe_url(f"postgresql://app:{PW}@db:6432/app") == "app@db:6432/app"
    assert describe_url(f"postgresql://app:{PW}@[db/app") == "<unparsable URL>"


def test_a_driver_error_kept_as_the_cause_is_scrubbed() -> None:
    url = f"postgresql://app:{PW}@127.0.0.1:1/app?connect_timeout=2"
    with pytest.raises(OutboxDatabaseError) as info:
        connect(url)
    shown = "".join(traceback.format_exception(info.value))
    assert PW not in shown
    assert "app@127.0.0.1:1/app" in str(info.value)
    err = psycopg.ProgrammingError(f'bad "postgresql://app:{PW}@db"')
    assert PW not in str(scrub(err, None))
    err = psycopg.ProgrammingError(f"invalid percent-encoded token: {PW[:4]}%zz")
    assert "%zz" not in str(scrub(err, f"postgresql://app:{PW[:4]}%zz@db"))
