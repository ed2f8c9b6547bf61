"""``GET /api/v1/recommendations``: learned from what customers buy (the orders stream), as a reader of a book
and as a signed-in customer sees it, through cancellations and a killed recommendations service."""
from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from client import Api, fresh_isbn
from harness import found, until

REC_FIELDS = {"isbn", "title", "authors", "category", "price_cents", "currency", "reason"}
LAG = 15.0  # the contract's 5 s, with room for a loaded test machine (the lag seen is printed)


def tag() -> str:
    return "rec-" + fresh_isbn()[-9:]


async def buy(customer: Api, *isbns: str) -> str:
    """A confirmed order of one copy of each book; its id."""
    r = await customer.order([(i, 1) for i in isbns])
    assert r.status in (201, 202), r
    order = r.body["id"]
    if r.body["status"] != "CONFIRMED":
        async def confirmed():
            got = await customer.get(f"/orders/{order}")
            assert got.body["status"] in ("PENDING", "CONFIRMED"), got
            return got if got.body["status"] == "CONFIRMED" else None
        await until(confirmed, 30, done=found)
    return order


async def follower_lease(shop) -> dict:
    """The recommendations follower's lease as stored: ``{owner, until}``."""
    from bookshop.storage.mongo import Database
    db = Database(shop.mongodb_uri, f"{shop.prefix}_recommendations")
    try:
        return await db["meta"].find_one({"_id": "follower"}, {"_id": 0})
    finally:
        db.close()


def listed(items) -> list[tuple[str, str]]:
    return [(i["isbn"], i["reason"]) for i in items]


async def recs(api: Api, isbn: str | None = None) -> list[tuple[str, str]]:
    r = await api.get("/recommendations", params={"isbn": isbn} if isbn else None)
    assert r.status == 200, r
    assert all(set(i) == REC_FIELDS for i in r.body["items"]), r
    return listed(r.body["items"])


async def becomes(api: Api, isbn: str | None, expected: list[tuple[str, str]], seconds: float = LAG) -> float:
    """Wait until the list is ``expected``; how long it took. A failure shows each list seen, and when."""
    started = time.monotonic()
    seen: list[tuple[float, list]] = []

    async def check():
        got = await recs(api, isbn)
        if not seen or seen[-1][1] != got:
            seen.append((round(time.monotonic() - started, 2), got))
        return got if got == expected else None
    await until(check, seconds, done=found, describe=lambda: f"expected {expected}, seen (seconds, list): {seen}")
    return time.monotonic() - started


