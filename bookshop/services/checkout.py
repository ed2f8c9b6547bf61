"""The checkout saga and its recovery.

``POST /orders`` is an orchestrated saga: price → create the PENDING order (claiming the promotion) →
reserve stock → charge → commit the reservation → CONFIRMED. The order document is the saga's state: its
status, a lease saying who drives it, and ``todo`` — compensations still owed (``payment``: refund or void;
``stock``: release or put back). Every step is idempotent per order id on the upstream side (inventory
dedupes reservations, payments dedupes charges), so whoever picks an order up can safely repeat a step.

The card number lives only in the request's memory: it is never stored, so a saga that lost its process
before the charge cannot be driven forward and is compensated instead (void the payment, release stock).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging

from bookshop.services import errors
from bookshop.services.orders import (
    SYSTEM, OrderStatus, PaymentStatus, check_chargeable, price, qualifies_for_promotion,
)

log = logging.getLogger(__name__)

OPEN = [OrderStatus.PENDING]


def request_fingerprint(body: dict, secret: str) -> str:
    """What an Idempotency-Key remembers of its request: an HMAC of the canonical body with the card reduced
    to its last four digits and expiry. Nothing derived from the full card number or the CVC goes in, so a
    retry with another card of the same last four digits and expiry counts as the same request."""
    reduced = dict(body)
    card = body.get("payment")
    if isinstance(card, dict):
        digits = str(card.get("card_number", "")).replace(" ", "").replace("-", "")
        reduced["payment"] = {"last4": digits[-4:], "exp_month": card.get("exp_month"),
                              "exp_year": card.get("exp_year")}
    canonical = json.dumps(reduced, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()


@dataclasses.dataclass(frozen=True)
class PlaceOrder:
    user_id: str
    lines: list[tuple[str, int]]
    shipping_address: dict
    card: dict
    expected_total_cents: int | None
    from_cart: bool


class Checkout:
    """The checkout saga: placing, confirming, cancelling and shipping orders, and recovering the
    sagas their owners left unfinished."""

    RECOVERY_CONCURRENCY = 8

    def __init__(self, repo, catalog, inventory, payments, currency: str, lease_seconds: float, metrics=None,
                 kick=lambda: None, new_id=None, now=None):
        self.repo = repo
        self.catalog = catalog
        self.inventory = inventory
        self.payments = payments
        self.currency = currency
        self.lease = lease_seconds
        self.metrics = metrics
        self.kick = kick
        self.new_id = new_id
        self.now = now
        self._recovering: dict[str, asyncio.Future] = {}  # order id -> its recovery task
        self._recovery_gate = asyncio.Semaphore(self.RECOVERY_CONCURRENCY)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name)

    # -- placing an order -------------------------------------------------------------------------------
    async def create(self, order_id: str, cmd: PlaceOrder) -> dict:
        """Price the order and store it PENDING (raises before anything is stored when it cannot be)."""
        if self.payments.is_open:
            # payments is known to be down: fail fast, before any stock is held
            raise errors.Unavailable("payments are unavailable; try again shortly", retry_after=5)
        books = await self.catalog.books([isbn for isbn, _ in cmd.lines])
        for attempt in range(2):
            wants_promotion = qualifies_for_promotion(cmd.lines) and not await self.repo.promotion_claimed(
                cmd.user_id)
            priced = price(cmd.lines, books, self.currency, wants_promotion)
            check_chargeable(priced)
            if cmd.expected_total_cents is not None and cmd.expected_total_cents != priced.total_cents:
                raise errors.Conflict("the price changed", code="price_changed",
                                      details={"total_cents": priced.total_cents})
            now = self.now()
            doc = {
                "_id": order_id, "user_id": cmd.user_id, "status": OrderStatus.PENDING.value,
                "items": [line.as_dict() for line in priced.items], "subtotal_cents": priced.subtotal_cents,
                "discount_cents": priced.discount_cents, "total_cents": priced.total_cents,
                "currency": priced.currency, "promotion_applied": priced.promotion_applied,
                "shipping_address": cmd.shipping_address,
                "payment": {"status": PaymentStatus.NONE.value, "last4": cmd.card["card_number"][-4:]},
                "history": [{"status": OrderStatus.PENDING.value, "at": now, "by": cmd.user_id}],
                "created_at": now,
                "from_cart": cmd.from_cart, "open": True, "todo": [],
                "saga_lease": now + _seconds(self.lease),
            }
            if await self.repo.create(doc, claim_promotion=priced.promotion_applied):
                self.kick()
                self._count("orders_created")
                return doc
            # another order took the promotion between our check and our claim: price again without it
        raise errors.Conflict("could not create the order; retry", code="conflict")

    async def run(self, order: dict, card: dict) -> dict:
        """Drive a freshly created order to a decision. Returns the order; raises OutOfStock,
        PaymentDeclined or Unavailable (with the order already CANCELLED) when it fails."""
        order_id = order["_id"]
        lines = [{"isbn": i["isbn"], "quantity": i["quantity"]} for i in order["items"]]
        try:
            reservation = await self.inventory.reserve(order_id, lines)
        except errors.Unavailable:
            await self.cancel(order, "inventory_unavailable", todo=["stock"])
            raise
        if reservation["state"] != "held":
            short = reservation.get("short", [])
            await self.cancel(order, "out_of_stock", todo=["stock"])
            self._count("orders_out_of_stock")
            raise errors.OutOfStock("not enough stock", details={"order_id": order_id, "items": short})
        # no lease renewal here (one write less per order): a saga slower than its lease is picked up by
        # recovery, which voids the payment; our charge is then refused (409) and we compensate
        try:
            charge = await self.payments.charge(order_id, order["total_cents"], order["currency"], card)
        except errors.Unavailable:
            # the charge may or may not have happened: void/refund it (now or by recovery), give stock back
            await self.cancel(order, "payment_unavailable", todo=["payment", "stock"])
            self._count("orders_payment_unavailable")
            raise errors.Unavailable("payments are unavailable; nothing was charged", retry_after=5,
                                     details={"order_id": order_id}) from None
        except errors.Conflict:  # voided by a recovery that thought we were dead
            await self.cancel(order, "checkout_interrupted", todo=["payment", "stock"])
            raise errors.Conflict("checkout interrupted; retry", code="checkout_interrupted",
                                  details={"order_id": order_id}) from None
        if charge["status"] != "charged":
            await self.cancel(order, "payment_declined", todo=["stock"],
                              payment_status=PaymentStatus.DECLINED)
            self._count("orders_declined")
            raise errors.PaymentDeclined(details={"order_id": order_id, "reason": charge.get("reason")})
        return await self.confirm(order)

    async def confirm(self, order: dict) -> dict:
        """Commit the reservation and confirm a charged order."""
        order_id = order["_id"]
        try:
            committed = (await self.inventory.commit(order_id)).get("state") == "committed"
        except errors.Conflict:
            committed = False
        except errors.Unavailable:
            # charged, but inventory cannot commit now: stay PENDING (answered 202); recovery finishes it
            # once the lease runs out. Never a 5xx here: a client retry would charge a second order.
            log.warning("order %s: commit postponed (inventory unavailable)", order_id)
            return await self.repo.get(order_id) or order
        if not committed:
            # the reservation expired (or never existed) before we could commit: refund and cancel
            await self.cancel(order, "reservation_expired", todo=["payment", "stock"])
            raise errors.OutOfStock("the stock reservation expired", details={"order_id": order_id, "items": []})
        doc = await self.repo.transition(order_id, OPEN, OrderStatus.CONFIRMED,
                                         set_fields={"payment.status": PaymentStatus.CHARGED.value},
                                         clear_cart=order.get("from_cart", False), by=SYSTEM)
        if doc is None:
            # cancelled meanwhile (by its customer or staff): that cancel owes the refund and stock
            doc = await self.repo.get(order_id)
        else:
            self._count("orders_confirmed")
        self.kick()
        return doc

    # -- cancelling and compensating --------------------------------------------------------------------
    async def cancel(self, order: dict, reason: str, todo: list[str],
                     payment_status: PaymentStatus | None = None, from_status=None, by: str = SYSTEM) -> dict | None:
        if payment_status is None and "payment" in todo:
            # a charge exists or may exist: the order shows it is owed back until the processor confirms
            payment_status = PaymentStatus.REFUND_PENDING
        fields = {"payment.status": payment_status.value} if payment_status else None
        doc = await self.repo.transition(order["_id"], from_status or OPEN, OrderStatus.CANCELLED, reason=reason,
                                         set_fields=fields, todo=todo, release_promotion=True, by=by)
        self.kick()
        if doc is not None:
            doc = await self.compensate(doc)
        return doc

    async def compensate(self, doc: dict) -> dict:
        """Pay what a cancelled order still owes (``todo``); what fails stays for recovery."""
        order_id = doc["_id"]
        for item in list(doc.get("todo", [])):
            try:
                if item == "payment":
                    result = await self.payments.refund(order_id)
                    if result.get("refunded"):
                        status = PaymentStatus.REFUNDED
                    elif result.get("status") == "declined":
                        status = PaymentStatus.DECLINED
                    else:  # voided: nothing was taken, and a late charge is refused
                        status = PaymentStatus.NONE
                    doc = await self.repo.done_todo(order_id, item, {"payment.status": status.value}) or doc
                elif item == "stock":
                    await self._give_stock_back(order_id)
                    doc = await self.repo.done_todo(order_id, item) or doc
            except errors.Conflict as exc:
                log.warning("order %s: compensation %s refused: %s", order_id, item, exc.code)
            except errors.Unavailable:
                log.warning("order %s: compensation %s postponed (upstream unavailable)", order_id, item)
        self.kick()
        return doc

    async def _give_stock_back(self, order_id: str) -> None:
        """Release the order's reservation, or put its stock back on the shelf if it was committed."""
        try:
            state = (await self.inventory.release(order_id)).get("state")
        except errors.Conflict as exc:
            if exc.code != "reservation_not_held":
                raise
            state = (exc.details or {}).get("state")
        if state == "committed":
            await self.inventory.put_back(order_id)

    async def cancel_by_request(self, order: dict, by: str = SYSTEM) -> dict:
        """A customer or staff cancel: before shipping only; refund and restock."""
        status = OrderStatus(order["status"])
        if status not in (OrderStatus.PENDING, OrderStatus.CONFIRMED):
            raise errors.Conflict(f"an order that is {status.value} cannot be cancelled",
                                  code="invalid_status_transition", details={"status": status.value})
        doc = await self.cancel(order, "cancelled_by_request", todo=["payment", "stock"],
                                from_status=[OrderStatus.PENDING, OrderStatus.CONFIRMED], by=by)
        if doc is None:
            current = await self.repo.get(order["_id"])
            raise errors.Conflict(f"an order that is {current['status']} cannot be cancelled",
                                  code="invalid_status_transition", details={"status": current["status"]})
        self._count("orders_cancelled")
        return doc

    async def ship(self, order: dict, by: str = SYSTEM) -> dict:
        doc = await self.repo.transition(order["_id"], [OrderStatus.CONFIRMED], OrderStatus.SHIPPED, by=by)
        if doc is None:
            raise errors.Conflict(f"only a CONFIRMED order can be shipped (this one is {order['status']})",
                                  code="invalid_status_transition", details={"status": order["status"]})
        self.kick()
        self._count("orders_shipped")
        return doc

    # -- recovery -----------------------------------------------------------------------------------------
    async def recover(self, wait: float | None = None) -> int:
        """Drive forward or compensate every open order whose owner's lease ran out; returns how many.

        Orders are recovered side by side, each in a task of its own: one order can be stuck for a long
        time (a process killed mid-transaction leaves the order's document locked until the database
        reaps that transaction, 60 s on mongod) and must not hold up all the others. With ``wait``, the
        pass returns after that many seconds and leaves slow orders running; a later pass skips them.
        """
        tasks = []
        for candidate in await self.repo.unfinished():
            order_id = candidate["_id"]
            if order_id in self._recovering:
                continue
            task = asyncio.ensure_future(self._recover_candidate(order_id))
            self._recovering[order_id] = task
            task.add_done_callback(lambda _t, oid=order_id: self._recovering.pop(oid, None))
            tasks.append(task)
        if not tasks:
            return 0
        done, _ = await asyncio.wait(tasks, timeout=wait)
        return sum(1 for t in done if not t.cancelled() and t.result())

    async def _recover_candidate(self, order_id: str) -> bool:
        async with self._recovery_gate:
            try:
                order = await self.repo.take_lease(order_id, self.lease)
                if order is None:
                    return False  # another instance took it, or it finished meanwhile
                await self._recover_one(order)
                return True
            except errors.DomainError as exc:
                log.warning("order %s: recovery postponed: %s", order_id, exc.code)
            except Exception:  # noqa: BLE001 - a task of its own: nobody else would see this
                log.exception("order %s: recovery failed", order_id)
            return False

    def stop_recovery(self) -> None:
        """Cancel the recoveries still running (at shutdown); their orders' leases let others resume."""
        for task in list(self._recovering.values()):
            task.cancel()

    async def _recover_one(self, order: dict) -> None:
        order_id = order["_id"]
        if order["status"] != OrderStatus.PENDING.value:
            await self.compensate(order)
            return
        ledger = await self.payments.status(order_id)
        if ledger is not None and ledger["status"] == "charged" and not ledger.get("refunded"):
            log.info("recovery: order %s was charged; confirming", order_id)
            try:
                await self.confirm(order)
            except errors.OutOfStock:
                pass  # cancelled and refunded by confirm()
        elif ledger is not None and ledger["status"] == "declined":
            await self.cancel(order, "payment_declined", todo=["stock"], payment_status=PaymentStatus.DECLINED)
        else:
            log.info("recovery: order %s was interrupted before payment; compensating", order_id)
            await self.cancel(order, "checkout_interrupted", todo=["payment", "stock"])
        self._count("orders_recovered")

    async def recover_forever(self, stop: asyncio.Event, every: float = 2.0) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.recover(wait=every)
                except errors.DomainError as exc:
                    log.warning("recovery pass failed: %s", exc.code)
                except Exception:  # noqa: BLE001 - the loop must outlive a bad pass (e.g. database down)
                    log.exception("recovery pass failed")
                try:
                    await asyncio.wait_for(stop.wait(), every)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.stop_recovery()


def _seconds(value: float):
    import datetime
    return datetime.timedelta(seconds=value)
