"""Checkout after the redesign (issue 11), against shops of their own: a saga slower than its lease still
finishes, overload is answered with 503 before anything is made, and a database written by the earlier version
(idempotency records of their own, sagas left open) is taken over without losing anything."""
from __future__ import annotations

import asyncio
import datetime
import uuid

import aiohttp
import pytest
from bson import ObjectId
from motor.motor_asyncio import AsyncIOMotorClient

from client import ADDRESS, Api
from harness import until


async def settled(customer: Api, order_id: str, timeout: float) -> dict:
    async def decided():
        doc = (await customer.get(f"/orders/{order_id}")).body
        return doc if doc["status"] != "PENDING" else None
    return await until(decided, timeout, every=0.5)


@pytest.mark.gen_test(timeout=120)
async def test_a_healthy_saga_slower_than_its_lease_ends_confirmed_and_charged_once(make_shop):
    shop = make_shop({"BOOKSHOP_PAYMENTS_LATENCY_MS": "15000", "BOOKSHOP_UPSTREAM_TIMEOUT": "30",
                      "BOOKSHOP_SAGA_LEASE": "2", "BOOKSHOP_CHECKOUT_WAIT": "1"})
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff, customer = await asyncio.gather(api.staff(), api.customer())
        isbn = await api.new_book(staff, stock=3)
        r = await customer.order([(isbn, 1)])
        assert r.status == 202 and r.body["status"] == "PENDING", r
        order = await settled(customer, r.body["id"], 60)
        assert order["status"] == "CONFIRMED", order  # not cancelled checkout_interrupted by its own recovery
        assert order["payment"]["status"] == "charged"
        assert [h["status"] for h in order["history"]] == ["PENDING", "CONFIRMED"]
        ledger = (await staff.get(f"/orders/{order['id']}/payments")).body
        assert [e["kind"] for e in ledger] == ["charge"]
        stock = (await api.get(f"/inventory/{isbn}")).body
        assert (stock["on_hand"], stock["reserved"]) == (2, 0)


@pytest.mark.gen_test(timeout=120)
async def test_overload_is_answered_503_with_retry_after_before_anything_is_made(make_shop):
    shop = make_shop({"BOOKSHOP_CHECKOUT_CONCURRENCY": "2", "BOOKSHOP_PAYMENTS_LATENCY_MS": "2000",
                      "BOOKSHOP_CHECKOUT_WAIT": "20"})
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        buyers = await asyncio.gather(*(api.customer() for _ in range(12)))
        isbn = await api.new_book(staff, stock=50)
        replies = await asyncio.gather(*(b.order([(isbn, 1)]) for b in buyers))
        statuses = [r.status for r in replies]
        assert set(statuses) <= {201, 503}, replies
        busy = [r for r in replies if r.status == 503]
        assert busy, statuses  # 2 run, 2 wait: the rest is refused
        for r in busy:
            assert r.body["error"]["code"] == "checkout_busy" and int(r.headers["Retry-After"]) >= 1
            assert "order_id" not in (r.body["error"].get("details") or {})
        confirmed = statuses.count(201)
        assert confirmed >= 4
        # nothing was made for the refused ones: no order, no hold, no charge
        listed = (await staff.get("/orders", params={"limit": "100"})).body["items"]
        assert len(listed) == confirmed and {o["status"] for o in listed} == {"CONFIRMED"}
        stock = (await api.get(f"/inventory/{isbn}")).body
        assert (stock["on_hand"], stock["reserved"]) == (50 - confirmed, 0)
        # and the refused customers get in once the rush is over (the same key: nothing was stored for it)
        refused = next(b for b, r in zip(buyers, replies) if r.status == 503)
        r = await refused.order([(isbn, 1)], key=uuid.uuid4().hex)
        assert r.status == 201, r


def old_order(user_id: str, isbn: str, status: str, *, minutes_ago: float, todo=(), payment="none", reason=None):
    """An order document as the version with transactions and idempotency records wrote it."""
    at = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=minutes_ago)
    history = [{"status": "PENDING", "at": at}]
    if status != "PENDING":
        history.append({"status": status, "at": at, **({"reason": reason} if reason else {})})
    return {"_id": str(ObjectId()), "user_id": user_id, "status": status,
            "items": [{"isbn": isbn, "title": "Old Book", "quantity": 1, "unit_price_cents": 1000}],
            "subtotal_cents": 1000, "discount_cents": 0, "total_cents": 1000, "currency": "EUR",
            "promotion_applied": False, "shipping_address": ADDRESS, "payment": {"status": payment, "last4": "4242"},
            "history": history, "created_at": at, "from_cart": False, "open": bool(todo) or status == "PENDING",
            "todo": list(todo), "saga_lease": at + datetime.timedelta(seconds=10)}


