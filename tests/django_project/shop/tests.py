"""Run by Django's own test runner (``manage.py test shop``): each TestCase test is one
transaction that rolls back, and it reads what the view enqueued before that."""

from __future__ import annotations

import json

from django.db import connection
from django.test import TestCase, TransactionTestCase

from shop.models import Order


def enqueued() -> list[tuple[str, str, dict[str, object]]]:
    """The events this test's transaction wrote, committed or not."""
    with connection.cursor() as cursor:
        # Django's connection reads jsonb as text (its JSONField decodes it).
        cursor.execute("SELECT event, distinct_id, properties FROM outbox_events ORDER BY id")
        return [(e, d, json.loads(p)) for e, d, p in cursor.fetchall()]


class PlaceOrderTests(TestCase):
    def test_the_test_database_has_the_outbox_tables(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM outbox_events")
            assert cursor.fetchone() == (0,)

    def test_the_view_enqueues_order_placed(self) -> None:
        response = self.client.post(
            "/orders/", {"user_id": "user-42", "total_cents": 1250}, content_type="application/json"
        )
        assert response.status_code == 201
        order = Order.objects.get()
        [(event, distinct_id, properties)] = enqueued()
        assert (event, distinct_id) == ("order_placed", "user-42")
        assert properties["order_id"] == order.id
        assert properties["total_cents"] == 1250

    def test_a_refused_order_enqueues_nothing(self) -> None:
        self.client.raise_request_exception = False
        response = self.client.post(
            "/orders/", {"user_id": "user-43", "total_cents": 0}, content_type="application/json"
        )
        assert response.status_code == 500
        assert enqueued() == []
        assert not Order.objects.exists()


class CommittedEventsStayTests(TransactionTestCase):
    """Django empties the tables of its models after each TransactionTestCase test, not
    the outbox's (its tables are no model's): what a test committed stays."""

    def test_1_the_view_commits_its_event(self) -> None:
        response = self.client.post(
            "/orders/", {"user_id": "user-42", "total_cents": 1250}, content_type="application/json"
        )
        assert response.status_code == 201
        assert [e for e, _, _ in enqueued()] == ["order_placed"]

    def test_2_the_event_outlives_the_flush(self) -> None:
        assert not Order.objects.exists()
        assert [e for e, _, _ in enqueued()] == ["order_placed"]
