"""The checkout saga and its recovery.

``POST /orders`` is an orchestrated saga: price → claim the promotion (if the order takes it) → create the
PENDING order → reserve stock → charge → commit the reservation → CONFIRMED. The order document is the saga's
state: its status, a lease saying who drives it (``owner``, ``saga_lease``), and ``todo`` — work still owed
(``payment``: refund or void; ``stock``: release or put back; ``cart``: take the ordered lines out of the
cart). Every step is idempotent per order id on the upstream side (inventory dedupes reservations, payments
dedupes charges), so whoever picks an order up can safely repeat a step. Each change of the order is one
single-document write (see ``storage/orders.py``): no transaction, so nothing a killed process left behind
can block its successor.

A live saga renews its lease only when it runs long (a batched write at half-life, for all such sagas of the
process); recovery never takes an order its own process is running, takes an order whose lease ran out, and
takes at once the orders of an earlier process of this host that is gone (so a restarted service finishes its
predecessor's sagas within a recovery pass, not after their leases).

The card number lives only in the request's memory: it is never stored, so a saga that lost its process
before the charge cannot be driven forward and is compensated instead (void the payment, release stock).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import socket

from bookshop.services import errors, periodic
from bookshop.services.orders import (
    SYSTEM, OrderStatus, PaymentStatus, check_chargeable, price, qualifies_for_promotion,
)

log = logging.getLogger(__name__)

OPEN = [OrderStatus.PENDING]
# a promotion claim whose order never appeared (its process died between the two writes) is free again after
STALE_CLAIM = datetime.timedelta(seconds=60)
# cancellations whose answer is a 5xx: the client may retry with the same Idempotency-Key
RETRYABLE = ("inventory_unavailable", "payment_unavailable")


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


def first_answer(doc: dict) -> dict:
    """The order as the first answer to its ``POST /orders`` showed it: ``idem.answer`` counts the history
    entries it had (1: ``202 PENDING``; the entry that decided it: ``201`` or the error it stands for)."""
    shown = (doc.get("idem") or {}).get("answer")
    if not shown or shown >= len(doc["history"]):
        return doc
    history = doc["history"][:shown]
    status = history[-1]["status"]
    charged = status in (OrderStatus.CONFIRMED.value, OrderStatus.SHIPPED.value)
    payment = {**doc["payment"], "status": PaymentStatus.CHARGED.value if charged else PaymentStatus.NONE.value}
    return {**doc, "status": status, "history": history, "payment": payment}


# -- who runs a saga ------------------------------------------------------------------------------------------
def process_identity() -> str:
    """``host|pid namespace|pid``: unique among live processes, and tells a later process of the same host
    whether the owner is gone."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "-"
    return f"{socket.gethostname()}|{namespace}|{os.getpid()}"


def local_prefix(identity: str) -> str:
    """The part of an identity shared by every process of this host and PID namespace."""
    return identity.rpartition("|")[0] + "|"


def owner_is_gone(owner: str, me: str) -> bool:
    """True only when ``owner`` was a process of this host and PID namespace that no longer runs (or is a
    zombie). Anything else (another host, a live or reused pid) is left to the lease."""
    prefix, _, pid = owner.rpartition("|")
    if owner == me or prefix + "|" != local_prefix(me) or not pid.isdigit():
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False


class DuplicateRequest(Exception):
    """Another request with this customer's Idempotency-Key got there first: answer as a replay of it."""


