"""The checkout saga and its recovery, against in-memory fakes of the order repository, the catalogue,
inventory and payments (no database, no network). The fakes keep the upstreams' contracts: reservations and
charges are idempotent per order id, a refund of an order never charged voids it, errors are domain errors."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime

import pytest
from harness import until

from bookshop.services import cards, errors
from bookshop.services.checkout import Checkout, DuplicateRequest, PlaceOrder
from bookshop.services.orders import OrderStatus

A, B = "9780000000001", "9780000000002"


CARD = {"card_number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}
ADDRESS = {"name": "Ann", "line1": "1 Book Street", "city": "Lyon", "postal_code": "69001", "country": "FR"}
LEASE = 10.0


class Clock:
    def __init__(self):
        self.now = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


def _set(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        doc = doc[part]
    doc[last] = value


class FakeRepo:
    """The order repository's behaviour (orders.OrderRepo), in memory."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.orders: dict[str, dict] = {}
        self.promotions: dict[str, dict] = {}
        self.carts: dict[str, list[dict]] = {}
        self.writes = 0
        self.key_reads = 0  # by_key calls

    async def give_back_lease(self, order_id, owner):
        doc = self.orders.get(order_id)
        if doc is not None and doc["open"] and doc.get("owner") == owner:
            doc["saga_lease"] = self.clock()

    async def get(self, order_id):
        return copy.deepcopy(self.orders.get(order_id))

    async def by_key(self, user_id, key):
        self.key_reads += 1
        return self._by_key(user_id, key)

    def _by_key(self, user_id, key):
        for doc in self.orders.values():
            if doc["user_id"] == user_id and (doc.get("idem") or {}).get("key") == key:
                return copy.deepcopy(doc)
        return None

    async def promotion_holder(self, user_id):
        return copy.deepcopy(self.promotions.get(user_id))

    async def claim_promotion(self, user_id, order_id, key):
        self.writes += 1
        if user_id in self.promotions:
            return False
        self.promotions[user_id] = {"_id": user_id, "order_id": order_id, "key": key, "at": self.clock()}
        return True

    async def release_promotion(self, user_id, order_id):
        self.writes += 1
        if self.promotions.get(user_id, {}).get("order_id") == order_id:
            del self.promotions[user_id]

    async def insert(self, doc):
        self.writes += 1
        key = (doc.get("idem") or {}).get("key")
        if key is not None and self._by_key(doc["user_id"], key) is not None:  # the unique index
            return False
        self.orders[doc["_id"]] = copy.deepcopy(doc)
        return True

    async def transition(self, order, from_status, to, *, by, reason=None, payment_status=None, todo=None,
                         outcome=None, release_key=False):
        self.writes += 1
        doc = self.orders.get(order["_id"])
        if doc is None or doc["status"] not in [s.value for s in from_status]:
            return None
        entry = {"status": to.value, "at": self.clock(), "by": by}
        if reason:
            entry["reason"] = reason
        doc["status"] = to.value
        doc["history"].append(entry)
        if payment_status:
            doc["payment"]["status"] = payment_status
        if outcome:
            doc["outcome"] = copy.deepcopy(outcome)
        doc["todo"] += [t for t in todo or [] if t not in doc["todo"]]
        doc["open"] = bool(doc["todo"])
        if "idem" in doc:
            if release_key and doc["idem"]["answer"] is None:
                del doc["idem"]
            elif doc["idem"]["answer"] is None:
                doc["idem"]["answer"] = len(doc["history"])
        return copy.deepcopy(doc)

    async def done_todo(self, order_id, item, payment_status=None):
        self.writes += 1
        doc = self.orders[order_id]
        doc["todo"] = [t for t in doc["todo"] if t != item]
        if payment_status:
            doc["payment"]["status"] = payment_status
        doc["open"] = bool(doc["todo"]) or doc["status"] == OrderStatus.PENDING.value
        return copy.deepcopy(doc)

    async def record_pending_answer(self, order_id):
        doc = self.orders[order_id]
        if doc["status"] != "PENDING" or "idem" not in doc or doc["idem"]["answer"] is not None:
            return False
        self.writes += 1
        doc["idem"]["answer"] = 1
        return True

    async def release_key(self, order_id):
        doc = self.orders.get(order_id)
        if doc is not None and doc.get("idem", {}).get("answer", 0) is None:
            del doc["idem"]

    async def take_lines(self, user_id, order_id, lines):
        self.writes += 1
        cart = self.carts.get(user_id, [])
        ordered = {line["isbn"]: line["quantity"] for line in lines}
        self.carts[user_id] = [{"isbn": i["isbn"], "quantity": i["quantity"] - ordered.get(i["isbn"], 0)}
                               for i in cart if i["quantity"] > ordered.get(i["isbn"], 0)]

    async def take_lease(self, order_id, seconds, owner, dead_owner=None):
        doc = self.orders.get(order_id)
        if doc is None or not doc["open"]:
            return None
        if not (doc["saga_lease"] < self.clock() or (dead_owner is not None and doc.get("owner") == dead_owner)):
            return None
        self.writes += 1
        doc["saga_lease"] = self.clock() + datetime.timedelta(seconds=seconds)
        doc["owner"] = owner
        return copy.deepcopy(doc)

    async def renew_leases(self, order_ids, seconds, owner):
        self.writes += 1
        for order_id in order_ids:
            doc = self.orders.get(order_id)
            if doc is not None and doc["open"] and doc.get("owner") == owner:
                doc["saga_lease"] = self.clock() + datetime.timedelta(seconds=seconds)

    async def unfinished(self, limit=100):
        return [{"_id": d["_id"], "owner": d.get("owner")} for d in self.orders.values()
                if d["open"] and d["saga_lease"] < self.clock()]

    async def open_owned_by(self, prefix, limit=1000):
        return [{"_id": d["_id"], "owner": d["owner"]} for d in self.orders.values()
                if d["open"] and (d.get("owner") or "").startswith(prefix)]


