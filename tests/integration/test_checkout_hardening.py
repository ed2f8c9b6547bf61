"""Checkout hardening against a shop of its own (payments slowed down, then killed): a cancel whose refund must
wait, and a from_cart order confirmed while its customer kept shopping."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from client import Api
from harness import until


def cart_lines(cart: dict) -> dict:
    return {i["isbn"]: i["quantity"] for i in cart["items"]}


@pytest.mark.gen_test(timeout=90)
async def test_cart_changes_during_a_from_cart_checkout_survive_it_and_a_cancel_waiting_for_its_refund(make_shop):
    shop = make_shop({"BOOKSHOP_PAYMENTS_LATENCY_MS": "1500", "BOOKSHOP_CHECKOUT_WAIT": "20",
                      "BOOKSHOP_SAGA_LEASE": "2"})
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff, customer = await asyncio.gather(api.staff(), api.customer())
        a, b, c = [await api.new_book(staff, stock=10, price_cents=1000) for _ in range(3)]
        await customer.put(f"/cart/items/{a}", {"quantity": 2})
        await customer.put(f"/cart/items/{b}", {"quantity": 1})

        # while the charge takes its 1.5 s, the customer raises one line and adds another book
        placing = asyncio.ensure_future(customer.order([], from_cart=True))

        async def order_pending():
            listed = (await customer.get("/orders")).body["items"]
            return listed and listed[0]["status"] == "PENDING"
        await until(order_pending, 10, every=0.05)
        assert (await customer.put(f"/cart/items/{a}", {"quantity": 3})).status == 200
        assert (await customer.put(f"/cart/items/{c}", {"quantity": 1})).status == 200
        r = await placing
        assert r.status == 201, r
        assert {i["isbn"]: i["quantity"] for i in r.body["items"]} == {a: 2, b: 1}
        # only what was ordered left the cart: one copy of a (3 - 2) and c stay, b is gone
        assert cart_lines((await customer.get("/cart")).body) == {a: 1, c: 1}
        order = r.body

        # the payments service goes away: a cancel still succeeds, and shows the refund as pending
        shop.kill("payments")
        r = await customer.post(f"/orders/{order['id']}/cancel")
        assert r.status == 200, r
        assert r.body["status"] == "CANCELLED"
        assert r.body["payment"] == {"status": "refund_pending", "last4": "4242"}
        r = await customer.get(f"/orders/{order['id']}")
        assert r.body["payment"]["status"] == "refund_pending"
        stock = (await api.get(f"/inventory/{a}")).body
        assert (stock["on_hand"], stock["reserved"]) == (10, 0)  # the stock came back regardless

        shop.start("payments")

        async def refunded():
            doc = (await customer.get(f"/orders/{order['id']}")).body
            return doc if doc["payment"]["status"] == "refunded" else None
        await until(refunded, 20, every=0.3)
        ledger = (await staff.get(f"/orders/{order['id']}/payments")).body
        assert [e["kind"] for e in ledger] == ["charge", "refund"]
