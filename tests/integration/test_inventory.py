"""Inventory: public levels, staff restock, and the internal reservations the checkout relies on —
all-or-nothing, idempotent, expiring, and never overselling across service instances."""
from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
import time
import uuid

import aiohttp
import pymongo
import pytest

from bookshop.procs import free_port
from client import Api, fresh_isbn, levels
from harness import ROOT, RUN_PY, Shop


async def service_token(shop, session: aiohttp.ClientSession) -> str:
    form = {"grant_type": "client_credentials", "client_id": "orders",
            "client_secret": shop.env["BOOKSHOP_SERVICE_SECRET"]}
    async with session.post(shop.url("users") + "/oauth/token", data=form) as resp:
        assert resp.status == 200
        return (await resp.json())["access_token"]


async def internal(shop, session: aiohttp.ClientSession, base: str | None = None) -> Api:
    """An Api on an inventory instance's own routes, signed in as the orders service."""
    return Api(shop, session, await service_token(shop, session), base=base or shop.url("inventory"))


def order_id() -> str:
    return "o-" + uuid.uuid4().hex


async def direct(shop, session) -> tuple[Api, Api]:
    """Staff Apis on the catalog and inventory services themselves (for shops started without a gateway)."""
    token = (await Api(shop, session, base=shop.url("users") + "/api/v1").staff()).token
    return (Api(shop, session, token, base=shop.url("catalog") + "/api/v1"),
            Api(shop, session, token, base=shop.url("inventory") + "/api/v1"))


async def stocked_book(shop, session, quantity: int) -> tuple[str, Api]:
    """A new book with ``quantity`` in stock, made without a gateway; and the staff Api on the inventory."""
    catalog, inventory = await direct(shop, session)
    isbn = await catalog.new_book(catalog)
    assert (await inventory.post(f"/inventory/{isbn}/restock", {"quantity": quantity})).status == 200
    return isbn, inventory


async def reserve(inv: Api, oid: str, *items: tuple[str, int]):
    return await inv.post("/internal/reservations",
                          {"order_id": oid, "items": [{"isbn": i, "quantity": q} for i, q in items]})


# -- levels and restock -----------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_a_catalogued_book_never_restocked_is_zero_and_an_unknown_one_404(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        isbn = await api.new_book(await api.staff())
        r = await api.get(f"/inventory/{isbn}")
        assert r.status == 200
        assert r.body == {"isbn": isbn, "on_hand": 0, "reserved": 0, "available": 0}
        r = await api.get(f"/inventory/{isbn[:3]}-{isbn[3:]}")
        assert r.status == 200 and r.body["isbn"] == isbn
        r = await api.get(f"/inventory/{fresh_isbn()}")
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found"
        r = await api.get(f"/inventory/{isbn[:12]}{(int(isbn[12]) + 1) % 10}")
        assert r.status == 400 and r.body["error"]["code"] == "invalid_field"


@pytest.mark.gen_test
async def test_staff_restock_adds_to_the_levels(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        r = await staff.post(f"/inventory/{isbn}/restock", {"quantity": 5})
        assert r.status == 200 and r.body == {"isbn": isbn, "on_hand": 5, "reserved": 0, "available": 5}
        r = await staff.post(f"/inventory/{isbn}/restock", {"quantity": 3})
        assert r.body == {"isbn": isbn, "on_hand": 8, "reserved": 0, "available": 8}
        assert await levels(api, isbn) == (8, 0, 8)
        replies = await asyncio.gather(*(staff.post(f"/inventory/{isbn}/restock", {"quantity": 1})
                                         for _ in range(20)))
        assert {r.status for r in replies} == {200}
        assert sorted(r.body["on_hand"] for r in replies) == list(range(9, 29))  # each saw its own update
        assert await levels(api, isbn) == (28, 0, 28)
        r = await staff.post(f"/inventory/{fresh_isbn()}/restock", {"quantity": 1})
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found"


@pytest.mark.parametrize("body, field", [
    ({"quantity": 0}, "quantity"), ({"quantity": -1}, "quantity"), ({"quantity": "5"}, "quantity"),
    ({"quantity": 1.5}, "quantity"), ({"quantity": 5.0}, "quantity"), ({"quantity": True}, "quantity"),
    ({"quantity": None}, "quantity"), ({"quantity": 1_000_001}, "quantity"), ({}, "quantity"),
    ({"quantity": {"$inc": 5}}, "quantity"), ({"quantity": 5, "reason": "found"}, "reason"),
])
@pytest.mark.gen_test
async def test_bad_restocks_are_400_and_change_nothing(shop, body, field):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=2)
        r = await staff.post(f"/inventory/{isbn}/restock", body)
        assert r.status == 400, r
        assert r.body["error"]["code"] == "invalid_field"
        assert r.body["error"]["message"].startswith(field)
        assert await levels(api, isbn) == (2, 0, 2)