class FakeCatalog:
    def __init__(self, books: dict[str, dict]):
        self.on_sale = books

    async def books(self, isbns):
        return {i: self.on_sale[i] for i in isbns if i in self.on_sale}


class Down:
    """Makes the named operations of a fake raise Unavailable, as the client does for a dead upstream."""

    def __init__(self):
        self.down: set[str] = set()

    def check(self, operation: str) -> None:
        if operation in self.down or "*" in self.down:
            raise errors.Unavailable(f"{operation}: upstream unavailable", retry_after=2)


class FakeInventory(Down):
    """The inventory service's reservations: all-or-nothing, idempotent per order id."""

    def __init__(self, stock: dict[str, int]):
        super().__init__()
        self.on_hand = dict(stock)
        self.reserved = {isbn: 0 for isbn in stock}
        self.reservations: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []

    def available(self, isbn: str) -> int:
        return self.on_hand[isbn] - self.reserved[isbn]

    def levels(self, isbn: str) -> tuple[int, int]:
        return self.on_hand[isbn], self.reserved[isbn]

    async def reserve(self, order_id, lines):
        self.calls.append(("reserve", order_id))
        self.check("reserve")
        if order_id in self.reservations:
            return copy.deepcopy(self.reservations[order_id])
        short = [{"isbn": ln["isbn"], "requested": ln["quantity"], "available": max(0, self.available(ln["isbn"]))}
                 for ln in lines if self.available(ln["isbn"]) < ln["quantity"]]
        if short:
            res = {"order_id": order_id, "state": "rejected", "items": lines, "short": short}
        else:
            for ln in lines:
                self.reserved[ln["isbn"]] += ln["quantity"]
            res = {"order_id": order_id, "state": "held", "items": lines}
        self.reservations[order_id] = res
        return copy.deepcopy(res)

    def _not_held(self, res):
        return errors.Conflict(f"reservation is {res['state']}", code="reservation_not_held",
                               details=copy.deepcopy(res))

    async def commit(self, order_id):
        self.calls.append(("commit", order_id))
        self.check("commit")
        res = self.reservations.get(order_id)
        if res is None:
            return {"order_id": order_id, "state": "none"}
        if res["state"] == "held":
            for ln in res["items"]:
                self.reserved[ln["isbn"]] -= ln["quantity"]
                self.on_hand[ln["isbn"]] -= ln["quantity"]
            res["state"] = "committed"
        if res["state"] != "committed":
            raise self._not_held(res)
        return copy.deepcopy(res)

    async def release(self, order_id):
        self.calls.append(("release", order_id))
        self.check("release")
        res = self.reservations.get(order_id)
        if res is None:
            return {"order_id": order_id, "state": "none"}
        if res["state"] == "held":
            for ln in res["items"]:
                self.reserved[ln["isbn"]] -= ln["quantity"]
        if res["state"] in ("held", "rejected"):
            res["state"] = "released"
        if res["state"] not in ("released", "expired"):
            raise self._not_held(res)
        return copy.deepcopy(res)

    async def put_back(self, order_id):
        self.calls.append(("put_back", order_id))
        self.check("put_back")
        res = self.reservations.get(order_id)
        if res is None:
            return {"order_id": order_id, "state": "none"}
        if res["state"] == "committed":
            for ln in res["items"]:
                self.on_hand[ln["isbn"]] += ln["quantity"]
            res["state"] = "returned"
        if res["state"] != "returned":
            raise self._not_held(res)
        return copy.deepcopy(res)

    def expire(self, order_id):
        """The sweeper's work: a held reservation past its time gives its stock back."""
        res = self.reservations[order_id]
        assert res["state"] == "held"
        for ln in res["items"]:
            self.reserved[ln["isbn"]] -= ln["quantity"]
        res["state"] = "expired"


class FakePayments(Down):
    """The simulated card processor: one charge document per order, a void fences a late charge."""

    def __init__(self):
        super().__init__()
        self.is_open = False
        self.charges: dict[str, dict] = {}
        self.lose_reply = False  # the charge lands but the caller hears nothing (a timeout)

    async def charge(self, order_id, amount_cents, currency, card):
        self.check("charge")
        doc = self.charges.get(order_id)
        if doc is None:
            decision = cards.card_decision(card["card_number"])
            status = "charged" if decision == cards.APPROVED else "declined"
            doc = {"order_id": order_id, "status": status, "reason": None if status == "charged" else decision,
                   "amount_cents": amount_cents, "refunded": False,
                   "ledger": [{"kind": "charge", "amount_cents": amount_cents}] if status == "charged" else []}
            self.charges[order_id] = doc
        if doc["status"] == "voided":
            raise errors.Conflict("this order's payment was voided", code="charge_voided")
        if self.lose_reply:
            raise errors.Unavailable("payments timed out", retry_after=2)
        return copy.deepcopy(doc)

    async def refund(self, order_id):
        self.check("refund")
        doc = self.charges.get(order_id)
        if doc is None:
            doc = self.charges[order_id] = {"order_id": order_id, "status": "voided", "refunded": False,
                                            "ledger": []}
        elif doc["status"] == "charged" and not doc["refunded"]:
            doc["refunded"] = True
            doc["ledger"].append({"kind": "refund", "amount_cents": doc["amount_cents"]})
        return copy.deepcopy(doc)

    async def status(self, order_id):
        self.check("status")
        return copy.deepcopy(self.charges.get(order_id))


