"""Many customers, few copies: stock is never sold twice and nobody is charged for what they did not get."""
from __future__ import annotations

import asyncio
import time

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


@pytest.mark.gen_test(timeout=150)
async def test_two_hundred_customers_race_for_fifty_copies(make_shop):
    # The claim under test is correctness under real concurrency, not latency: generous timeouts keep a busy
    # test machine from turning slow answers into 202s (still correct, but not what we count here).
    shop = make_shop({"BOOKSHOP_CHECKOUT_WAIT": "25", "BOOKSHOP_UPSTREAM_TIMEOUT": "20"})
    connector = aiohttp.TCPConnector(limit=CUSTOMERS + 10)
    async with aiohttp.ClientSession(connector=connector) as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=COPIES, price_cents=1999)
        started = time.monotonic()
        buyers = await customers(api, CUSTOMERS)
        registered = time.monotonic()

        replies = await asyncio.gather(*(buyer.order([(isbn, 1)]) for buyer in buyers))
        raced = time.monotonic()
        print(f"\nregistering {CUSTOMERS} customers: {registered - started:.1f}s; "
              f"the race: {raced - registered:.1f}s")

        statuses = [r.status for r in replies]
        assert statuses.count(201) == COPIES, sorted(set(statuses))
        assert statuses.count(409) == CUSTOMERS - COPIES, sorted(set(statuses))
        won = [r.body for r in replies if r.status == 201]
        lost = [r.body["error"] for r in replies if r.status == 409]
        assert all(o["status"] == "CONFIRMED" and o["payment"]["status"] == "charged" for o in won)
        assert {e["code"] for e in lost} == {"out_of_stock"}
        assert all(e["details"]["items"][0]["isbn"] == isbn for e in lost)

        r = await api.get(f"/inventory/{isbn}")
        assert (r.body["on_hand"], r.body["reserved"], r.body["available"]) == (0, 0, 0)

        order_ids = [o["id"] for o in won] + [e["details"]["order_id"] for e in lost]
        assert len(set(order_ids)) == CUSTOMERS
        ledgers = await asyncio.gather(*(staff.get(f"/orders/{order_id}/payments") for order_id in order_ids))
        assert all(r.status == 200 for r in ledgers)
        entries = [e for r in ledgers for e in r.body]
        assert {e["kind"] for e in entries} == {"charge"}
        assert sum(e["amount_cents"] for e in entries) == COPIES * 1999
        assert all(len(r.body) == 1 for r in ledgers[:COPIES])
        assert all(r.body == [] for r in ledgers[COPIES:])

        # every losing order is CANCELLED, out of stock, and charged nothing
        for buyer, reply in zip(buyers, replies):
            if reply.status == 409:
                order = (await buyer.get(f"/orders/{reply.body['error']['details']['order_id']}")).body
                assert order["status"] == "CANCELLED" and order["payment"]["status"] == "none"