class Gate:
    """At most ``running`` checkouts at once and ``waiting`` more in line; beyond that, or after waiting
    ``wait`` seconds, the checkout is busy (a 503 with Retry-After before anything is made)."""

    def __init__(self, running: int, waiting: int):
        self.limit = running
        self.waiting_limit = waiting
        self.active = 0
        self._line: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._line if not f.done())

    @property
    def full(self) -> bool:
        """No place to run and none to wait: a new checkout would be refused."""
        return self.active >= self.limit and self.waiting >= self.waiting_limit

    def refuse_if_full(self) -> None:
        """Refuse at once, before any work, when the gate is full (overload costs the database nothing)."""
        if self.full:
            raise self._busy()

    async def enter(self, wait: float) -> None:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return
        if self.waiting >= self.waiting_limit:
            raise self._busy()
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._line.append(turn)
        timer = loop.call_later(wait, lambda: turn.done() or turn.set_result(False))
        try:
            granted = await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self.leave()  # handed a place we can no longer use
            raise
        finally:
            timer.cancel()
        if not granted:
            raise self._busy()

    def leave(self) -> None:
        while self._line:
            turn = self._line.popleft()
            if not turn.done():
                turn.set_result(True)  # the place passes on; ``active`` stays
                return
        self.active -= 1

    @staticmethod
    def _busy() -> errors.Unavailable:
        return errors.Unavailable("the checkout is busy; try again shortly", code="checkout_busy", retry_after=1)


@dataclasses.dataclass(frozen=True)
class PlaceOrder:
    user_id: str
    lines: list[tuple[str, int]]
    shipping_address: dict
    card: dict
    expected_total_cents: int | None
    from_cart: bool
    #: the request's trace (a W3C traceparent), kept with the order: its recovery, if any, links to it
    traceparent: str | None = None