class World:
    def __init__(self, stock=None, books=None):
        self.clock = Clock()
        self.repo = FakeRepo(self.clock)
        self.catalog = FakeCatalog(books or {
            A: {"isbn": A, "title": "Alpha", "price_cents": 1000, "currency": "EUR"},
            B: {"isbn": B, "title": "Beta", "price_cents": 700, "currency": "EUR"},
        })
        self.inventory = FakeInventory(stock if stock is not None else {A: 10, B: 10})
        self.payments = FakePayments()
        self.checkout = self.instance("host|ns|1")
        self._ids = 0

    def instance(self, owner: str, gone=()) -> Checkout:
        """A Checkout as one orders process runs it (``gone``: the owners it may take for dead)."""
        return Checkout(self.repo, self.catalog, self.inventory, self.payments, "EUR", LEASE, now=self.clock,
                        owner=owner, is_gone=lambda other: other in gone)

    def new_id(self) -> str:
        self._ids += 1
        return f"{self._ids:024x}"

    def command(self, lines, user="u1", card=None, expected=None, from_cart=False) -> PlaceOrder:
        return PlaceOrder(user_id=user, lines=lines, shipping_address=ADDRESS, card=card or CARD,
                          expected_total_cents=expected, from_cart=from_cart)

    async def place(self, lines, **kw) -> dict:
        order = await self.checkout.create(self.new_id(), self.command(lines, **kw))
        return await self.checkout.run(order, kw.get("card") or CARD)

    def stored(self, order_id) -> dict:
        return self.repo.orders[order_id]


def statuses(doc):
    return [h["status"] for h in doc["history"]]


# -- placing orders --------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_happy_path_confirms_charges_and_sells_the_stock():
    w = World()
    order = await w.place([(A, 2), (B, 1)], from_cart=True)
    assert order["status"] == "CONFIRMED"
    assert statuses(order) == ["PENDING", "CONFIRMED"]
    assert order["payment"] == {"status": "charged", "last4": "4242"}
    assert (order["subtotal_cents"], order["discount_cents"], order["total_cents"]) == (2700, 700, 2000)
    assert order["promotion_applied"] is True
    assert order["open"] is False and order["todo"] == []
    assert w.payments.charges[order["_id"]]["amount_cents"] == 2000
    assert w.inventory.levels(A) == (8, 0) and w.inventory.levels(B) == (9, 0)
    assert w.repo.promotions["u1"]["order_id"] == order["_id"]


@pytest.mark.gen_test
async def test_the_card_number_is_never_stored():
    w = World()
    order = await w.place([(A, 1)])
    assert "4242424242424242" not in repr(w.stored(order["_id"]))


@pytest.mark.gen_test
async def test_out_of_stock_cancels_with_the_short_items_and_charges_nothing():
    w = World(stock={A: 1, B: 10})
    with pytest.raises(errors.OutOfStock) as info:
        await w.place([(A, 2), (B, 1)])
    order_id = info.value.details["order_id"]
    assert info.value.details["items"] == [{"isbn": A, "requested": 2, "available": 1}]
    doc = w.stored(order_id)
    assert doc["status"] == "CANCELLED" and doc["history"][-1]["reason"] == "out_of_stock"
    assert doc["payment"]["status"] == "none"
    assert doc["open"] is False and doc["todo"] == []
    assert order_id not in w.payments.charges
    assert w.inventory.levels(A) == (1, 0) and w.inventory.levels(B) == (10, 0)


@pytest.mark.gen_test
@pytest.mark.parametrize("number, reason", [(cards.DECLINED, "declined"),
                                            (cards.INSUFFICIENT_FUNDS, "insufficient_funds")])
async def test_a_declined_card_releases_the_stock(number, reason):
    w = World()
    with pytest.raises(errors.PaymentDeclined) as info:
        await w.place([(A, 3)], card={**CARD, "card_number": number})
    assert info.value.details["reason"] == reason
    doc = w.stored(info.value.details["order_id"])
    assert doc["status"] == "CANCELLED" and doc["history"][-1]["reason"] == "payment_declined"
    assert doc["payment"] == {"status": "declined", "last4": number[-4:]}
    assert doc["open"] is False
    assert w.inventory.levels(A) == (10, 0)
    # the promotion the order claimed is given back
    assert w.repo.promotions == {}


@pytest.mark.gen_test
async def test_payments_known_down_fails_fast_before_anything_is_stored():
    w = World()
    w.payments.is_open = True
    with pytest.raises(errors.Unavailable) as info:
        await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    assert info.value.retry_after
    assert w.repo.orders == {} and w.inventory.calls == []


@pytest.mark.gen_test
async def test_payments_unavailable_cancels_and_keeps_the_refund_owed_then_recovery_pays_it():
    w = World()
    w.payments.down = {"charge", "refund"}
    with pytest.raises(errors.Unavailable) as info:
        await w.place([(A, 2)])
    assert info.value.retry_after
    order_id = info.value.details["order_id"]
    doc = w.stored(order_id)
    assert doc["status"] == "CANCELLED" and doc["history"][-1]["reason"] == "payment_unavailable"
    assert doc["todo"] == ["payment"]  # the stock went back; the payment could not be voided yet
    assert doc["open"] is True
    assert w.inventory.levels(A) == (10, 0)
    # nothing happens before the lease runs out
    assert await w.checkout.recover() == 0
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    assert w.stored(order_id)["todo"] == ["payment"]  # still down: still owed
    w.payments.down = set()
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    doc = w.stored(order_id)
    assert doc["todo"] == [] and doc["open"] is False
    assert w.payments.charges[order_id]["status"] == "voided"  # a late charge would now be refused
    assert doc["payment"]["status"] == "none"


