"""The ``Reservations`` service against small in-memory repositories (pure asyncio, no database).

The fakes keep the contract of ``bookshop.storage.inventory``: every change of one ISBN is one atomic
check-and-set (no ``await`` between the check and the write, like the single-document update), and every call
yields to the event loop first so concurrent callers really interleave. ``FakeLevels.relay_pass`` does what the
relay does to decided entries: moves them to the archive (``returned`` ones only after the fence).
"""
from __future__ import annotations

import asyncio
import copy
import datetime
import itertools

import pytest

from bookshop.services.errors import InvalidInput, Unavailable
from bookshop.services.inventory import (NotFoundError, Reservation, Reservations, ReservationState as S,
                                         Line, levels_view)

A, B, C = "9780306406157", "9780804429573", "9791090636071"
TTL = 60
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
FENCE = datetime.timedelta(hours=24)
_ids = itertools.count(1)

DELTAS = {  # the levels' change of a move, per unit of the entry's qty
    (S.HELD, S.COMMITTED): {"on_hand": -1, "reserved": -1},
    (S.COMMITTED, S.RETURNED): {"on_hand": 1, "available": 1},
    **{(S.HELD, to): {"reserved": -1, "available": 1} for to in (S.RELEASED, S.EXPIRED, S.REJECTED, S.RETURNED)},
}


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


class FakeArchive:
    def __init__(self):
        self.lines: dict[str, dict] = {}

    async def add(self, lines):
        await asyncio.sleep(0)
        for line in lines:
            self.lines.setdefault(line["_id"], copy.deepcopy(line))

    async def of_order(self, order_id):
        await asyncio.sleep(0)
        return [copy.deepcopy(v) for k, v in self.lines.items() if k.startswith(order_id + "|")]

    @staticmethod
    def line(isbn, entry):
        return {"_id": f"{entry['order']}|{isbn}|{entry['id']}", "isbn": isbn, "order": entry["order"],
                "qty": entry["qty"], "state": entry["state"], "n": entry.get("n", 1), "until": entry.get("until"),
                "short": entry.get("short"), "at": entry.get("at")}


