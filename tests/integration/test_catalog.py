"""Catalogue through the gateway: staff CRUD, ISBN forms, search and paging, bad input, roles, indexes."""
from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from bookshop.storage.catalog import BookRepo
from bookshop.storage.mongo import Database
from bookshop.storage.outbox import EventLog
from client import Api, fresh_isbn, fresh_isbn10

FIELDS = {"isbn", "title", "authors", "category", "price_cents", "currency", "description", "published_year",
          "created_at", "updated_at"}


def hyphenated13(isbn13: str) -> str:
    return f"{isbn13[:3]}-{isbn13[3]}-{isbn13[4:8]}-{isbn13[8:12]}-{isbn13[12]}"


def bad_checksum(isbn13: str) -> str:
    return isbn13[:12] + str((int(isbn13[12]) + 1) % 10)


def tag() -> str:
    """A word no other test uses (letters only, so it is one search word)."""
    return "z" + "".join(random.choice("bcdfghjklmnpqrstvwxz") for _ in range(11))


def new_book(**fields) -> dict:
    book = {"isbn": fresh_isbn(), "title": "A Title", "authors": ["Ann Author"], "category": "fiction",
            "price_cents": 1250, "currency": "EUR"}
    book.update(fields)
    return book


async def search_all(api: Api, params: dict, limit: int = 100) -> list[dict]:
    items, cursor = [], None
    while True:
        r = await api.get("/books", params={**params, "limit": str(limit), **({"cursor": cursor} if cursor else {})})
        assert r.status == 200, r
        items += r.body["items"]
        cursor = r.body["next_cursor"]
        if cursor is None:
            return items


# -- create, read, update, delete -------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_staff_creates_reads_edits_and_deletes_a_book(shop):
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        book = new_book(title="  The Left Hand of Darkness ", authors=["Ursula K. Le Guin"],
                        category="Science Fiction", description="Winter.", published_year=1969)
        r = await staff.post("/books", book)
        assert r.status == 201, r
        created = r.body
        assert set(created) == FIELDS
        assert created["isbn"] == book["isbn"]
        assert created["title"] == "The Left Hand of Darkness"
        assert created["category"] == "science fiction"
        assert created["price_cents"] == 1250 and created["currency"] == "EUR"
        assert created["created_at"] == created["updated_at"] and created["created_at"].endswith("Z")

        r = await staff.post("/books", {**book, "title": "Another"})
        assert r.status == 409 and r.body["error"]["code"] == "isbn_exists", r

        r = await staff.get(f"/books/{book['isbn']}", token=None)
        assert r.status == 200
        assert {k: r.body[k] for k in FIELDS} == created

        r = await staff.patch(f"/books/{book['isbn']}", {"price_cents": 999})
        assert r.status == 200, r
        assert r.body["price_cents"] == 999
        assert r.body["title"] == created["title"] and r.body["authors"] == created["authors"]
        assert r.body["description"] == "Winter." and r.body["published_year"] == 1969
        assert r.body["created_at"] == created["created_at"] and r.body["updated_at"] > created["updated_at"]

        r = await staff.patch(f"/books/{book['isbn']}", {"description": None, "title": "Left Hand"})
        assert r.status == 200 and r.body["description"] is None and r.body["title"] == "Left Hand"
        assert r.body["price_cents"] == 999
        r = await staff.get(f"/books/{book['isbn']}", token=None)
        assert r.body["title"] == "Left Hand" and r.body["price_cents"] == 999
        search = {"q": "left hand", "author": "ursula guin", "category": "science fiction"}
        assert book["isbn"] in [b["isbn"] for b in await search_all(staff, search)]

        r = await staff.delete(f"/books/{book['isbn']}")
        assert r.status == 204 and r.body is None
        r = await staff.get(f"/books/{book['isbn']}", token=None)
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found"
        assert (await staff.delete(f"/books/{book['isbn']}")).status == 404
        r = await staff.patch(f"/books/{book['isbn']}", {"price_cents": 1})
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found"
        assert book["isbn"] not in [b["isbn"] for b in await search_all(staff, search)]


