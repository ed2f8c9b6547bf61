"""Reservations on the real level documents and archive (the embedded server, no HTTP): no oversell under
concurrency while the relay moves decided holds out, late duplicates, put-back after the sale left its
document, expiry through the ``expires`` index, and data written by the earlier code (reservation headers,
old-shape holds) converted at start-up."""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import random
import uuid

import pytest
from harness import until

from bookshop.services.inventory import Reservations, ReservationState as S
from bookshop.storage.inventory import LegacyReservationRepo, LevelRepo
from bookshop.storage.mongo import Database
from bookshop.storage.outbox import EventLog, Relay, utcnow

A, B, C, D = "9780306406157", "9780804429573", "9791090636071", "9780000000002"
TTL = 60


class Clock:
    def __init__(self):
        self.offset = datetime.timedelta()

    def __call__(self):
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += datetime.timedelta(seconds=seconds)


@contextlib.asynccontextmanager
async def fresh_store(mongodb_uri, leftover_seconds: float = 0):
    """A database of its own: (db, levels, reservations, relay, clock). By default, what the relay numbered
    leaves its document at its next pass."""
    name = "reservations_" + uuid.uuid4().hex[:10]
    db = Database(mongodb_uri, name)
    try:
        log = EventLog(db)
        await log.create_indexes()
        levels = LevelRepo(db, log, leftover_seconds=leftover_seconds)
        await levels.create_indexes()
        clock = Clock()
        yield db, levels, Reservations(levels, levels.archive, TTL, clock), Relay(log), clock
    finally:
        await db.client.drop_database(name)
        db.close()


async def levels_of(levels: LevelRepo, isbn: str) -> tuple[int, int, int]:
    doc = await levels.levels.find_one({"_id": isbn})
    assert doc["available"] == doc["on_hand"] - doc["reserved"] >= 0, doc
    held = sum(h["qty"] for h in doc.get("holds", []) if h.get("state", "held") == "held")
    assert doc["reserved"] == held, doc
    return doc["on_hand"], doc["reserved"], doc["available"]


async def drain(relay: Relay) -> None:
    while await relay.run_once():
        pass


@pytest.mark.gen_test(timeout=120)
async def test_hundreds_of_concurrent_reservations_never_oversell_while_the_relay_moves_holds_out(mongodb_uri):
    async with fresh_store(mongodb_uri) as store:
        db, levels, res, relay, _ = store
        await levels.restock(A, 40)
        await levels.restock(B, 25)
        stop = asyncio.Event()
        relaying = asyncio.ensure_future(relay.run(stop))
        try:
            oids = [f"o{i}" for i in range(300)]
            baskets = {o: [(A, 1), (B, 1)] if i % 3 == 0 else [(A, 1)] for i, o in enumerate(oids)}
            outs = await asyncio.gather(*(res.reserve(o, baskets[o]) for o in oids),
                                        *(res.reserve(o, baskets[o]) for o in random.sample(oids, 50)))  # duplicates
            state = {}
            for o, out in zip(oids + [None] * 50, outs):
                if o is not None:
                    state[o] = out["state"]
            held = [o for o in oids if state[o] == "held"]
            assert len(held) == 40
            assert await levels_of(levels, A) == (40, 40, 0)
            held_b = sum(1 for o in held if len(baskets[o]) == 2)
            assert held_b <= 25 and await levels_of(levels, B) == (25, held_b, 25 - held_b)
            sold, kept = held[::2], held[1::2]
            outs = await asyncio.gather(*(res.commit(o) for o in sold), *(res.commit(o) for o in sold[:10]),
                                        *(res.release(o) for o in kept), *(res.commit(o) for o in kept[:5]))
            assert {o["state"] for o in outs[:len(sold) + 10]} == {"committed"}
            assert {o["state"] for o in outs[len(sold) + 10:]} <= {"released", "committed"}
            await drain(relay)
            sold_now = [o for o in held if (await res.look(o)).state is S.COMMITTED]
            on_hand_a = 40 - len(sold_now)
            assert await levels_of(levels, A) == (on_hand_a, 0, on_hand_a)
            # decided holds leave the document with the relay's passes (the running relay's own pass may be
            # the one that moves them, after drain's pass found nothing left to do)

            async def no_holds():
                await drain(relay)
                return (await levels.levels.find_one({"_id": A}))["holds"] == []
            await until(no_holds, timeout=30)
            for o in sold_now:  # answered from the archive, sold once
                assert (await res.commit(o))["state"] == "committed"
            assert await levels_of(levels, A) == (on_hand_a, 0, on_hand_a)
        finally:
            stop.set()
            await relaying


