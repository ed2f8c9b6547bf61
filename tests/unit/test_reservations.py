"""The ``Reservations`` service against small in-memory repositories (pure asyncio, no database).

The fakes keep the contract of ``bookshop.storage.inventory``: every level change is one atomic check-and-set
(no ``await`` between the check and the write, like the single-document update), and every call yields to the
event loop first so concurrent callers really interleave.
"""
from __future__ import annotations

import asyncio
import copy
import datetime

import pytest

from bookshop.services.errors import InvalidInput, Unavailable
from bookshop.services.inventory import NotFoundError, Reservations, ReservationState as S, levels_view

A, B, C = "9780306406157", "9780804429573", "9791090636071"
TTL = 60
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


class FakeLevels:
    """LevelRepo in memory. ``gates[isbn]`` (an asyncio.Event) stalls a hold of that ISBN until set."""

    def __init__(self, stock: dict[str, int]):
        self.docs = {isbn: {"_id": isbn, "on_hand": n, "reserved": 0, "available": n, "holds": []}
                     for isbn, n in stock.items()}
        self.gates: dict[str, asyncio.Event] = {}
        self.calls = 0

    async def _turn(self):
        self.calls += 1
        await asyncio.sleep(0)

    async def get(self, isbn):
        await self._turn()
        doc = self.docs.get(isbn)
        return None if doc is None else {k: v for k, v in doc.items() if k != "holds"}

    async def hold(self, isbn, order_id, qty):
        await self._turn()
        if isbn in self.gates:
            await self.gates[isbn].wait()
        doc = self.docs.get(isbn)
        if doc is not None and doc["available"] >= qty and all(h["order"] != order_id for h in doc["holds"]):
            doc["reserved"] += qty
            doc["available"] -= qty
            doc["holds"].append({"order": order_id, "qty": qty})
            return "held"
        if doc is not None and any(h["order"] == order_id for h in doc["holds"]):
            return "already"
        return "short"

    async def unhold(self, isbn, order_id, qty, sold):
        await self._turn()
        doc = self.docs.get(isbn)
        if doc is None or {"order": order_id, "qty": qty} not in doc["holds"]:
            return False
        if sold:
            doc["on_hand"] -= qty
        else:
            doc["available"] += qty
        doc["reserved"] -= qty
        doc["holds"] = [h for h in doc["holds"] if h["order"] != order_id]
        return True

    async def put_back(self, isbn, qty, session):
        await self._turn()
        doc = self.docs[isbn]
        doc["on_hand"] += qty
        doc["available"] += qty

    def levels(self, isbn) -> tuple[int, int, int]:
        doc = self.docs[isbn]
        assert doc["available"] == doc["on_hand"] - doc["reserved"] >= 0
        assert doc["reserved"] == sum(h["qty"] for h in doc["holds"])
        return doc["on_hand"], doc["reserved"], doc["available"]