@pytest.mark.gen_test
async def test_a_charge_whose_reply_was_lost_is_refunded():
    w = World()
    w.payments.lose_reply = True
    with pytest.raises(errors.Unavailable) as info:
        await w.place([(A, 1)])
    doc = w.stored(info.value.details["order_id"])
    assert doc["status"] == "CANCELLED" and doc["payment"]["status"] == "refunded"
    assert [e["kind"] for e in w.payments.charges[doc["_id"]]["ledger"]] == ["charge", "refund"]
    assert doc["open"] is False and w.inventory.levels(A) == (10, 0)


@pytest.mark.gen_test
async def test_inventory_unavailable_cancels_without_charging():
    w = World()
    w.inventory.down = {"reserve"}
    with pytest.raises(errors.Unavailable):
        await w.place([(A, 1)])
    (doc,) = w.repo.orders.values()
    assert doc["status"] == "CANCELLED" and doc["history"][-1]["reason"] == "inventory_unavailable"
    assert w.payments.charges == {}


@pytest.mark.gen_test
async def test_price_changed_is_refused_before_anything_is_stored():
    w = World()
    with pytest.raises(errors.Conflict) as info:
        await w.checkout.create(w.new_id(), w.command([(A, 1)], expected=999))
    assert info.value.code == "price_changed"
    assert info.value.details["total_cents"] == 1000
    assert w.repo.orders == {}
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)], expected=1000))
    assert order["total_cents"] == 1000


@pytest.mark.gen_test
async def test_the_promotion_is_once_per_customer_and_given_back_by_a_cancel():
    w = World()
    first = await w.place([(A, 3)])
    assert first["promotion_applied"] and first["discount_cents"] == 1000
    second = await w.place([(A, 3)])
    assert not second["promotion_applied"] and second["total_cents"] == 3000
    other = await w.place([(B, 3)], user="u2")  # another customer has their own
    assert other["promotion_applied"]
    await w.checkout.cancel_by_request(await w.repo.get(first["_id"]))
    third = await w.place([(A, 3)])
    assert third["promotion_applied"]


@pytest.mark.gen_test
async def test_losing_the_promotion_race_prices_again_without_it():
    w = World()
    claim = w.repo.claim_promotion

    async def raced_claim(user_id, order_id, key):  # another order's claim landed between our check and ours
        w.repo.promotions.setdefault(user_id, {"_id": user_id, "order_id": "someone-else", "key": "k2",
                                               "at": w.clock()})
        return await claim(user_id, order_id, key)
    w.repo.claim_promotion = raced_claim
    order = await w.checkout.create(w.new_id(), w.command([(A, 3)]), key="k1")
    assert order["promotion_applied"] is False and order["discount_cents"] == 0
    assert w.repo.promotions["u1"]["order_id"] == "someone-else"


@pytest.mark.gen_test
async def test_an_expired_reservation_means_refund_and_cancel():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    real_charge = w.payments.charge

    async def slow_charge(*args):
        w.inventory.expire(order["_id"])  # the reservation ran out while the processor thought
        return await real_charge(*args)
    w.payments.charge = slow_charge
    with pytest.raises(errors.OutOfStock):
        await w.checkout.run(order, CARD)
    doc = w.stored(order["_id"])
    assert doc["status"] == "CANCELLED" and doc["history"][-1]["reason"] == "reservation_expired"
    assert doc["payment"]["status"] == "refunded" and doc["open"] is False
    assert w.inventory.levels(A) == (10, 0)


# -- cancel and ship ----------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_cancel_a_confirmed_order_refunds_and_restocks():
    w = World()
    order = await w.place([(A, 2)])
    doc = await w.checkout.cancel_by_request(order)
    assert doc["status"] == "CANCELLED" and doc["payment"]["status"] == "refunded"
    assert doc["open"] is False and doc["todo"] == []
    assert w.inventory.levels(A) == (10, 0)
    assert statuses(doc) == ["PENDING", "CONFIRMED", "CANCELLED"]
    with pytest.raises(errors.Conflict) as info:
        await w.checkout.cancel_by_request(doc)
    assert info.value.code == "invalid_status_transition"


@pytest.mark.gen_test
async def test_ship_only_from_confirmed_and_no_cancel_after():
    w = World()
    order = await w.place([(A, 1)])
    shipped = await w.checkout.ship(order)
    assert shipped["status"] == "SHIPPED"
    with pytest.raises(errors.Conflict):
        await w.checkout.ship(shipped)
    with pytest.raises(errors.Conflict):
        await w.checkout.cancel_by_request(shipped)
    assert w.payments.charges[order["_id"]]["refunded"] is False


@pytest.mark.gen_test
async def test_a_cancel_that_races_a_stale_read_is_a_conflict():
    w = World()
    order = await w.place([(A, 1)])
    stale = copy.deepcopy(order)
    await w.checkout.ship(order)
    with pytest.raises(errors.Conflict) as info:
        await w.checkout.cancel_by_request(stale)  # read CONFIRMED, but it shipped meanwhile
    assert info.value.details == {"status": "SHIPPED"}


# -- recovery -------------------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_recovery_confirms_a_pending_order_that_was_charged():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 2)]))
    # the process died after the charge, before confirming
    await w.inventory.reserve(order["_id"], [{"isbn": A, "quantity": 2}])
    await w.payments.charge(order["_id"], order["total_cents"], "EUR", CARD)
    assert await w.checkout.recover() == 0  # its owner's lease still runs
    w.clock.advance(LEASE + 1)
    assert await w.checkout.recover() == 1
    doc = w.stored(order["_id"])
    assert doc["status"] == "CONFIRMED" and doc["payment"]["status"] == "charged" and doc["open"] is False
    assert w.inventory.levels(A) == (8, 0)
    assert len(w.payments.charges[order["_id"]]["ledger"]) == 1
    w.clock.advance(LEASE + 1)
    assert await w.checkout.recover() == 0  # nothing left to do