@pytest.mark.gen_test(timeout=300)
async def test_readers_of_a_book_get_what_its_buyers_bought_with_it(make_shop):
    shop = make_shop()
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        cat_a, cat_b, cat_c = tag(), tag(), tag()
        a = await api.new_book(staff, stock=50, category=cat_a, title="A")
        b = await api.new_book(staff, stock=50, category=cat_b, title="B")
        c = await api.new_book(staff, stock=50, category=cat_c, title="C")
        assert await recs(api, a) == []  # alone in its category, bought by nobody

        ab = [await api.customer() for _ in range(5)]
        ac = [await api.customer() for _ in range(3)]
        for customer in ab:
            await buy(customer, a, b)
        for customer in ac[:2]:
            await buy(customer, a, c)
        await buy(ac[2], a)
        await buy(ac[2], c)  # both books, in two orders: still one customer who bought both

        newcomer = await api.customer()
        lag = await becomes(newcomer, a, [(b, "bought_together"), (c, "bought_together")])
        print(f"the last confirmation showed in the recommendations after {lag * 1000:.0f} ms")
        assert await recs(api, a) == [(b, "bought_together"), (c, "bought_together")]  # anonymous: the same
        assert await recs(api, b) == [(a, "bought_together")]

        # a buyer of A+B is never shown B (nor A); a buyer of A+C gets B first in their own list
        assert await recs(ab[0], a) == [(c, "bought_together")]
        assert await recs(ac[0]) == [(b, "bought_together")]
        assert await recs(newcomer) == []

        # same-category books fill the list after the bought-together ones, newest first
        older = await api.new_book(staff, category=cat_a, published_year=1999)
        newer = await api.new_book(staff, category=cat_a, published_year=2020)
        assert await recs(newcomer, a) == [(b, "bought_together"), (c, "bought_together"),
                                           (newer, "same_category"), (older, "same_category")]
        assert await recs(ac[0]) == [(b, "bought_together"), (newer, "same_category"), (older, "same_category")]

        # four buy A+D: D passes C; one of them twice, and cancelling one of those two changes nothing
        d = await api.new_book(staff, stock=50, category=tag(), title="D")
        ad = [await api.customer() for _ in range(4)]
        orders = [await buy(customer, a, d) for customer in ad]
        twice = await buy(ad[0], a, d)
        top3 = [(b, "bought_together"), (d, "bought_together"), (c, "bought_together")]
        await becomes(newcomer, a, top3 + [(newer, "same_category"), (older, "same_category")])
        assert (await ad[0].post(f"/orders/{twice}/cancel")).status == 200
        # cancelling after confirmation lowers the count: D (4 -> 2) falls behind C (3)
        for customer, order in zip(ad[1:3], orders[1:3]):
            r = await customer.post(f"/orders/{order}/cancel")
            assert r.status == 200 and r.body["status"] == "CANCELLED", r
        lag = await becomes(newcomer, a, [(b, "bought_together"), (c, "bought_together"), (d, "bought_together"),
                                          (newer, "same_category"), (older, "same_category")])
        print(f"the last cancellation showed in the recommendations after {lag * 1000:.0f} ms")
        # ... but ad[0] still holds A and D in their first order
        assert await recs(ad[0], a) == [(b, "bought_together"), (c, "bought_together"), (newer, "same_category"),
                                        (older, "same_category")]

        # killed, and an order confirmed while it is down: nothing lost; and the restarted service (the same
        # host:port) follows at once, instead of waiting out the follower lease its killed self held (6 s)
        before = await follower_lease(shop)
        shop.kill("recommendations")
        e = await api.new_book(staff, stock=50, category=tag(), title="E")
        await buy(await api.customer(), a, e)
        shop.start("recommendations")
        together = [(x, "bought_together") for x in (b, c, d, e)]
        lag = await becomes(newcomer, a, together + [(newer, "same_category")])
        print(f"the order confirmed while it was down showed {lag * 1000:.0f} ms after its restart")
        after = await follower_lease(shop)
        assert before["owner"] == after["owner"] == f"{socket.gethostname()}:{shop.ports['recommendations']}"
        assert after["until"] > before["until"]  # taken back, and renewed since
        assert await recs(ad[0], a) == [(b, "bought_together"), (c, "bought_together"), (e, "bought_together"),
                                        (newer, "same_category"), (older, "same_category")]
        assert await recs(ac[0]) == [(b, "bought_together"), (d, "bought_together"), (e, "bought_together"),
                                     (newer, "same_category"), (older, "same_category")]

        # nothing counted twice: three more buy A+F, and F ties with C (3), the tie going by ISBN; had the
        # restart applied an event again, C (6) and D (4) would be ahead of F
        f = await api.new_book(staff, stock=50, category=tag(), title="F")
        for _ in range(3):
            await buy(await api.customer(), a, f)
        tied = [(x, "bought_together") for x in sorted((c, f))]
        await becomes(newcomer, a, [(b, "bought_together")] + tied + [(d, "bought_together"), (e, "bought_together")])

        # only books on sale
        assert (await staff.delete(f"/books/{b}")).status == 204
        assert (await recs(newcomer, a))[:2] == tied
        r = await api.get(f"/books/{a}")
        assert r.status == 200 and b not in [i["isbn"] for i in r.body["recommendations"]]