@pytest.mark.gen_test
async def test_only_staff_restock(shop):
    # force_close: see test_catalog.py::test_a_rejected_write_leaves_the_connection_usable
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        api = Api(shop, session)
        isbn = await api.new_book(await api.staff(), stock=1)
        r = await (await api.customer()).post(f"/inventory/{isbn}/restock", {"quantity": 5})
        assert r.status == 403 and r.body["error"]["code"] == "forbidden"
        r = await api.post(f"/inventory/{isbn}/restock", {"quantity": 5})
        assert r.status == 401
        inv = await internal(shop, session)  # a service token is no staff token either
        assert (await inv.post(f"/api/v1/inventory/{isbn}/restock", {"quantity": 5})).status == 403
        assert await levels(api, isbn) == (1, 0, 1)


# -- reservations -----------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_internal_routes_need_a_service_token(shop):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=3)
        base = shop.url("inventory")
        body = {"order_id": order_id(), "items": [{"isbn": isbn, "quantity": 1}]}
        for who, status in ((api, 401), (staff, 403)):
            assert (await who.post(base + "/internal/reservations", body)).status == status
            assert (await who.post(base + f"/internal/reservations/{body['order_id']}/commit")).status == status
            assert (await who.get(base + "/internal/levels")).status == status
        assert (await api.post("/internal/reservations", body)).status == 404  # not on the gateway
        assert await levels(api, isbn) == (3, 0, 3)
        r = await (await internal(shop, session)).get("/internal/levels", params={"limit": "²"})
        assert r.status == 400