class FakeLevels:
    """LevelRepo in memory, on the test's clock. ``gates[isbn]`` (an asyncio.Event) stalls a hold of that
    ISBN until set."""

    def __init__(self, stock: dict[str, int], clock: Clock, archive: FakeArchive):
        self.docs = {isbn: {"_id": isbn, "on_hand": n, "reserved": 0, "available": n, "holds": []}
                     for isbn, n in stock.items()}
        self.clock = clock
        self.archive = archive
        self.gates: dict[str, asyncio.Event] = {}
        self.writes = 0
        self.scans = 0  # entries() without the ISBNs: every level document read

    async def _turn(self):
        await asyncio.sleep(0)

    def _entry(self, isbn, order_id):
        doc = self.docs.get(isbn)
        return next((h for h in doc["holds"] if h["order"] == order_id), None) if doc else None

    async def get_many(self, isbns):
        await self._turn()
        return {i: {k: v for k, v in self.docs[i].items() if k != "holds"} for i in isbns if i in self.docs}

    async def hold(self, isbn, order_id, qty, n, until):
        await self._turn()
        if isbn in self.gates:
            await self.gates[isbn].wait()
        doc = self.docs.get(isbn)
        existing = self._entry(isbn, order_id)
        if existing is not None:
            return "already", copy.deepcopy(existing)
        if doc is None or doc["available"] < qty:
            return "short", None
        entry = {"order": order_id, "qty": qty, "state": "held", "n": n, "until": until}
        doc["reserved"] += qty
        doc["available"] -= qty
        doc["holds"].append(entry)
        self.writes += 1
        return "held", copy.deepcopy(entry)

    async def entry(self, isbn, order_id):
        await self._turn()
        return copy.deepcopy(self._entry(isbn, order_id))

    async def entries(self, order_id, isbns=None):
        await self._turn()
        self.scans += isbns is None
        return {isbn: copy.deepcopy(e) for isbn in (self.docs if isbns is None else isbns)
                if (e := self._entry(isbn, order_id)) is not None}

    def _apply(self, doc, qty, delta):
        for field, sign in delta.items():
            doc[field] += sign * qty

    async def move(self, isbn, order_id, frm, to, *, until_before=None, **extra):
        await self._turn()
        entry = self._entry(isbn, order_id)
        expired = until_before is None or entry is not None and entry["until"] < until_before
        if entry is None or entry["state"] != frm.value or not expired:
            return False
        self._apply(self.docs[isbn], entry["qty"], DELTAS[(frm, to)])
        entry.update(state=to.value, id=next(_ids), at=self.clock(), **extra)
        self.writes += 1
        return True

    async def drop(self, isbn, order_id):
        await self._turn()
        entry = self._entry(isbn, order_id)
        if entry is None or entry["state"] != "held":
            return False
        self._apply(self.docs[isbn], entry["qty"], {"reserved": -1, "available": 1})
        self.docs[isbn]["holds"].remove(entry)
        self.writes += 1
        return True

    async def put_back_archived(self, isbn, order_id, qty, n):
        await self._turn()
        if self._entry(isbn, order_id) is not None:
            return False
        doc = self.docs[isbn]
        doc["on_hand"] += qty
        doc["available"] += qty
        doc["holds"].append({"order": order_id, "qty": qty, "state": "returned", "id": next(_ids), "n": n,
                             "at": self.clock()})
        self.writes += 1
        return True

    async def expired(self, now, limit=200):
        await self._turn()
        return [(isbn, copy.deepcopy(h)) for isbn, doc in self.docs.items() for h in doc["holds"]
                if h["state"] == "held" and h["until"] < now]

    async def relay_pass(self):
        """What the relay does with decided entries: archive them, then take them out of the documents."""
        movable = {s.value for s in S.moved_out_at_once()}
        lines, moved = [], []
        for isbn, doc in self.docs.items():
            for h in doc["holds"]:
                if h["state"] in movable or (h["state"] == "returned" and h["at"] < self.clock() - FENCE):
                    lines.append(self.archive.line(isbn, h))
                    moved.append((doc, h))
        await self.archive.add(lines)
        for doc, h in moved:
            doc["holds"].remove(h)

    def levels(self, isbn) -> tuple[int, int, int]:
        doc = self.docs[isbn]
        assert doc["available"] == doc["on_hand"] - doc["reserved"] >= 0
        assert doc["reserved"] == sum(h["qty"] for h in doc["holds"] if h["state"] == "held")
        return doc["on_hand"], doc["reserved"], doc["available"]


def make(stock: dict[str, int], ttl: float = TTL):
    clock = Clock()
    archive = FakeArchive()
    levels = FakeLevels(stock, clock, archive)
    return Reservations(levels, archive, ttl, clock), levels, clock


async def half_made(levels, order_id, items, held):
    """What a reserver that died after holding ``held`` of ``items`` leaves behind."""
    for isbn, qty in held:
        assert (await levels.hold(isbn, order_id, qty, len(items), T0 + datetime.timedelta(seconds=TTL)))[0] == "held"


# -- reserving --------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_reserve_holds_every_item_until_the_ttl():
    res, levels, clock = make({A: 5, B: 3})
    out = await res.reserve("o1", [(B, 1), (A, 2), (B, 1)])
    assert out["state"] == "held"
    assert out["items"] == [{"isbn": A, "quantity": 2}, {"isbn": B, "quantity": 2}]
    assert out["expires_at"] == (T0 + datetime.timedelta(seconds=TTL)).isoformat(timespec="seconds")
    assert "short" not in out
    assert levels.levels(A) == (5, 2, 3)
    assert levels.levels(B) == (3, 2, 1)
    assert (await res.look("o1")).view() == out


@pytest.mark.gen_test
async def test_a_one_book_reservation_is_one_write():
    res, levels, _ = make({A: 5})
    assert (await res.reserve("o1", [(A, 1)]))["state"] == "held"
    assert levels.writes == 1
    assert (await res.commit("o1"))["state"] == "committed"
    assert levels.writes == 2


@pytest.mark.gen_test
async def test_all_or_nothing_one_short_item_reserves_nothing_and_is_reported():
    res, levels, _ = make({A: 5, B: 1, C: 4})
    out = await res.reserve("o1", [(A, 2), (B, 2), (C, 1)])
    assert out["state"] == "rejected"
    assert out["short"] == [{"isbn": B, "requested": 2, "available": 1}]
    assert "expires_at" not in out
    assert levels.levels(A) == (5, 0, 5)  # held first, then given back
    assert levels.levels(B) == (1, 0, 1)
    assert levels.levels(C) == (4, 0, 4)
    again = await res.reserve("o1", [(A, 2), (B, 2), (C, 1)])
    assert again["state"] == "rejected" and again["short"] == out["short"]


