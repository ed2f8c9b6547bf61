"""Orders service routes: the cart, placing orders (idempotent), reading, cancelling and shipping them."""
from __future__ import annotations

import logging
import re

from bookshop import tracing
from bookshop.deps import OrdersDeps
from bookshop.handlers.base import BaseHandler, error_body
from bookshop.handlers.bodies import Card, Line
from bookshop.handlers.catalog import ISBN
from bookshop.handlers.common import int_arg
from bookshop.services import cards, errors
from bookshop.services.catalog import page_limit
from bookshop.services.checkout import request_fingerprint
from bookshop.services.isbn import normalize_isbn
from bookshop.services.orders import OrderStatus, order_view, price, qualifies_for_promotion
from bookshop.services.place_order import Answer, OrderRequest
from bookshop.validation import StrictModel

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ORDER_ID = r"([0-9a-f]{24})"


class OrdersBase(BaseHandler):
    """Base of the orders routes: their collaborators are ``self.deps``."""
    deps: OrdersDeps


class Address(StrictModel):
    name: str
    line1: str
    line2: str | None = None
    city: str
    postal_code: str
    country: str


class NewOrder(StrictModel):
    items: list[Line] | None = None
    from_cart: bool | None = None
    shipping_address: Address
    payment: Card
    expected_total_cents: int | None = None


class CartQuantity(StrictModel):
    quantity: int


def _check_address(address: Address) -> dict:
    out = {}
    for field, value in address.model_dump().items():
        if value is None:
            continue
        value = value.strip()
        limit = 2 if field == "country" else 200
        if not value or len(value) > limit or (field == "country" and not value.isalpha()):
            what = "a two-letter country code" if field == "country" else f"1 to {limit} characters"
            raise errors.InvalidInput(f"shipping_address.{field}: must be {what}", code="invalid_field",
                                      details={"field": f"shipping_address.{field}"})
        out[field] = value.upper() if field == "country" else value
    return out


class CartHandler(OrdersBase):
    async def get(self):
        principal = self.require("customer")
        self.write_json(await price_cart(self.deps, self.ctx.settings.currency, principal.sub))


async def price_cart(deps: OrdersDeps, currency: str, user_id: str) -> dict:
    carts = deps.carts
    lines = [(i["isbn"], i["quantity"]) for i in await carts.get(user_id)]
    if not lines:
        return {"items": [], "subtotal_cents": 0, "discount_cents": 0, "total_cents": 0, "currency": currency}
    books = await deps.catalog.books([isbn for isbn, _ in lines])
    gone = [isbn for isbn, _ in lines if isbn not in books]
    if gone:  # books that left sale leave carts too
        await carts.drop(user_id, gone)
        lines = [(isbn, q) for isbn, q in lines if isbn in books]
    promo = qualifies_for_promotion(lines) and await deps.checkout.promotion_available(user_id)
    priced = price(lines, books, currency, promo) if lines else None
    if priced is None:
        return {"items": [], "subtotal_cents": 0, "discount_cents": 0, "total_cents": 0, "currency": currency}
    return {"items": [line.as_dict() for line in priced.items], "subtotal_cents": priced.subtotal_cents,
            "discount_cents": priced.discount_cents, "total_cents": priced.total_cents, "currency": currency}


class CartItemHandler(OrdersBase):
    async def put(self, raw_isbn):
        principal = self.require("customer")
        isbn = normalize_isbn(raw_isbn)
        quantity = self.json_body(CartQuantity).quantity
        if not 0 <= quantity <= 100:
            raise errors.InvalidInput("quantity: must be an integer from 0 to 100", code="invalid_field",
                                      details={"field": "quantity"})
        if quantity and await self.deps.catalog.book(isbn) is None:
            raise errors.NotFound("no such book", code="book_not_found")
        if not await self.deps.carts.set_quantity(principal.sub, isbn, quantity):
            raise errors.Conflict("the cart is full", code="cart_full")
        self.write_json(await price_cart(self.deps, self.ctx.settings.currency, principal.sub))