@pytest.mark.gen_test
async def test_recovery_voids_and_releases_a_pending_order_never_charged():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 3)]))
    await w.inventory.reserve(order["_id"], [{"isbn": A, "quantity": 3}])
    assert w.inventory.levels(A) == (10, 3)
    w.clock.advance(LEASE + 1)
    assert await w.checkout.recover() == 1
    doc = w.stored(order["_id"])
    assert doc["status"] == "CANCELLED" and doc["history"][-1]["reason"] == "checkout_interrupted"
    assert doc["payment"]["status"] == "none" and doc["open"] is False and doc["todo"] == []
    assert w.inventory.levels(A) == (10, 0)
    assert w.payments.charges[order["_id"]]["status"] == "voided"
    assert w.repo.promotions == {}


@pytest.mark.gen_test
async def test_recovery_never_takes_a_saga_its_own_process_is_running():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    real_charge = w.payments.charge

    async def slow_charge(*args):
        # the processor takes longer than the lease: this process's recovery must leave the saga alone
        w.clock.advance(LEASE + 1)
        assert await w.checkout.recover() == 0
        return await real_charge(*args)
    w.payments.charge = slow_charge
    doc = await w.checkout.run(order, CARD)
    assert doc["status"] == "CONFIRMED" and doc["payment"]["status"] == "charged"
    assert len(w.payments.charges[order["_id"]]["ledger"]) == 1


@pytest.mark.gen_test
async def test_an_owner_that_was_only_slow_has_its_late_charge_refused_when_another_instance_took_over():
    w = World()
    other = w.instance("elsewhere|ns|7")
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    real_charge = w.payments.charge

    async def slow_charge(*args):
        # the processor took longer than the lease, which nobody renewed: another instance took us for dead
        w.clock.advance(LEASE + 1)
        assert await other.recover() == 1
        return await real_charge(*args)
    w.payments.charge = slow_charge
    with pytest.raises(errors.Conflict) as info:
        await w.checkout.run(order, CARD)
    assert info.value.code == "checkout_interrupted"
    doc = w.stored(order["_id"])
    assert doc["status"] == "CANCELLED" and doc["payment"]["status"] == "none" and doc["open"] is False
    assert w.payments.charges[order["_id"]]["ledger"] == []
    assert w.inventory.levels(A) == (10, 0)


@pytest.mark.gen_test
async def test_a_long_saga_renews_its_lease_in_one_write_and_a_short_one_never_does():
    w = World()
    quick = await w.place([(A, 1)])
    writes = w.repo.writes
    assert await w.checkout.renew_leases() == 0 and w.repo.writes == writes  # nothing running, nothing written
    assert quick["status"] == "CONFIRMED"
    orders = [await w.checkout.create(w.new_id(), w.command([(A, 1)], user=f"u{i}")) for i in range(3)]
    for order in orders:
        w.checkout._hold(order)
    w.clock.advance(LEASE / 4)
    assert await w.checkout.renew_leases() == 0  # a quarter of the lease: not yet
    w.clock.advance(LEASE / 4 + 0.1)
    writes = w.repo.writes
    assert await w.checkout.renew_leases() == 3
    assert w.repo.writes == writes + 1  # one write for all of them
    assert all(w.stored(o["_id"])["saga_lease"] == w.clock() + datetime.timedelta(seconds=LEASE) for o in orders)
    w.clock.advance(LEASE - 1)
    other = w.instance("elsewhere|ns|7")
    assert await other.recover() == 0  # renewed: nobody takes them
    w.checkout.stop_recovery()


@pytest.mark.gen_test
async def test_after_a_restart_the_orders_of_the_dead_process_are_taken_at_once():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    await w.inventory.reserve(order["_id"], [{"isbn": A, "quantity": 1}])
    # the process died; its successor on this host starts while the order's lease still runs
    successor = w.instance("host|ns|2", gone={"host|ns|1"})
    assert await successor.recover() == 1
    doc = w.stored(order["_id"])
    assert doc["status"] == "CANCELLED" and doc["history"][-1]["reason"] == "checkout_interrupted"
    assert w.inventory.levels(A) == (10, 0)
    # an order of a live process is left to its lease
    live = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    assert await w.instance("host|ns|3", gone={"host|ns|2"}).recover() == 0
    assert w.stored(live["_id"])["status"] == "PENDING"


@pytest.mark.gen_test
async def test_recovery_of_a_pending_order_before_its_reservation():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    doc = w.stored(order["_id"])
    assert doc["status"] == "CANCELLED" and doc["open"] is False
    assert w.inventory.levels(A) == (10, 0)


@pytest.mark.gen_test
async def test_recovery_cancels_a_pending_order_whose_card_was_declined():
    w = World()
    card = {**CARD, "card_number": cards.DECLINED}
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)], card=card))
    await w.inventory.reserve(order["_id"], [{"isbn": A, "quantity": 1}])
    await w.payments.charge(order["_id"], order["total_cents"], "EUR", card)
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    doc = w.stored(order["_id"])
    assert doc["status"] == "CANCELLED" and doc["payment"]["status"] == "declined"
    assert w.inventory.levels(A) == (10, 0)