@pytest.mark.gen_test
async def test_every_short_item_is_reported_including_unknown_ones():
    res, levels, _ = make({A: 0, B: 10})
    out = await res.reserve("o1", [(C, 1), (A, 3), (B, 1)])
    assert out["state"] == "rejected"
    assert out["short"] == [{"isbn": A, "requested": 3, "available": 0},
                            {"isbn": C, "requested": 1, "available": 0}]
    assert levels.levels(B) == (10, 0, 10)


@pytest.mark.gen_test
async def test_bad_lines_are_refused_before_anything_is_written():
    res, levels, _ = make({A: 5})
    with pytest.raises(InvalidInput):
        await res.reserve("o1", [])
    assert levels.writes == 0


@pytest.mark.gen_test
async def test_concurrent_orders_never_hold_more_than_there_is():
    res, levels, _ = make({A: 50, B: 30})
    outs = await asyncio.gather(*(res.reserve(f"o{i}", [(A, 1), (B, 1)] if i % 2 else [(A, 1)])
                                  for i in range(200)))
    held = [o for o in outs if o["state"] == "held"]
    assert len(held) == 50
    assert levels.levels(A) == (50, 50, 0)
    held_b = sum(1 for o in held if len(o["items"]) == 2)
    assert levels.levels(B) == (30, held_b, 30 - held_b)
    assert all(o["state"] == "rejected" and o["short"] for o in outs if o["state"] != "held")


# -- idempotency ------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_the_same_reservation_sent_again_is_answered_from_its_holds():
    res, levels, _ = make({A: 5})
    first = await res.reserve("o1", [(A, 2)])
    again = await res.reserve("o1", [(A, 2)])
    assert again == first
    assert levels.levels(A) == (5, 2, 3)
    # a replay with another quantity is still the first reservation's answer
    assert (await res.reserve("o1", [(A, 5)]))["items"] == [{"isbn": A, "quantity": 2}]
    assert levels.levels(A) == (5, 2, 3)


@pytest.mark.gen_test
async def test_concurrent_duplicates_reserve_once_and_all_get_the_outcome():
    res, levels, _ = make({A: 5, B: 5})
    outs = await asyncio.gather(*(res.reserve("o1", [(A, 2), (B, 1)]) for _ in range(10)))
    assert {o["state"] for o in outs} == {"held"}
    assert len({o["expires_at"] for o in outs}) == 1
    assert levels.levels(A) == (5, 2, 3)
    assert levels.levels(B) == (5, 1, 4)


@pytest.mark.gen_test
async def test_concurrent_duplicates_of_a_rejected_reservation_hold_nothing():
    res, levels, _ = make({A: 5, B: 0})
    outs = await asyncio.gather(*(res.reserve("o1", [(A, 2), (B, 1)]) for _ in range(10)))
    assert {o["state"] for o in outs} == {"rejected"}
    assert levels.levels(A) == (5, 0, 5)


# -- commit, release, put back ----------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_commit_sells_the_held_units_once():
    res, levels, _ = make({A: 5, B: 2})
    await res.reserve("o1", [(A, 2), (B, 2)])
    outs = await asyncio.gather(*(res.commit("o1") for _ in range(5)))
    assert {o["state"] for o in outs} == {"committed"}
    assert levels.levels(A) == (3, 0, 3)
    assert levels.levels(B) == (0, 0, 0)
    assert (await res.commit("o1"))["state"] == "committed"
    await levels.relay_pass()  # the sale's entries leave the level documents: still answered, still once
    assert levels.docs[A]["holds"] == []
    assert (await res.commit("o1"))["state"] == "committed"
    assert levels.levels(A) == (3, 0, 3)


@pytest.mark.gen_test
async def test_release_gives_the_units_back_once_and_a_released_one_cannot_be_committed():
    res, levels, _ = make({A: 5})
    await res.reserve("o1", [(A, 4)])
    outs = await asyncio.gather(*(res.release("o1") for _ in range(5)))
    assert {o["state"] for o in outs} == {"released"}
    assert levels.levels(A) == (5, 0, 5)
    assert (await res.commit("o1"))["state"] == "released"
    await levels.relay_pass()
    assert (await res.commit("o1"))["state"] == "released"
    assert levels.levels(A) == (5, 0, 5)