@pytest.mark.gen_test
async def test_isbn10_with_hyphens_is_stored_as_isbn13_and_found_by_either_form(shop):
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        isbn10, isbn13 = fresh_isbn10()
        r = await staff.post("/books", new_book(isbn=isbn10))
        assert r.status == 201, r
        assert r.body["isbn"] == isbn13
        for form in (isbn10, isbn10.replace("-", ""), isbn13, hyphenated13(isbn13)):
            r = await staff.get(f"/books/{form}", token=None)
            assert r.status == 200, (form, r)
            assert r.body["isbn"] == isbn13
        # the same book in its other form is the same book
        r = await staff.post("/books", new_book(isbn=hyphenated13(isbn13)))
        assert r.status == 409 and r.body["error"]["code"] == "isbn_exists"
        r = await staff.patch(f"/books/{isbn10}", {"title": "Renamed"})
        assert r.status == 200 and r.body["isbn"] == isbn13 and r.body["title"] == "Renamed"
        assert (await staff.delete(f"/books/{hyphenated13(isbn13)}")).status == 204
        assert (await staff.get(f"/books/{isbn10}", token=None)).status == 404


@pytest.mark.gen_test
async def test_bad_and_unknown_isbns(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        unknown = fresh_isbn()
        for path in (f"/books/{bad_checksum(unknown)}", "/books/0-306-40615-3", "/books/12345", "/books/abc",
                     "/books/978030640615%20"):
            r = await api.get(path)
            assert r.status == 400 and r.body["error"]["code"] == "invalid_field", (path, r)
            assert "isbn" in r.body["error"]["message"]
        r = await api.get(f"/books/{unknown}")
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found"
        r = await staff.post("/books", new_book(isbn=bad_checksum(unknown)))
        assert r.status == 400 and r.body["error"]["message"].startswith("isbn")
        assert (await staff.patch(f"/books/{bad_checksum(unknown)}", {"price_cents": 5})).status == 400
        assert (await staff.delete(f"/books/{bad_checksum(unknown)}")).status == 400
        assert (await staff.delete(f"/books/{unknown}")).status == 404


@pytest.mark.gen_test
async def test_concurrent_creates_of_one_isbn_make_one_book(shop):
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        book = new_book()
        replies = await asyncio.gather(*(staff.post("/books", {**book, "title": f"Copy {i}"}) for i in range(10)))
        statuses = sorted(r.status for r in replies)
        assert statuses == [201] + [409] * 9, replies
        winner = next(r.body for r in replies if r.status == 201)
        assert (await staff.get(f"/books/{book['isbn']}")).body["title"] == winner["title"]


@pytest.mark.gen_test
async def test_concurrent_edits_of_title_and_authors_keep_the_book_searchable(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        for _ in range(6):
            isbn = await api.new_book(staff, title="Plain Title", authors=["Plain Author"])
            title, author = tag(), tag()
            replies = await asyncio.gather(staff.patch(f"/books/{isbn}", {"title": title}),
                                           staff.patch(f"/books/{isbn}", {"authors": [author]}),
                                           staff.patch(f"/books/{isbn}", {"price_cents": 777}))
            assert [r.status for r in replies] == [200, 200, 200], replies
            book = (await staff.get(f"/books/{isbn}")).body
            assert (book["title"], book["authors"], book["price_cents"]) == (title, [author], 777)
            for params in ({"q": title}, {"q": author}, {"author": author}, {"q": f"{title} {author}"}):
                assert [b["isbn"] for b in await search_all(staff, params)] == [isbn], params
            assert isbn not in [b["isbn"] for b in await search_all(staff, {"q": "plain"})]  # old words gone


# -- bad input and roles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, field", [
    ({"title": ""}, "title"),
    ({"title": "   "}, "title"),
    ({"title": 5}, "title"),
    ({"authors": []}, "authors"),
    ({"authors": "Ann Author"}, "authors"),
    ({"category": ""}, "category"),
    ({"price_cents": -1}, "price_cents"),
    ({"price_cents": 0}, "price_cents"),
    ({"price_cents": 12.5}, "price_cents"),
    ({"price_cents": 12.0}, "price_cents"),
    ({"price_cents": "7"}, "price_cents"),
    ({"price_cents": True}, "price_cents"),
    ({"price_cents": None}, "price_cents"),
    ({"currency": "USD"}, "currency"),
    ({"currency": "eur"}, "currency"),
    ({"published_year": "1999"}, "published_year"),
    ({"title": {"$gt": ""}}, "title"),
    ({"category": {"$ne": None}}, "category"),
    ({"authors": [{"$regex": ".*"}]}, "authors"),
    ({"shelf": "A3"}, "shelf"),
    ({"price_cents": 1, "$set": {"price_cents": 1}}, "body"),
])
@pytest.mark.gen_test
async def test_bad_book_fields_are_400_naming_the_field(shop, change, field):
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        book = new_book(**change)
        r = await staff.post("/books", book)
        assert r.status == 400, r
        assert r.body["error"]["code"] == "invalid_field"
        assert r.body["error"]["message"].startswith(field), r.body
        r = await staff.get(f"/books/{book['isbn']}")
        assert r.status == 404  # nothing was stored