class Checkout:
    """The checkout saga: placing, confirming, cancelling and shipping orders, and recovering the
    sagas their owners left unfinished."""

    RECOVERY_CONCURRENCY = 16

    def __init__(self, repo, catalog, inventory, payments, currency: str, lease_seconds: float, metrics=None,
                 now=None, concurrency: int = 32, queue: int | None = None, owner: str | None = None,
                 is_gone=None, recovery_trace=None):
        self.repo = repo
        # recovery_trace(order): the context manager a recovery runs in (a trace of its own, linked to the order's)
        self.recovery_trace = recovery_trace or (lambda order: contextlib.nullcontext())
        self.catalog = catalog
        self.inventory = inventory
        self.payments = payments
        self.currency = currency
        self.lease = lease_seconds
        self.metrics = metrics
        self.now = now or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self.owner = owner or process_identity()
        self.is_gone = is_gone or (lambda other: owner_is_gone(other, self.owner))
        self.gate = Gate(concurrency, concurrency if queue is None else queue)
        self.tasks: dict[str, asyncio.Future] = {}  # order id -> its saga started by place()
        self.running: dict[str, datetime.datetime] = {}  # order id -> lease end, for what this process runs
        self._renewal: asyncio.TimerHandle | None = None
        self._recovering: dict[str, asyncio.Future] = {}  # order id -> its recovery task
        self._recovery_gate = asyncio.Semaphore(self.RECOVERY_CONCURRENCY)
        self._first_pass = True
        self._left_over = False  # a recovery of the last pass was postponed (an upstream still down)
        self._soon = asyncio.Event()  # set by a postponement: the next recovery pass comes at the busy pace

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name)

    # -- placing an order -------------------------------------------------------------------------------
    async def place(self, order_id: str, cmd: PlaceOrder, key: str | None = None, fingerprint: str | None = None,
                    wait: float = 5.0) -> tuple[dict, asyncio.Future]:
        """Admit a checkout (or raise Unavailable: busy), create its order and start its saga in the
        background. Returns the order and the saga's task (its result: the order as the saga left it)."""
        try:
            await self.gate.enter(wait)
        except errors.Unavailable:
            self._count("checkouts_busy")
            raise
        try:
            order = await self.create(order_id, cmd, key, fingerprint)
        except BaseException:
            self.gate.leave()
            raise
        task = asyncio.ensure_future(self.run(order, cmd.card))
        self.tasks[order_id] = task
        task.add_done_callback(lambda t: self._saga_done(order_id, t))
        return order, task

    def _saga_done(self, order_id: str, task: asyncio.Future) -> None:
        self.tasks.pop(order_id, None)
        self.gate.leave()
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, else asyncio reports "exception was never retrieved"
        if exc is not None and not isinstance(exc, errors.DomainError):
            log.error("checkout saga failed", exc_info=exc)

    def task_of(self, order_id: str) -> asyncio.Future | None:
        """The saga (or recovery) this process runs for the order, if any: a duplicate request waits on it."""
        return self.tasks.get(order_id) or self._recovering.get(order_id)

    async def promotion_available(self, user_id: str) -> bool:
        """True unless an order of the customer holds the promotion. A claim left behind by an order that was
        never created, or by a cancelled one whose give-back was cut off, is given back here."""
        holder = await self.repo.promotion_holder(user_id)
        if holder is None:
            return True
        order = await self.repo.get(holder["order_id"])
        if order is None and self.now() - holder["at"] < STALE_CLAIM:
            return False  # its order is on its way
        if order is not None and order["status"] != OrderStatus.CANCELLED.value:
            return False
        await self.repo.release_promotion(user_id, holder["order_id"])
        return True

    async def create(self, order_id: str, cmd: PlaceOrder, key: str | None = None,
                     fingerprint: str | None = None) -> dict:
        """Price the order and store it PENDING, with the request's Idempotency-Key (raises before anything is
        stored when it cannot be; DuplicateRequest when another request with the key got there first)."""
        if self.payments.is_open:
            # payments is known to be down: fail fast, before any stock is held
            raise errors.Unavailable("payments are unavailable; try again shortly", retry_after=5)
        books = await self.catalog.books([isbn for isbn, _ in cmd.lines])
        qualifies = qualifies_for_promotion(cmd.lines)
        for attempt in range(3):
            wants_promotion = qualifies and await self.promotion_available(cmd.user_id)
            priced = price(cmd.lines, books, self.currency, wants_promotion)
            check_chargeable(priced)
            if cmd.expected_total_cents is not None and cmd.expected_total_cents != priced.total_cents:
                raise errors.Conflict("the price changed", code="price_changed",
                                      details={"total_cents": priced.total_cents})
            if priced.promotion_applied and not await self.repo.claim_promotion(cmd.user_id, order_id, key):
                holder = await self.repo.promotion_holder(cmd.user_id)
                if key is not None and holder is not None and holder.get("key") == key:
                    raise DuplicateRequest()  # a duplicate of this very request holds it: its order is coming
                continue  # another order took it between our check and our claim: price again without it
            now = self.now()
            doc = {
                "_id": order_id, "user_id": cmd.user_id, "status": OrderStatus.PENDING.value,
                "items": [line.as_dict() for line in priced.items], "subtotal_cents": priced.subtotal_cents,
                "discount_cents": priced.discount_cents, "total_cents": priced.total_cents,
                "currency": priced.currency, "promotion_applied": priced.promotion_applied,
                "shipping_address": cmd.shipping_address,
                "payment": {"status": PaymentStatus.NONE.value, "last4": cmd.card["card_number"][-4:]},
                "history": [{"status": OrderStatus.PENDING.value, "at": now, "by": cmd.user_id}],
                "created_at": now, "from_cart": cmd.from_cart, "open": True, "todo": [],
                "owner": self.owner, "saga_lease": now + datetime.timedelta(seconds=self.lease),
            }
            if key is not None:
                doc["idem"] = {"key": key, "fp": fingerprint, "answer": None}
            if cmd.traceparent:
                doc["traceparent"] = cmd.traceparent
            if await self.repo.insert(doc):
                self._count("orders_created")
                return doc
            if priced.promotion_applied:  # the key is another order's: our claim goes back
                await self.repo.release_promotion(cmd.user_id, order_id)
            raise DuplicateRequest()
        raise errors.Conflict("could not create the order; retry", code="conflict")

    async def run(self, order: dict, card: dict) -> dict:
        """Drive a freshly created order to a decision. Returns the order; raises OutOfStock,
        PaymentDeclined or Unavailable (with the order already CANCELLED) when it fails."""
        self._hold(order)
        try:
            return await self._run(order, card)
        finally:
            self.running.pop(order["_id"], None)

    async def _run(self, order: dict, card: dict) -> dict:
        order_id = order["_id"]
        lines = [{"isbn": i["isbn"], "quantity": i["quantity"]} for i in order["items"]]
        try:
            reservation = await self.inventory.reserve(order_id, lines)
        except errors.Unavailable:
            await self.cancel(order, "inventory_unavailable", todo=["stock"])
            raise
        if reservation["state"] != "held":
            short = reservation.get("short", [])
            await self.cancel(order, "out_of_stock", todo=["stock"], outcome={"items": short})
            self._count("orders_out_of_stock")
            raise errors.OutOfStock("not enough stock", details={"order_id": order_id, "items": short})
        try:
            charge = await self.payments.charge(order_id, order["total_cents"], order["currency"], card)
        except errors.Unavailable:
            # the charge may or may not have happened: void/refund it (now or by recovery), give stock back
            await self.cancel(order, "payment_unavailable", todo=["payment", "stock"])
            self._count("orders_payment_unavailable")
            raise errors.Unavailable("payments are unavailable; nothing was charged", retry_after=5,
                                     details={"order_id": order_id}) from None
        except errors.Conflict:  # voided by a cancel, or by the recovery of another instance that took us for dead
            await self.cancel(order, "checkout_interrupted", todo=["payment", "stock"])
            raise errors.Conflict("checkout interrupted; retry", code="checkout_interrupted",
                                  details={"order_id": order_id}) from None
        if charge["status"] != "charged":
            await self.cancel(order, "payment_declined", todo=["stock"], payment_status=PaymentStatus.DECLINED,
                              outcome={"reason": charge.get("reason")})
            self._count("orders_declined")
            raise errors.PaymentDeclined(details={"order_id": order_id, "reason": charge.get("reason")})
        return await self.confirm(order)

    async def confirm(self, order: dict) -> dict:
        """Commit the reservation and confirm a charged order (then take its lines out of the cart)."""
        order_id = order["_id"]
        try:
            committed = (await self.inventory.commit(order_id)).get("state") == "committed"
        except errors.Conflict:
            committed = False
        except errors.Unavailable:
            # charged, but inventory cannot commit now: stay PENDING (answered 202); recovery finishes it.
            # Never a 5xx here: a client retry would charge a second order.
            # The lease goes back at once: recovery tries again at its busy pace (each second), not a lease later.
            log.warning("order %s: commit postponed (inventory unavailable)", order_id)
            await self._postpone(order_id)
            return await self.repo.get(order_id) or order
        if not committed:
            # the reservation expired (or never existed) before we could commit: refund and cancel
            await self.cancel(order, "reservation_expired", todo=["payment", "stock"])
            raise errors.OutOfStock("the stock reservation expired", details={"order_id": order_id, "items": []})
        doc = await self.repo.transition(order, OPEN, OrderStatus.CONFIRMED, by=SYSTEM,
                                         payment_status=PaymentStatus.CHARGED.value,
                                         todo=["cart"] if order.get("from_cart") else None)
        if doc is None:
            # cancelled meanwhile (by its customer or staff): that cancel owes the refund and stock
            return await self.repo.get(order_id)
        self._count("orders_confirmed")
        if doc.get("todo"):
            doc = await self.compensate(doc)
        return doc

    # -- cancelling and compensating --------------------------------------------------------------------
    async def cancel(self, order: dict, reason: str, todo: list[str], payment_status: PaymentStatus | None = None,
                     from_status=None, by: str = SYSTEM, outcome: dict | None = None) -> dict | None:
        if payment_status is None and "payment" in todo:
            # a charge exists or may exist: the order shows it is owed back until the processor confirms
            payment_status = PaymentStatus.REFUND_PENDING
        doc = await self.repo.transition(order, from_status or OPEN, OrderStatus.CANCELLED, by=by, reason=reason,
                                         payment_status=payment_status.value if payment_status else None,
                                         todo=todo, outcome=outcome, release_key=reason in RETRYABLE)
        if doc is None:
            return None
        if doc.get("promotion_applied"):
            try:
                await self.repo.release_promotion(doc["user_id"], doc["_id"])
            except Exception:  # noqa: BLE001 - the next pricing for this customer gives it back (promotion_available)
                log.warning("order %s: promotion give-back postponed", doc["_id"], exc_info=True)
        return await self.compensate(doc)

    async def compensate(self, doc: dict) -> dict:
        """Do the work an order still owes (``todo``); what an unreachable upstream refuses stays for recovery,
        which comes again within a second or so (the lease is given back)."""
        order_id = doc["_id"]
        postponed = False
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
                    doc = await self.repo.done_todo(order_id, item, status.value) or doc
                elif item == "stock":
                    await self._give_stock_back(order_id)
                    doc = await self.repo.done_todo(order_id, item) or doc
                elif item == "cart":
                    await self.repo.take_lines(doc["user_id"], order_id, doc["items"])
                    doc = await self.repo.done_todo(order_id, item) or doc
            except errors.Conflict as exc:
                log.warning("order %s: compensation %s refused: %s", order_id, item, exc.code)
            except errors.Unavailable:
                log.warning("order %s: compensation %s postponed (upstream unavailable)", order_id, item)
                postponed = True
        if postponed:  # recovery comes again at its busy pace, not once the lease has run out
            await self._postpone(order_id)
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
        doc = await self.repo.transition(order, [OrderStatus.CONFIRMED], OrderStatus.SHIPPED, by=by)
        if doc is None:
            raise errors.Conflict(f"only a CONFIRMED order can be shipped (this one is {order['status']})",
                                  code="invalid_status_transition", details={"status": order["status"]})
        self._count("orders_shipped")
        return doc

    # -- leases -------------------------------------------------------------------------------------------
    def _hold(self, order: dict) -> None:
        """Mark the order as run by this process (recovery skips it) and keep its lease while it runs long."""
        self.running[order["_id"]] = order.get("saga_lease") or self.now() + datetime.timedelta(seconds=self.lease)
        if self._renewal is None:
            self._renewal = asyncio.get_running_loop().call_later(self.lease / 4, self._renewal_due)

    def _renewal_due(self) -> None:
        self._renewal = None
        if not self.running:
            return
        task = asyncio.ensure_future(self.renew_leases())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # renew_leases logs its own failures
        self._renewal = asyncio.get_running_loop().call_later(self.lease / 4, self._renewal_due)

    async def renew_leases(self) -> int:
        """Extend, in one write, the leases of this process's sagas that have run for half their lease or more
        (a normal checkout is over long before: it never pays for a renewal). Returns how many."""
        now = self.now()
        half = datetime.timedelta(seconds=self.lease / 2)
        due = [order_id for order_id, until in self.running.items() if until - now <= half]
        if not due:
            return 0
        try:
            await self.repo.renew_leases(due, self.lease, self.owner)
        except Exception:  # noqa: BLE001 - the next tick tries again; recovery elsewhere is the worst case
            log.warning("lease renewal of %d sagas failed", len(due), exc_info=True)
            return 0
        until = now + datetime.timedelta(seconds=self.lease)
        for order_id in due:
            if order_id in self.running:
                self.running[order_id] = until
        return len(due)

    # -- recovery -----------------------------------------------------------------------------------------
    async def recover(self, wait: float | None = None) -> int:
        """Drive forward or compensate every open order whose owner's lease ran out (and, on the first pass,
        those of an earlier process of this host that is gone); returns how many.

        Orders this process is running itself are never taken. Orders are recovered side by side, each in a
        task of its own, so one slow order does not hold up the others; with ``wait``, the pass returns after
        that many seconds and leaves slow orders running; a later pass skips them.
        """
        candidates = [(c["_id"], None) for c in await self.repo.unfinished()]
        if self.metrics is not None:  # open orders whose owner's lease ran out: recovery's work still to do
            self.metrics.gauge("saga_recovery_backlog", len(candidates))
        if self._first_pass:
            self._first_pass = False
            from_gone = [(c["_id"], c["owner"]) for c in await self.repo.open_owned_by(local_prefix(self.owner))
                         if c.get("owner") and self.is_gone(c["owner"])]
            candidates = from_gone + candidates
        tasks = []
        for order_id, gone_owner in candidates:
            if order_id in self._recovering or order_id in self.running:
                continue
            task = asyncio.ensure_future(self._recover_candidate(order_id, gone_owner))
            self._recovering[order_id] = task
            task.add_done_callback(lambda _t, oid=order_id: self._recovering.pop(oid, None))
            tasks.append(task)
        if not tasks:
            return 0
        done, _ = await asyncio.wait(tasks, timeout=wait)
        return sum(1 for t in done if not t.cancelled() and t.result())

    async def _recover_candidate(self, order_id: str, gone_owner: str | None = None) -> bool:
        async with self._recovery_gate:
            try:
                if order_id in self.running:
                    return False
                order = await self.repo.take_lease(order_id, self.lease, self.owner, gone_owner)
                if order is None:
                    return False  # another instance took it, or it finished meanwhile
                self._hold(order)
                try:
                    with self.recovery_trace(order):
                        await self._recover_one(order)
                finally:
                    self.running.pop(order_id, None)
                return True
            except errors.DomainError as exc:
                log.warning("order %s: recovery postponed: %s", order_id, exc.code)
                await self._postpone(order_id)
            except Exception:  # noqa: BLE001 - a task of its own: nobody else would see this
                log.exception("order %s: recovery failed", order_id)
                await self._postpone(order_id)
            return False

    async def _postpone(self, order_id: str) -> None:
        """An upstream is still down: give the lease back and come again at the busy pace (a compensation
        is owed, typically a refund: paid seconds after the upstream is back, not a lease later)."""
        self._left_over = True
        self._soon.set()
        driver = self.task_of(order_id)
        if driver is not None and not driver.done() and driver is not asyncio.current_task():
            # another task of this process still drives the order (a customer's cancel while its saga is
            # running): its lease stays, or another instance's recovery would run beside the live saga
            return
        try:
            await self.repo.give_back_lease(order_id, self.owner)
        except Exception as exc:  # noqa: BLE001 - the lease then simply runs out
            log.warning("order %s: lease kept after a postponed recovery: %s", order_id, exc)

    def stop_recovery(self) -> None:
        """Cancel the recoveries still running (at shutdown); their orders' leases let others resume."""
        for task in list(self._recovering.values()):
            task.cancel()
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None

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
            await self.cancel(order, "payment_declined", todo=["stock"], payment_status=PaymentStatus.DECLINED,
                              outcome={"reason": ledger.get("reason")})
        else:
            log.info("recovery: order %s was interrupted before payment; compensating", order_id)
            await self.cancel(order, "checkout_interrupted", todo=["payment", "stock"])
        self._count("orders_recovered")

    async def recover_forever(self, stop: asyncio.Event, every: float = 5.0, busy_every: float = 1.0) -> None:
        """A recovery pass every ``every`` seconds; every ``busy_every`` while work is left over (compensations
        waiting for an upstream to come back), so that it is paid soon after it can be."""
        try:
            while not stop.is_set():
                busy = False
                self._left_over = False
                try:
                    busy = bool(await self.recover(wait=every) or self._recovering or self._left_over)
                except errors.DomainError as exc:
                    log.warning("recovery pass failed: %s", exc.code)
                except Exception:  # noqa: BLE001 - the loop must outlive a bad pass (e.g. database down)
                    log.exception("recovery pass failed")
                if not busy:  # idle: a postponement meanwhile brings the next pass forward
                    await periodic.pause_until(stop, self._soon, every)
                    busy = self._soon.is_set()
                self._soon.clear()
                if busy:
                    await periodic.pause(stop, busy_every)
        finally:
            self.stop_recovery()