@pytest.mark.gen_test
async def test_a_rejected_reservation_can_be_released_and_changes_nothing():
    res, levels, _ = make({A: 5, B: 1})
    await res.reserve("o1", [(A, 1), (B, 2)])
    assert (await res.release("o1"))["state"] == "released"
    assert levels.levels(A) == (5, 0, 5) and levels.levels(B) == (1, 0, 1)


@pytest.mark.gen_test
async def test_a_reservation_that_held_nothing_leaves_nothing_to_release():
    res, levels, _ = make({A: 1})
    assert (await res.reserve("o1", [(A, 2)]))["state"] == "rejected"
    with pytest.raises(NotFoundError):  # the orders service reads this 404 as "nothing to give back"
        await res.release("o1")
    assert levels.levels(A) == (1, 0, 1) and levels.writes == 0


@pytest.mark.gen_test
async def test_release_after_commit_keeps_the_sale():
    res, levels, _ = make({A: 5})
    await res.reserve("o1", [(A, 2)])
    await res.commit("o1")
    assert (await res.release("o1"))["state"] == "committed"
    assert levels.levels(A) == (3, 0, 3)


@pytest.mark.parametrize("relayed", [False, True])
@pytest.mark.gen_test
async def test_put_back_after_commit_returns_the_stock_once(relayed):
    res, levels, clock = make({A: 5, B: 1})
    await res.reserve("o1", [(A, 2), (B, 1)])
    await res.commit("o1")
    if relayed:
        await levels.relay_pass()  # the sale is only in the archive now
    outs = await asyncio.gather(*(res.put_back("o1") for _ in range(5)))
    assert {o["state"] for o in outs} == {"returned"}
    assert levels.levels(A) == (5, 0, 5)
    assert levels.levels(B) == (1, 0, 1)
    await levels.relay_pass()  # returned entries stay in the documents (the fence) ...
    assert (await res.put_back("o1"))["state"] == "returned"
    clock.advance(FENCE.total_seconds() + 1)
    await levels.relay_pass()  # ... until the fence is over: then the archive answers
    assert levels.docs[A]["holds"] == []
    assert (await res.put_back("o1"))["state"] == "returned"
    assert (await res.commit("o1"))["state"] == "returned"
    assert levels.levels(A) == (5, 0, 5)


@pytest.mark.gen_test
async def test_put_back_of_a_held_reservation_changes_nothing():
    res, levels, _ = make({A: 5})
    await res.reserve("o1", [(A, 2)])
    assert (await res.put_back("o1"))["state"] == "held"
    assert levels.levels(A) == (5, 2, 3)


@pytest.mark.gen_test
async def test_unknown_orders_are_not_found():
    res, _, _ = make({A: 5})
    for action in (res.commit, res.release, res.put_back):
        with pytest.raises(NotFoundError):
            await action("nope")
    assert await res.look("nope") is None


@pytest.mark.gen_test
async def test_a_caller_that_names_the_isbns_spares_the_look_through_every_level_document():
    res, levels, _ = make({A: 5, B: 5, C: 5})
    await res.reserve("o1", [(A, 1), (B, 1)])
    assert levels.scans == 0
    assert (await res.commit("o1", [A, B]))["state"] == "committed"
    assert levels.scans == 0
    await levels.relay_pass()
    assert (await res.put_back("o1"))["state"] == "returned"  # no ISBNs: the archive says where
    assert levels.scans == 0
    with pytest.raises(NotFoundError):
        await res.release("nope", [C])  # nothing there, and nothing elsewhere since these are its ISBNs
    assert levels.scans == 0
    with pytest.raises(NotFoundError):
        await res.release("nope")
    assert levels.scans == 1
    # ISBNs that are not all of the order's: found out (fewer entries than it has ISBNs), then looked for
    await res.reserve("o2", [(A, 1), (C, 1)])
    assert (await res.commit("o2", [A]))["state"] == "committed"
    assert levels.levels(A) == (4, 0, 4) and levels.levels(C) == (4, 0, 4)