@pytest.mark.gen_test
async def test_missing_fields_and_bad_patches_are_400(shop):
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        for missing in ("isbn", "title", "authors", "category", "price_cents", "currency"):
            book = new_book()
            book.pop(missing)
            r = await staff.post("/books", book)
            assert r.status == 400 and r.body["error"]["message"].startswith(missing), r
        r = await staff.post("/books", raw=b'{"isbn": ')
        assert r.status == 400 and r.body["error"]["code"] == "malformed_json"
        book = new_book()
        assert (await staff.post("/books", book)).status == 201
        for patch, field in (({}, "body"), ({"title": None}, "title"), ({"price_cents": "7"}, "price_cents"),
                             ({"price_cents": -5}, "price_cents"), ({"currency": "GBP"}, "currency"),
                             ({"isbn": fresh_isbn()}, "isbn"), ({"title": {"$gt": ""}}, "title"),
                             ({"authors": None}, "authors"), ({"created_at": "2020-01-01"}, "created_at")):
            r = await staff.patch(f"/books/{book['isbn']}", patch)
            assert r.status == 400 and r.body["error"]["message"].startswith(field), (patch, r)
        r = await staff.get(f"/books/{book['isbn']}")
        assert r.body["title"] == book["title"] and r.body["price_cents"] == book["price_cents"]


@pytest.mark.gen_test
async def test_only_staff_may_write_the_catalogue(shop):
    # force_close: a fresh connection per request (each refusal is checked on a clean connection)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        api = Api(shop, session)
        staff, customer = await api.staff(), await api.customer()
        isbn = await api.new_book(staff)
        book = new_book()
        for who, status, code in ((customer, 403, "forbidden"), (api, 401, "unauthenticated"),
                                  (api.as_("not-a-token"), 401, None)):
            for reply in (await who.post("/books", book), await who.patch(f"/books/{isbn}", {"price_cents": 1}),
                          await who.delete(f"/books/{isbn}")):
                assert reply.status == status, reply
                if code:
                    assert reply.body["error"]["code"] == code
        assert (await api.get(f"/books/{book['isbn']}")).status == 404
        r = await api.get(f"/books/{isbn}")
        assert r.status == 200 and r.body["price_cents"] == 1000
        # reading is for anyone, signed in or not
        assert (await customer.get("/books", params={"q": "anything"})).status == 200
        assert (await customer.get(f"/books/{isbn}")).status == 200


@pytest.mark.gen_test
async def test_a_rejected_write_leaves_the_connection_usable(shop):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        api = Api(shop, session)
        assert (await api.post("/books", new_book())).status == 401
        assert (await api.patch(f"/books/{fresh_isbn()}", {"price_cents": 1})).status == 401