@pytest.mark.gen_test
async def test_a_failed_stock_compensation_stays_owed_and_is_retried():
    w = World()
    order = await w.place([(A, 2)])
    w.inventory.down = {"release", "put_back"}
    doc = await w.checkout.cancel_by_request(order)
    assert doc["status"] == "CANCELLED" and doc["payment"]["status"] == "refunded"
    assert doc["todo"] == ["stock"] and doc["open"] is True
    assert w.inventory.levels(A) == (8, 0)
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    assert w.stored(order["_id"])["todo"] == ["stock"]  # still down: still owed
    w.inventory.down = set()
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    doc = w.stored(order["_id"])
    assert doc["todo"] == [] and doc["open"] is False
    assert w.inventory.levels(A) == (10, 0)
    # repeating the compensation is harmless: stock is put back once, money refunded once
    await w.checkout.compensate({**doc, "todo": ["payment", "stock"]})
    assert w.inventory.levels(A) == (10, 0)
    assert [e["kind"] for e in w.payments.charges[order["_id"]]["ledger"]] == ["charge", "refund"]


@pytest.mark.gen_test
async def test_recovery_while_the_payments_status_is_unknown_waits():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    w.payments.down = {"status"}
    w.clock.advance(LEASE + 1)
    assert await w.checkout.recover() == 0
    assert w.stored(order["_id"])["status"] == "PENDING"  # never guess: it may have been charged
    w.payments.down = set()
    w.clock.advance(LEASE + 1)
    assert await w.checkout.recover() == 1
    assert w.stored(order["_id"])["status"] == "CANCELLED"


@pytest.mark.gen_test
async def test_one_stuck_order_does_not_hold_up_the_recovery_of_the_others():
    w = World()
    stuck = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    others = [await w.checkout.create(w.new_id(), w.command([(B, 1)], user=f"u{i}")) for i in range(3)]
    unlocked = asyncio.Event()
    take_lease = w.repo.take_lease

    async def locked_document(order_id, *args):
        if order_id == stuck["_id"]:  # e.g. a slow database answering for this one
            await unlocked.wait()
        return await take_lease(order_id, *args)
    w.repo.take_lease = locked_document
    w.clock.advance(LEASE + 1)
    assert await w.checkout.recover(wait=0.5) == 3
    assert [w.stored(o["_id"])["status"] for o in others] == ["CANCELLED"] * 3
    assert w.stored(stuck["_id"])["status"] == "PENDING"
    assert await w.checkout.recover(wait=0.1) == 0  # a later pass does not start it twice
    unlocked.set()
    for _ in range(100):
        if w.stored(stuck["_id"])["status"] == "CANCELLED":
            break
        await asyncio.sleep(0.01)
    assert w.stored(stuck["_id"])["status"] == "CANCELLED"


@pytest.mark.gen_test
async def test_stopping_recovery_cancels_what_still_runs():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    forever = asyncio.Event()

    async def never(order_id, *args):
        await forever.wait()
    w.repo.take_lease = never
    w.clock.advance(LEASE + 1)
    stop = asyncio.Event()
    loop_task = asyncio.ensure_future(w.checkout.recover_forever(stop, every=0.05))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(loop_task, 1)
    await asyncio.sleep(0)
    assert w.checkout._recovering == {}
    assert w.stored(order["_id"])["status"] == "PENDING"  # left for whoever takes its lease next


# -- hardening (issue 10) ------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_an_order_above_the_processors_limit_is_refused_naming_items_before_anything_is_made():
    w = World(books={A: {"isbn": A, "title": "Folio", "price_cents": 60_000_000, "currency": "EUR"}})
    with pytest.raises(errors.InvalidInput) as info:
        await w.checkout.create(w.new_id(), w.command([(A, 2)]))
    assert info.value.code == "invalid_field" and info.value.details == {"field": "items"}
    assert "items" in info.value.message
    assert w.repo.orders == {} and w.repo.promotions == {} and w.inventory.calls == [] and w.payments.charges == {}
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))  # 60,000,000 is still chargeable
    assert order["total_cents"] == 60_000_000


@pytest.mark.gen_test
async def test_a_cancel_whose_refund_must_wait_shows_refund_pending_never_charged():
    w = World()
    order = await w.place([(A, 2)])
    w.payments.down = {"refund"}
    doc = await w.checkout.cancel_by_request(order, by="u1")
    assert doc["status"] == "CANCELLED"
    assert doc["payment"]["status"] == "refund_pending" and doc["todo"] == ["payment"]
    assert w.stored(order["_id"])["payment"]["status"] == "refund_pending"
    assert w.inventory.levels(A) == (10, 0)
    w.payments.down = set()
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    doc = w.stored(order["_id"])
    assert doc["payment"]["status"] == "refunded" and doc["todo"] == [] and doc["open"] is False


@pytest.mark.gen_test
async def test_a_cancel_before_the_charge_is_refund_pending_until_the_void_then_none():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]))
    w.payments.down = {"refund"}
    doc = await w.checkout.cancel_by_request(order, by="u1")
    assert doc["payment"]["status"] == "refund_pending"  # a charge may be on its way
    w.payments.down = set()
    doc = await w.checkout.compensate(doc)
    assert doc["payment"]["status"] == "none" and w.payments.charges[order["_id"]]["status"] == "voided"


@pytest.mark.gen_test
async def test_a_failing_put_back_leaves_the_stock_owed_but_the_cancel_succeeds():
    w = World()
    order = await w.place([(A, 2)])
    w.inventory.down = {"put_back"}  # release answers "committed", then putting it back fails
    doc = await w.checkout.cancel_by_request(order, by="u1")
    assert doc["status"] == "CANCELLED" and doc["payment"]["status"] == "refunded"
    assert doc["todo"] == ["stock"] and doc["open"] is True
    w.inventory.down = set()
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()
    assert w.stored(order["_id"])["todo"] == [] and w.inventory.levels(A) == (10, 0)


