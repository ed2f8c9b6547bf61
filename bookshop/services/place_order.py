"""The place-order use case (``POST /orders``): the Idempotency-Key protocol, the saga task's lifecycle and the
answer, around ``Checkout`` (the saga itself).

``PlaceOrders.place(request)`` does, in this order: refuse at once when the checkout gate is full (before any
database work); let a duplicate of a request this process is still answering wait for it (in memory), then answer
it from the key's order; build the command (the cart's lines for ``from_cart``); create the order and run its saga
in a background task the request waits on for ``wait`` seconds; answer ``201``, ``202 PENDING`` or the error the
cancellation stands for, and record the answer in the order (a 5xx frees the key instead). A new key costs no
read: the order's insert, with the key unique per customer, is what finds a repeated key, and a request refused
before the insert (cart empty, card expired, price changed, busy) looks its key up first, so a replay is always
the first answer (``replay``), never one made from the cart or the card as they are now. The handler only
parses the request and writes the ``Answer``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hmac
import logging
from typing import Callable

from bookshop.services import cards, errors
from bookshop.services.checkout import RETRYABLE, DuplicateRequest, PlaceOrder, first_answer
from bookshop.services.orders import OrderStatus, merge_lines

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OrderRequest:
    """A parsed and validated ``POST /orders`` (``items`` None: the order is the customer's cart)."""
    user_id: str
    key: str
    fingerprint: str
    items: list[tuple[str, int]] | None
    shipping_address: dict
    card: dict
    expected_total_cents: int | None
    traceparent: str | None = None


@dataclasses.dataclass(frozen=True)
class Answer:
    """What ``POST /orders`` answers: the order (``201``/``202``) or an error (``code``, ``message``,
    ``details``; ``retry_after`` for a 5xx); ``body``: an answer an earlier version stored verbatim."""
    status: int
    order: dict | None = None
    body: dict | None = None
    code: str | None = None
    message: str | None = None
    details: dict | None = None
    retry_after: int | None = None


def order_answer(order: dict) -> Answer:
    """The answer to ``POST /orders`` for an order as it stands: 201 CONFIRMED, 202 PENDING, or the error its
    cancellation stands for."""
    status = order["status"]
    if status in (OrderStatus.CONFIRMED.value, OrderStatus.SHIPPED.value):
        return Answer(201, order)
    if status == OrderStatus.PENDING.value:
        return Answer(202, order)
    reason = order["history"][-1].get("reason")
    outcome = order.get("outcome") or {}
    details = {"order_id": order["_id"]}
    if reason == "payment_declined":
        return Answer(402, code="payment_declined", message="the card was declined",
                      details={**details, "reason": outcome.get("reason")})
    if reason == "out_of_stock":
        return Answer(409, code="out_of_stock", message="not enough stock",
                      details={**details, "items": outcome.get("items", [])})
    if reason == "reservation_expired":
        return Answer(409, code="out_of_stock", message="the stock reservation expired",
                      details={**details, "items": []})
    if reason in RETRYABLE:
        return Answer(503, code="service_unavailable", message=f"the checkout could not finish ({reason}); retry",
                      details=details, retry_after=5)
    return Answer(409, code="order_cancelled", message=f"the order was cancelled ({reason})", details=details)


def refusal(exc: errors.DomainError, status: int, order_id: str | None = None) -> Answer:
    """A checkout refused before (or instead of) an answer to remember: nothing made, or a key freed."""
    details = dict(exc.details or {})
    if order_id is not None:
        details.setdefault("order_id", order_id)
    return Answer(status, code=exc.code, message=exc.message, details=details or None, retry_after=exc.retry_after)


class PlaceOrders:
    """``POST /orders``: see the module's notes. ``status_of`` maps a domain error to its HTTP status (the
    handlers' table); ``wait`` is ``BOOKSHOP_CHECKOUT_WAIT``."""

    def __init__(self, checkout, orders, carts, wait: float, status_of,
                 today: Callable[[], datetime.date] = datetime.date.today):
        self.checkout = checkout
        self.orders = orders
        self.carts = carts
        self.wait = wait
        self.status_of = status_of
        self.today = today  # the day a new order's card must not have expired by
        self.requests: dict[tuple[str, str], asyncio.Future] = {}  # (customer, key) -> its request, answering

    async def place(self, request: OrderRequest) -> Answer:
        self.checkout.gate.refuse_if_full()  # overloaded: answered at once, before any database work (a 503)
        # a duplicate of a request this process is still answering waits for that answer (no database work)
        ident = (request.user_id, request.key)
        first = self.requests.get(ident)
        mine = None
        if first is None:
            mine = self.requests[ident] = asyncio.get_running_loop().create_future()
        else:
            await asyncio.wait([first], timeout=self.wait + 5)
        try:
            if first is not None:  # a duplicate of a request just answered here: its order is most likely there
                known = await self.known(request)
                if known is not None:
                    return known
            # A new key costs no read: the insert with the key unique finds a replay (DuplicateRequest), and
            # whatever is refused before the insert looks the key up first: a replay is the first answer whatever
            # the cart (a confirmed from_cart order has emptied it), the card's dates, the prices or the gate are now
            try:
                cmd = await self.command(request)
            except errors.DomainError:
                known = await self.known(request)
                if known is not None:
                    return known
                raise
            order_id = self.orders.new_id()
            try:
                order, task = await self.checkout.place(order_id, cmd, request.key, request.fingerprint,
                                                        wait=self.wait)
            except DuplicateRequest:  # another request with this key got there first
                return await self.replay(None, request)
            except errors.DomainError as exc:
                known = await self.known(request)
                if known is not None:
                    return known
                return refusal(exc, self.status_of(exc))  # nothing was made: not an answer to remember
            return await self._answer(order_id, order, task)
        finally:
            if mine is not None:
                del self.requests[ident]
                mine.set_result(None)

    async def command(self, request: OrderRequest) -> PlaceOrder:
        card = request.card
        cards.validate_card(card["card_number"], card["exp_month"], card["exp_year"], card["cvc"],
                            self.today())  # its form was checked at the edge; its dates now
        if request.items is None:
            lines = [(i["isbn"], i["quantity"]) for i in await self.carts.get(request.user_id)]
            if not lines:
                raise errors.InvalidInput("from_cart: the cart is empty", code="cart_empty",
                                          details={"field": "from_cart"})
        else:
            lines = request.items
        return PlaceOrder(user_id=request.user_id, lines=merge_lines(lines), shipping_address=request.shipping_address,
                          card=request.card, expected_total_cents=request.expected_total_cents,
                          from_cart=request.items is None, traceparent=request.traceparent)

    async def _answer(self, order_id: str, order: dict, task: asyncio.Future) -> Answer:
        """Wait for the saga; answer 201 if it ends in time, 202 PENDING if it is still running (or failed
        unexpectedly: recovery takes it on). The answer is recorded in the order (see ``first_answer``); only a
        retryable refusal made before anything was charged frees the key."""
        try:
            doc = await asyncio.wait_for(asyncio.shield(task), self.wait)
        except asyncio.TimeoutError:
            doc = None
        except errors.Unavailable as exc:  # cancelled, and its key freed: the client may retry with it
            return refusal(exc, self.status_of(exc), order_id)
        except errors.DomainError:  # the cancellation that stands for this error is recorded in the order
            doc = await self.orders.get(order_id)
        except Exception:
            # Never free the key here: the saga may have charged the card before it failed (a database
            # error on the confirmation, say), and a retry with the key would make and charge a second order.
            # The order is answered as it stands: still PENDING, recovery finishes or compensates it.
            log.exception("the checkout saga of order %s failed", order_id)
            doc = None
        if doc is None or doc["status"] == OrderStatus.PENDING.value:
            if await self.orders.record_pending_answer(order_id):
                return Answer(202, order)
            doc = await self.orders.get(order_id)  # decided meanwhile: that is the answer
        return order_answer(first_answer(doc))

    async def known(self, request: OrderRequest) -> Answer | None:
        """The first answer of the request's key, if an order was made with it (else None)."""
        existing = await self.orders.by_key(request.user_id, request.key)
        return None if existing is None else await self.replay(existing, request)

    async def replay(self, found: dict | None, request: OrderRequest) -> Answer:
        """Answer a repeated key with its first answer, waiting (a while) for it if the first request is
        still running. ``found`` is the key's order (None: it is being created by a concurrent request)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait + 5
        doc, seen = found, found is not None
        pause = 0.05
        while True:
            if doc is not None:
                seen = True
                idem = doc.get("idem") or {}
                if idem.get("fp") is not None and not hmac.compare_digest(idem["fp"], request.fingerprint):
                    raise errors.IdempotencyMismatch()
                if idem.get("legacy") is not None:  # an answer stored verbatim by an earlier version
                    return Answer(idem["legacy"]["status"], body=idem["legacy"]["body"])
                if idem.get("answer") is not None:
                    return order_answer(first_answer(doc))
            elif seen:  # the first request failed with a 5xx and freed the key: the client may retry
                raise errors.Conflict("the first request with this key failed; retry", code="request_failed",
                                      retry_after=1)
            remaining = deadline - loop.time()
            if remaining <= 0:
                if doc is None:
                    raise errors.Conflict("the first request with this key is still running",
                                          code="request_in_progress", retry_after=1)
                return order_answer(doc)  # its request died: the order as it stands
            task = self.checkout.task_of(doc["_id"]) if doc is not None else None
            if task is not None:
                await asyncio.wait([task], timeout=remaining)
            else:
                # driven by another process (or by nobody until recovery takes it): look again, less and less
                # often, so that many waiting clients do not keep the database from the work they wait for
                pause = min(pause * 2, 1.0)
                await asyncio.sleep(min(pause, remaining))
            doc = await self.orders.by_key(request.user_id, request.key)
