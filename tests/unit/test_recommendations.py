"""Co-purchase counts, their bounded lists, the lists made from them, and following the orders stream
(with an in-memory store, purchases pages and stream)."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools

import pytest
from fakes import FakeCoPurchases as FakeStore  # its contract with the real store: test_repository_contracts.py
from harness import until

from bookshop.services import errors
from bookshop.services import recommendations as rec
from bookshop.services.recommendations import CoPurchases, Learner, NeedsRebuild, OrderChange, StreamState

A, B, C, D, E = (f"97800000000{i:02d}" for i in range(5))
_ids = itertools.count(1)


def oid() -> str:
    return f"{next(_ids):024x}"


def event(seq: int, user: str, order: str, status: str, isbns=(), kind="order.status_changed", lines=True):
    data = {"id": order, "user_id": user, "status": status, "total_cents": 100, "currency": "EUR", "items": 1}
    if lines:
        data["lines"] = [{"isbn": i, "quantity": 2} for i in isbns]
    return {"type": "event", "seq": seq, "event": kind, "data": data, "at": f"2025-01-01T00:00:{seq % 60:02d}.000Z",
            "user_id": user}


def live(user, order, *isbns):
    return OrderChange(user, order, True, tuple(isbns))


def cancelled(user, order):
    return OrderChange(user, order, False, None)


def partners_of(model: CoPurchases, isbn: str) -> dict[str, int]:
    return {k: c - e for k, (c, e) in model.partners.get(isbn, {}).items()}


# -- events ------------------------------------------------------------------------------------------------
def test_an_event_says_which_order_of_whom_becomes_live_or_not():
    assert rec.order_change(event(1, "u1", "o1", "CONFIRMED", [B, A, A])) == OrderChange("u1", "o1", True, (A, B))
    assert rec.order_change(event(1, "u1", "o1", "SHIPPED", [A])).live
    assert rec.order_change(event(1, "u1", "o1", "CANCELLED", [A])) == OrderChange("u1", "o1", False, (A,))
    assert rec.order_change(event(1, "u1", "o1", "CONFIRMED", lines=False)).isbns is None


@pytest.mark.parametrize("bad", [
    {"event": "order.created", "data": {"id": "o1", "user_id": "u1", "status": "PENDING", "lines": []}},
    {"event": "book.created", "data": {"id": "o1", "user_id": "u1", "status": "CONFIRMED"}},
    {"event": "order.status_changed", "data": "nope"},
    {"event": "order.status_changed", "data": {"id": "o.1", "user_id": "u1", "status": "CONFIRMED"}},
    {"event": "order.status_changed", "data": {"id": "o1", "user_id": "$where", "status": "CONFIRMED"}},
    {"event": "order.status_changed", "data": {"id": "o1", "user_id": "u1", "status": "LOST"}},
])
def test_events_that_change_nothing_or_are_not_shaped_as_expected_are_ignored(bad):
    assert rec.order_change(bad) is None


def test_lines_that_are_not_isbn_13_are_left_out():
    e = event(1, "u1", "o1", "CONFIRMED", [A])
    e["data"]["lines"] += [{"isbn": "12"}, {"isbn": {"$gt": ""}}, "x", {"isbn": "978000000000x"}]
    assert rec.order_change(e).isbns == (A,)


# -- counts --------------------------------------------------------------------------------------------------
def test_pairs_count_distinct_customers_who_bought_both():
    model = CoPurchases()
    for n in range(5):
        model.learn(live(f"ab{n}", oid(), A, B))
    for n in range(3):
        model.learn(live(f"ac{n}", oid(), A))
        model.learn(live(f"ac{n}", oid(), C))  # in another order: still bought both
    assert partners_of(model, A) == {B: 5, C: 3}
    assert partners_of(model, B) == {A: 5}
    assert partners_of(model, C) == {A: 3}
    assert rec.ranked_partners([model.partners[A]], {A}) == [B, C]


def test_a_customer_counts_once_however_many_orders_hold_the_books():
    model = CoPurchases()
    first, second = oid(), oid()
    model.learn(live("u", first, A, B))
    model.learn(live("u", second, A, B, C))
    assert partners_of(model, A) == {B: 1, C: 1}
    model.learn(cancelled("u", first))  # the second still holds A and B
    assert partners_of(model, A) == {B: 1, C: 1}
    model.learn(cancelled("u", second))  # nothing holds anything
    assert model.partners[A] == {} and model.holdings == {}


def test_a_cancel_removes_only_the_pairs_of_books_no_live_order_holds_any_more():
    model = CoPurchases()
    keep, drop = oid(), oid()
    model.learn(live("u", keep, A))
    model.learn(live("u", drop, B, C))
    assert partners_of(model, A) == {B: 1, C: 1}
    model.learn(cancelled("u", drop))
    assert partners_of(model, A) == {} and partners_of(model, B) == {} and partners_of(model, C) == {}
    assert model.held("u") == [A]


def test_repeats_shipping_and_unknown_cancels_change_nothing():
    model = CoPurchases()
    order = oid()
    for change in (live("u", order, A, B), live("u", order, A, B), OrderChange("u", order, True, (A, B))):
        model.learn(change)
    model.learn(cancelled("u", oid()))  # an order never counted (cancelled while pending)
    model.learn(cancelled("other", oid()))
    assert partners_of(model, A) == {B: 1}
    assert set(model.holdings) == {"u"}
    model.learn(cancelled("u", order))
    model.learn(cancelled("u", order))
    assert partners_of(model, A) == {}


def test_a_live_event_without_lines_counts_nothing_but_its_cancel_is_understood():
    model = CoPurchases()
    order = oid()
    model.learn(OrderChange("u", order, True, None))
    assert model.holdings == {} and not model.dirty_customers


def test_a_customer_counts_with_a_bounded_history(monkeypatch):
    monkeypatch.setattr(rec, "MAX_ORDERS_PER_CUSTOMER", 20)
    monkeypatch.setattr(rec, "MAX_BOOKS_PER_CUSTOMER", 30)
    model = CoPurchases(kept=5)
    for n in range(25):
        model.learn(live("reseller", oid(), f"979{n:010d}"))
    assert len(model.holdings["reseller"]) == 20
    assert all(len(p) <= 5 for p in model.partners.values())
    model.learn(live("collector", oid(), *(f"979{n:010d}" for n in range(31))))  # too many books at once
    assert "collector" not in model.holdings
    first = sorted(model.holdings["reseller"])[0]
    model.learn(cancelled("reseller", first))
    model.learn(live("reseller", oid(), A))  # room again
    assert A in model.held("reseller")


def test_a_full_list_keeps_its_strongest_partners_with_honest_bounds():
    partners: rec.Partners = {}
    for isbn, times in ((A, 5), (B, 3), (C, 1)):
        for _ in range(times):
            rec.bump(partners, isbn, kept=3)
    rec.bump(partners, D, kept=3)  # full: D takes C's place, C's count as its error
    assert partners == {A: [5, 0], B: [3, 0], D: [2, 1]}
    rec.unbump(partners, D)  # nobody is known to hold both any more
    assert D not in partners
    rec.unbump(partners, B)
    assert partners[B] == [2, 0]
    rec.unbump(partners, E)  # unknown: nothing
    assert set(partners) == {A, B}


def test_ties_between_the_smallest_entries_evict_the_one_ranked_last():
    partners: rec.Partners = {C: [1, 0], B: [1, 0]}
    rec.bump(partners, A, kept=2)
    assert set(partners) == {B, A}


def test_a_rebuild_counts_exactly_then_bounds_every_list():
    model = CoPurchases(kept=None)
    for n in range(rec.PARTNERS_KEPT + 10):
        model.learn(live(f"u{n}", oid(), A, f"979{n:010d}"))
    model.learn(live("v", oid(), A, B))
    model.learn(live("w", oid(), A, B))
    assert len(model.partners[A]) == rec.PARTNERS_KEPT + 11
    model.truncate()
    assert len(model.partners[A]) == rec.PARTNERS_KEPT
    assert rec.ranked_partners([model.partners[A]], {A})[0] == B


def test_personal_scores_are_summed_over_the_caller_s_books_and_never_name_them():
    lists = [{B: [2, 0], C: [1, 0], D: [4, 3]}, {C: [3, 0], A: [9, 0]}]
    assert rec.ranked_partners(lists, {A}) == [C, B, D]
    assert rec.ranked_partners([{C: [1, 0], B: [1, 0]}], set()) == [B, C]  # ties by ISBN


def test_held_books_come_most_recent_order_first():
    assert rec.held_books({"0001": [A, B], "0003": [C], "0002": [B, D]}) == [C, B, D, A]


def test_categories_where_most_of_the_caller_s_books_are_come_first():
    books = [{"category": "sf"}, {"category": "art"}, {"category": "sf"}, {"category": "cooking"}]
    assert rec.ranked_categories(books) == ["sf", "art", "cooking"]


# -- resuming ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state, hello, rebuild", [
    (StreamState(), {"seq": 0, "oldest": 0}, True),
    (StreamState(True, None, 10), {"seq": 10, "oldest": 3}, False),
    (StreamState(True, None, 10), {"seq": 15, "oldest": 11}, False),
    (StreamState(True, None, 10), {"seq": 15, "oldest": 12}, True),   # 11 is gone
    (StreamState(True, None, 10), {"seq": 15, "oldest": 0}, True),    # all gone
    (StreamState(True, None, 10), {"seq": 10, "oldest": 0}, False),   # gone, but nothing was missed
    (StreamState(True, None, 10), {"seq": 4, "oldest": 1}, True),     # behind us: another history
    (StreamState(True, None, 10), {"seq": 12, "oldest": 1, "epoch": "e1"}, True),  # the first epoch
    (StreamState(True, "e1", 10), {"seq": 12, "oldest": 1, "epoch": "e1"}, False),
    (StreamState(True, "e1", 10), {"seq": 12, "oldest": 1, "epoch": "e2"}, True),
])
def test_when_the_stream_cannot_continue_what_was_applied_the_counts_are_rebuilt(state, hello, rebuild):
    assert (rec.rebuild_reason(state, hello) is not None) is rebuild


# -- the learner, against fakes ----------------------------------------------------------------------------------
class FakeOrders:
    """The orders service: its live orders (for the purchases pages) and its event stream."""

    def __init__(self, page_size=2):
        self.orders: dict[str, dict] = {}
        self.events: list[dict] = []
        self.epoch = None
        self.oldest = 1
        self.page_size = page_size
        self.connections: list[int | None] = []
        self.hold = asyncio.Event()  # set: the stream stays open after its events
        self.pages = 0

    def place(self, user, *isbns, status="CONFIRMED") -> str:
        order = oid()
        self.orders[order] = {"id": order, "user_id": user, "status": status,
                              "lines": [{"isbn": i, "quantity": 1} for i in isbns]}
        self.events.append(event(len(self.events) + 1, user, order, status, isbns))
        return order

    def change(self, order, status):
        o = self.orders[order]
        o["status"] = status
        self.events.append(event(len(self.events) + 1, o["user_id"], order, status, [i["isbn"] for i in o["lines"]]))

    async def purchases(self, after, limit):
        self.pages += 1
        live = sorted((o for o in self.orders.values() if o["status"] in rec.LIVE), key=lambda o: o["id"])
        rest = [o for o in live if after is None or o["id"] > after][:self.page_size]
        more = len([o for o in live if after is None or o["id"] > after]) > self.page_size
        return copy.deepcopy(rest), (rest[-1]["id"] if more else None)

    async def follow(self, after, epoch, sink):
        self.connections.append(after)
        head = len(self.events)
        hello = {"type": "hello", "seq": head, "oldest": self.oldest if self.events else 0}
        if self.epoch is not None:
            hello["epoch"] = self.epoch
        await sink(hello)
        start = head if after is None else after
        for e in self.events[start:]:
            if e["seq"] >= self.oldest:
                await sink(copy.deepcopy(e))
        if self.hold.is_set():
            await asyncio.Event().wait()


def learner(store, orders, **kw):
    return Learner(store, orders.purchases, orders.follow, owner="me", batch=kw.pop("batch", 3), **kw)


async def settle(learner_, stop, store, seq, connections: list | None = None, until=lambda: True):
    """Run the learner until the store is at ``seq`` and knows that event (and, with ``connections``, it
    has connected; and ``until()``)."""
    task = asyncio.ensure_future(learner_.run(stop))
    try:
        for _ in range(500):
            if store.stream.built and store.stream.last_seq >= seq and (connections is None or connections) \
                    and (seq == 0 or store.stream.last_event is not None) and until():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not at seq {seq}: {store.stream}")
    finally:
        stop.set()
        await task


def shop_history(orders: FakeOrders) -> dict[str, str]:
    made = {}
    for n in range(5):
        made[f"ab{n}"] = orders.place(f"ab{n}", A, B)
    for n in range(3):
        made[f"ac{n}"] = orders.place(f"ac{n}", A, C)
    return made


@pytest.mark.gen_test
async def test_a_first_start_rebuilds_from_the_purchases_then_follows_the_stream():
    store, orders = FakeStore(), FakeOrders()
    made = shop_history(orders)
    orders.place("pending", A, D, status="PENDING")
    await settle(learner(store, orders), asyncio.Event(), store, len(orders.events))
    assert store.counts(A) == {B: 5, C: 3}
    assert orders.connections[0] is None and orders.pages == 4
    orders.change(made["ab0"], "CANCELLED")
    orders.place("ad", A, D)
    await settle(learner(store, orders), asyncio.Event(), store, len(orders.events))
    assert store.counts(A) == {B: 4, C: 3, D: 1}
    # resumed just before the rebuild's point (to learn what that event is), then the same to apply the new
    assert orders.connections[1:3] == [8, 8]
    orders.connections = []
    await settle(learner(store, orders), asyncio.Event(), store, len(orders.events), orders.connections)
    assert orders.connections == [10]


@pytest.mark.gen_test
async def test_events_are_applied_once_whatever_the_restarts_and_the_batches():
    reference = CoPurchases()
    orders = FakeOrders()
    made = shop_history(orders)
    orders.change(made["ab1"], "SHIPPED")
    orders.change(made["ac2"], "CANCELLED")
    for e in orders.events:
        change = rec.order_change(e)
        if change:
            reference.learn(change)
    store = FakeStore()
    store.stream = StreamState(built=True)  # an empty shop that was followed from its first event
    for upto in range(1, len(orders.events) + 1):  # a restart after every event
        partial = FakeOrders()
        partial.events = orders.events[:upto]
        await settle(learner(store, partial, batch=2), asyncio.Event(), store, upto)
        assert partial.pages == 0
    assert store.counts(A) == partners_of(reference, A) == {B: 5, C: 2}
    assert store.holdings == reference.holdings


@pytest.mark.gen_test
async def test_a_commit_that_fails_is_retried_from_the_store_and_counts_once():
    store, orders = FakeStore(), FakeOrders()
    store.stream = StreamState(built=True)
    shop_history(orders)
    store.fail_next_commit = True
    await settle(learner(store, orders), asyncio.Event(), store, len(orders.events))
    assert store.counts(A) == {B: 5, C: 3}


@pytest.mark.gen_test
async def test_a_batch_too_large_for_one_commit_is_committed_in_parts_and_counts_once():
    store, orders = FakeStore(), FakeOrders()
    store.stream = StreamState(built=True)
    shop_history(orders)
    store.most_customers = 2
    await settle(learner(store, orders, batch=8), asyncio.Event(), store, len(orders.events))
    assert store.counts(A) == {B: 5, C: 3}
    assert store.commits >= 4  # 8 customers, at most 2 a commit


@pytest.mark.gen_test
async def test_events_between_the_rebuild_s_point_and_its_pages_change_nothing_when_applied_again():
    orders = FakeOrders()
    made = shop_history(orders)
    store = FakeStore()
    # the pages were read after these were committed, but the stream's head was taken before
    store.stream = StreamState()
    model = CoPurchases(kept=None)
    orders.change(made["ab0"], "CANCELLED")
    orders.place("late", A, C)
    for o in orders.orders.values():
        if o["status"] in rec.LIVE:
            model.learn(rec.purchase_change(o))
    await store.replace_all("me", model, StreamState(built=True, last_seq=8), None)
    await settle(learner(store, orders), asyncio.Event(), store, len(orders.events))
    assert store.counts(A) == {B: 4, C: 4}


@pytest.mark.gen_test
async def test_a_missing_event_a_new_history_or_a_new_epoch_rebuild_the_counts():
    orders = FakeOrders()
    shop_history(orders)
    store = FakeStore()
    await settle(learner(store, orders), asyncio.Event(), store, 8)
    assert orders.pages == 4

    # the history was recreated: the same seq is another event
    other = FakeOrders()
    for n in range(9):
        other.place(f"new{n}", D, E)
    store.stream = dataclasses.replace(store.stream, last_seq=8)
    await settle(learner(store, other), asyncio.Event(), store, 9)
    assert store.counts(D) == {E: 9} and store.counts(A) == {}

    # the events after ours expired
    other.place("x", A, B)
    other.place("y", A, B)
    other.oldest = 11
    await settle(learner(store, other), asyncio.Event(), store, 11)
    assert store.counts(A) == {B: 2}

    # an epoch appears
    other.epoch = "e1"
    pages = other.pages
    await settle(learner(store, other), asyncio.Event(), store, 11, until=lambda: store.stream.epoch == "e1")
    assert other.pages > pages and store.counts(A) == {B: 2}


@pytest.mark.gen_test
async def test_a_gap_inside_a_batch_asks_for_a_rebuild():
    store, orders = FakeStore(), FakeOrders()
    store.stream = StreamState(built=True, last_seq=2)
    lrn = learner(store, orders)
    lrn.state = dataclasses.replace(store.stream)
    with pytest.raises(NeedsRebuild):
        await lrn.apply([event(3, "u", oid(), "CONFIRMED", [A]), event(5, "u", oid(), "CONFIRMED", [B])])
    assert store.stream.last_seq == 2


@pytest.mark.gen_test
async def test_an_instance_that_does_not_hold_the_lease_does_not_follow():
    store, orders = FakeStore(), FakeOrders()
    shop_history(orders)
    store.lease = ("someone else", 6.0)
    lrn = learner(store, orders, lease_seconds=0.03)
    stop = asyncio.Event()
    task = asyncio.ensure_future(lrn.run(stop))
    await asyncio.sleep(0.1)
    assert orders.connections == [] and not store.stream.built
    await store.release_lease("someone else")
    await until(lambda: store.stream.built)
    stop.set()
    await task
    assert store.stream.built and store.counts(A) == {B: 5, C: 3}


@pytest.mark.gen_test
async def test_a_live_stream_is_applied_as_it_comes():
    store, orders = FakeStore(), FakeOrders()
    store.stream = StreamState(built=True)
    orders.hold.set()
    stop = asyncio.Event()
    lrn = learner(store, orders)
    task = asyncio.ensure_future(lrn.run(stop))
    await asyncio.wait_for(lrn.following.wait(), 2)
    assert orders.connections == [0]
    stop.set()
    await task


# -- reads ---------------------------------------------------------------------------------------------------
class FakeCatalog:
    def __init__(self, books):
        self.by_isbn = {b["isbn"]: b for b in books}
        self.calls: list[str] = []

    async def books(self, isbns):
        self.calls.append("books")
        assert 1 <= len(isbns) <= 200
        return {i: self.by_isbn[i] for i in isbns if i in self.by_isbn}

    async def newest(self, category, limit):
        self.calls.append("newest")
        found = [b for b in self.by_isbn.values() if b["category"] == category]
        return sorted(found, key=lambda b: (-(b.get("published_year") or 0), b["isbn"]))[:limit]


def book(isbn, category, year=2000):
    return {"isbn": isbn, "title": f"T{isbn[-2:]}", "authors": ["X"], "category": category, "price_cents": 500,
            "currency": "EUR", "published_year": year, "description": "left out of the items"}


def shelf():
    """A (sf), its partners B, C (art), D (cooking, off sale); sf has S1..S6 (newest first)."""
    books = [book(A, "sf"), book(B, "art"), book(C, "art", 2010)]
    books += [book(f"9790000000{n:03d}", "sf", 2020 - n) for n in range(1, 7)]
    return books


def store_with(pairs: dict[str, dict[str, int]], holdings=None) -> FakeStore:
    store = FakeStore()
    store.partners = {k: {p: [n, 0] for p, n in v.items()} for k, v in pairs.items()}
    store.holdings = holdings or {}
    return store


@pytest.mark.gen_test
async def test_a_reader_of_a_book_gets_what_was_bought_with_it_then_its_category():
    catalog = FakeCatalog(shelf())
    store = store_with({A: {B: 5, C: 3, D: 7}})
    items = await rec.Recommender(catalog, store).for_book(A)
    assert [(i["isbn"], i["reason"]) for i in items] == [  # D is off sale
        (B, "bought_together"), (C, "bought_together"), ("9790000000001", "same_category"),
        ("9790000000002", "same_category"), ("9790000000003", "same_category")]
    assert set(items[0]) == {"isbn", "title", "authors", "category", "price_cents", "currency", "reason"}
    assert catalog.calls == ["books", "newest"]  # the book itself comes with its partners


@pytest.mark.gen_test
async def test_the_caller_s_books_are_never_recommended():
    catalog = FakeCatalog(shelf())
    store = store_with({A: {B: 5, C: 3}}, holdings={"u": {"0001": [B, "9790000000001"]}})
    items = await rec.Recommender(catalog, store).for_book(A, "u")
    assert [i["isbn"] for i in items] == [C, "9790000000002", "9790000000003", "9790000000004", "9790000000005"]


@pytest.mark.gen_test
async def test_an_unknown_book_is_not_found():
    with pytest.raises(errors.NotFound) as info:
        await rec.Recommender(FakeCatalog(shelf()), store_with({})).for_book(E)
    assert info.value.code == "book_not_found"


@pytest.mark.gen_test
async def test_a_book_with_many_partners_fills_the_list_from_them_alone():
    partners = {f"9790000000{n:03d}": 10 - n for n in range(1, 7)}
    catalog = FakeCatalog(shelf())
    items = await rec.Recommender(catalog, store_with({A: partners})).for_book(A)
    assert [i["reason"] for i in items] == ["bought_together"] * 5
    assert catalog.calls == ["books"]


@pytest.mark.gen_test
async def test_personal_lists_sum_over_the_caller_s_books_then_fill_from_their_categories():
    catalog = FakeCatalog(shelf())
    store = store_with({A: {B: 1, C: 1}, "9790000000001": {C: 2}},
                       holdings={"u": {"0001": [A], "0002": ["9790000000001"]}})
    items = await rec.Recommender(catalog, store).for_customer("u")
    assert [(i["isbn"], i["reason"]) for i in items] == [
        (C, "bought_together"), (B, "bought_together"), ("9790000000002", "same_category"),
        ("9790000000003", "same_category"), ("9790000000004", "same_category")]
    assert await rec.Recommender(catalog, store).for_customer("nobody") == []


@pytest.mark.gen_test
async def test_partners_no_longer_on_sale_are_skipped_a_chunk_at_a_time():
    gone = {f"9791000000{n:03d}": 40 - n for n in range(15)}  # ranked first, all off sale
    on_sale = [book(f"9792000000{n:03d}", "art") for n in range(3)]
    catalog = FakeCatalog(shelf() + on_sale)
    partners = {**gone, **{b["isbn"]: 5 for b in on_sale}}
    items = await rec.Recommender(catalog, store_with({A: partners})).for_book(A)
    assert [i["isbn"] for i in items[:3]] == [b["isbn"] for b in on_sale]
    assert [i["reason"] for i in items] == ["bought_together"] * 3 + ["same_category"] * 2
    assert catalog.calls == ["books", "books", "newest"]


@pytest.mark.gen_test
async def test_releasing_the_lease_on_shutdown_survives_a_database_that_is_gone():
    store, orders = FakeStore(), FakeOrders()

    async def down(owner):
        raise errors.Unavailable("database down")
    store.release_lease = down
    await learner(store, orders).release()  # logged, not raised


# -- the demo purchase history ---------------------------------------------------------------------------------
def test_the_demo_history_is_bounded_backdated_and_the_same_every_time():
    import datetime

    from bookshop.services import demo_data
    books = demo_data.demo_books()
    today = datetime.date(2025, 3, 10)
    orders = demo_data.demo_orders(books, today, "EUR")
    assert 0 < len(orders) <= 500
    assert orders == demo_data.demo_orders(books, today, "EUR")
    midnight = datetime.datetime(2025, 3, 10, tzinfo=datetime.timezone.utc)
    assert all(o["created_at"] < midnight and o["status"] == "CONFIRMED" and o["demo"] for o in orders)
    ids = [o["_id"] for o in orders]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in ids)  # ObjectId-shaped, growing with time
    on_sale = {b["isbn"]: b for b in books}
    for order in orders:
        assert order["total_cents"] == sum(i["unit_price_cents"] * i["quantity"] for i in order["items"])
        assert all(i["isbn"] in on_sale and i["unit_price_cents"] == on_sale[i["isbn"]]["price_cents"]
                   for i in order["items"])
    assert demo_data.demo_orders([], today) == []


def test_readers_of_the_demo_history_also_buy_across_categories():
    import datetime

    from bookshop.services import demo_data
    books = demo_data.demo_books()
    category = {b["isbn"]: b["category"] for b in books}
    model = CoPurchases()
    for o in demo_data.demo_orders(books, datetime.date(2025, 3, 10)):
        model.learn(rec.OrderChange(o["user_id"], o["_id"], True, tuple(sorted({i["isbn"] for i in o["items"]}))))
    patterns = demo_data.demo_patterns(books)
    assert len(patterns) >= 3
    for pattern in patterns:
        for book in pattern:
            top = rec.ranked_partners([model.partners[book]], {book})[:2]
            assert set(top) == set(pattern) - {book}
            assert len({category[i] for i in pattern}) == 3  # across categories