@pytest.mark.gen_test
async def test_history_entries_record_who_acted():
    w = World()
    order = await w.place([(A, 1)], user="u1")
    assert [(h["status"], h["by"]) for h in order["history"]] == [("PENDING", "u1"), ("CONFIRMED", "system")]
    shipped = await w.checkout.ship(order, by="staff-7")
    assert shipped["history"][-1]["by"] == "staff-7"
    other = await w.place([(A, 1)], user="u2")
    cancelled = await w.checkout.cancel_by_request(other, by="staff-7")
    assert [h["by"] for h in cancelled["history"]] == ["u2", "system", "staff-7"]
    w.inventory.on_hand[B] = 0
    with pytest.raises(errors.OutOfStock) as info:
        await w.place([(B, 1)], user="u3")
    assert [h["by"] for h in w.stored(info.value.details["order_id"])["history"]] == ["u3", "system"]


# -- the key, the answer and the claim in the order (issue 11) -----------------------------------------------------
@pytest.mark.gen_test
async def test_the_order_keeps_its_key_and_first_answer_and_a_duplicate_is_told_so():
    w = World()
    order = await w.checkout.create(w.new_id(), w.command([(A, 3)]), key="k1", fingerprint="fp")
    assert order["idem"] == {"key": "k1", "fp": "fp", "answer": None} and order["owner"] == "host|ns|1"
    with pytest.raises(DuplicateRequest):  # a concurrent duplicate (in another process) finds the key taken
        await w.checkout.create(w.new_id(), w.command([(A, 3)]), key="k1", fingerprint="fp")
    done = await w.checkout.run(order, CARD)
    assert done["idem"]["answer"] == 2  # answered by the confirmation
    assert len(w.repo.orders) == 1 and w.repo.promotions["u1"]["order_id"] == order["_id"]
    # without the promotion in play the insert itself tells: and no claim is left behind
    other = await w.checkout.create(w.new_id(), w.command([(B, 1)], user="u2"), key="k2")
    with pytest.raises(DuplicateRequest):
        await w.checkout.create(w.new_id(), w.command([(B, 3)], user="u2"), key="k2")
    assert "u2" not in w.repo.promotions and len(w.repo.orders) == 2 and other["_id"] in w.repo.orders


@pytest.mark.gen_test
async def test_a_checkout_that_fails_with_a_5xx_frees_its_key_and_a_decided_one_records_its_answer():
    w = World()
    w.payments.down = {"charge"}
    order = await w.checkout.create(w.new_id(), w.command([(A, 1)]), key="k1")
    with pytest.raises(errors.Unavailable):
        await w.checkout.run(order, CARD)
    assert "idem" not in w.stored(order["_id"]) and await w.repo.by_key("u1", "k1") is None
    w.payments.down = set()
    declined = await w.checkout.create(w.new_id(), w.command([(A, 1)]), key="k2")
    with pytest.raises(errors.PaymentDeclined):
        await w.checkout.run(declined, {**CARD, "card_number": cards.DECLINED})
    doc = w.stored(declined["_id"])
    assert doc["idem"]["answer"] == 2 and doc["outcome"] == {"reason": "declined"}
    w.inventory.on_hand[B] = 0
    short = await w.checkout.create(w.new_id(), w.command([(B, 1)]), key="k3")
    with pytest.raises(errors.OutOfStock):
        await w.checkout.run(short, CARD)
    assert w.stored(short["_id"])["outcome"] == {"items": [{"isbn": B, "requested": 1, "available": 0}]}


@pytest.mark.gen_test
async def test_confirming_a_from_cart_order_takes_only_its_lines_out_of_the_cart():
    w = World()
    w.repo.carts["u1"] = [{"isbn": A, "quantity": 2}, {"isbn": B, "quantity": 1}]
    order = await w.checkout.create(w.new_id(), w.command([(A, 2), (B, 1)], from_cart=True))
    w.repo.carts["u1"] = [{"isbn": A, "quantity": 3}, {"isbn": B, "quantity": 1}, {"isbn": "C", "quantity": 1}]
    doc = await w.checkout.run(order, CARD)
    assert doc["status"] == "CONFIRMED" and doc["todo"] == [] and doc["open"] is False
    assert w.repo.carts["u1"] == [{"isbn": A, "quantity": 1}, {"isbn": "C", "quantity": 1}]


@pytest.mark.gen_test
async def test_a_promotion_claim_left_behind_is_given_back():
    w = World()
    # a process died between claiming the promotion and creating the order
    await w.repo.claim_promotion("u1", "never-created", "k0")
    assert await w.checkout.promotion_available("u1") is False  # maybe its order is still on its way
    w.clock.advance(61)
    order = await w.checkout.create(w.new_id(), w.command([(A, 3)]))
    assert order["promotion_applied"] is True
    # a cancel whose give-back was cut off
    w.repo.orders[order["_id"]]["status"] = "CANCELLED"
    assert await w.checkout.promotion_available("u1") is True and "u1" not in w.repo.promotions


@pytest.mark.gen_test
async def test_a_saga_failing_after_the_charge_keeps_its_key_so_a_retry_charges_nothing_more():
    """An unexpected error after the card was charged (the database dropping the confirmation) used to free
    the Idempotency-Key with a 500: the client's retry with that key made and charged a second order."""
    from bookshop.handlers.base import status_of
    from bookshop.services.place_order import OrderRequest, PlaceOrders
    w = World()
    w.repo.new_id = w.new_id
    transition, failed = w.repo.transition, []

    async def flaky(order, from_status, to, **kw):
        if to is OrderStatus.CONFIRMED and not failed:
            failed.append(to)
            raise ConnectionError("database connection reset")
        return await transition(order, from_status, to, **kw)
    w.repo.transition = flaky
    place = PlaceOrders(w.checkout, w.repo, None, 2.0, status_of)
    request = OrderRequest(user_id="u1", key="k-1", fingerprint="fp", items=[(A, 1)], shipping_address=ADDRESS,
                           card=CARD, expected_total_cents=None)
    first = await place.place(request)
    assert failed and first.status == 202 and first.order["status"] == "PENDING"
    again = await place.place(request)
    assert again.status == 202 and again.order["_id"] == first.order["_id"]
    w.clock.advance(LEASE + 1)
    await w.checkout.recover()  # the order's lease ran out: recovery finishes it
    assert list(w.repo.orders) == [first.order["_id"]]
    assert w.stored(first.order["_id"])["status"] == "CONFIRMED"
    assert len([c for c in w.payments.charges.values() if c["status"] == "charged" and not c["refunded"]]) == 1