# -- expiry -----------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_sweep_expires_held_reservations_past_their_ttl_only():
    res, levels, clock = make({A: 10})
    await res.reserve("old", [(A, 3)])
    clock.advance(TTL / 2)
    await res.reserve("young", [(A, 2)])
    await res.reserve("sold", [(A, 1)])
    await res.commit("sold")
    assert await res.sweep() == 0
    clock.advance(TTL / 2 + 1)
    assert await res.sweep() == 1
    assert (await res.look("old")).state is S.EXPIRED
    assert levels.levels(A) == (9, 2, 7)
    assert (await res.commit("old"))["state"] == "expired"  # too late: the order must not get the stock
    assert (await res.release("old"))["state"] == "expired"
    assert levels.levels(A) == (9, 2, 7)
    clock.advance(TTL)
    assert await res.sweep() == 1
    assert levels.levels(A) == (9, 0, 9)
    assert await res.sweep() == 0
    assert (await res.look("sold")).state is S.COMMITTED  # a sale never expires


@pytest.mark.gen_test
async def test_concurrent_sweeps_and_commit_race_for_one_expiring_reservation():
    res, levels, clock = make({A: 10, B: 10})
    await res.reserve("o1", [(A, 4), (B, 1)])
    clock.advance(TTL + 1)
    outs = await asyncio.gather(res.sweep(), res.sweep(), res.commit("o1"), res.sweep())
    state = (await res.look("o1")).state.value
    assert state in ("expired", "committed")
    assert outs[2]["state"] == state
    assert sum(outs[i] for i in (0, 1, 3)) == (state == "expired")
    assert levels.levels(A) == ((10, 0, 10) if state == "expired" else (6, 0, 6))
    assert levels.levels(B) == ((10, 0, 10) if state == "expired" else (9, 0, 9))  # never half and half


# -- a maker that died half-way, late duplicates ------------------------------------------------------------
@pytest.mark.gen_test
async def test_a_duplicate_finishes_a_reservation_whose_maker_died_half_way():
    res, levels, _ = make({A: 5, B: 5})
    await half_made(levels, "o1", [(A, 2), (B, 3)], held=[(A, 2)])
    assert (await res.look("o1")).state is S.RESERVING
    out = await res.reserve("o1", [(A, 2), (B, 3)])
    assert out["state"] == "held"
    assert levels.levels(A) == (5, 2, 3)  # held once, not twice
    assert levels.levels(B) == (5, 3, 2)


@pytest.mark.gen_test
async def test_a_commit_of_a_reservation_still_being_made_waits_then_is_unavailable():
    res, levels, _ = make({A: 5, B: 5})
    res.WAIT_FOR_RESERVING = 0.2
    await half_made(levels, "o1", [(A, 1), (B, 1)], held=[(A, 1)])
    with pytest.raises(Unavailable):
        await res.commit("o1")
    assert levels.levels(A) == (5, 1, 4)


@pytest.mark.gen_test
async def test_release_and_expiry_give_back_what_a_half_made_reservation_holds():
    res, levels, clock = make({A: 5, B: 5, C: 5})
    await half_made(levels, "gone", [(A, 2), (B, 3)], held=[(A, 2)])
    await half_made(levels, "given-up", [(B, 1), (C, 1)], held=[(B, 1)])
    assert (await res.release("given-up"))["state"] == "released"
    assert levels.levels(B) == (5, 0, 5)
    assert await res.sweep() == 0
    clock.advance(TTL + 1)
    assert await res.sweep() == 1
    assert levels.levels(A) == (5, 0, 5)
    assert (await res.look("gone")).state is S.EXPIRED


@pytest.mark.gen_test
async def test_a_commit_that_died_after_the_first_isbn_is_finished_by_the_next_look():
    res, levels, clock = make({A: 5, B: 5})
    await res.reserve("o1", [(A, 2), (B, 3)])
    assert await levels.move(A, "o1", S.HELD, S.COMMITTED)  # ... and the committer died here
    assert (await res.commit("o1"))["state"] == "committed"  # the caller's retry
    assert levels.levels(A) == (3, 0, 3)
    assert levels.levels(B) == (2, 0, 2)
    assert (await res.release("o1"))["state"] == "committed"
    assert levels.levels(B) == (2, 0, 2)


