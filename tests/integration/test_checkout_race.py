"""Many customers, few copies: stock is never sold twice and nobody is charged for what they did not get."""
from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import pytest

from client import Api

CUSTOMERS = 200
COPIES = 50


async def customers(api: Api, count: int, parallel: int = 16) -> list[Api]:
    """Register and sign in ``count`` customers; password hashing is deliberately slow, so bounded."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> Api:
        async with gate:
            return await api.customer()
    return await asyncio.gather(*(one() for _ in range(count)))


async def settle(buyer: Api, reply) -> dict:
    """The order a checkout answer stands for, once it is decided (a 202 is decided in the background)."""
    order_id = reply.body["id"] if reply.status in (201, 202) else reply.body["error"]["details"]["order_id"]
    deadline = time.monotonic() + 60
    while True:
        order = (await buyer.get(f"/orders/{order_id}")).body
        if order["status"] != "PENDING":
            return order
        assert time.monotonic() < deadline, f"order {order_id} still PENDING"
        await asyncio.sleep(0.2)


@pytest.mark.gen_test(timeout=400)
async def test_two_hundred_customers_race_for_fifty_copies(make_shop, private_mongodb_uri):
    # The claim under test is correctness under real concurrency, not latency: on a busy machine some
    # checkouts answer 202 PENDING and finish in the background; they are followed to their end.
    shop = make_shop({"BOOKSHOP_CHECKOUT_WAIT": "8", "MONGODB_URI": private_mongodb_uri})
    connector = aiohttp.TCPConnector(limit=CUSTOMERS + 10)
    async with aiohttp.ClientSession(connector=connector) as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=COPIES, price_cents=1999)
        started = time.monotonic()
        buyers = await customers(api, CUSTOMERS)
        registered = time.monotonic()

        async def checkout(buyer: Api):
            # what a client does with a 503 (the checkout is busy, or the gateway gave up waiting): retry with
            # the same key after Retry-After, until it gets an answer
            key = uuid.uuid4().hex
            deadline = time.monotonic() + 150
            while True:
                reply = await buyer.order([(isbn, 1)], key=key)
                if reply.status != 503 or time.monotonic() > deadline:
                    return reply
                await asyncio.sleep(float(reply.headers.get("Retry-After", "1")))
        replies = await asyncio.gather(*(checkout(buyer) for buyer in buyers))
        raced = time.monotonic()
        print(f"\nregistering {CUSTOMERS} customers: {registered - started:.1f}s; "
              f"the race: {raced - registered:.1f}s; "
              f"answers: { {s: [r.status for r in replies].count(s) for s in {r.status for r in replies}} }")

        assert {r.status for r in replies} <= {201, 202, 409}, [r for r in replies if r.status >= 500][:3]
        for r in replies:
            if r.status == 409:
                assert r.body["error"]["code"] == "out_of_stock"
                assert r.body["error"]["details"]["items"][0]["isbn"] == isbn
        orders = await asyncio.gather(*(settle(b, r) for b, r in zip(buyers, replies)))
        won = [o for o in orders if o["status"] == "CONFIRMED"]
        lost = [o for o in orders if o["status"] == "CANCELLED"]
        assert len(won) == COPIES and len(lost) == CUSTOMERS - COPIES
        assert all(o["payment"]["status"] == "charged" for o in won)
        assert all(o["payment"]["status"] == "none" for o in lost)
        assert {o["history"][-1]["reason"] for o in lost} == {"out_of_stock"}
        assert all(r.status != 409 for r, o in zip(replies, orders) if o["status"] == "CONFIRMED")

        r = await api.get(f"/inventory/{isbn}")
        assert (r.body["on_hand"], r.body["reserved"], r.body["available"]) == (0, 0, 0)

        assert len({o["id"] for o in orders}) == CUSTOMERS
        ledgers = await asyncio.gather(*(staff.get(f"/orders/{o['id']}/payments") for o in won + lost))
        assert all(r.status == 200 for r in ledgers)
        entries = [e for r in ledgers for e in r.body]
        assert {e["kind"] for e in entries} == {"charge"}
        assert sum(e["amount_cents"] for e in entries) == COPIES * 1999
        assert all(len(r.body) == 1 for r in ledgers[:COPIES])
        assert all(r.body == [] for r in ledgers[COPIES:])