@pytest.mark.gen_test(timeout=60)
async def test_bad_requests(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, category=tag())
        r = await api.get("/recommendations", params={"isbn": isbn[:12] + str((int(isbn[12]) + 1) % 10)})
        assert r.status == 400 and r.body["error"]["code"] == "invalid_field", r
        r = await api.get("/recommendations", params={"isbn": fresh_isbn()})
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found", r
        assert (await staff.delete(f"/books/{isbn}")).status == 204
        r = await api.get("/recommendations", params={"isbn": isbn})
        assert r.status == 404 and r.body["error"]["code"] == "book_not_found", r
        for who in (api, staff):  # without isbn: only for a signed-in customer
            r = await who.get("/recommendations")
            assert r.status == 400 and r.body["error"]["details"] == {"field": "isbn"}, r
        r = await api.get("/recommendations", params={"isbn": isbn}, token="not-a-token")
        assert r.status == 401, r


@pytest.mark.gen_test(timeout=120)
async def test_the_book_page_shows_the_same_list(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        a = await api.new_book(staff, stock=20, category=tag())
        b = await api.new_book(staff, stock=20, category=tag())
        same = await api.new_book(staff, category=(await api.get(f"/books/{a}")).body["category"])
        direct = api.as_(None)
        direct.base = shop.url("recommendations") + "/api/v1"
        before = int((await direct.get("/recommendations", params={"isbn": a})).headers["X-Orders-Seq"])
        await buy(await api.customer(), a, b)
        await becomes(api, a, [(b, "bought_together"), (same, "same_category")])
        page = (await api.get(f"/books/{a}")).body
        assert listed(page["recommendations"]) == [(b, "bought_together"), (same, "same_category")]
        # how far into the orders stream the answer's counts had got: what a cache needs to tell it is fresh
        after = int((await direct.get("/recommendations", params={"isbn": a})).headers["X-Orders-Seq"])
        assert after > before >= 0


# -- the store, against the real database ----------------------------------------------------------------------
async def fresh_repo(mongodb_uri):
    from bookshop.storage.mongo import Database
    from bookshop.storage.recommendations import CoPurchaseRepo
    db = Database(mongodb_uri, "recs_" + fresh_isbn()[-10:])
    repo = CoPurchaseRepo(db)
    await repo.create_indexes()
    return db, repo


async def rebuild_to(repo, state, model=None) -> None:
    """The store as a rebuild leaves it: ``model``'s counts (none by default) at ``state``."""
    from bookshop.services import recommendations as rec

    async def keep():
        return True
    assert await repo.replace_all("me", model if model is not None else rec.CoPurchases(), state, keep)


@pytest.mark.gen_test(timeout=60)
async def test_the_store_commits_a_batch_whole_and_once(mongodb_uri):
    from bookshop.services import recommendations as rec
    db, repo = await fresh_repo(mongodb_uri)
    try:
        a, b, c = fresh_isbn(), fresh_isbn(), fresh_isbn()
        assert await repo.state() == rec.StreamState()
        model = rec.CoPurchases(kept=None)
        model.learn(rec.OrderChange("u1", "000000000000000000000001", True, (a, b)))
        model.truncate()
        built = rec.StreamState(built=True, epoch=None, last_seq=7)
        await rebuild_to(repo, built, model)
        assert await repo.state() == built
        assert await repo.partners_of([a, b, c]) == {a: {b: [1, 0]}, b: {a: [1, 0]}}

        # a batch: u2 buys A+C, u1 cancels; two followers both continuing seq 7: one commit wins
        batch = rec.CoPurchases(await repo.holdings_of(["u1", "u2"]))
        deltas = batch.hold(rec.OrderChange("u2", "000000000000000000000002", True, (a, c)))
        deltas += batch.hold(rec.OrderChange("u1", "000000000000000000000001", False, None))
        batch.partners = await repo.partners_of(sorted({d.book for d in deltas}))
        batch.count(deltas)
        after = rec.StreamState(built=True, last_seq=9, last_event="f9")
        results = await asyncio.gather(repo.commit(built, after, batch), repo.commit(built, after, batch))
        assert sorted(results) == [False, True]
        assert await repo.state() == after
        assert await repo.partners_of([a, b, c]) == {a: {c: [1, 0]}, c: {a: [1, 0]}}
        assert await repo.holdings_of(["u1", "u2"]) == {"u2": {"000000000000000000000002": [a, c]}}
        assert await repo.held_books("u2") == [a, c] and await repo.held_books("u1") == []
        assert not await repo.commit(built, after, batch)  # a stale follower: nothing written
    finally:
        db.close()


# a follower process that commits one batch (u2 buys A+C, continuing seq 1) and stops dead in the middle of
# writing it, just before its first write to the partner lists: then it is killed
_DIES_MID_COMMIT = """
import asyncio, sys
from motor.motor_asyncio import AsyncIOMotorCollection
from bookshop.services import recommendations as rec
from bookshop.storage.mongo import Database
from bookshop.storage.recommendations import CoPurchaseRepo

async def main(uri, name, a, c):
    real = AsyncIOMotorCollection.bulk_write
    async def bulk_write(self, *args, **kwargs):
        if self.name == "partners":
            print("writing", flush=True)
            await asyncio.sleep(3600)
        return await real(self, *args, **kwargs)
    AsyncIOMotorCollection.bulk_write = bulk_write
    repo = CoPurchaseRepo(Database(uri, name))
    model = rec.CoPurchases(await repo.holdings_of(["u2"]))
    deltas = model.hold(rec.OrderChange("u2", "000000000000000000000002", True, (a, c)))
    model.partners = await repo.partners_of(sorted({d.book for d in deltas}))
    model.count(deltas)
    await repo.commit(await repo.state(), rec.StreamState(built=True, last_seq=2, last_event="f2"), model)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.gen_test(timeout=120)
async def test_a_follower_killed_in_the_middle_of_a_commit_holds_nothing_up(mongodb_uri):
    """Its successor goes on at once (no transaction left open, whose documents the server would keep locked
    for 60 s), and the batch it was writing counts once: whole, or not at all."""
    import signal
    import subprocess
    import sys

    from bookshop.services import recommendations as rec
    from harness import ROOT, spawn
    db, repo = await fresh_repo(mongodb_uri)
    try:
        a, b, c = sorted(fresh_isbn() for _ in range(3))
        model = rec.CoPurchases(kept=None)
        model.learn(rec.OrderChange("u1", "000000000000000000000001", True, (a, b)))
        model.truncate()

        await rebuild_to(repo, rec.StreamState(built=True, last_seq=1), model)
        child = spawn([sys.executable, "-c", _DIES_MID_COMMIT, mongodb_uri, db.db.name, a, c],
                      stdout=subprocess.PIPE, cwd=ROOT)
        try:
            line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
            assert line == b"writing\n", line
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            child.stdout.close()

        async def successor():
            state = await repo.state()
            await commit_batch(repo, state, rec.OrderChange("u3", "000000000000000000000003", True, (a, c)))
            return state
        state = await asyncio.wait_for(successor(), 15)  # the server would release the documents after 60 s
        assert state.last_seq in (1, 2)  # the killed one's batch: not committed at all, or committed whole
        together = 2 if state.last_seq == 2 else 1  # customers who bought A and C: u3, and u2 if committed
        assert await repo.partners_of([a, b, c]) == {a: {b: [1, 0], c: [together, 0]}, b: {a: [1, 0]},
                                                     c: {a: [together, 0]}}
        assert set(await repo.holdings_of(["u1", "u2", "u3"])) == ({"u1", "u2", "u3"} if state.last_seq == 2
                                                                   else {"u1", "u3"})
        assert (await repo.state()).last_seq == state.last_seq + 1
    finally:
        db.close()


async def commit_batch(repo, state, *changes, seq=None):
    """Commit the batch of ``changes`` after ``state`` (as a follower does); the state it reaches."""
    from bookshop.services import recommendations as rec
    model = rec.CoPurchases(await repo.holdings_of(sorted({c.user_id for c in changes})))
    deltas = [d for c in changes for d in model.hold(c)]
    model.partners = await repo.partners_of(sorted({d.book for d in deltas}))
    model.count(deltas)
    after = rec.StreamState(built=True, last_seq=seq or state.last_seq + 1, last_event=f"e{seq}")
    assert await repo.commit(state, after, model)
    return after, model


async def version(db) -> int:
    """The store's version: raised by every commit and every rebuild."""
    return (await db["meta"].find_one({"_id": "orders_stream"}))["version"]


@pytest.mark.gen_test(timeout=60)
async def test_a_late_write_of_an_earlier_batch_changes_nothing(mongodb_uri):
    """A follower that lost its lease without noticing may still be writing a batch it had committed: what
    later batches, or a rebuild, wrote stays. And documents written before they carried the version of their
    batch are written as any other."""
    from bookshop.services import recommendations as rec
    db, repo = await fresh_repo(mongodb_uri)
    try:
        a, b, c = sorted(fresh_isbn() for _ in range(3))
        model = rec.CoPurchases(kept=None)
        model.learn(rec.OrderChange("u1", "000000000000000000000001", True, (a, b)))

        await rebuild_to(repo, rec.StreamState(built=True, last_seq=1), model)
        for name in ("holdings", "partners"):  # as the code before stored them
            await db[name].update_many({}, {"$unset": {"v": ""}})
        state, second = await commit_batch(repo, await repo.state(),
                                           rec.OrderChange("u2", "000000000000000000000002", True, (a, c)))
        assert await repo.partners_of([a, b, c]) == {a: {b: [1, 0], c: [1, 0]}, b: {a: [1, 0]}, c: {a: [1, 0]}}
        late, late_version = repo._pending(second), await version(db)  # what its follower was writing
        state, _ = await commit_batch(repo, state, rec.OrderChange("u2", "000000000000000000000002", False, None),
                                      rec.OrderChange("u1", "000000000000000000000001", False, None))
        assert await repo.partners_of([a, b, c]) == {} and await repo.holdings_of(["u1", "u2"]) == {}
        await repo._finish(late, late_version)
        assert await repo.partners_of([a, b, c]) == {} and await repo.holdings_of(["u1", "u2"]) == {}
        assert await repo.state() == state

        # a rebuild (here: of a new history, whose seqs start again below the late batch's) and then the late
        # write: the rebuild's counts stay, and the next batch is written
        rebuilt = rec.CoPurchases(kept=None)
        rebuilt.learn(rec.OrderChange("u3", "000000000000000000000003", True, (b, c)))
        new_history = rec.StreamState(built=True, epoch="e2", last_seq=1)
        await rebuild_to(repo, new_history, rebuilt)
        await repo._finish(late, late_version)
        assert await repo.partners_of([a, b, c]) == {b: {c: [1, 0]}, c: {b: [1, 0]}}
        assert await repo.holdings_of(["u1", "u2", "u3"]) == {"u3": {"000000000000000000000003": [b, c]}}
        await commit_batch(repo, await repo.state(), rec.OrderChange("u4", "000000000000000000000004", True, (a, b)))
        assert await repo.partners_of([a]) == {a: {b: [1, 0]}}
    finally:
        db.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_batch_that_changes_no_count_only_moves_the_position(mongodb_uri):
    from bookshop.services import recommendations as rec
    db, repo = await fresh_repo(mongodb_uri)
    try:
        built = rec.StreamState(built=True, last_seq=4)
        await rebuild_to(repo, built)
        at = await version(db)
        after = rec.StreamState(built=True, last_seq=6, last_event="e6")
        assert await repo.commit(built, after, rec.CoPurchases())  # e.g. two orders placed, not yet confirmed
        assert await repo.state() == after and await version(db) == at
        assert not await repo.commit(built, after, rec.CoPurchases())  # a stale follower: nothing moves
        assert await repo.state() == after
    finally:
        db.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_batch_too_large_for_one_commit_writes_nothing(mongodb_uri, monkeypatch):
    from bookshop.services import recommendations as rec
    from bookshop.storage import recommendations as store
    db, repo = await fresh_repo(mongodb_uri)
    try:
        built = rec.StreamState(built=True, last_seq=1)
        await rebuild_to(repo, built)
        monkeypatch.setattr(store, "PENDING_BYTES", 200)
        model = rec.CoPurchases()
        for n in range(5):
            model.learn(rec.OrderChange(f"u{n}", f"00000000000000000000000{n}", True, (fresh_isbn(), fresh_isbn())))
        with pytest.raises(rec.BatchTooLarge):
            await repo.commit(built, rec.StreamState(built=True, last_seq=2), model)
        assert await repo.state() == built
        assert await repo.holdings_of([f"u{n}" for n in range(5)]) == {}
    finally:
        db.close()


@pytest.mark.gen_test(timeout=60)
async def test_one_follower_at_a_time_holds_the_lease(mongodb_uri):
    db, repo = await fresh_repo(mongodb_uri)
    try:
        assert await repo.take_lease("one", 30)
        assert not await repo.take_lease("two", 30)
        assert await repo.take_lease("one", 30)  # renewed
        await repo.release_lease("two")  # not its lease: nothing
        assert not await repo.take_lease("two", 30)
        await repo.release_lease("one")
        assert await repo.take_lease("two", 30)
        got = await asyncio.gather(*(repo.take_lease(f"racer{n}", 30) for n in range(8)))
        assert not any(got)  # "two" holds it
        await repo.release_lease("two")
        got = await asyncio.gather(*(repo.take_lease(f"racer{n}", 30) for n in range(8)))
        assert sum(got) == 1
    finally:
        db.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_confirmation_shows_on_a_cached_book_page(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        a = await api.new_book(staff, stock=20, category=tag())
        b = await api.new_book(staff, stock=20, category=tag())
        for _ in range(2):  # cached now
            assert (await api.get(f"/books/{a}")).body["recommendations"] == []
        await buy(await api.customer(), a, b)

        async def shown():
            page = (await api.get(f"/books/{a}")).body
            return page if listed(page["recommendations"]) == [(b, "bought_together")] else None
        await until(shown, LAG, done=found)


@pytest.mark.gen_test(timeout=180)
async def test_a_demo_shop_has_a_purchase_history_to_recommend_from(make_shop):
    import datetime

    from bookshop.services import demo_data
    shop = make_shop(env={"BOOKSHOP_DEMO_DATA": "1"})
    books = demo_data.demo_books()
    category = {b["isbn"]: b["category"] for b in books}
    pattern = demo_data.demo_patterns(books)[0]
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)

        async def learned():
            got = await recs(api, pattern[0])
            return got if [r for _, r in got[:2]] == ["bought_together"] * 2 else None
        got = await until(learned, 60, done=found)
        assert {i for i, _ in got[:2]} == set(pattern[1:])
        assert len({category[i] for i in pattern}) == 3

        # made up: confirmed before today, never charged, and the stock is the demo stock
        staff = await api.staff()
        page = (await staff.get("/orders", params={"limit": "100"})).body["items"]
        assert page and all(o["status"] == "CONFIRMED" for o in page)
        today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        assert all(o["created_at"] < today for o in page)
        assert (await staff.get(f"/orders/{page[0]['id']}/payments")).body == []
        levels = demo_data.demo_stock_levels(books)
        for isbn in pattern:
            r = await api.get(f"/inventory/{isbn}")
            assert r.body["on_hand"] == levels[isbn] and r.body["reserved"] == 0, r
