"""A view that writes an order and its analytics event in one transaction."""

from __future__ import annotations

import json

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