@pytest.mark.gen_test(timeout=60)
async def test_a_late_duplicate_of_a_sold_reservation_is_dropped_and_never_sold(mongodb_uri):
    async with fresh_store(mongodb_uri) as store:
        db, levels, res, relay, _ = store
        await levels.restock(A, 5)
        await levels.restock(B, 5)
        assert (await res.reserve("o1", [(A, 1), (B, 2)]))["state"] == "held"
        assert (await res.commit("o1"))["state"] == "committed"
        await drain(relay)
        out = await res.reserve("o1", [(A, 1), (B, 2)])  # a retry that arrived after the sale left the documents
        assert out["state"] == "committed"
        assert await levels_of(levels, A) == (4, 0, 4) and await levels_of(levels, B) == (3, 0, 3)
        # a late hold whose maker died before its check: dropped by the next look, never sold
        assert (await levels.hold(A, "o1", 1, 2, utcnow()))[0] == "held"
        assert (await res.commit("o1"))["state"] == "committed"
        assert await levels_of(levels, A) == (4, 0, 4)


@pytest.mark.gen_test(timeout=60)
async def test_put_back_after_the_sale_left_its_document_returns_the_stock_once(mongodb_uri):
    async with fresh_store(mongodb_uri) as store:
        db, levels, res, relay, _ = store
        await levels.restock(A, 5)
        await levels.restock(B, 2)
        await res.reserve("o1", [(A, 2), (B, 1)])
        await res.commit("o1")
        await drain(relay)
        outs = await asyncio.gather(*(res.put_back("o1") for _ in range(8)))
        assert {o["state"] for o in outs} == {"returned"}
        assert await levels_of(levels, A) == (5, 0, 5) and await levels_of(levels, B) == (2, 0, 2)
        await drain(relay)
        assert (await res.put_back("o1"))["state"] == "returned"
        assert (await res.release("o1"))["state"] == "returned"
        assert await levels_of(levels, A) == (5, 0, 5)


@pytest.mark.gen_test(timeout=60)
async def test_holds_expire_through_the_index_and_a_sale_never_does(mongodb_uri):
    async with fresh_store(mongodb_uri) as store:
        db, levels, res, relay, clock = store
        await levels.restock(A, 10)
        await levels.restock(B, 10)
        await res.reserve("old", [(A, 3), (B, 1)])
        await res.reserve("sold", [(A, 1)])
        await res.commit("sold")
        assert await res.sweep() == 0
        clock.advance(TTL + 1)
        assert await res.sweep() == 1
        assert await levels_of(levels, A) == (9, 0, 9) and await levels_of(levels, B) == (10, 0, 10)
        assert (await levels.levels.find_one({"_id": A}))["expires"] is None
        assert (await res.commit("old"))["state"] == "expired"
        assert (await res.look("sold")).state is S.COMMITTED
        plan = await levels.levels.find({"expires": {"$lt": utcnow()}}).explain()
        assert "IXSCAN" in str(plan)


# -- data written by the earlier code -------------------------------------------------------------------------
def header(order_id, items, state, **fields):
    return {"_id": order_id, "items": [{"isbn": i, "quantity": q} for i, q in items], "state": state,
            "created_at": utcnow(), **fields}


def level(isbn, on_hand, holds):
    reserved = sum(q for _, q in holds)
    return {"_id": isbn, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved,
            "holds": [{"order": o, "qty": q} for o, q in holds], "pending": []}


async def write_old_shape(db) -> None:
    """What the earlier code left in a data directory, shape for shape: headers in every state (some busy:
    their worker died mid-way) and the level documents' old holds."""
    soon = utcnow() + datetime.timedelta(seconds=TTL)
    await db["levels"].insert_many([
        # A: 'held' holds 2, 'commit-half' still holds 1 (its other ISBN was sold already),
        #    'release-half' holds 1, 'reserving' holds 1, an orphan holds 1
        level(A, 20, [("held", 2), ("commit-half", 1), ("release-half", 1), ("reserving", 1), ("orphan", 1)]),
        # B: 'held' holds 1; 'commit-half' was sold here (on_hand already lowered)
        level(B, 9, [("held", 1)]),
        level(C, 7, []),
    ])
    lock = utcnow() - datetime.timedelta(seconds=30)
    await db["reservations"].insert_many([
        header("held", [(A, 2), (B, 1)], "held", expires_at=soon),
        header("commit-half", [(A, 1), (B, 1)], "committed", busy=True, lock_until=lock, expires_at=soon),
        header("release-half", [(A, 1), (C, 1)], "released", busy=True, lock_until=lock, expires_at=soon),
        header("reserving", [(A, 1), (C, 2)], "reserving", busy=True, lock_until=lock),
        header("sold", [(C, 2)], "committed", expires_at=soon),
        header("returned", [(C, 1)], "returned", expires_at=soon),
        header("expired", [(B, 1)], "expired", expires_at=soon),
        header("rejected", [(C, 9)], "rejected", short=[{"isbn": C, "requested": 9, "available": 7}]),
    ])


