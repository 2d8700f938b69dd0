"""``outbox-worker demo``: a small application writing its own rows and enqueueing
events in the same transactions (some of which roll back), then a drain.

It shows the point of the outbox: what ships is exactly what committed.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ForeignKey, String, create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox
from worker.app import Worker, build_sink
from worker.database import migrate, resolve_database_url, sqlalchemy_url
from worker.settings import Settings
from worker.sinks.base import Event, Outbound, Sink


class Base(DeclarativeBase):
    """The demo application's own tables."""


class User(Base):
    """A person who signed up."""

    __tablename__ = "demo_users"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(200), unique=True)


class Workspace(Base):
    """A workspace a user created."""

    __tablename__ = "demo_workspaces"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("demo_users.id"))


class Issue(Base):
    """An issue in a workspace."""

    __tablename__ = "demo_issues"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("demo_workspaces.id"))
    title: Mapped[str] = mapped_column(String(200))


class RecordingSink:
    """Passes batches to the real sink and remembers what it accepted."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.name = inner.name
        self.events: list[Event] = []

    def send(self, events: Sequence[Outbound]) -> None:
        """Send through the inner sink; record on success."""
        self.inner.send(events)
        self.events.extend(e.data for e in events)

    def close(self) -> None:
        """Close the inner sink."""
        self.inner.close()


def _signup(session: Session, email: str) -> User:
    user = User(email=email)
    session.add(user)
    session.flush()
    outbox.enqueue(
        session,
        "user_signed_up",
        user.id,
        {"email_domain": email.split("@")[1], "auth_method": "email"},
    )
    return user


def run_demo(settings: Settings) -> int:
    """Run the demo against the configured (or embedded) database; returns an exit code."""
    url = resolve_database_url(settings.database_url, settings.data_dir)
    migrate(url)
    engine = create_engine(sqlalchemy_url(url))
    Base.metadata.create_all(engine)
    run = secrets.token_hex(3)
    story: list[tuple[str, str]] = []
    committed: list[uuid.UUID] = []
    rolled_back: list[str] = []

    with Session(engine) as session, session.begin():
        alice_id = _signup(session, f"alice-{run}@example.com").id
        story.append(("commit", "alice signs up: user row + user_signed_up"))
    with Session(engine) as session, session.begin():
        ws = Workspace(name="Acme", owner_id=alice_id)
        session.add(ws)
        session.flush()
        first = outbox.enqueue(
            session,
            "workspace_created",
            alice_id,
            {"workspace_id": str(ws.id)},
            dedup_key=f"workspace_created:{ws.id}",
        )
        again = outbox.enqueue(
            session,
            "workspace_created",
            alice_id,
            {"workspace_id": str(ws.id)},
            dedup_key=f"workspace_created:{ws.id}",
        )
        if first is None or again is not None:
            raise RuntimeError("the duplicate workspace_created should have been refused")
        committed.append(first)
        story.append(
            (
                "commit",
                "alice creates a workspace (a retried handler's duplicate "
                "event is refused by its dedup key)",
            )
        )
        workspace_id = ws.id
    with Session(engine) as session, session.begin():
        titles = ["Set up billing", "Invite the team", "Write the launch post"]
        issues = [Issue(workspace_id=workspace_id, title=t) for t in titles]
        session.add_all(issues)
        session.flush()
        outbox.enqueue_many(
            session,
            [
                {
                    "event": "issue_created",
                    "distinct_id": alice_id,
                    "properties": {"workspace_id": str(workspace_id), "issue_id": str(i.id)},
                }
                for i in issues
            ],
        )
        story.append(("commit", "alice creates 3 issues with enqueue_many (one statement)"))
    try:
        with Session(engine) as session, session.begin():
            _signup(session, f"alice-{run}@example.com")  # same email: unique violation
    except IntegrityError:
        rolled_back.append("user_signed_up (duplicate email)")
        story.append(
            (
                "rollback",
                "a second signup with alice's email fails its unique "
                "constraint: its event rolls back with it",
            )
        )
    with Session(engine) as session:
        session.begin()
        issue = Issue(workspace_id=workspace_id, title="Draft that is abandoned")
        session.add(issue)
        session.flush()
        outbox.enqueue(session, "issue_created", alice_id, {"issue_id": str(issue.id)})
        session.rollback()
        rolled_back.append("issue_created (handler rolled back)")
        story.append(("rollback", "a request handler errors after enqueueing: rollback"))

    with Session(engine) as session:
        pending = session.execute(outbox_count_sql()).scalar_one()
    engine.dispose()

    print("\nthe application's transactions:")
    for outcome, text in story:
        print(f"  {outcome:<9} {text}")
    print(
        f"\n{pending} events wait in outbox_events; draining them now "
        f"(sink: {settings.sink_name})...\n"
    )

    sink = RecordingSink(build_sink(settings))
    worker = Worker(settings, sink=sink, database_url=url)
    stats = worker.run_until_empty()

    print(f"\nshipped {stats.shipped} events:")
    for e in sink.events:
        props: dict[str, Any] = dict(e["properties"])
        print(f"  {e['event']:<18} uuid={e['uuid']}  {_brief(props)}")
    print("\nnever shipped, because their transactions rolled back:")
    for name in rolled_back:
        print(f"  {name}")
    return 0


def outbox_count_sql() -> Any:
    """The statement counting the pending events (over the view ``outbox_events``:
    what the event tables and ``outbox_retry`` hold undelivered)."""
    from sqlalchemy import text

    return text("SELECT count(*) FROM outbox_events WHERE status = 'pending'")


def _brief(props: dict[str, Any]) -> str:
    shown = {k: v for k, v in props.items() if not k.startswith("$")}
    return " ".join(f"{k}={v}" for k, v in shown.items())