# -- search -----------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_search_by_title_and_author_words_author_and_category(shop):
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        t, a, c = tag(), tag(), tag()
        books = {
            "one": new_book(title=f"The {t} Chronicles", authors=["Mária Tóth"], category=f"{c} fiction"),
            "two": new_book(title="Quiet Days", authors=[f"Jo {a}", "Mária Tóth"], category=f"{c} fiction"),
            "three": new_book(title=f"{a} Rising", authors=["Sam Smith"], category=f"{c} poetry"),
            "four": new_book(title=f"{t} and {a}", authors=["Sam Smith"], category=f"{c} poetry"),
        }
        for book in books.values():
            assert (await staff.post("/books", book)).status == 201

        def found(items):
            return {name for name, b in books.items() if b["isbn"] in {i["isbn"] for i in items}}
        assert found(await search_all(staff, {"q": t})) == {"one", "four"}
        assert found(await search_all(staff, {"q": t.upper() + "!"})) == {"one", "four"}
        assert found(await search_all(staff, {"q": a})) == {"two", "three", "four"}  # title or author words
        assert found(await search_all(staff, {"author": a})) == {"two"}               # author words only
        assert found(await search_all(staff, {"q": f"{t} chronicles"})) == {"one"}    # every word must match
        assert found(await search_all(staff, {"q": f"{t} maria toth"})) == {"one"}    # accents fold
        assert found(await search_all(staff, {"q": t, "author": "toth"})) == {"one"}
        assert found(await search_all(staff, {"category": f"{c} poetry"})) == {"three", "four"}
        assert found(await search_all(staff, {"category": f" {c.upper()} Poetry "})) == {"three", "four"}
        assert found(await search_all(staff, {"category": f"{c} poetry", "q": t})) == {"four"}
        assert found(await search_all(staff, {"q": f"{t} {tag()}"})) == set()
        assert found(await search_all(staff, {"q": "!!!"})) == set()
        item = next(i for i in await search_all(staff, {"q": t}) if i["isbn"] == books["one"]["isbn"])
        assert set(item) == FIELDS and item["title"] == books["one"]["title"]

        r = await staff.patch(f"/books/{books['one']['isbn']}", {"title": "Renamed", "authors": ["New Name"]})
        assert r.status == 200
        assert found(await search_all(staff, {"q": t})) == {"four"}
        assert found(await search_all(staff, {"q": "toth"})) >= {"two"}
        assert "one" not in found(await search_all(staff, {"author": "toth"}))
        assert found(await search_all(staff, {"category": f"{c} fiction", "q": "renamed"})) == {"one"}


@pytest.mark.gen_test(timeout=60)
async def test_paging_is_complete_and_stable_while_books_come_and_go(shop):
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        category = tag()
        isbns = sorted(fresh_isbn() for _ in range(25))
        replies = await asyncio.gather(*(staff.post("/books", new_book(isbn=i, category=category)) for i in isbns))
        assert {r.status for r in replies} == {201}

        seen, cursor, pages = [], None, 0
        while True:
            params = {"category": category, "limit": "7", **({"cursor": cursor} if cursor else {})}
            r = await staff.get("/books", params=params, token=None)
            assert r.status == 200, r
            assert len(r.body["items"]) <= 7
            seen += [i["isbn"] for i in r.body["items"]]
            cursor = r.body["next_cursor"]
            pages += 1
            if pages == 2:  # books added and removed while a client pages must not shift the others
                added = await Api(shop, session).new_book(staff, category=category)
                assert (await staff.delete(f"/books/{isbns[-1]}")).status == 204
            if cursor is None:
                break
        assert len(seen) == len(set(seen)), "a book was listed twice"
        assert seen == sorted(seen)
        assert set(isbns[:-1]) <= set(seen), "a book was skipped"
        assert isbns[-1] not in seen
        assert (added in seen) == (added > seen[13])
        assert pages == 4

        r = await staff.get("/books", params={"category": category, "limit": "100"})
        assert [i["isbn"] for i in r.body["items"]] == sorted(set(isbns[:-1]) | {added})
        assert r.body["next_cursor"] is None
        r = await staff.get("/books", params={"category": category, "limit": "25"})
        assert len(r.body["items"]) == 25 and r.body["next_cursor"] is None  # an exact fit has no next page
        r = await staff.get("/books", params={"category": category})
        assert len(r.body["items"]) == 20 and r.body["next_cursor"]         # default limit 20