@pytest.mark.gen_test
async def test_a_cancel_beside_a_live_saga_keeps_its_lease_so_no_other_instance_runs_it_meanwhile():
    """A customer's cancel handled by the process running the saga, with the refund postponed (payments
    refusing), used to give the saga's lease back: another instance's recovery then ran beside the live saga."""
    w = World()
    other = w.instance("elsewhere|ns|7")
    charge, seen = w.payments.charge, {}

    async def slow_charge(*args):
        w.payments.down.add("refund")
        order_id = next(iter(w.repo.orders))
        cancel = asyncio.ensure_future(w.checkout.cancel_by_request(await w.repo.get(order_id), by="u1"))
        await cancel  # another request's task, as a customer's POST /orders/{id}/cancel is
        w.clock.advance(0.001)
        seen["taken_by_other"] = await other.recover()
        seen["owner"] = w.stored(order_id)["owner"]
        w.payments.down.discard("refund")
        return await charge(*args)
    w.payments.charge = slow_charge
    order, task = await w.checkout.place(w.new_id(), w.command([(A, 1)]), wait=1.0)
    with contextlib.suppress(errors.DomainError):
        await task
    assert seen["taken_by_other"] == 0 and seen["owner"] == "host|ns|1"


@pytest.mark.gen_test
async def test_a_postponed_compensation_brings_the_idle_recovery_loop_forward():
    """A postponement (an upstream down) made while the recovery loop slept its idle pause used to wait for
    that whole pause (5 s) before the busy pace (1 s) applied."""
    w = World()
    passes = []
    recover = w.checkout.recover

    async def counted(**kw):
        passes.append(w.clock())
        return await recover(**kw)
    w.checkout.recover = counted
    stop = asyncio.Event()
    loop_task = asyncio.ensure_future(w.checkout.recover_forever(stop, every=30.0, busy_every=0.01))
    await until(lambda: len(passes) == 1, timeout=5)
    await w.checkout._postpone("no-such-order")
    await until(lambda: len(passes) >= 2, timeout=5)  # long before the 30 s idle pause is over
    stop.set()
    await asyncio.wait_for(loop_task, 5)


@pytest.mark.gen_test
async def test_a_replay_after_the_card_expired_is_the_first_answer_and_a_new_key_is_refused():
    from bookshop.handlers.base import status_of
    from bookshop.services.place_order import OrderRequest, PlaceOrders
    w = World()
    w.repo.new_id = w.new_id
    today = [datetime.date(2030, 6, 30)]
    place = PlaceOrders(w.checkout, w.repo, None, 2.0, status_of, today=lambda: today[0])
    june = {**CARD, "exp_month": 6, "exp_year": 2030}

    def request(key):
        return OrderRequest(user_id="u1", key=key, fingerprint="fp-" + key, items=[(A, 1)],
                            shipping_address=ADDRESS, card=june, expected_total_cents=None)
    first = await place.place(request("k-june"))
    assert first.status == 201
    today[0] = datetime.date(2030, 7, 1)  # the card has expired since
    again = await place.place(request("k-june"))
    assert again.status == 201 and again.order["_id"] == first.order["_id"]
    with pytest.raises(errors.InvalidInput) as refused:
        await place.place(request("k-july"))
    assert refused.value.details == {"field": "payment.exp_year"}


@pytest.mark.gen_test
async def test_a_new_key_costs_no_read_and_a_repeat_is_found_by_the_insert_or_before_a_refusal():
    """The key's look-up was a read before every order; now the insert (the key unique) finds a repeat, and a
    repeat that would be refused now (the price changed since, the gate busy) still gets its first answer."""
    from bookshop.handlers.base import status_of
    from bookshop.services.place_order import OrderRequest, PlaceOrders
    w = World()
    w.repo.new_id = w.new_id
    place = PlaceOrders(w.checkout, w.repo, None, 2.0, status_of)

    def request(key, expected=None):
        return OrderRequest(user_id="u1", key=key, fingerprint="fp-" + key, items=[(A, 1)],
                            shipping_address=ADDRESS, card=CARD, expected_total_cents=expected)
    first = await place.place(request("k-1"))
    assert first.status == 201 and w.repo.key_reads == 0
    again = await place.place(request("k-1"))  # found by the insert
    assert again.status == 201 and again.order["_id"] == first.order["_id"] and len(w.repo.orders) == 1
    total = first.order["total_cents"]
    assert (await place.place(request("k-2", expected=total))).status == 201
    w.catalog.on_sale[A] = {**w.catalog.on_sale[A], "price_cents": w.catalog.on_sale[A]["price_cents"] + 100}
    replay = await place.place(request("k-2", expected=total))
    assert replay.status == 201 and replay.order["total_cents"] == total and len(w.repo.orders) == 2
    refused = await place.place(request("k-3", expected=total))
    assert refused.status == 409 and refused.code == "price_changed" and len(w.repo.orders) == 2