@pytest.mark.gen_test(timeout=60)
async def test_headers_and_holds_of_the_earlier_code_are_finished_or_converted_at_start_up(mongodb_uri):
    async with fresh_store(mongodb_uri) as store:
        db, levels, res, relay, _ = store
        await write_old_shape(db)
        assert await res.convert_legacy(LegacyReservationRepo(db)) == 8
        assert await db["reservations"].count_documents({}) == 0
        assert await res.convert_legacy(LegacyReservationRepo(db)) == 0  # a second start finds nothing to do
        # A: held 2 kept; commit-half sold (-1); release-half, reserving, orphan given back
        assert await levels_of(levels, A) == (19, 2, 17)
        assert await levels_of(levels, B) == (9, 1, 8)
        assert await levels_of(levels, C) == (7, 0, 7)
        expect = {"held": "held", "commit-half": "committed", "release-half": "released", "reserving": "rejected",
                  "sold": "committed", "returned": "returned", "expired": "expired", "rejected": "rejected"}
        assert {o: (await res.look(o)).state.value for o in expect} == expect
        assert (await res.look("held")).view()["expires_at"]
        # and they go on as if they had been made by this code
        assert (await res.commit("held"))["state"] == "committed"
        assert await levels_of(levels, A) == (17, 0, 17) and await levels_of(levels, B) == (8, 0, 8)
        assert (await res.put_back("sold"))["state"] == "returned"
        assert (await res.put_back("sold"))["state"] == "returned"
        assert await levels_of(levels, C) == (9, 0, 9)
        assert (await res.release("commit-half"))["state"] == "committed"
        assert (await res.put_back("commit-half"))["state"] == "returned"
        assert await levels_of(levels, A) == (18, 0, 18) and await levels_of(levels, B) == (9, 0, 9)
        await drain(relay)
        assert (await res.commit("release-half"))["state"] == "released"
        assert (await res.reserve("rejected", [(C, 9)]))["state"] == "rejected"  # a replay: the first answer
        assert await levels_of(levels, C) == (9, 0, 9)


@pytest.mark.gen_test(timeout=60)
async def test_what_the_relay_numbered_leaves_its_document_with_the_next_write_not_a_write_of_its_own(mongodb_uri):
    async with fresh_store(mongodb_uri, leftover_seconds=1.0) as store:
        db, levels, res, relay, _ = store
        log = relay.log
        await levels.restock(A, 100)
        stop = asyncio.Event()
        relaying = asyncio.ensure_future(relay.run(stop))
        try:
            async def numbered(seq):
                loop = asyncio.get_running_loop()
                until = loop.time() + 10
                while log.last_seen < seq:
                    assert loop.time() < until, f"seq {seq} not numbered"
                    await log.wait(log.last_seen, 0.5)

            async def level_updates():
                return (await db.client.admin.command("top"))["totals"][f"{db.name}.levels"]["update"]["count"]

            await numbered(1)
            before = await level_updates()
            for i in range(10):  # one order after the other on one book: each write finds the last one's event
                await res.reserve(f"o{i}", [(A, 1)])
                await numbered(2 + 2 * i)
                await res.commit(f"o{i}", [A])
                await numbered(3 + 2 * i)
            assert await level_updates() - before == 20  # the holds and commits, nothing of the relay's
            loop = asyncio.get_running_loop()
            until = loop.time() + 10
            while (doc := await levels.levels.find_one({"_id": A}))["pending"] or doc["holds"]:
                assert loop.time() < until, "the leftovers were not pulled"  # the last ones: pulled after 1 s
                await asyncio.sleep(0.1)
            assert await level_updates() - before == 21
            on_hand = [e["data"]["on_hand"] for e in await log.read(0, 100)]  # every event once, in order
            assert on_hand == [100] + [100 - j // 2 for j in range(1, 21)]
            assert {(await res.look(f"o{i}", [A])).state for i in range(10)} == {S.COMMITTED}
        finally:
            stop.set()
            await relaying