@pytest.mark.gen_test(timeout=120)
async def test_a_database_written_by_the_previous_version_is_taken_over_without_losing_anything(make_shop):
    shop = make_shop(services=["users", "catalog", "inventory", "payments", "recommendations", "gateway"])
    mongo = AsyncIOMotorClient(shop.mongodb_uri, tz_aware=True)
    db = mongo[f"{shop.prefix}_orders"]
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(shop, session)
            staff, customer = await asyncio.gather(api.staff(), api.customer())
            me = (await customer.get("/users/me")).body["id"]
            isbn = await api.new_book(staff, stock=5, price_cents=1000)

            confirmed = old_order(me, isbn, "CONFIRMED", minutes_ago=30, payment="charged")
            interrupted = old_order(me, isbn, "PENDING", minutes_ago=5)  # its process died mid-saga
            owed = old_order(me, isbn, "CANCELLED", minutes_ago=20, todo=["payment"], payment="charged",
                             reason="cancelled_by_request")  # the refund was still owed: it showed "charged"
            await db.orders.insert_many([confirmed, interrupted, owed])
            answer = {"status": 201, "body": {"id": confirmed["_id"], "status": "CONFIRMED", "note": "as stored"}}
            await db.idempotency.insert_many([
                {"_id": f"{me}:old-confirmed", "fingerprint": "an-hmac-over-the-full-card", "order_id":
                 confirmed["_id"], "response": answer, "created_at": confirmed["created_at"]},
                {"_id": f"{me}:old-interrupted", "fingerprint": "another-hmac", "order_id": interrupted["_id"],
                 "response": None, "created_at": interrupted["created_at"]},
                {"_id": f"{me}:old-refused", "fingerprint": "a-third-hmac", "order_id": str(ObjectId()),
                 "response": {"status": 409, "body": {"error": {"code": "price_changed"}}},
                 "created_at": interrupted["created_at"]},
            ])
            pending_event = {"_id": ObjectId(), "event": "order.created", "at": interrupted["created_at"],
                             "user_id": me, "data": {"id": interrupted["_id"], "user_id": me, "status": "PENDING",
                                                     "total_cents": 1000, "currency": "EUR", "items": 1}}
            await db.outbox.insert_one(pending_event)

            shop.start("orders")

            # the open saga is finished (nothing was charged: cancelled and compensated)
            order = await settled(customer, interrupted["_id"], 20)
            assert order["status"] == "CANCELLED" and order["history"][-1]["reason"] == "checkout_interrupted"
            # the cancelled order's refund is paid (here: nothing had been taken) and it never shows charged

            async def owed_paid():
                doc = (await customer.get(f"/orders/{owed['_id']}")).body
                return doc if doc["payment"]["status"] in ("none", "refunded") else None
            await until(owed_paid, 20, every=0.2)
            # old keys replay: the stored answer verbatim, or the order as recovery decided it
            r = await customer.order([(isbn, 1)], key="old-confirmed")
            assert (r.status, r.body) == (201, answer["body"])
            r = await customer.order([(isbn, 1)], key="old-interrupted")
            assert r.status == 409 and r.body["error"]["details"]["order_id"] == interrupted["_id"], r
            # a key whose request made no order is free: it makes one now
            r = await customer.order([(isbn, 1)], key="old-refused")
            assert r.status == 201 and r.body["id"] not in (confirmed["_id"], interrupted["_id"]), r
            # nothing of the old fingerprints stays, and the old outbox event reached the stream
            assert await db.idempotency.count_documents({}) == 0
            assert "hmac" not in repr(await db.orders.find({}).to_list(None))
            assert await db.events.count_documents({"source": str(pending_event["_id"])}) == 1
            listed = {o["id"]: o["status"] for o in (await customer.get("/orders")).body["items"]}
            assert listed[confirmed["_id"]] == "CONFIRMED" and len(listed) == 4
    finally:
        mongo.close()
