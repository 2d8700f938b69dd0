"""Run by Django's own test runner (``manage.py test shop``).

A TestCase test is one transaction that Django rolls back: outbox.testing reads what
the view enqueued in it, uncommitted. A TransactionTestCase test commits: the
events stay (Django empties its models' tables, not the outbox's) and
worker.testing.deliver ships them to a capture server with the real worker.
"""

from __future__ import annotations

from django.db import connection
from django.http import HttpResponse
from django.test import Client, TestCase, TransactionTestCase

from outbox.contrib.django.schema import conninfo
from outbox.testing import assert_enqueued, assert_not_enqueued, enqueued
from shop.models import Order
from worker.testing import CaptureServer, deliver


def place(user_id: str, total_cents: int, client: Client) -> HttpResponse:
    return client.post(
        "/orders/",
        {"user_id": user_id, "total_cents": total_cents},
        content_type="application/json",
    )


class PlaceOrderTests(TestCase):
    def test_the_test_database_has_the_outbox_tables(self) -> None:
        assert enqueued(connection) == []

    def test_the_view_enqueues_order_placed(self) -> None:
        response = place("user-42", 1250, self.client)
        assert response.status_code == 201
        order = Order.objects.get()
        [event] = assert_enqueued(
            connection,
            "order_placed",
            distinct_id="user-42",
            properties={"order_id": order.id, "total_cents": 1250},
        )
        assert event.in_transaction  # not committed: Django rolls it back after the test

    def test_a_refused_order_enqueues_nothing(self) -> None:
        self.client.raise_request_exception = False
        response = place("user-43", 0, self.client)
        assert response.status_code == 500
        assert_not_enqueued(connection)
        assert not Order.objects.exists()


class CommittedEventsTests(TransactionTestCase):
    def test_1_the_view_commits_its_event_and_deliver_ships_it(self) -> None:
        response = place("user-42", 1250, self.client)
        assert response.status_code == 201
        with CaptureServer() as capture:
            [event] = deliver(database_url(), capture)
        assert (event["event"], event["distinct_id"]) == ("order_placed", "user-42")
        assert event["properties"]["total_cents"] == 1250

    def test_2_a_committed_event_outlives_djangos_flush(self) -> None:
        assert place("user-44", 700, self.client).status_code == 201

    def test_3_the_event_is_still_there(self) -> None:
        assert not Order.objects.exists()  # Django flushed its own table
        [event] = enqueued(connection, scope="all")
        assert (event.event, event.distinct_id) == ("order_placed", "user-44")


def database_url() -> str:
    """The test database (``test_<NAME>``) as a libpq connection string."""
    return conninfo(connection)
