"""Views that write an order and its analytics event in one transaction (a sync view,
and an async one through sync_to_async), and an async view making the wrong call."""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

import outbox
from shop.models import Order


def place_order(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body)
    with transaction.atomic():
        order = Order.objects.create(user_id=body["user_id"], total_cents=body["total_cents"])
        if order.total_cents <= 0:
            # The order and its event roll back together.
            raise ValueError("an order costs something")
        outbox.enqueue(
            connection,
            "order_placed",
            order.user_id,
            {"order_id": order.id, "total_cents": order.total_cents},
        )
    return JsonResponse({"order_id": order.id}, status=201)


@sync_to_async
def _place_order_in_a_transaction(user_id: str, total_cents: int) -> Order:
    """The order and its event in one atomic block, on the thread sync_to_async runs
    Django's connection on (thread_sensitive, its default)."""
    with transaction.atomic():
        order = Order.objects.create(user_id=user_id, total_cents=total_cents)
        if order.total_cents <= 0:
            raise ValueError("an order costs something")
        outbox.enqueue(
            connection,
            "order_placed",
            order.user_id,
            {"order_id": order.id, "total_cents": order.total_cents},
        )
    return order


async def place_order_async(request: HttpRequest) -> HttpResponse:
    body = json.loads(request.body)
    order = await _place_order_in_a_transaction(body["user_id"], body["total_cents"])
    return JsonResponse({"order_id": order.id}, status=201)


async def enqueue_in_async_code(request: HttpRequest) -> HttpResponse:
    """The wrong call: Django's connection from the event loop."""
    outbox.enqueue(connection, "never_written", "u")
    return JsonResponse({}, status=201)