@pytest.mark.gen_test
async def test_the_sweeper_finishes_a_half_done_commit_instead_of_expiring_it():
    res, levels, clock = make({A: 5, B: 5})
    await res.reserve("o1", [(A, 2), (B, 3)])
    assert await levels.move(A, "o1", S.HELD, S.COMMITTED)
    await levels.relay_pass()  # the primary's sale even left its document
    clock.advance(TTL + 1)
    assert await res.sweep() == 0
    assert levels.levels(B) == (2, 0, 2)  # sold, not given back
    assert (await res.look("o1")).state is S.COMMITTED


@pytest.mark.gen_test
async def test_a_release_racing_a_reservation_being_made_leaves_nothing_held():
    res, levels, _ = make({A: 5, B: 5})
    levels.gates[B] = asyncio.Event()
    maker = asyncio.ensure_future(res.reserve("o1", [(A, 1), (B, 1)]))
    while levels.levels(A) != (5, 1, 4):
        await asyncio.sleep(0)
    assert (await res.release("o1"))["state"] == "released"  # the orders service gave up waiting
    levels.gates.pop(B).set()
    assert (await maker)["state"] == "released"
    assert levels.levels(A) == (5, 0, 5)
    assert levels.levels(B) == (5, 0, 5)


@pytest.mark.gen_test
async def test_a_slow_maker_overtaken_by_a_duplicate_agrees_with_it():
    res, levels, _ = make({A: 5, B: 5})
    levels.gates[B] = asyncio.Event()
    maker = asyncio.ensure_future(res.reserve("o1", [(A, 1), (B, 1)]))
    while levels.levels(A) != (5, 1, 4):
        await asyncio.sleep(0)
    duplicate = asyncio.ensure_future(res.reserve("o1", [(A, 1), (B, 1)]))
    await asyncio.sleep(0.01)
    levels.gates.pop(B).set()
    outs = await asyncio.gather(maker, duplicate)
    assert [o["state"] for o in outs] == ["held", "held"]
    assert levels.levels(A) == (5, 1, 4) and levels.levels(B) == (5, 1, 4)
    assert (await res.commit("o1"))["state"] == "committed"
    assert levels.levels(A) == (4, 0, 4) and levels.levels(B) == (4, 0, 4)


@pytest.mark.gen_test
async def test_a_late_duplicate_of_a_sold_reservation_is_dropped_never_sold_again():
    res, levels, _ = make({A: 5, B: 5})
    await res.reserve("o1", [(A, 1), (B, 1)])
    await res.commit("o1")
    await levels.relay_pass()
    out = await res.reserve("o1", [(A, 1), (B, 1)])  # a retry that arrived after everything else
    assert out["state"] == "committed"
    assert levels.levels(A) == (4, 0, 4) and levels.levels(B) == (4, 0, 4)
    # one that died before it could check leaves a hold behind: the next look drops it, nobody sells it
    await half_made(levels, "o1", [(A, 1)], held=[(A, 1)])
    assert (await res.commit("o1"))["state"] == "committed"
    assert levels.levels(A) == (4, 0, 4)


@pytest.mark.gen_test
async def test_a_late_hold_of_a_sold_reservation_expires_and_is_never_sold():
    res, levels, clock = make({A: 5})
    await res.reserve("o1", [(A, 1)])
    await res.commit("o1")
    await levels.relay_pass()
    await half_made(levels, "o1", [(A, 1)], held=[(A, 1)])
    clock.advance(TTL + 1)
    assert await res.sweep() == 0
    assert levels.levels(A) == (4, 0, 4)


def test_views_carry_no_internals():
    until = T0 + datetime.timedelta(seconds=TTL)
    held = Reservation("o1", {A: Line(S.HELD, 1, 1, until)})
    assert held.view() == {"order_id": "o1", "state": "held", "items": [{"isbn": A, "quantity": 1}],
                           "expires_at": until.isoformat(timespec="seconds")}
    rejected = Reservation("o1", {A: Line(S.REJECTED, 2, 2, until, short=[{"isbn": B}]), B: Line(S.REJECTED, 1, 2)})
    assert rejected.view() == {"order_id": "o1", "state": "rejected", "short": [{"isbn": B}],
                               "items": [{"isbn": A, "quantity": 2}, {"isbn": B, "quantity": 1}]}
    assert Reservation("o1", {A: Line(S.HELD, 1, 2, until)}).state is S.RESERVING
    assert levels_view(A, None)["available"] == 0
