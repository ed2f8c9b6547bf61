"""``GET /api/v1/books/{isbn}`` at the gateway: the book with its stock and recommendations, still served
when those services are down, and never stale after a change (whoever makes it, wherever)."""
from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from client import Api, fresh_isbn, fresh_isbn10
from harness import found, until

REC_FIELDS = {"isbn", "title", "authors", "category", "price_cents", "currency", "reason"}


def tag() -> str:
    return "z" + "".join(random.choice("bcdfghjklmnpqrstvwxz") for _ in range(11))


async def page(api: Api, isbn: str):
    r = await api.get(f"/books/{isbn}")
    assert r.status == 200, r
    return r.body


@pytest.mark.gen_test
async def test_the_book_page_has_the_book_its_stock_and_recommendations(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        category = tag()
        years = {"old": 1990, "target": 2005, "new": 2020, "undated": None, "newest": 2024}
        isbns = {}
        for name, year in years.items():
            isbns[name] = await api.new_book(staff, title=f"{name.title()} Book", category=category,
                                             **({"published_year": year} if year else {}))
        other = await api.new_book(staff, category=tag(), published_year=2030)
        await staff.post(f"/inventory/{isbns['target']}/restock", {"quantity": 7})

        body = await page(api, isbns["target"])
        assert body["isbn"] == isbns["target"] and body["title"] == "Target Book"
        assert body["published_year"] == 2005 and body["category"] == category
        assert body["stock"] == {"available": 7}
        recs = body["recommendations"]
        assert [r["isbn"] for r in recs] == [isbns["newest"], isbns["new"], isbns["old"], isbns["undated"]]
        assert all(set(r) == REC_FIELDS for r in recs)
        assert other not in [r["isbn"] for r in recs]

        # the ISBN-10 form of a 978 book and hyphens work too; a signed-in customer gets the same book
        isbn10, isbn13 = fresh_isbn10()
        r = await staff.post("/books", {"isbn": isbn13, "title": "Form", "authors": ["F"], "category": tag(),
                                        "price_cents": 100, "currency": "EUR"})
        assert r.status == 201
        assert (await page(api, isbn10))["isbn"] == isbn13
        assert (await page(api, isbn10.replace("-", "")))["isbn"] == isbn13
        assert (await page(api, f"{isbn13[:3]}-{isbn13[3:]}"))["isbn"] == isbn13
        customer = await api.customer()
        body = await page(customer, isbns["target"])
        assert body["stock"] == {"available": 7} and isbns["target"] not in [r["isbn"] for r in body["recommendations"]]

        r = await api.get(f"/books/{isbns['target'][:12]}{(int(isbns['target'][12]) + 1) % 10}")
        assert r.status == 400 and r.body["error"]["code"] == "invalid_field"
        r = await api.get(f"/books/{fresh_isbn()}")
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found"


def isbn_after_the_rest() -> str:
    """A fresh ISBN-13 that sorts after every fresh_isbn() one (whose 4th to 12th digits are random)."""
    return fresh_isbn("97999999")


@pytest.mark.gen_test(timeout=60)
async def test_recommendations_are_the_newest_of_a_big_category(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        category = tag()
        older = await asyncio.gather(*(api.new_book(staff, category=category, published_year=1900 + i % 50)
                                       for i in range(110)))
        newest = isbn_after_the_rest()
        r = await staff.post("/books", {"isbn": newest, "title": "Brand New", "authors": ["N"], "category": category,
                                        "price_cents": 100, "currency": "EUR", "published_year": 2025})
        assert r.status == 201, r
        recs = (await page(api, older[0]))["recommendations"]
        assert len(recs) == 5
        assert recs[0]["isbn"] == newest  # the 111th ISBN of its category, but the newest book
        assert older[0] not in [b["isbn"] for b in recs]


@pytest.mark.gen_test
async def test_a_book_never_restocked_shows_zero_and_alone_in_its_category_has_no_recommendations(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        isbn = await api.new_book(await api.staff(), category=tag())
        body = await page(api, isbn)
        assert body["stock"] == {"available": 0}
        assert body["recommendations"] == []


@pytest.mark.gen_test
async def test_changes_through_the_gateway_show_on_the_next_read(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=3, title="First Title")
        for _ in range(2):  # warm whatever cache there is
            assert (await page(api, isbn))["title"] == "First Title"
        assert (await staff.patch(f"/books/{isbn}", {"title": "Second Title", "price_cents": 555})).status == 200
        body = await page(api, isbn)
        assert body["title"] == "Second Title" and body["price_cents"] == 555
        assert (await staff.post(f"/inventory/{isbn}/restock", {"quantity": 4})).status == 200
        assert (await page(api, isbn))["stock"] == {"available": 7}
        assert (await staff.post(f"/inventory/{isbn}/restock", {"quantity": 1})).status == 200
        assert (await page(api, isbn))["stock"] == {"available": 8}
        assert (await staff.delete(f"/books/{isbn}")).status == 204
        assert (await api.get(f"/books/{isbn}")).status == 404


@pytest.mark.gen_test(timeout=60)
async def test_reads_after_a_change_never_go_back_in_time(shop):
    """A late event of the previous change must not overwrite what a read after this change fetched."""
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=1, title="T0")
        stale = []
        for i in range(1, 21):
            assert (await staff.post(f"/inventory/{isbn}/restock", {"quantity": 1})).status == 200
            for j in range(3):
                body = await page(api, isbn)
                if body["stock"] != {"available": 1 + i}:
                    stale.append((i, j, body["stock"]))
        for i in range(1, 9):
            assert (await staff.patch(f"/books/{isbn}", {"title": f"T{i}"})).status == 200
            for j in range(3):
                body = await page(api, isbn)
                if body["title"] != f"T{i}":
                    stale.append((i, j, body["title"]))
        assert stale == []


@pytest.mark.gen_test
async def test_a_book_created_after_a_404_is_found_at_once(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = fresh_isbn()
        assert (await api.get(f"/books/{isbn}")).status == 404
        r = await staff.post("/books", {"isbn": isbn, "title": "Late", "authors": ["L"], "category": "late",
                                        "price_cents": 100, "currency": "EUR"})
        assert r.status == 201
        assert (await page(api, isbn))["title"] == "Late"


@pytest.mark.gen_test
async def test_changes_made_behind_the_gateways_back_show_within_two_seconds(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        category = tag()
        isbn = await api.new_book(staff, stock=3, title="Old Title", category=category)
        neighbour = await api.new_book(staff, title="Neighbour", category=category)
        for _ in range(2):
            body = await page(api, isbn)
        assert body["title"] == "Old Title" and body["stock"] == {"available": 3}
        assert [r["isbn"] for r in body["recommendations"]] == [neighbour]

        catalog = staff.as_(staff.token)
        catalog.base = shop.url("catalog") + "/api/v1"
        inventory = staff.as_(staff.token)
        inventory.base = shop.url("inventory") + "/api/v1"

        assert (await catalog.patch(f"/books/{isbn}", {"title": "New Title"})).status == 200
        started = time.monotonic()

        async def retitled():
            body = await page(api, isbn)
            return body if body["title"] == "New Title" else None
        await until(retitled, done=found)
        title_lag = time.monotonic() - started

        assert (await inventory.post(f"/inventory/{isbn}/restock", {"quantity": 2})).status == 200

        async def restocked():
            body = await page(api, isbn)
            return body if body["stock"] == {"available": 5} else None
        await until(restocked, done=found)

        assert (await catalog.delete(f"/books/{isbn}")).status == 204

        async def gone():
            r = await api.get(f"/books/{isbn}")
            return r if r.status == 404 else None
        await until(gone, done=found)
        print(f"a title changed at the catalog showed at the gateway after {title_lag * 1000:.0f} ms")


@pytest.mark.gen_test
async def test_a_deleted_or_moved_book_leaves_the_recommendations(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        category = tag()
        isbn = await api.new_book(staff, category=category)
        moved = await api.new_book(staff, category=category, published_year=2001)
        deleted = await api.new_book(staff, category=category, published_year=2000)
        body = await page(api, isbn)
        assert [r["isbn"] for r in body["recommendations"]] == [moved, deleted]
        assert (await staff.patch(f"/books/{moved}", {"category": tag()})).status == 200
        assert (await staff.delete(f"/books/{deleted}")).status == 204

        async def updated():
            recs = (await page(api, isbn))["recommendations"]
            return recs if recs == [] else None
        await until(updated, done=found)


@pytest.mark.gen_test(timeout=90)
async def test_the_page_is_served_without_the_services_that_are_down(make_shop):
    shop = make_shop(services=["users", "catalog", "inventory", "recommendations", "gateway"])
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        category = tag()
        isbn = await api.new_book(staff, stock=4, category=category)
        neighbour = await api.new_book(staff, stock=2, category=category)
        body = await page(api, isbn)
        assert body["stock"] == {"available": 4}
        assert [r["isbn"] for r in body["recommendations"]] == [neighbour]

        shop.kill("recommendations")
        # a page whose recommendations the gateway holds (kept correct by the catalog's events) may still
        # show them; one it has to ask for gets null, at once
        for _ in range(3):
            started = time.monotonic()
            r = await api.get(f"/books/{neighbour}")
            assert r.status == 200, r
            assert r.body["recommendations"] is None
            assert r.body["stock"] == {"available": 2} and r.body["isbn"] == neighbour
            assert time.monotonic() - started < 1.5
        r = await api.get(f"/books/{isbn}")
        assert r.status == 200 and r.body["stock"] == {"available": 4}
        assert r.body["recommendations"] in (None, body["recommendations"])

        shop.kill("inventory")

        async def stockless():  # at once, or as soon as the gateway sees the inventory's stream go
            r = await api.get(f"/books/{isbn}")
            assert r.status == 200, r
            return r if r.body["stock"] is None else None
        await until(stockless, done=found)
        for book in (isbn, neighbour):
            started = time.monotonic()
            r = await api.get(f"/books/{book}")
            assert r.status == 200, r
            assert r.body["stock"] is None and r.body["isbn"] == book and r.body["title"] == f"Book {book}"
            assert time.monotonic() - started < 1.5
        assert r.body["recommendations"] is None
        assert (await api.get(f"/books/{fresh_isbn()}")).status == 404  # still a 404 when unknown

        shop.kill("catalog")  # without the book itself there is no page

        async def unavailable():
            r = await api.get(f"/books/{isbn}")
            return r if r.status == 503 else None
        r = await until(unavailable, done=found)
        assert r.headers["Retry-After"] and r.body["error"]["code"] in ("service_unavailable", "upstream_error")