@pytest.mark.gen_test
async def test_bad_search_parameters_are_400(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        category = tag()
        for _ in range(3):
            await api.new_book(staff, category=category)
        r = await api.get("/books", params={"category": category, "limit": "2"})
        cursor = r.body["next_cursor"]
        assert cursor
        edited = cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")
        for params, field in (({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "abc"}, "limit"),
                              ({"limit": "-1"}, "limit"), ({"limit": "2.5"}, "limit"), ({"limit": "²"}, "limit"),
                              ({"cursor": "forged"}, "cursor"), ({"cursor": edited}, "cursor"),
                              ({"cursor": cursor + "x"}, "cursor"), ({"cursor": "é"}, "cursor"),
                              ({"q": "x" * 201}, None), ({"author": "x" * 201}, None),
                              ({"category": "x" * 51}, None)):
            r = await api.get("/books", params={"category": category, **params})
            assert r.status == 400, (params, r)
            assert r.body["error"]["code"] == "invalid_field"
            if field:
                assert r.body["error"]["message"].startswith(field)
        r = await api.get("/books", params={"category": category, "limit": "2", "cursor": cursor})
        assert r.status == 200 and len(r.body["items"]) == 1 and r.body["next_cursor"] is None
        # operator-looking query values are just words, never a query
        for params in ({"category": '{"$ne": null}'}, {"q": "$where"}, {"author": "{$gt: ''}"}):
            r = await api.get("/books", params=params)
            assert r.status == 200 and r.body == {"items": [], "next_cursor": None}, (params, r)
        r = await api.get("/books", params={"category[$ne]": category, "limit": "1"})
        assert r.status == 200 and r.body["next_cursor"]  # an unknown parameter is no filter at all


# -- indexes ----------------------------------------------------------------------------------------------
def stages(plan: dict) -> list[str]:
    """Every stage name in a plan tree."""
    out = [plan.get("stage", "?")]
    for key in ("inputStage", "outerStage", "innerStage", "queryPlan"):
        if isinstance(plan.get(key), dict):
            out += stages(plan[key])
    for child in plan.get("inputStages", []):
        out += stages(child)
    return out


@pytest.mark.gen_test
async def test_every_search_shape_uses_an_index(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        for i in range(5):
            await api.new_book(staff, title=f"Index Probe {i}", authors=["Ida Index"], category="indexing")
        r = await api.get("/books", params={"q": "index probe", "author": "ida", "category": "indexing"})
        assert len(r.body["items"]) >= 5
    db = Database(shop.mongodb_uri, f"{shop.prefix}_catalog")
    try:
        repo = BookRepo(db, EventLog(db))
        shapes = {"q": (["index", "probe"], [], None), "one word": (["probe"], [], None),
                  "author": ([], ["ida", "index"], None), "category": ([], [], "indexing"),
                  "no filter": ([], [], None), "q+author+category": (["probe"], ["ida"], "indexing")}
        for name, (q_words, author_words, category) in shapes.items():
            for after in (None, "9780000000000"):
                explained = await repo.explain_search(q_words, author_words, category, after, 21)
                plan = explained["queryPlanner"]["winningPlan"]
                names = stages(plan)
                assert "IXSCAN" in names, (name, plan)
                assert "COLLSCAN" not in names, (name, plan)
        # what recommendations read: newest first within a category
        plan = (await repo.explain_newest("indexing", 6))["queryPlanner"]["winningPlan"]
        assert "IXSCAN" in stages(plan) and "COLLSCAN" not in stages(plan), plan
        newest = await repo.newest("indexing", 100)
        assert len(newest) >= 5 and all(b["category"] == "indexing" for b in newest)
    finally:
        db.close()
