"""The real ``outbox-worker reconcile`` after a real drain (``run --until-empty``) to the
capture server, over HTTP and against a real PostgreSQL: a healthy run reconciles to
zero difference; with a project key of no project PostHog counts none of what the
ledger counts. The personal API key never appears in what either command prints."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from tests.acceptance.test_worker_process import run_cli
from tests.conftest import undelivered, worker_env
from tests.integration.test_metrics_only import REGISTRY
from worker.testing import CaptureServer, Reply

ROOT = Path(__file__).resolve().parents[2]
PERSONAL = "phx_Pers0nalKeyPers0nalKeyPers0nalKey42"
RIGHT = "phc_Rr1ghtRr1ghtRr1ghtRr1ghtRr1ghtRr1ght"
WRONG = "phc_Wr0ngWr0ngWr0ngWr0ngWr0ngWr0ngWr0ng"
PROJECT = 4242


@pytest.fixture
def contract() -> Iterator[None]:
    outbox.configure(registry=REGISTRY)
    yield
    outbox.configure()


def enqueue_events(database_url: str) -> None:
    """12 issue_created, 3 of them yesterday (UTC), and 2 metrics-only runtime_ready."""
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    with psycopg.connect(database_url) as conn:
        for i in range(12):
            outbox.enqueue(
                conn,
                "issue_created",
                f"user-{i}",
                {"issue_id": f"issue-{i}"},
                timestamp=yesterday if i < 3 else None,
            )
        for provider in ("claude", "codex"):
            outbox.enqueue(
                conn, "runtime_ready", "daemon", {"provider": provider, "runtime_id": "r"}
            )
        conn.commit()


def env_for(database_url: str, capture: CaptureServer, **extra: str) -> dict[str, str]:
    return worker_env(
        database_url,
        capture,
        OUTBOX_CONTRACT="tests.integration.test_metrics_only:REGISTRY",
        OUTBOX_POSTHOG_PERSONAL_API_KEY=PERSONAL,
        OUTBOX_POSTHOG_PROJECT_ID=str(PROJECT),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra,
    )


def drain(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = run_cli(env, "run", "--until-empty")
    assert result.returncode == 0, result.stderr
    return result


def no_secret(*results: subprocess.CompletedProcess[str]) -> None:
    for result in results:
        for text in (result.stdout, result.stderr):
            assert PERSONAL not in text
            assert PERSONAL[:12] not in text  # not even cut short


def ledger_days(db: psycopg.Connection[Any]) -> dict[str, int]:
    rows = db.execute(
        "SELECT day::text, sum(delivered)::int FROM outbox_ledger "
        "WHERE destination = 'posthog' GROUP BY day ORDER BY day"
    ).fetchall()
    return dict(rows)


@pytest.fixture
def project(capture: CaptureServer) -> CaptureServer:
    capture.query.personal_api_key = PERSONAL
    capture.query.project_id = PROJECT
    capture.project_keys = {RIGHT}
    return capture


def test_a_healthy_run_reconciles_to_zero(
    contract: None, database_url: str, db: psycopg.Connection[Any], project: CaptureServer
) -> None:
    enqueue_events(database_url)
    env = env_for(database_url, project, POSTHOG_API_KEY=RIGHT)
    ran = drain(env)
    days = ledger_days(db)
    assert sorted(days.values()) == [3, 9]

    text = run_cli(env, "reconcile")
    assert text.returncode == 0, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"reconcile: the outbox's ledger against PostHog project {PROJECT}")
    rows = [line.split() for line in lines if line.startswith(tuple(days))]
    (yesterday, before), (today, now) = days.items()
    assert rows == [
        [yesterday, "issue_created", str(before), str(before), "0"],
        [today, "issue_created", str(now), str(now), "0", "still", "moving"],
    ]
    flat = " ".join(text.stdout.split())
    assert "metrics-only events go to Prometheus, never to PostHog: runtime_ready (2)" in flat
    assert "re-sent duplicates" in flat and "is still moving" in flat
    assert "Every row is within the threshold (any difference)." in flat

    as_json = run_cli(env, "reconcile", "--json", "--event", "issue_created")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert [(r["delivered"], r["posthog"], r["difference"]) for r in report["rows"]] == [
        (3, 3, 0),
        (9, 9, 0),
    ]
    assert report["project_id"] == PROJECT and report["over_threshold"] == 0
    # One query each, with the personal key as a Bearer token, for the outbox's events.
    assert [q.events for q in project.query.queries] == [("issue_created",)] * 2
    no_secret(ran, text, as_json)


def test_a_key_of_no_project_shows_posthog_counting_none_of_the_ledger(
    contract: None, database_url: str, db: psycopg.Connection[Any], project: CaptureServer
) -> None:
    enqueue_events(database_url)
    # Without the key check (a proxy that forwards only capture), capture answers the
    # wrong key 200, the outbox deletes the rows, and PostHog drops the events.
    env = env_for(database_url, project, POSTHOG_API_KEY=WRONG, OUTBOX_VERIFY_API_KEY="0")
    ran = drain(env)
    assert len(project.dropped) == 12 and project.events == []
    days = ledger_days(db)
    assert sum(days.values()) == 12

    text = run_cli(env, "reconcile", "--threshold", "1")
    assert text.returncode == 1, text.stdout + text.stderr
    rows = [line.split() for line in text.stdout.splitlines() if line.startswith(tuple(days))]
    assert [r[:5] for r in rows] == [
        [day, "issue_created", str(n), "0", f"-{n}"] for day, n in days.items()
    ]
    assert all("over threshold" in " ".join(r) for r in rows)
    assert "2 of 2 rows pass the threshold (a difference of more than 1 event)" in " ".join(
        text.stdout.split()
    )

    # A looser threshold: -9 and -3 are not over 9 events.
    loose = run_cli(env, "reconcile", "--threshold", "9", "--json")
    assert loose.returncode == 0, loose.stderr
    report = json.loads(loose.stdout)
    assert [r["over_threshold"] for r in report["rows"]] == [False, False]
    # Both limits given: over 2 events and over 99% of the delivered ones.
    both = run_cli(env, "reconcile", "--threshold", "2", "--threshold-percent", "99")
    assert both.returncode == 1, both.stderr
    no_secret(ran, text, loose, both)


def test_failures_are_one_line_with_their_exit_status_and_no_key(
    database_url: str, project: CaptureServer
) -> None:
    env = env_for(database_url, project, POSTHOG_API_KEY=RIGHT)
    missing = run_cli({**env, "OUTBOX_POSTHOG_PROJECT_ID": ""}, "reconcile")
    assert missing.returncode == 2
    assert missing.stderr.startswith(
        "outbox-worker: error: reconcile needs OUTBOX_POSTHOG_PROJECT_ID"
    )

    bad = run_cli({**env, "OUTBOX_POSTHOG_PROJECT_ID": "-1"}, "reconcile")
    assert bad.returncode == 2
    assert bad.stderr.startswith("outbox-worker: error: OUTBOX_POSTHOG_PROJECT_ID=-1 must be")

    with psycopg.connect(database_url) as conn:
        outbox.enqueue(conn, "issue_created", "u", {"issue_id": "i"})
        conn.commit()
    drain(env)
    project.query.personal_api_key = "phx_another"
    refused = run_cli(env, "reconcile")
    assert refused.returncode == 3
    [line] = refused.stderr.splitlines()
    assert line.startswith(
        f"outbox-worker: error: PostHog at {project.url}/api/projects/{PROJECT}/query did not "
        "accept OUTBOX_POSTHOG_PERSONAL_API_KEY (401"
    )
    assert refused.stdout == ""

    project.query.personal_api_key = PERSONAL
    project.query.enqueue_reply(Reply(status=429, retry_after=60))
    limited = run_cli(env, "reconcile")
    assert limited.returncode == 3
    assert "rate-limiting queries (429" in limited.stderr and "try again in 60 s" in limited.stderr

    # A server that echoes the key back: masked, at every log level.
    project.query.enqueue_reply(Reply(status=500, body={"detail": f"no luck for {PERSONAL}"}))
    echoed = run_cli(env, "reconcile", "--log-level", "DEBUG")
    assert echoed.returncode == 3
    assert "answered 500: no luck for ***" in echoed.stderr

    project.stop()
    unreachable = run_cli(env, "reconcile")
    assert unreachable.returncode == 3
    [line] = unreachable.stderr.splitlines()
    assert line.startswith(f"outbox-worker: error: could not ask PostHog at {project.url}")
    assert "Traceback" not in unreachable.stderr
    no_secret(missing, bad, refused, limited, echoed, unreachable)


def test_re_sent_duplicates_show_as_a_positive_difference_until_posthog_merges_them(
    database_url: str, db: psycopg.Connection[Any], project: CaptureServer
) -> None:
    with psycopg.connect(database_url) as conn:
        for i in range(5):
            outbox.enqueue(conn, "issue_created", f"user-{i}", {"issue_id": f"issue-{i}"})
        conn.commit()
    # PostHog stores the batch but answers after the worker gave up: it sends it again.
    project.enqueue_reply(Reply(status=200, delay=2))
    project.query.merged = False  # as PostHog counts before ClickHouse merges the copies
    env = env_for(
        database_url,
        project,
        POSTHOG_API_KEY=RIGHT,
        OUTBOX_REQUEST_TIMEOUT="0.5",
        OUTBOX_BACKOFF_BASE="0",
    )
    runs = [run_cli(env, "run", "--until-empty")]
    if undelivered(database_url):
        runs.append(run_cli(env, "run", "--until-empty"))
    assert undelivered(database_url) == 0, [r.stderr for r in runs]
    project.wait_for_events(10, timeout=20)  # the late copy, too
    assert sum(ledger_days(db).values()) == 5  # the ledger counts each event once

    before = run_cli(env, "reconcile", "--json")
    assert before.returncode == 1, before.stderr
    [row] = json.loads(before.stdout)["rows"]
    assert (row["delivered"], row["posthog"], row["difference"]) == (5, 10, 5)

    project.query.merged = True  # ClickHouse merged them
    after = run_cli(env, "reconcile")
    assert after.returncode == 0, after.stdout + after.stderr
    no_secret(*runs, before, after)