class OrdersHandler(OrdersBase):
    async def get(self):
        principal = self.require("customer", "staff")
        status = self.get_query_argument("status", None)
        if status is not None and status not in {s.value for s in OrderStatus}:
            raise errors.InvalidInput("status: one of PENDING, CONFIRMED, SHIPPED, CANCELLED",
                                      code="invalid_field", details={"field": "status"})
        limit = page_limit(self.get_query_argument("limit", None))
        cursor = self.get_query_argument("cursor", None)
        before = None
        if cursor:
            before = self.deps.cursors.decode(cursor).get("before")
            if not isinstance(before, str):
                raise errors.InvalidInput("cursor: not a cursor this server issued", code="invalid_field")
        user_id = None if principal.is_staff else principal.sub
        docs = await self.deps.orders.page(user_id, status, before, limit + 1)
        more = len(docs) > limit
        docs = docs[:limit]
        next_cursor = self.deps.cursors.encode({"before": docs[-1]["_id"]}) if more else None
        self.write_json({"items": [order_view(d) for d in docs], "next_cursor": next_cursor})

    async def post(self):
        principal = self.require("customer")
        key = self.request.headers.get("Idempotency-Key")
        if not key or not _KEY.match(key):
            raise errors.InvalidInput("Idempotency-Key header: required, 1 to 128 letters, digits or ._:-",
                                      code="idempotency_key_required", details={"field": "Idempotency-Key"})
        request = self.order_request(principal.sub, key, self.json_body(NewOrder))
        self.write_answer(await self.deps.place_orders.place(request))

    def order_request(self, user_id: str, key: str, body: NewOrder) -> OrderRequest:
        if (body.items is None) == (not body.from_cart):
            raise errors.InvalidInput("items: give either items or from_cart: true", code="invalid_field",
                                      details={"field": "items"})
        items = None if body.from_cart else [(normalize_isbn(line.isbn, f"items[{i}].isbn"), line.quantity)
                                             for i, line in enumerate(body.items)]
        card = body.payment
        # the card's form here; its dates once the key is known to be new (services/place_order.py): a replay
        # is the first answer, whatever the calendar says now
        number = cards.validate_card(card.card_number, card.exp_month, card.exp_year, card.cvc, None)
        if body.expected_total_cents is not None and body.expected_total_cents < 0:
            raise errors.InvalidInput("expected_total_cents: must not be negative", code="invalid_field",
                                      details={"field": "expected_total_cents"})
        return OrderRequest(user_id=user_id, key=key,
                            fingerprint=request_fingerprint(self.json_body(), self.ctx.settings.service_secret),
                            items=items, shipping_address=_check_address(body.shipping_address),
                            card={**card.model_dump(), "card_number": number},
                            expected_total_cents=body.expected_total_cents, traceparent=tracing.traceparent())

    def write_answer(self, answer: Answer) -> None:
        if answer.order is not None:
            self.write_json(order_view(answer.order), answer.status)
            return
        if answer.retry_after or answer.status in (503, 429):
            self.set_header("Retry-After", str(answer.retry_after or 5))
        body = answer.body or error_body(answer.code, answer.message, self.request_id, answer.details)
        self.write_json(body, answer.status)


async def visible_order(handler: OrdersBase, order_id: str) -> dict:
    """The order if the caller may see it; another customer's order is a 404, not a 403."""
    principal = handler.require("customer", "staff")
    order = await handler.deps.orders.get(order_id)
    if order is None or (not principal.is_staff and order["user_id"] != principal.sub):
        raise errors.NotFound("no such order", code="order_not_found")
    return order


class OrderHandler(OrdersBase):
    async def get(self, order_id):
        self.write_json(order_view(await visible_order(self, order_id)))


class CancelHandler(OrdersBase):
    async def post(self, order_id):
        order = await visible_order(self, order_id)
        doc = await self.deps.checkout.cancel_by_request(order, by=self.principal.sub)
        self.write_json(order_view(doc))


class ShipHandler(OrdersBase):
    async def post(self, order_id):
        self.require("staff")
        order = await visible_order(self, order_id)
        self.write_json(order_view(await self.deps.checkout.ship(order, by=self.principal.sub)))


class PaymentsLedgerHandler(OrdersBase):
    async def get(self, order_id):
        self.require("staff")
        await visible_order(self, order_id)
        self.write_json(await self.deps.payments.ledger(order_id))


class RecentOrdersHandler(OrdersBase):
    """``GET /internal/orders/recent?user_id=`` (service): the newest orders, for dashboard snapshots."""

    async def get(self):
        self.require("service")
        user_id = self.get_query_argument("user_id", None)
        limit = int_arg(self, "limit", 50, 1, 200)
        seq = await self.ctx.event_log.latest_seq()  # first: later events are newer than the snapshot
        epoch = await self.ctx.event_log.epoch()
        docs = await self.deps.orders.recent(user_id, limit)
        self.write_json({"items": [order_view(d) for d in docs], "seq": seq, "epoch": epoch})


class PurchasesHandler(OrdersBase):
    """``GET /internal/orders/purchases?after=&limit=`` (service): confirmed and shipped orders with their lines,
    a page at a time by order id; ``next_after`` is None on the last page."""

    async def get(self):
        self.require("service")
        after = self.get_query_argument("after", None)
        if after is not None and not re.fullmatch(r"[0-9a-f]{24}", after):
            raise errors.InvalidInput("after: an order id", code="invalid_field", details={"field": "after"})
        limit = int_arg(self, "limit", 500, 1, 1000)
        docs = await self.deps.orders.purchases(after, limit)
        items = [{"id": d["_id"], "user_id": d["user_id"], "status": d["status"],
                  "lines": [{"isbn": i["isbn"], "quantity": i["quantity"]} for i in d["items"]]} for d in docs]
        self.write_json({"items": items, "next_after": docs[-1]["_id"] if len(docs) == limit else None})


class PurchasedHandler(OrdersBase):
    async def get(self, user_id):
        self.require("service")
        self.write_json({"isbns": await self.deps.orders.purchased(user_id)})


def routes() -> list[tuple]:
    return [
        (r"/api/v1/cart", CartHandler),
        (rf"/api/v1/cart/items/{ISBN}", CartItemHandler),
        (r"/api/v1/orders", OrdersHandler),
        (r"/api/v1/orders/([^/]+)", OrderHandler),
        (rf"/api/v1/orders/{_ORDER_ID}/cancel", CancelHandler),
        (rf"/api/v1/orders/{_ORDER_ID}/ship", ShipHandler),
        (rf"/api/v1/orders/{_ORDER_ID}/payments", PaymentsLedgerHandler),
        (r"/internal/orders/recent", RecentOrdersHandler),
        (r"/internal/orders/purchases", PurchasesHandler),
        (r"/internal/users/([A-Za-z0-9_:-]{1,64})/purchased", PurchasedHandler),
    ]
