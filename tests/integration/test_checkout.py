"""Checkout through the public API: orders, payments, cancel and ship, the cart, the promotion, idempotency."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid

import aiohttp
import pytest
from motor.motor_asyncio import AsyncIOMotorClient

from client import ADDRESS, CARD, Api, fresh_isbn, levels

ORDER_FIELDS = {"id", "user_id", "status", "items", "subtotal_cents", "discount_cents", "total_cents", "currency",
                "promotion_applied", "shipping_address", "payment", "history", "created_at"}


async def ledger(staff: Api, order_id: str) -> list[dict]:
    r = await staff.get(f"/orders/{order_id}/payments")
    assert r.status == 200, r
    return r.body


async def people(shop, session) -> tuple[Api, Api, Api]:
    api = Api(shop, session)
    staff, customer = await asyncio.gather(api.staff(), api.customer())
    return api, staff, customer


def order_body(items, card=None, **extra) -> dict:
    return {"items": [{"isbn": i, "quantity": q} for i, q in items], "shipping_address": ADDRESS,
            "payment": card or CARD, **extra}


# -- placing an order ------------------------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_checkout_confirms_with_the_full_order(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=5, price_cents=1250, title="Dune")
        other = await api.new_book(staff, stock=5, price_cents=800, title="Emma")
        me = (await customer.get("/users/me")).body

        r = await customer.order([(isbn, 1), (other, 1), (isbn, 1)])
        assert r.status == 201, r
        order = r.body
        assert set(order) == ORDER_FIELDS
        assert order["status"] == "CONFIRMED"
        assert order["user_id"] == me["id"]
        assert order["items"] == [
            {"isbn": isbn, "title": "Dune", "quantity": 2, "unit_price_cents": 1250},
            {"isbn": other, "title": "Emma", "quantity": 1, "unit_price_cents": 800},
        ]
        # three copies: the customer's first qualifying order gets the cheapest copy free
        assert (order["subtotal_cents"], order["discount_cents"], order["total_cents"]) == (3300, 800, 2500)
        assert order["currency"] == "EUR" and order["promotion_applied"] is True
        assert order["shipping_address"] == ADDRESS
        assert order["payment"] == {"status": "charged", "last4": "4242"}
        assert [h["status"] for h in order["history"]] == ["PENDING", "CONFIRMED"]
        assert all(h["at"].endswith("Z") for h in order["history"])
        assert order["created_at"] == order["history"][0]["at"]

        r = await customer.get(f"/orders/{order['id']}")
        assert r.status == 200 and r.body == order
        assert await levels(api, isbn) == (3, 0, 3)
        assert await levels(api, other) == (4, 0, 4)
        (charge,) = await ledger(staff, order["id"])
        assert charge["kind"] == "charge" and charge["amount_cents"] == 2500 and charge["at"]
        r = await customer.get(f"/orders/{order['id']}/payments")
        assert r.status == 403
        r = await customer.get("/orders")
        assert r.status == 200 and [o["id"] for o in r.body["items"]] == [order["id"]]
        assert r.body["next_cursor"] is None


@pytest.mark.gen_test(timeout=30)
async def test_out_of_stock_is_409_with_the_short_items_and_a_cancelled_order(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        scarce = await api.new_book(staff, stock=1)
        plenty = await api.new_book(staff, stock=10)

        r = await customer.order([(plenty, 1), (scarce, 2)])
        assert r.status == 409, r
        error = r.body["error"]
        assert error["code"] == "out_of_stock"
        assert error["details"]["items"] == [{"isbn": scarce, "requested": 2, "available": 1}]
        order_id = error["details"]["order_id"]
        assert error["request_id"] == r.headers["X-Request-ID"]

        order = (await customer.get(f"/orders/{order_id}")).body
        assert order["status"] == "CANCELLED"
        assert order["history"][-1]["reason"] == "out_of_stock"
        assert order["payment"]["status"] == "none"
        assert await levels(api, scarce) == (1, 0, 1)
        assert await levels(api, plenty) == (10, 0, 10)
        assert await ledger(staff, order_id) == []

        r = await customer.order([(await api.new_book(staff), 1)])  # catalogued, never restocked
        assert r.status == 409 and r.body["error"]["code"] == "out_of_stock"


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("number", ["4000000000000002", "4000000000009995"])
async def test_declined_cards_are_402_and_release_the_stock(shop, number):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=4)
        r = await customer.order([(isbn, 3)], card={**CARD, "card_number": number})
        assert r.status == 402, r
        assert r.body["error"]["code"] == "payment_declined"
        order_id = r.body["error"]["details"]["order_id"]
        order = (await customer.get(f"/orders/{order_id}")).body
        assert order["status"] == "CANCELLED"
        assert order["payment"] == {"status": "declined", "last4": number[-4:]}
        assert order["history"][-1]["reason"] == "payment_declined"
        assert await levels(api, isbn) == (4, 0, 4)
        assert await ledger(staff, order_id) == []
        # the declined order gave the promotion back
        r = await customer.order([(isbn, 3)])
        assert r.status == 201 and r.body["promotion_applied"] is True


@pytest.mark.gen_test(timeout=30)
async def test_bad_checkout_requests_are_rejected_before_anything_happens(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=3)

        async def post(body, key="k-" + uuid.uuid4().hex, **kw):
            headers = {"Idempotency-Key": key} if key else {}
            return await customer.post("/orders", body, headers=headers, **kw)

        r = await customer.order([(isbn, 1)], card={**CARD, "card_number": "4242424242424241"})
        assert r.status == 400 and r.body["error"]["details"]["field"] == "payment.card_number"
        assert "4242424242424241" not in str(r.body)
        r = await post(order_body([(isbn, 1)]), key=None)
        assert r.status == 400 and r.body["error"]["code"] == "idempotency_key_required"
        r = await post(order_body([(isbn, 1)]), key="has spaces")
        assert r.status == 400
        for bad in (
            order_body([({"$gt": ""}, 1)]),
            {**order_body([(isbn, 1)]), "shipping_address": {**ADDRESS, "city": {"$ne": None}}},
            order_body([(isbn, "1")]),
            order_body([(isbn, 0)]),
            order_body([(isbn, 101)]),
            order_body([(isbn, True)]),
            order_body([("9780306406158", 1)]),  # checksum-invalid ISBN
            order_body([]),
            {**order_body([(isbn, 1)]), "from_cart": True},
            {**order_body([(isbn, 1)]), "discount_cents": 1000},
            {**order_body([(isbn, 1)]), "payment": {**CARD, "exp_month": "12"}},
            {**order_body([(isbn, 1)]), "shipping_address": {**ADDRESS, "country": ""}},
            {**order_body([(isbn, 1)]), "expected_total_cents": -1},
        ):
            r = await post(bad)
            assert r.status == 400, (bad, r)
            assert r.body["error"]["message"]
        r = await post(order_body([(isbn, 1)]), token=None)
        assert r.status == 401
        r = await staff.post("/orders", order_body([(isbn, 1)]), headers={"Idempotency-Key": "staff-1"})
        assert r.status == 403
        r = await customer.order([(fresh_isbn(), 1)])  # valid ISBN, not in the catalogue
        assert r.status == 409 and r.body["error"]["code"] == "book_unavailable"
        assert await levels(api, isbn) == (3, 0, 3)
        assert (await customer.get("/orders")).body["items"] == []


# -- reading, cancelling, shipping -----------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_customers_see_their_own_orders_and_staff_see_all(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, alice = await people(shop, session)
        bob = await api.customer()
        isbn = await api.new_book(staff, stock=10)
        a = (await alice.order([(isbn, 1)])).body
        b = (await bob.order([(isbn, 1)])).body
        assert a["status"] == b["status"] == "CONFIRMED"
        r = await bob.post(f"/orders/{b['id']}/cancel")
        assert r.status == 200

        assert (await bob.get(f"/orders/{a['id']}")).status == 404
        assert (await bob.post(f"/orders/{a['id']}/cancel")).status == 404
        assert (await bob.get("/orders/not-an-id")).status == 404
        assert [o["id"] for o in (await bob.get("/orders")).body["items"]] == [b["id"]]
        assert (await staff.get(f"/orders/{a['id']}")).body["id"] == a["id"]

        confirmed = (await staff.get("/orders", params={"status": "CONFIRMED", "limit": "100"})).body["items"]
        assert a["id"] in {o["id"] for o in confirmed} and b["id"] not in {o["id"] for o in confirmed}
        assert {o["status"] for o in confirmed} == {"CONFIRMED"}
        cancelled = (await staff.get("/orders", params={"status": "CANCELLED", "limit": "100"})).body["items"]
        assert b["id"] in {o["id"] for o in cancelled}
        assert (await staff.get("/orders", params={"status": "LOST"})).status == 400
        assert (await staff.get("/orders", params={"limit": "0"})).status == 400
        assert (await alice.get("/orders", params={"status": "CANCELLED"})).body["items"] == []
        assert (await api.get("/orders", token=None)).status == 401

        # paging through all orders as staff, newest first
        first = (await staff.get("/orders", params={"limit": "1"})).body
        assert len(first["items"]) == 1 and first["next_cursor"]
        second = (await staff.get("/orders", params={"limit": "1", "cursor": first["next_cursor"]})).body
        assert second["items"][0]["id"] < first["items"][0]["id"]


@pytest.mark.gen_test(timeout=30)
async def test_cancel_refunds_and_restocks_once(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=5, price_cents=1100)
        order = (await customer.order([(isbn, 2)])).body
        assert await levels(api, isbn) == (3, 0, 3)

        r = await customer.post(f"/orders/{order['id']}/cancel")
        assert r.status == 200, r
        assert r.body["status"] == "CANCELLED"
        assert r.body["payment"] == {"status": "refunded", "last4": "4242"}
        assert [h["status"] for h in r.body["history"]] == ["PENDING", "CONFIRMED", "CANCELLED"]
        assert [(e["kind"], e["amount_cents"]) for e in await ledger(staff, order["id"])] == [
            ("charge", 2200), ("refund", 2200)]
        assert await levels(api, isbn) == (5, 0, 5)

        r = await customer.post(f"/orders/{order['id']}/cancel")
        assert r.status == 409 and r.body["error"]["code"] == "invalid_status_transition"
        assert len(await ledger(staff, order["id"])) == 2
        assert await levels(api, isbn) == (5, 0, 5)

        # staff may cancel a customer's order too
        order = (await customer.order([(isbn, 1)])).body
        r = await staff.post(f"/orders/{order['id']}/cancel")
        assert r.status == 200 and r.body["status"] == "CANCELLED"
        assert await levels(api, isbn) == (5, 0, 5)


@pytest.mark.gen_test(timeout=30)
async def test_ship_is_staff_only_from_confirmed_and_ends_cancelling(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=5)
        order = (await customer.order([(isbn, 1)])).body

        r = await customer.post(f"/orders/{order['id']}/ship")
        assert r.status == 403
        r = await staff.post(f"/orders/{order['id']}/ship")
        assert r.status == 200 and r.body["status"] == "SHIPPED"
        assert r.body["payment"]["status"] == "charged"
        r = await staff.post(f"/orders/{order['id']}/ship")
        assert r.status == 409 and r.body["error"]["code"] == "invalid_status_transition"
        r = await customer.post(f"/orders/{order['id']}/cancel")
        assert r.status == 409
        r = await customer.get(f"/orders/{order['id']}")
        assert r.body["status"] == "SHIPPED"
        assert [h["status"] for h in r.body["history"]] == ["PENDING", "CONFIRMED", "SHIPPED"]
        assert await levels(api, isbn) == (4, 0, 4)
        assert len(await ledger(staff, order["id"])) == 1

        cancelled = (await customer.order([(isbn, 1)])).body
        await customer.post(f"/orders/{cancelled['id']}/cancel")
        r = await staff.post(f"/orders/{cancelled['id']}/ship")
        assert r.status == 409
        assert (await staff.post(f"/orders/{'f' * 24}/ship")).status == 404


@pytest.mark.gen_test(timeout=30)
async def test_price_changed_is_409_with_the_current_total(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=5, price_cents=1000)
        r = await customer.order([(isbn, 2)], expected_total_cents=2000)
        assert r.status == 201 and r.body["total_cents"] == 2000

        assert (await staff.patch(f"/books/{isbn}", {"price_cents": 1200})).status == 200
        r = await customer.order([(isbn, 2)], expected_total_cents=2000)
        assert r.status == 409, r
        assert r.body["error"]["code"] == "price_changed"
        assert r.body["error"]["details"]["total_cents"] == 2400
        assert await levels(api, isbn) == (3, 0, 3)
        assert len((await customer.get("/orders")).body["items"]) == 1  # no order for the refused one
        r = await customer.order([(isbn, 2)], expected_total_cents=2400)
        assert r.status == 201 and r.body["items"][0]["unit_price_cents"] == 1200


# -- the cart --------------------------------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_cart_lines_prices_and_promotion_preview(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        cheap = await api.new_book(staff, stock=5, price_cents=500, title="Cheap")
        dear = await api.new_book(staff, stock=5, price_cents=2000, title="Dear")

        empty = {"items": [], "subtotal_cents": 0, "discount_cents": 0, "total_cents": 0, "currency": "EUR"}
        assert (await customer.get("/cart")).body == empty
        r = await customer.put(f"/cart/items/{dear}", {"quantity": 2})
        assert r.status == 200, r
        assert r.body == {"items": [{"isbn": dear, "title": "Dear", "quantity": 2, "unit_price_cents": 2000}],
                          "subtotal_cents": 4000, "discount_cents": 0, "total_cents": 4000, "currency": "EUR"}
        r = await customer.put(f"/cart/items/{cheap}", {"quantity": 1})
        cart = (await customer.get("/cart")).body
        assert cart == r.body
        assert (cart["subtotal_cents"], cart["discount_cents"], cart["total_cents"]) == (4500, 500, 4000)
        r = await customer.put(f"/cart/items/{dear}", {"quantity": 1})
        assert (r.body["subtotal_cents"], r.body["discount_cents"]) == (2500, 0)
        r = await customer.put(f"/cart/items/{dear}", {"quantity": 0})
        assert [i["isbn"] for i in r.body["items"]] == [cheap]

        r = await customer.put(f"/cart/items/{fresh_isbn()}", {"quantity": 1})
        assert r.status == 404
        assert (await customer.put("/cart/items/9780306406158", {"quantity": 1})).status == 400
        for bad in ({"quantity": "1"}, {"quantity": -1}, {"quantity": 101}, {"quantity": 1, "x": 1},
                    {"quantity": {"$gt": 0}}):
            assert (await customer.put(f"/cart/items/{cheap}", bad)).status == 400, bad
        assert (await customer.get("/cart", token=None)).status == 401
        assert (await staff.get("/cart")).status == 403
        # a hyphenated ISBN is the same book, the same line
        r = await customer.put(f"/cart/items/{cheap[:3]}-{cheap[3:]}", {"quantity": 3})
        assert r.status == 200 and [(i["isbn"], i["quantity"]) for i in r.body["items"]] == [(cheap, 3)]


@pytest.mark.gen_test(timeout=30)
async def test_ordering_from_the_cart_empties_it(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        a = await api.new_book(staff, stock=5, price_cents=900)
        b = await api.new_book(staff, stock=5, price_cents=600)
        r = await customer.order([], from_cart=True)
        assert r.status == 400 and r.body["error"]["code"] == "cart_empty"
        await customer.put(f"/cart/items/{a}", {"quantity": 2})
        await customer.put(f"/cart/items/{b}", {"quantity": 1})
        preview = (await customer.get("/cart")).body

        r = await customer.order([], from_cart=True, expected_total_cents=preview["total_cents"])
        assert r.status == 201, r
        assert [(i["isbn"], i["quantity"]) for i in r.body["items"]] == [(a, 2), (b, 1)]
        assert r.body["total_cents"] == preview["total_cents"] == 1800
        assert (await customer.get("/cart")).body["items"] == []
        assert await levels(api, a) == (3, 0, 3)

        # a failed order leaves the cart as it was
        await customer.put(f"/cart/items/{a}", {"quantity": 4})
        r = await customer.order([], from_cart=True)
        assert r.status == 409 and r.body["error"]["code"] == "out_of_stock"
        assert (await customer.get("/cart")).body["items"][0]["quantity"] == 4


@pytest.mark.gen_test(timeout=30)
async def test_a_deleted_book_leaves_carts_but_past_orders_keep_their_lines(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        gone = await api.new_book(staff, stock=5, price_cents=700, title="Soon Gone")
        stays = await api.new_book(staff, stock=5, price_cents=300)
        order = (await customer.order([(gone, 1)])).body
        await customer.put(f"/cart/items/{gone}", {"quantity": 1})
        await customer.put(f"/cart/items/{stays}", {"quantity": 1})

        assert (await staff.delete(f"/books/{gone}")).status == 204
        cart = (await customer.get("/cart")).body
        assert [i["isbn"] for i in cart["items"]] == [stays] and cart["total_cents"] == 300
        r = await customer.get(f"/orders/{order['id']}")
        assert r.body["items"] == [{"isbn": gone, "title": "Soon Gone", "quantity": 1, "unit_price_cents": 700}]
        r = await customer.order([(gone, 1)])
        assert r.status == 409 and r.body["error"]["code"] == "book_unavailable"
        r = await customer.put(f"/cart/items/{gone}", {"quantity": 1})
        assert r.status == 404


# -- the promotion ---------------------------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_the_promotion_is_once_per_customer_and_comes_back_after_a_cancel(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=50, price_cents=1000)
        cheap = await api.new_book(staff, stock=50, price_cents=400)

        r = await customer.order([(isbn, 2)])
        assert r.body["promotion_applied"] is False  # two copies do not qualify, and do not use it up
        first = (await customer.order([(isbn, 2), (cheap, 1)])).body
        assert first["promotion_applied"] is True and first["discount_cents"] == 400
        second = (await customer.order([(isbn, 3)])).body
        assert second["promotion_applied"] is False and second["discount_cents"] == 0
        assert second["total_cents"] == 3000
        assert (await customer.put(f"/cart/items/{isbn}", {"quantity": 3})).body["discount_cents"] == 0

        assert (await customer.post(f"/orders/{first['id']}/cancel")).status == 200
        assert (await customer.get("/cart")).body["discount_cents"] == 1000  # the preview sees it back
        third = (await customer.order([(isbn, 3)])).body
        assert third["promotion_applied"] is True and third["discount_cents"] == 1000


@pytest.mark.gen_test(timeout=30)
async def test_two_concurrent_qualifying_orders_share_one_promotion(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=100, price_cents=1000)
        replies = await asyncio.gather(*(customer.order([(isbn, 3)]) for _ in range(6)))
        assert [r.status for r in replies] == [201] * 6, replies
        winners = [r.body for r in replies if r.body["promotion_applied"]]
        assert len(winners) == 1 and winners[0]["total_cents"] == 2000
        assert sorted(r.body["total_cents"] for r in replies) == [2000] + [3000] * 5
        assert await levels(api, isbn) == (82, 0, 82)

        assert (await customer.post(f"/orders/{winners[0]['id']}/cancel")).status == 200
        replies = await asyncio.gather(*(customer.order([(isbn, 3)]) for _ in range(3)))
        assert sum(r.body["promotion_applied"] for r in replies) == 1


# -- idempotency -----------------------------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_the_same_key_replays_the_first_answer(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        other = await api.customer()
        isbn = await api.new_book(staff, stock=5)
        key = "order-" + uuid.uuid4().hex

        first = await customer.order([(isbn, 1)], key=key)
        assert first.status == 201
        again = await customer.order([(isbn, 1)], key=key)
        assert again.status == 201 and again.body == first.body
        r = await customer.order([(isbn, 2)], key=key)
        assert r.status == 422 and r.body["error"]["code"] == "idempotency_key_reused"
        # keys are per customer: someone else's same key is a new order
        r = await other.order([(isbn, 1)], key=key)
        assert r.status == 201 and r.body["id"] != first.body["id"]
        assert await levels(api, isbn) == (3, 0, 3)
        assert len((await customer.get("/orders")).body["items"]) == 1

        # failures are replayed too (4xx are answers, not faults)
        key = "declined-" + uuid.uuid4().hex
        card = {**CARD, "card_number": "4000000000000002"}
        first = await customer.order([(isbn, 1)], key=key, card=card)
        again = await customer.order([(isbn, 1)], key=key, card=card)
        assert first.status == again.status == 402
        assert again.body["error"]["details"]["order_id"] == first.body["error"]["details"]["order_id"]

        # an order from the cart replays even though the cart is empty by now
        await customer.put(f"/cart/items/{isbn}", {"quantity": 1})
        key = "cart-" + uuid.uuid4().hex
        first = await customer.order([], key=key, from_cart=True)
        assert first.status == 201, first
        again = await customer.order([], key=key, from_cart=True)
        assert again.status == 201 and again.body["id"] == first.body["id"], again


@pytest.mark.gen_test(timeout=40)
async def test_twenty_concurrent_requests_with_one_key_make_one_order(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=10, price_cents=1500)
        key = "burst-" + uuid.uuid4().hex
        replies = await asyncio.gather(*(customer.order([(isbn, 2)], key=key) for _ in range(20)))
        assert {r.status for r in replies} == {201}, replies
        assert len({r.body["id"] for r in replies}) == 1
        assert all(r.body == replies[0].body for r in replies)
        order_id = replies[0].body["id"]
        assert len(await ledger(staff, order_id)) == 1
        assert await levels(api, isbn) == (8, 0, 8)
        assert [o["id"] for o in (await customer.get("/orders")).body["items"]] == [order_id]


# -- hardening (issue 10) --------------------------------------------------------------------------------------------
SAME_LAST4 = "4000020000004242"  # Luhn-valid, same last four digits as the test card, another number


@pytest.mark.gen_test(timeout=30)
async def test_a_retry_with_another_card_of_the_same_last_four_and_expiry_replays_and_nothing_card_is_stored(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=5)
        key = "card-" + uuid.uuid4().hex
        first = await customer.order([(isbn, 1)], key=key)
        assert first.status == 201, first
        again = await customer.order([(isbn, 1)], key=key, card={**CARD, "card_number": SAME_LAST4, "cvc": "999"})
        assert again.status == 201 and again.body == first.body, again
        grouped = await customer.order([(isbn, 1)], key=key, card={**CARD, "card_number": "4242 4242 4242 4242"})
        assert grouped.status == 201 and grouped.body["id"] == first.body["id"]
        r = await customer.order([(isbn, 1)], key=key, card={**CARD, "exp_year": CARD["exp_year"] + 1})
        assert r.status == 422, r
        assert await levels(api, isbn) == (4, 0, 4)

        # nothing derived from the full number or the CVC is in the orders database: not the number, not an
        # HMAC of a body that held it (the old fingerprint)
        body = order_body([(isbn, 1)])
        secret = shop.env["BOOKSHOP_SERVICE_SECRET"].encode()
        old_style = hmac.new(secret, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()
        mongo = AsyncIOMotorClient(shop.mongodb_uri, tz_aware=True)
        try:
            database = mongo[f"{shop.prefix}_orders"]
            stored = [doc for name in await database.list_collection_names()
                      for doc in await database[name].find({}).to_list(None)]
        finally:
            mongo.close()
        dump = repr(stored)
        assert first.body["id"] in dump
        assert old_style not in dump and CARD["card_number"] not in dump and SAME_LAST4 not in dump


@pytest.mark.gen_test(timeout=30)
async def test_grouped_card_numbers_are_accepted(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        isbn = await api.new_book(staff, stock=5)
        for number in ("4242 4242 4242 4242", "4242-4242-4242-4242", "3782 822463 10005"):
            r = await customer.order([(isbn, 1)], card={**CARD, "card_number": number})
            assert r.status == 201, (number, r)
            assert r.body["payment"] == {"status": "charged", "last4": number[-4:]}
        r = await customer.order([(isbn, 1)], card={**CARD, "card_number": "4000 0000 0000 0002"})
        assert r.status == 402  # the separators are ignored: still the declined test card
        for number in ("4242  4242 4242 4242", "4242--4242-4242-4242", "4242.4242.4242.4242", " 4242424242424242",
                       "4242 4242 424"):
            r = await customer.order([(isbn, 1)], card={**CARD, "card_number": number})
            assert r.status == 400 and r.body["error"]["details"]["field"] == "payment.card_number", (number, r)
            assert number.strip() not in str(r.body)
        assert await levels(api, isbn) == (2, 0, 2)


@pytest.mark.gen_test(timeout=30)
async def test_an_order_above_the_processors_limit_is_400_naming_items_and_makes_nothing(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        dear = await api.new_book(staff, stock=5, price_cents=60_000_000)
        r = await customer.order([(dear, 2)])
        assert r.status == 400, r
        assert r.body["error"]["code"] == "invalid_field" and r.body["error"]["details"]["field"] == "items"
        assert "items" in r.body["error"]["message"] and "amount_cents" not in str(r.body)
        assert await levels(api, dear) == (5, 0, 5)
        assert (await customer.get("/orders")).body["items"] == []
        r = await customer.order([(dear, 1)])
        assert r.status == 201 and r.body["total_cents"] == 60_000_000


@pytest.mark.gen_test(timeout=30)
async def test_history_entries_record_who_acted(shop):
    async with aiohttp.ClientSession() as session:
        api, staff, customer = await people(shop, session)
        me, staff_me = (await customer.get("/users/me")).body, (await staff.get("/users/me")).body
        isbn = await api.new_book(staff, stock=5)
        order = (await customer.order([(isbn, 1)])).body
        assert [(h["status"], h["by"]) for h in order["history"]] == [("PENDING", me["id"]), ("CONFIRMED", "system")]
        shipped = (await staff.post(f"/orders/{order['id']}/ship")).body
        assert shipped["history"][-1] == {**shipped["history"][-1], "status": "SHIPPED", "by": staff_me["id"]}
        other = (await customer.order([(isbn, 1)])).body
        cancelled = (await staff.post(f"/orders/{other['id']}/cancel")).body
        assert cancelled["history"][-1]["by"] == staff_me["id"]
        mine = (await customer.order([(isbn, 1)])).body
        cancelled = (await customer.post(f"/orders/{mine['id']}/cancel")).body
        assert cancelled["history"][-1]["by"] == me["id"]
        r = await customer.order([(isbn, 5)])
        assert r.status == 409
        lost = (await customer.get(f"/orders/{r.body['error']['details']['order_id']}")).body
        assert [h["by"] for h in lost["history"]] == [me["id"], "system"]