@pytest.mark.gen_test
async def test_bad_reservation_requests_are_400(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        isbn = await api.new_book(await api.staff(), stock=3)
        inv = await internal(shop, session)
        for body, field in (
                ({"order_id": "o 1", "items": [{"isbn": isbn, "quantity": 1}]}, "order_id"),
                ({"order_id": "", "items": [{"isbn": isbn, "quantity": 1}]}, "order_id"),
                ({"order_id": "x" * 65, "items": [{"isbn": isbn, "quantity": 1}]}, "order_id"),
                ({"order_id": order_id(), "items": []}, "items"),
                ({"order_id": order_id(), "items": [{"isbn": isbn, "quantity": 1}] * 101}, "items"),
                ({"order_id": order_id(), "items": [{"isbn": isbn, "quantity": 0}]}, "items[0].quantity"),
                ({"order_id": order_id(), "items": [{"isbn": isbn, "quantity": "1"}]}, "items[0].quantity"),
                ({"order_id": order_id(), "items": [{"isbn": isbn, "quantity": 1}, {"isbn": "1", "quantity": 1}]},
                 "items[1].isbn"),
                ({"order_id": {"$ne": ""}, "items": [{"isbn": isbn, "quantity": 1}]}, "order_id")):
            r = await inv.post("/internal/reservations", body)
            assert r.status == 400, (body, r)
            assert r.body["error"]["message"].startswith(field), (field, r)
        assert await levels(api, isbn) == (3, 0, 3)


@pytest.mark.gen_test
async def test_a_reservation_is_all_or_nothing(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        plenty, scarce, none = (await api.new_book(staff, stock=5), await api.new_book(staff, stock=1),
                                await api.new_book(staff))
        inv = await internal(shop, session)
        r = await reserve(inv, order_id(), (plenty, 2), (scarce, 3))
        assert r.status == 200 and r.body["state"] == "rejected", r
        assert r.body["short"] == [{"isbn": scarce, "requested": 3, "available": 1}]
        assert await levels(api, plenty) == (5, 0, 5)
        assert await levels(api, scarce) == (1, 0, 1)

        r = await reserve(inv, order_id(), (scarce, 2), (none, 1), (plenty, 6))
        assert r.body["state"] == "rejected"
        assert sorted(r.body["short"], key=lambda s: s["isbn"]) == sorted([
            {"isbn": plenty, "requested": 6, "available": 5}, {"isbn": scarce, "requested": 2, "available": 1},
            {"isbn": none, "requested": 1, "available": 0}], key=lambda s: s["isbn"])

        oid = order_id()
        r = await reserve(inv, oid, (plenty, 1), (scarce, 1), (plenty, 1))  # lines of one ISBN add up
        assert r.body["state"] == "held" and "short" not in r.body, r
        assert sorted(r.body["items"], key=lambda i: i["isbn"]) == sorted(
            [{"isbn": plenty, "quantity": 2}, {"isbn": scarce, "quantity": 1}], key=lambda i: i["isbn"])
        assert await levels(api, plenty) == (5, 2, 3)
        assert await levels(api, scarce) == (1, 1, 0)
        r = await inv.get(f"/internal/reservations/{oid}")
        assert r.status == 200 and r.body["state"] == "held" and r.body["expires_at"]


@pytest.mark.gen_test
async def test_the_same_reservation_sent_ten_times_at_once_is_made_once(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        a, b = await api.new_book(staff, stock=10), await api.new_book(staff, stock=10)
        inv = await internal(shop, session)
        oid = order_id()
        replies = await asyncio.gather(*(reserve(inv, oid, (a, 3), (b, 2)) for _ in range(10)))
        assert {r.status for r in replies} == {200}, replies
        assert {r.body["state"] for r in replies} == {"held"}
        assert len({r.body["expires_at"] for r in replies}) == 1
        assert await levels(api, a) == (10, 3, 7)
        assert await levels(api, b) == (10, 2, 8)
        replies = await asyncio.gather(*(inv.post(f"/internal/reservations/{oid}/commit") for _ in range(10)))
        assert {(r.status, r.body["state"]) for r in replies} == {(200, "committed")}
        assert await levels(api, a) == (7, 0, 7)
        assert await levels(api, b) == (8, 0, 8)


@pytest.mark.gen_test
async def test_commit_release_and_put_back_are_idempotent_and_ordered(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        isbn = await api.new_book(await api.staff(), stock=10)
        inv = await internal(shop, session)
        sold, released = order_id(), order_id()
        assert (await reserve(inv, sold, (isbn, 4))).body["state"] == "held"
        assert (await reserve(inv, released, (isbn, 3))).body["state"] == "held"
        assert await levels(api, isbn) == (10, 7, 3)

        for _ in range(2):
            r = await inv.post(f"/internal/reservations/{sold}/commit")
            assert r.status == 200 and r.body["state"] == "committed"
            r = await inv.post(f"/internal/reservations/{released}/release")
            assert r.status == 200 and r.body["state"] == "released"
            assert await levels(api, isbn) == (6, 0, 6)

        r = await inv.post(f"/internal/reservations/{sold}/release")
        assert r.status == 409 and r.body["error"]["code"] == "reservation_not_held"
        assert r.body["error"]["details"]["state"] == "committed"
        r = await inv.post(f"/internal/reservations/{released}/commit")
        assert r.status == 409 and r.body["error"]["details"]["state"] == "released"
        r = await inv.post(f"/internal/reservations/{released}/put-back")
        assert r.status == 409
        assert await levels(api, isbn) == (6, 0, 6)

        replies = await asyncio.gather(*(inv.post(f"/internal/reservations/{sold}/put-back") for _ in range(5)))
        assert {(r.status, r.body["state"]) for r in replies} == {(200, "returned")}
        assert await levels(api, isbn) == (10, 0, 10)  # back on the shelf once
        r = await inv.post(f"/internal/reservations/{sold}/put-back")
        assert r.status == 200 and r.body["state"] == "returned"
        assert (await inv.post(f"/internal/reservations/{sold}/commit")).status == 409
        assert await levels(api, isbn) == (10, 0, 10)

        held = order_id()
        await reserve(inv, held, (isbn, 1))
        assert (await inv.post(f"/internal/reservations/{held}/put-back")).status == 409  # not sold yet
        assert await levels(api, isbn) == (10, 1, 9)
        for action in ("commit", "release", "put-back"):
            r = await inv.post(f"/internal/reservations/{order_id()}/{action}")
            assert r.status == 404 and r.body["error"]["code"] == "reservation_not_found"


@pytest.mark.gen_test
async def test_naming_the_orders_isbns_gives_the_same_answers_and_bad_names_are_400(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        a, b = await api.new_book(staff, stock=5), await api.new_book(staff, stock=5)
        inv = await internal(shop, session)
        named, partly = order_id(), order_id()
        assert (await reserve(inv, named, (a, 1), (b, 2))).body["state"] == "held"
        assert (await reserve(inv, partly, (a, 1), (b, 1))).body["state"] == "held"
        for body, field in (({"isbns": []}, "isbns"), ({"isbns": ["123"]}, "isbns[0]"), ({"isbns": a}, "isbns"),
                            ({"isbns": [a], "extra": 1}, "extra"), ({"isbns": [{"$ne": ""}]}, "isbns[0]")):
            r = await inv.post(f"/internal/reservations/{named}/commit", body)
            assert r.status == 400 and r.body["error"]["message"].startswith(field), (body, r)
        assert await levels(api, a) == (5, 2, 3)
        r = await inv.post(f"/internal/reservations/{named}/commit", {"isbns": [b, a[:3] + "-" + a[3:]]})
        assert r.status == 200 and r.body["state"] == "committed"
        assert sorted(i["isbn"] for i in r.body["items"]) == sorted([a, b])
        r = await inv.post(f"/internal/reservations/{partly}/release", {"isbns": [b]})  # not all of them
        assert r.status == 200 and r.body["state"] == "released"
        assert await levels(api, a) == (4, 0, 4) and await levels(api, b) == (3, 0, 3)
        r = await inv.post(f"/internal/reservations/{order_id()}/release", {"isbns": [a]})
        assert r.status == 404 and r.body["error"]["code"] == "reservation_not_found"


@pytest.mark.gen_test
async def test_restock_while_reservations_are_held_keeps_the_sums_right(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=5)
        inv = await internal(shop, session)
        first = order_id()
        await reserve(inv, first, (isbn, 3))
        r = await staff.post(f"/inventory/{isbn}/restock", {"quantity": 10})
        assert r.body == {"isbn": isbn, "on_hand": 15, "reserved": 3, "available": 12}
        assert (await inv.post(f"/internal/reservations/{first}/commit")).status == 200
        assert await levels(api, isbn) == (12, 0, 12)

        # restocks racing reservations: nothing lost, nothing sold twice
        oids = [order_id() for _ in range(40)]
        replies = await asyncio.gather(*[reserve(inv, o, (isbn, 1)) for o in oids],
                                       *[staff.post(f"/inventory/{isbn}/restock", {"quantity": 1})
                                         for _ in range(20)])
        assert {r.status for r in replies} == {200}
        held = [o for o, r in zip(oids, replies) if r.body["state"] == "held"]
        assert 12 <= len(held) <= 32
        assert await levels(api, isbn) == (32, len(held), 32 - len(held))
        await asyncio.gather(*(inv.post(f"/internal/reservations/{o}/commit") for o in held[::2]),
                             *(inv.post(f"/internal/reservations/{o}/release") for o in held[1::2]))
        sold = len(held[::2])
        assert await levels(api, isbn) == (32 - sold, 0, 32 - sold)


# -- many instances, many orders --------------------------------------------------------------------------
def start_second_instance(shop, name: str = "inventory-2") -> str:
    """Another inventory process on its own port, on the same database (as a second replica would be)."""
    port = free_port()
    shop.ports[name] = port
    out = subprocess.DEVNULL
    if shop.log_dir:
        out = open(os.path.join(shop.log_dir, f"{shop.prefix}-{name}.log"), "ab")
    shop.procs[name] = subprocess.Popen([sys.executable, RUN_PY, "--service", "inventory", "--port", str(port)],
                                        env=shop.env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=ROOT)
    if out is not subprocess.DEVNULL:
        out.close()
    shop.wait_ready(name)  # shop.stop() ends it with the others
    return shop.url(name)


@pytest.mark.gen_test(timeout=120)
async def test_500_concurrent_orders_for_50_units_over_two_instances(make_shop):
    shop = make_shop(services=["users", "catalog", "inventory"])
    second = start_second_instance(shop)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=500)) as session:
        isbn, api = await stocked_book(shop, session, 50)
        instances = [await internal(shop, session), await internal(shop, session, base=second)]
        for inst in instances:  # both have their token keys before the rush
            assert (await inst.get("/internal/levels")).status == 200
        oids = [order_id() for _ in range(500)]
        started = time.monotonic()
        replies = await asyncio.gather(*(reserve(instances[i % 2], o, (isbn, 1)) for i, o in enumerate(oids)))
        took = time.monotonic() - started
        assert {r.status for r in replies} == {200}, [r for r in replies if r.status != 200][:3]
        held = [o for o, r in zip(oids, replies) if r.body["state"] == "held"]
        assert len(held) == 50, f"{len(held)} held"
        for r in replies:
            if r.body["state"] != "held":
                assert r.body["state"] == "rejected"
                assert r.body["short"] == [{"isbn": isbn, "requested": 1, "available": 0}]
        assert {i % 2 for i, r in enumerate(replies) if r.body["state"] == "held"} == {0, 1}
        assert await levels(api, isbn) == (50, 50, 0)
        for inst in instances:  # both instances see the same levels
            r = await inst.get("/internal/levels")
            assert r.status == 200
            assert r.body["items"] == [{"isbn": isbn, "on_hand": 50, "reserved": 50, "available": 0}]
        replies = await asyncio.gather(*(instances[i % 2].post(f"/internal/reservations/{o}/commit")
                                         for i, o in enumerate(reversed(held))))
        assert {(r.status, r.body["state"]) for r in replies} == {(200, "committed")}
        assert await levels(api, isbn) == (0, 0, 0)
        print(f"500 reservations over two instances in {took:.2f}s")


@pytest.mark.gen_test(timeout=60)
async def test_a_held_reservation_expires_and_returns_its_stock(make_shop):
    shop = make_shop({"BOOKSHOP_RESERVATION_TTL": "1"}, services=["users", "catalog", "inventory"])
    async with aiohttp.ClientSession() as session:
        isbn, api = await stocked_book(shop, session, 5)
        inv = await internal(shop, session)
        expiring, committed = order_id(), order_id()
        assert (await reserve(inv, expiring, (isbn, 3))).body["state"] == "held"
        assert (await reserve(inv, committed, (isbn, 1))).body["state"] == "held"
        assert (await inv.post(f"/internal/reservations/{committed}/commit")).status == 200
        assert await levels(api, isbn) == (4, 3, 1)
        started = time.monotonic()
        while await levels(api, isbn) != (4, 0, 4):
            assert time.monotonic() - started < 5, "the reservation did not expire"
            await asyncio.sleep(0.05)
        print(f"expired {time.monotonic() - started:.2f}s after the check began (TTL 1 s)")
        r = await inv.get(f"/internal/reservations/{expiring}")
        assert r.body["state"] == "expired"
        r = await inv.post(f"/internal/reservations/{expiring}/commit")
        assert r.status == 409 and r.body["error"]["details"]["state"] == "expired"
        r = await inv.post(f"/internal/reservations/{expiring}/release")
        assert r.status == 200 and r.body["state"] == "expired"  # releasing an expired one is fine
        r = await inv.get(f"/internal/reservations/{committed}")
        assert r.body["state"] == "committed"  # a sale never expires
        assert await levels(api, isbn) == (4, 0, 4)


# -- a data directory written by the earlier code ---------------------------------------------------------
@pytest.mark.gen_test(timeout=120)
async def test_reservations_written_by_the_earlier_code_carry_on_after_an_upgrade(mongodb_uri, log_dir):
    """Reservation headers and old-shape holds, as the code with headers left them (one order held, one whose
    commit died half-way, one sold), inserted straight into the collections: the new inventory starts on
    them, finishes or converts them, and answers for them as before."""
    shop = Shop(mongodb_uri, log_dir=log_dir)
    a, b = "9780306406157", "9780804429573"
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=10)
    client = pymongo.MongoClient(mongodb_uri)
    try:
        db = client[f"{shop.prefix}_inventory"]
        db["levels"].insert_many([
            {"_id": a, "on_hand": 10, "reserved": 3, "available": 7, "pending": [],
             "holds": [{"order": "held-1", "qty": 2}, {"order": "half-1", "qty": 1}]},
            {"_id": b, "on_hand": 4, "reserved": 1, "available": 3, "pending": [],
             "holds": [{"order": "held-1", "qty": 1}]}])  # half-1's unit of b was sold already
        db["reservations"].insert_many([
            {"_id": "held-1", "items": [{"isbn": a, "quantity": 2}, {"isbn": b, "quantity": 1}], "state": "held",
             "expires_at": soon},
            {"_id": "half-1", "items": [{"isbn": a, "quantity": 1}, {"isbn": b, "quantity": 1}],
             "state": "committed", "busy": True, "lock_until": soon, "expires_at": soon},
            {"_id": "sold-1", "items": [{"isbn": b, "quantity": 1}], "state": "committed", "expires_at": soon}])
    finally:
        client.close()
    shop.start("users", "catalog", "inventory")
    try:
        async with aiohttp.ClientSession() as session:
            inv = await internal(shop, session)
            public = Api(shop, session, base=shop.url("inventory") + "/api/v1")
            states = {o: (await inv.get(f"/internal/reservations/{o}")).body["state"]
                      for o in ("held-1", "half-1", "sold-1")}
            assert states == {"held-1": "held", "half-1": "committed", "sold-1": "committed"}
            assert await levels(public, a) == (9, 2, 7)  # half-1's commit was finished: its unit of a sold
            assert await levels(public, b) == (4, 1, 3)
            r = await inv.post("/internal/reservations/held-1/commit")
            assert r.status == 200 and r.body["state"] == "committed"
            r = await inv.post("/internal/reservations/sold-1/put-back")
            assert r.status == 200 and r.body["state"] == "returned"
            r = await inv.post("/internal/reservations/half-1/release")
            assert r.status == 409 and r.body["error"]["details"]["state"] == "committed"
            assert await levels(public, a) == (7, 0, 7)
            assert await levels(public, b) == (4, 0, 4)
    finally:
        shop.stop()
    client = pymongo.MongoClient(mongodb_uri)
    try:
        assert client[f"{shop.prefix}_inventory"]["reservations"].count_documents({}) == 0
    finally:
        client.close()