class FakeHeaders:
    """ReservationRepo in memory, on the test's clock."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.docs: dict[str, dict] = {}

    async def get(self, order_id):
        await asyncio.sleep(0)
        doc = self.docs.get(order_id)
        return copy.deepcopy(doc) if doc is not None else None

    async def begin(self, order_id, items, lock_seconds):
        await asyncio.sleep(0)
        if order_id in self.docs:
            return None
        doc = {"_id": order_id, "items": [{"isbn": i, "quantity": q} for i, q in items],
               "state": S.RESERVING.value, "created_at": self.clock(), "busy": True,
               "lock_until": self.clock() + datetime.timedelta(seconds=lock_seconds)}
        self.docs[order_id] = doc
        return copy.deepcopy(doc)

    async def take_over(self, order_id, lock_seconds):
        await asyncio.sleep(0)
        doc = self.docs.get(order_id)
        if doc is None or not doc.get("busy") or not doc["lock_until"] < self.clock():
            return None
        doc["lock_until"] = self.clock() + datetime.timedelta(seconds=lock_seconds)
        return copy.deepcopy(doc)

    async def move(self, order_id, from_states, to, *, busy, lock_seconds=0, session=None, **fields):
        await asyncio.sleep(0)
        doc = self.docs.get(order_id)
        if doc is None or doc["state"] not in [s.value for s in from_states]:
            return None
        doc.update(state=to.value, **fields)
        if busy:
            doc.update(busy=True, lock_until=self.clock() + datetime.timedelta(seconds=lock_seconds))
        else:
            doc.pop("busy", None)
            doc.pop("lock_until", None)
        return copy.deepcopy(doc)

    async def done(self, order_id, state):
        await asyncio.sleep(0)
        doc = self.docs.get(order_id)
        if doc is not None and doc["state"] == state.value:
            doc.pop("busy", None)
            doc.pop("lock_until", None)

    async def expired(self, now, limit=100):
        await asyncio.sleep(0)
        return [copy.deepcopy(d) for d in self.docs.values()
                if d["state"] == S.HELD.value and d["expires_at"] < now][:limit]

    async def stale(self, before, limit=100):
        await asyncio.sleep(0)
        return [copy.deepcopy(d) for d in self.docs.values() if d.get("busy") and d["lock_until"] < before][:limit]


async def no_transaction(work):
    return await work(None)


def make(stock: dict[str, int], ttl: float = TTL):
    clock = Clock()
    levels, headers = FakeLevels(stock), FakeHeaders(clock)
    return Reservations(levels, headers, ttl, no_transaction, clock), levels, headers, clock


# -- reserving --------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_reserve_holds_every_item_until_the_ttl():
    res, levels, headers, clock = make({A: 5, B: 3})
    out = await res.reserve("o1", [(B, 1), (A, 2), (B, 1)])
    assert out["state"] == "held"
    assert out["items"] == [{"isbn": A, "quantity": 2}, {"isbn": B, "quantity": 2}]
    assert out["expires_at"] == (T0 + datetime.timedelta(seconds=TTL)).isoformat(timespec="seconds")
    assert "short" not in out
    assert levels.levels(A) == (5, 2, 3)
    assert levels.levels(B) == (3, 2, 1)
    assert not headers.docs["o1"].get("busy")


@pytest.mark.gen_test
async def test_all_or_nothing_one_short_item_reserves_nothing_and_is_reported():
    res, levels, _, _ = make({A: 5, B: 1, C: 4})
    out = await res.reserve("o1", [(A, 2), (B, 2), (C, 1)])
    assert out["state"] == "rejected"
    assert out["short"] == [{"isbn": B, "requested": 2, "available": 1}]
    assert "expires_at" not in out
    assert levels.levels(A) == (5, 0, 5)  # held first, then given back
    assert levels.levels(B) == (1, 0, 1)
    assert levels.levels(C) == (4, 0, 4)


@pytest.mark.gen_test
async def test_every_short_item_is_reported_including_unknown_ones():
    res, levels, _, _ = make({A: 0, B: 10})
    out = await res.reserve("o1", [(C, 1), (A, 3), (B, 1)])
    assert out["state"] == "rejected"
    assert out["short"] == [{"isbn": A, "requested": 3, "available": 0},
                            {"isbn": C, "requested": 1, "available": 0}]
    assert levels.levels(B) == (10, 0, 10)


@pytest.mark.gen_test
async def test_bad_lines_are_refused_before_anything_is_written():
    res, _, headers, _ = make({A: 5})
    with pytest.raises(InvalidInput):
        await res.reserve("o1", [])
    assert headers.docs == {}


@pytest.mark.gen_test
async def test_concurrent_orders_never_hold_more_than_there_is():
    res, levels, _, _ = make({A: 50, B: 30})
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
async def test_the_same_reservation_sent_again_is_answered_from_its_header():
    res, levels, _, _ = make({A: 5})
    first = await res.reserve("o1", [(A, 2)])
    again = await res.reserve("o1", [(A, 2)])
    assert again == first
    assert levels.levels(A) == (5, 2, 3)
    # a replay with other items is still the first reservation's answer
    assert (await res.reserve("o1", [(A, 5)]))["items"] == [{"isbn": A, "quantity": 2}]
    assert levels.levels(A) == (5, 2, 3)


@pytest.mark.gen_test
async def test_concurrent_duplicates_reserve_once_and_all_get_the_outcome():
    res, levels, _, _ = make({A: 5, B: 5})
    outs = await asyncio.gather(*(res.reserve("o1", [(A, 2), (B, 1)]) for _ in range(10)))
    assert {o["state"] for o in outs} == {"held"}
    assert len({o["expires_at"] for o in outs}) == 1
    assert levels.levels(A) == (5, 2, 3)
    assert levels.levels(B) == (5, 1, 4)


@pytest.mark.gen_test
async def test_concurrent_duplicates_of_a_rejected_reservation_hold_nothing():
    res, levels, _, _ = make({A: 5, B: 0})
    outs = await asyncio.gather(*(res.reserve("o1", [(A, 2), (B, 1)]) for _ in range(10)))
    assert {o["state"] for o in outs} == {"rejected"}
    assert levels.levels(A) == (5, 0, 5)


# -- commit, release, put back ----------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_commit_sells_the_held_units_once():
    res, levels, _, _ = make({A: 5, B: 2})
    await res.reserve("o1", [(A, 2), (B, 2)])
    outs = await asyncio.gather(*(res.commit("o1") for _ in range(5)))
    assert {o["state"] for o in outs} == {"committed"}
    assert levels.levels(A) == (3, 0, 3)
    assert levels.levels(B) == (0, 0, 0)
    assert (await res.commit("o1"))["state"] == "committed"
    assert levels.levels(A) == (3, 0, 3)


@pytest.mark.gen_test
async def test_release_gives_the_units_back_once_and_a_released_one_cannot_be_committed():
    res, levels, _, _ = make({A: 5})
    await res.reserve("o1", [(A, 4)])
    outs = await asyncio.gather(*(res.release("o1") for _ in range(5)))
    assert {o["state"] for o in outs} == {"released"}
    assert levels.levels(A) == (5, 0, 5)
    assert (await res.commit("o1"))["state"] == "released"
    assert levels.levels(A) == (5, 0, 5)


@pytest.mark.gen_test
async def test_a_rejected_reservation_can_be_released_and_changes_nothing():
    res, levels, _, _ = make({A: 1})
    await res.reserve("o1", [(A, 2)])
    assert (await res.release("o1"))["state"] == "released"
    assert levels.levels(A) == (1, 0, 1)


@pytest.mark.gen_test
async def test_release_after_commit_keeps_the_sale():
    res, levels, _, _ = make({A: 5})
    await res.reserve("o1", [(A, 2)])
    await res.commit("o1")
    assert (await res.release("o1"))["state"] == "committed"
    assert levels.levels(A) == (3, 0, 3)


@pytest.mark.gen_test
async def test_put_back_after_commit_returns_the_stock_once():
    res, levels, _, _ = make({A: 5, B: 1})
    await res.reserve("o1", [(A, 2), (B, 1)])
    await res.commit("o1")
    outs = await asyncio.gather(*(res.put_back("o1") for _ in range(5)))
    assert {o["state"] for o in outs} == {"returned"}
    assert levels.levels(A) == (5, 0, 5)
    assert levels.levels(B) == (1, 0, 1)
    assert (await res.put_back("o1"))["state"] == "returned"
    assert levels.levels(A) == (5, 0, 5)


@pytest.mark.gen_test
async def test_put_back_of_a_held_reservation_changes_nothing():
    res, levels, _, _ = make({A: 5})
    await res.reserve("o1", [(A, 2)])
    assert (await res.put_back("o1"))["state"] == "held"
    assert levels.levels(A) == (5, 2, 3)


@pytest.mark.gen_test
async def test_unknown_orders_are_not_found():
    res, _, _, _ = make({A: 5})
    for action in (res.commit, res.release, res.put_back):
        with pytest.raises(NotFoundError):
            await action("nope")


# -- expiry -----------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_sweep_expires_held_reservations_past_their_ttl_only():
    res, levels, headers, clock = make({A: 10})
    await res.reserve("old", [(A, 3)])
    clock.advance(TTL / 2)
    await res.reserve("young", [(A, 2)])
    await res.reserve("sold", [(A, 1)])
    await res.commit("sold")
    assert await res.sweep() == 0
    clock.advance(TTL / 2 + 1)
    assert await res.sweep() == 1
    assert headers.docs["old"]["state"] == "expired" and not headers.docs["old"].get("busy")
    assert levels.levels(A) == (9, 2, 7)
    assert (await res.commit("old"))["state"] == "expired"  # too late: the order must not get the stock
    assert (await res.release("old"))["state"] == "expired"
    assert levels.levels(A) == (9, 2, 7)
    clock.advance(TTL)
    assert await res.sweep() == 1
    assert levels.levels(A) == (9, 0, 9)
    assert await res.sweep() == 0


@pytest.mark.gen_test
async def test_concurrent_sweeps_and_commit_race_for_one_expiring_reservation():
    res, levels, headers, clock = make({A: 10})
    await res.reserve("o1", [(A, 4)])
    clock.advance(TTL + 1)
    outs = await asyncio.gather(res.sweep(), res.sweep(), res.commit("o1"), res.sweep())
    state = headers.docs["o1"]["state"]
    assert state in ("expired", "committed")
    assert outs[2]["state"] == state
    assert sum(outs[i] for i in (0, 1, 3)) == (state == "expired")
    assert levels.levels(A) == ((10, 0, 10) if state == "expired" else (6, 0, 6))


# -- a worker that died mid-way ---------------------------------------------------------------------------
async def _dead_reserver(res, levels, order_id, items, held):
    """What a worker that died after holding ``held`` leaves behind: a busy RESERVING header and some holds."""
    await res.headers.begin(order_id, items, res.LOCK_SECONDS)
    for isbn, qty in held:
        assert await levels.hold(isbn, order_id, qty) == "held"


@pytest.mark.gen_test
async def test_a_duplicate_takes_over_a_dead_reservers_work_once_its_lock_expired():
    res, levels, headers, clock = make({A: 5, B: 5})
    await _dead_reserver(res, levels, "o1", [(A, 2), (B, 3)], held=[(A, 2)])
    clock.advance(res.LOCK_SECONDS + 1)
    out = await res.reserve("o1", [(A, 2), (B, 3)])
    assert out["state"] == "held"
    assert levels.levels(A) == (5, 2, 3)  # held once, not twice
    assert levels.levels(B) == (5, 3, 2)
    assert not headers.docs["o1"].get("busy")


@pytest.mark.gen_test
async def test_sweep_gives_back_what_an_abandoned_reservation_held():
    res, levels, headers, clock = make({A: 5, B: 5})
    await _dead_reserver(res, levels, "o1", [(A, 2), (B, 3)], held=[(A, 2)])
    assert await res.sweep() == 0  # the lock is still valid: its worker may be alive
    clock.advance(2 * res.LOCK_SECONDS + 1)
    assert await res.sweep() == 1
    doc = headers.docs["o1"]
    assert doc["state"] == "rejected" and doc["reason"] == "abandoned" and not doc.get("busy")
    assert levels.levels(A) == (5, 0, 5)
    assert levels.levels(B) == (5, 0, 5)
    assert (await res.reserve("o1", [(A, 2), (B, 3)]))["state"] == "rejected"


@pytest.mark.gen_test
async def test_sweep_finishes_a_commit_whose_worker_died_half_way():
    res, levels, headers, clock = make({A: 5, B: 5})
    await res.reserve("o1", [(A, 2), (B, 3)])
    # the committer moved the header and sold A, then died before B and before ``done``
    await headers.move("o1", [S.HELD], S.COMMITTED, busy=True, lock_seconds=res.LOCK_SECONDS)
    await levels.unhold(A, "o1", 2, sold=True)
    clock.advance(2 * res.LOCK_SECONDS + 1)
    assert await res.sweep() == 1
    assert levels.levels(A) == (3, 0, 3)
    assert levels.levels(B) == (2, 0, 2)
    assert not headers.docs["o1"].get("busy")
    assert (await res.commit("o1"))["state"] == "committed"
    assert levels.levels(B) == (2, 0, 2)


@pytest.mark.gen_test
async def test_a_commit_call_finishes_a_dead_release_before_answering():
    res, levels, headers, clock = make({A: 5})
    await res.reserve("o1", [(A, 2)])
    await headers.move("o1", [S.HELD], S.RELEASED, busy=True, lock_seconds=res.LOCK_SECONDS)
    clock.advance(res.LOCK_SECONDS + 1)
    assert (await res.commit("o1"))["state"] == "released"
    assert levels.levels(A) == (5, 0, 5)
    assert not headers.docs["o1"].get("busy")


@pytest.mark.gen_test
async def test_a_slow_worker_taken_over_by_the_sweep_leaves_nothing_held():
    """The worker stalls past its lock between two items; the sweep gives back what it held and rejects
    the reservation; when the worker wakes up it must neither crash nor leave its late hold behind."""
    res, levels, headers, clock = make({A: 5, B: 5})
    levels.gates[B] = asyncio.Event()
    worker = asyncio.ensure_future(res.reserve("o1", [(A, 1), (B, 1)]))
    while levels.levels(A) != (5, 1, 4):
        await asyncio.sleep(0)
    clock.advance(2 * res.LOCK_SECONDS + 1)
    assert await res.sweep() == 1
    assert headers.docs["o1"]["state"] == "rejected"
    levels.gates.pop(B).set()
    out = await worker
    assert out["state"] == "rejected"
    assert levels.levels(A) == (5, 0, 5)
    assert levels.levels(B) == (5, 0, 5)


@pytest.mark.gen_test
async def test_a_slow_worker_overtaken_by_a_duplicate_agrees_with_it():
    res, levels, headers, clock = make({A: 5, B: 5})
    levels.gates[B] = asyncio.Event()
    worker = asyncio.ensure_future(res.reserve("o1", [(A, 1), (B, 1)]))
    while levels.levels(A) != (5, 1, 4):
        await asyncio.sleep(0)
    clock.advance(res.LOCK_SECONDS + 1)
    duplicate = asyncio.ensure_future(res.reserve("o1", [(A, 1), (B, 1)]))
    while headers.docs["o1"]["lock_until"] < clock():  # the duplicate took the lock over
        await asyncio.sleep(0.01)
    levels.gates.pop(B).set()
    outs = await asyncio.gather(worker, duplicate)
    assert [o["state"] for o in outs] == ["held", "held"]
    assert levels.levels(A) == (5, 1, 4)
    assert levels.levels(B) == (5, 1, 4)
    assert (await res.commit("o1"))["state"] == "committed"
    assert levels.levels(A) == (4, 0, 4) and levels.levels(B) == (4, 0, 4)


@pytest.mark.gen_test
async def test_a_busy_header_with_a_live_lock_is_waited_for_then_reported_unavailable():
    res, levels, _, _ = make({A: 5})
    await _dead_reserver(res, levels, "o1", [(A, 1)], held=[])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable):
        await res._outcome("o1", wait=0.2)
    assert 0.2 <= loop.time() - started < 2


def test_views_carry_no_internals():
    doc = {"_id": "o1", "state": "held", "items": [{"isbn": A, "quantity": 1}], "busy": True,
           "lock_until": T0, "expires_at": T0, "short": []}
    assert Reservations.view(doc) == {"order_id": "o1", "state": "held", "items": [{"isbn": A, "quantity": 1}],
                                      "expires_at": T0.isoformat(timespec="seconds")}
    assert levels_view(A, None)["available"] == 0
