"""Orders service routes: the cart, placing orders (idempotent), reading, cancelling and shipping them."""
from __future__ import annotations

import asyncio
import datetime
import hmac
import logging
import re

from bookshop import tracing
from bookshop.deps import OrdersDeps
from bookshop.handlers.base import BaseHandler, error_body, status_of
from bookshop.handlers.catalog import ISBN
from bookshop.handlers.common import int_arg
from bookshop.services import cards, errors
from bookshop.services.catalog import page_limit
from bookshop.services.checkout import RETRYABLE, DuplicateRequest, PlaceOrder, first_answer, request_fingerprint
from bookshop.services.isbn import normalize_isbn
from bookshop.services.orders import OrderStatus, merge_lines, price, qualifies_for_promotion
from bookshop.storage.orders import new_order_id, order_view
from bookshop.validation import StrictModel

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ORDER_ID = r"([0-9a-f]{24})"


class OrdersBase(BaseHandler):
    """Base of the orders routes: their collaborators are ``self.deps``."""
    deps: OrdersDeps


class Line(StrictModel):
    isbn: str
    quantity: int


class Address(StrictModel):
    name: str
    line1: str
    line2: str | None = None
    city: str
    postal_code: str
    country: str


class Card(StrictModel):
    card_number: str
    exp_month: int
    exp_year: int
    cvc: str


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
        body = self.json_body(NewOrder)
        checkout = self.deps.checkout
        checkout.gate.refuse_if_full()  # overloaded: answered at once, before any database work (a 503)
        fingerprint = request_fingerprint(self.json_body(), self.ctx.settings.service_secret)
        # a duplicate of a request this process is still answering waits for that answer (no database work)
        ident = (principal.sub, key)
        first = checkout.requests.get(ident)
        mine = None
        if first is None:
            mine = checkout.requests[ident] = asyncio.get_running_loop().create_future()
        else:
            await asyncio.wait([first], timeout=self.ctx.settings.checkout_wait + 5)
        try:
            # a replay is answered before the command is built: it must not depend on the cart as it is now
            # (a confirmed from_cart order has emptied it)
            existing = await self.deps.orders.by_key(principal.sub, key)
            if existing is not None:
                await self.replay(existing, principal.sub, key, fingerprint)
                return
            cmd = await self.command(principal.sub, body)
            try:
                status, payload = await self.place(new_order_id(), cmd, key, fingerprint)
            except DuplicateRequest:  # a concurrent request with this key (in another process) got there first
                await self.replay(None, principal.sub, key, fingerprint)
                return
            self.send(status, payload)
        finally:
            if mine is not None:
                del checkout.requests[ident]
                mine.set_result(None)

    async def command(self, user_id: str, body: NewOrder) -> PlaceOrder:
        if (body.items is None) == (not body.from_cart):
            raise errors.InvalidInput("items: give either items or from_cart: true", code="invalid_field",
                                      details={"field": "items"})
        if body.from_cart:
            lines = [(i["isbn"], i["quantity"]) for i in await self.deps.carts.get(user_id)]
            if not lines:
                raise errors.InvalidInput("from_cart: the cart is empty", code="cart_empty",
                                          details={"field": "from_cart"})
        else:
            lines = [(normalize_isbn(line.isbn, f"items[{i}].isbn"), line.quantity)
                     for i, line in enumerate(body.items)]
        lines = merge_lines(lines)
        card = body.payment
        number = cards.validate_card(card.card_number, card.exp_month, card.exp_year, card.cvc,
                                     datetime.date.today())
        if body.expected_total_cents is not None and body.expected_total_cents < 0:
            raise errors.InvalidInput("expected_total_cents: must not be negative", code="invalid_field",
                                      details={"field": "expected_total_cents"})
        return PlaceOrder(user_id=user_id, lines=lines, shipping_address=_check_address(body.shipping_address),
                          card={**card.model_dump(), "card_number": number},
                          expected_total_cents=body.expected_total_cents, from_cart=bool(body.from_cart),
                          traceparent=tracing.traceparent())

    async def place(self, order_id: str, cmd: PlaceOrder, key: str, fingerprint: str) -> tuple[int, dict]:
        """Run the saga; answer 201 if it ends in time, 202 PENDING if it is still running. The answer is
        recorded in the order (see ``first_answer``), except a 5xx, which frees the key for a retry."""
        checkout = self.deps.checkout
        orders = self.deps.orders
        wait = self.ctx.settings.checkout_wait
        try:
            order, task = await checkout.place(order_id, cmd, key, fingerprint, wait=wait)
        except errors.DomainError as exc:  # nothing was made: not an answer to remember
            return self.refusal(exc)
        try:
            doc = await asyncio.wait_for(asyncio.shield(task), wait)
        except asyncio.TimeoutError:
            doc = None
        except errors.Unavailable as exc:  # cancelled, and its key freed: the client may retry with it
            return self.refusal(exc, order_id)
        except errors.DomainError:  # the cancellation that stands for this error is recorded in the order
            doc = await orders.get(order_id)
        except Exception:
            await orders.release_key(order_id)  # a 500 is not an answer to replay
            raise
        if doc is None or doc["status"] == OrderStatus.PENDING.value:
            if await orders.record_pending_answer(order_id):
                return 202, order_view(order)
            doc = await orders.get(order_id)  # decided meanwhile: that is the answer
        return order_answer(first_answer(doc), self.request_id)

    def refusal(self, exc: errors.DomainError, order_id: str | None = None) -> tuple[int, dict]:
        details = dict(exc.details or {})
        if order_id is not None:
            details.setdefault("order_id", order_id)
        if exc.retry_after:
            self.set_header("Retry-After", str(exc.retry_after))
        return status_of(exc), error_body(exc.code, exc.message, self.request_id, details or None)

    async def replay(self, found: dict | None, user_id: str, key: str, fingerprint: str) -> None:
        """Answer a repeated key with its first answer, waiting (a while) for it if the first request is
        still running. ``found`` is the key's order (None: it is being created by a concurrent request)."""
        orders = self.deps.orders
        checkout = self.deps.checkout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.settings.checkout_wait + 5
        doc, seen = found, found is not None
        pause = 0.05
        while True:
            if doc is not None:
                seen = True
                idem = doc.get("idem") or {}
                if idem.get("fp") is not None and not hmac.compare_digest(idem["fp"], fingerprint):
                    raise errors.IdempotencyMismatch()
                if idem.get("legacy") is not None:  # an answer stored verbatim by an earlier version
                    self.send(idem["legacy"]["status"], idem["legacy"]["body"])
                    return
                if idem.get("answer") is not None:
                    self.send(*order_answer(first_answer(doc), self.request_id))
                    return
            elif seen:  # the first request failed with a 5xx and freed the key: the client may retry
                raise errors.Conflict("the first request with this key failed; retry", code="request_failed",
                                      retry_after=1)
            remaining = deadline - loop.time()
            if remaining <= 0:
                if doc is None:
                    raise errors.Conflict("the first request with this key is still running",
                                          code="request_in_progress", retry_after=1)
                self.send(*order_answer(doc, self.request_id))  # its request died: the order as it stands
                return
            task = checkout.task_of(doc["_id"]) if doc is not None else None
            if task is not None:
                await asyncio.wait([task], timeout=remaining)
            else:
                # driven by another process (or by nobody until recovery takes it): look again, less and less
                # often, so that many waiting clients do not keep the database from the work they wait for
                pause = min(pause * 2, 1.0)
                await asyncio.sleep(min(pause, remaining))
            doc = await orders.by_key(user_id, key)

    def send(self, status: int, payload: dict) -> None:
        if status in (503, 429) and not self._headers.get("Retry-After"):
            self.set_header("Retry-After", "5")
        self.write_json(payload, status)


def order_answer(order: dict, request_id: str) -> tuple[int, dict]:
    """The answer to POST /orders for an order as it stands: 201 CONFIRMED, 202 PENDING, or the error
    its cancellation stands for."""
    status = order["status"]
    if status in (OrderStatus.CONFIRMED.value, OrderStatus.SHIPPED.value):
        return 201, order_view(order)
    if status == OrderStatus.PENDING.value:
        return 202, order_view(order)
    reason = order["history"][-1].get("reason")
    outcome = order.get("outcome") or {}
    details = {"order_id": order["_id"]}
    if reason == "payment_declined":
        return 402, error_body("payment_declined", "the card was declined", request_id,
                               {**details, "reason": outcome.get("reason")})
    if reason == "out_of_stock":
        return 409, error_body("out_of_stock", "not enough stock", request_id,
                               {**details, "items": outcome.get("items", [])})
    if reason == "reservation_expired":
        return 409, error_body("out_of_stock", "the stock reservation expired", request_id, {**details, "items": []})
    if reason in RETRYABLE:
        return 503, error_body("service_unavailable", f"the checkout could not finish ({reason}); retry",
                               request_id, details)
    return 409, error_body("order_cancelled", f"the order was cancelled ({reason})", request_id, details)


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
