"""The embedded database as the checkout uses it: ``bookshop.database_process``'s planner fix.

SecantusDB's write path scanned the whole collection for any filter with a top-level operator, which is what
every ``findAndModify`` writes with (``{_id: found, $and: [query]}``): each order transition read every order.
These run the real storage engine in-process (``:memory:``) and count the documents its scans read.
"""
from __future__ import annotations

import contextlib

import pytest

from bookshop import database_process

pytest.importorskip("secantus")


@pytest.fixture
def storage():
    from secantus.storage import Storage
    database_process.plan_operator_filters()
    store = Storage(":memory:")
    store.insert("shop", "orders", [{"_id": f"o{i:04d}", "status": "PENDING", "n": i} for i in range(300)])
    store.create_index("shop", "orders", "status_1", {"status": 1})
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def scanned(monkeypatch):
    from secantus.storage import Storage
    seen = []
    real = Storage._scan_docs

    def counting(self, db, coll):
        for row in real(self, db, coll):
            seen.append(row[0])
            yield row
    monkeypatch.setattr(Storage, "_scan_docs", counting)
    return seen


def test_find_and_modify_write_filter_uses_the_id(storage, scanned):
    storage.update_matching("shop", "orders", {"_id": "o0007", "$and": [{"status": {"$in": ["PENDING"]}}]},
                            {"$set": {"status": "CONFIRMED"}}, return_post_images=True)
    assert scanned == []
    assert storage.find_matching("shop", "orders", {"_id": "o0007"})[0]["status"] == "CONFIRMED"


def test_operator_clauses_still_decide(storage, scanned):
    # the plain field picks the candidate; the $and clause that does not match still refuses the write
    storage.update_matching("shop", "orders", {"_id": "o0008", "$and": [{"status": "SHIPPED"}]},
                            {"$set": {"status": "CANCELLED"}})
    assert storage.find_matching("shop", "orders", {"_id": "o0008"})[0]["status"] == "PENDING"
    storage.update_matching("shop", "orders", {"$and": [{"_id": "o0009"}], "$or": [{"n": 9}, {"n": -1}]},
                            {"$set": {"status": "CANCELLED"}})
    assert storage.find_matching("shop", "orders", {"_id": "o0009"})[0]["status"] == "CANCELLED"
    assert scanned == []


def test_a_secondary_index_is_used_beside_an_operator(storage, scanned):
    storage.update_matching("shop", "orders", {"status": "PENDING", "$expr": {"$eq": ["$n", 12]}},
                            {"$set": {"status": "CONFIRMED"}}, multi=True)
    assert [d["_id"] for d in storage.find_matching("shop", "orders", {"status": "CONFIRMED"})] == ["o0012"]
    assert scanned == []  # candidates from the status index (300 PENDING), never the document table


def test_only_operators_still_scan(storage, scanned):
    storage.update_matching("shop", "orders", {"$or": [{"n": 1}, {"n": 2}]}, {"$set": {"status": "X"}}, multi=True)
    assert len(scanned) == 300
    assert sorted(d["_id"] for d in storage.find_matching("shop", "orders", {"status": "X"})) == ["o0001", "o0002"]


# -- an order's transition as the saga makes it: a plain update when the order is as the saga holds it ----------
def same(doc: dict, stored: dict) -> bool:
    """The order as the API shows it and its saga fields (the held order's own times have microseconds)."""
    from bookshop.services.orders import order_view
    fields = ("todo", "open", "idem", "outcome", "payment")
    return order_view(doc) == order_view(stored) and all(doc.get(f) == stored.get(f) for f in fields)


@contextlib.asynccontextmanager
async def _repo(uri: str):
    """An order repository on a database of its own, dropped afterwards."""
    import uuid

    from bookshop.storage.mongo import Database
    from bookshop.storage.orders import OrderRepo
    database = Database(uri, f"t_{uuid.uuid4().hex[:10]}")
    try:
        repo = OrderRepo(database, wake=lambda: None, created_hold=0)
        await repo.create_indexes()
        yield database, repo
    finally:
        await database.client.drop_database(database.name)
        database.close()


def _order(repo, key: str = "k1") -> dict:
    import datetime
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"_id": repo.new_id(), "user_id": "u1", "status": "PENDING",
            "items": [{"isbn": "9780306406157", "quantity": 1, "title": "t", "unit_price_cents": 500}],
            "subtotal_cents": 500, "discount_cents": 0, "total_cents": 500, "currency": "EUR",
            "promotion_applied": False, "shipping_address": {"name": "A"},
            "payment": {"status": "none", "last4": "4242"},
            "history": [{"status": "PENDING", "at": now, "by": "u1"}], "created_at": now, "from_cart": False,
            "open": True, "todo": [], "owner": "me", "saga_lease": now, "idem": {"key": key, "fp": "f", "answer": None}}


@pytest.mark.gen_test(timeout=60)
async def test_a_transition_of_the_order_as_held_answers_what_the_database_stores(mongodb_uri):
    from bookshop.services.orders import OrderStatus
    async with _repo(mongodb_uri) as (database, repo):
        order = _order(repo)
        assert await repo.insert(order)
        doc = await repo.transition(order, [OrderStatus.PENDING], OrderStatus.CANCELLED, by="system",
                                    reason="payment_declined", payment_status="declined", todo=["stock"],
                                    outcome={"reason": "insufficient_funds"})
        stored = await repo.get(order["_id"])
        assert same(doc, stored)
        assert stored["status"] == "CANCELLED" and stored["todo"] == ["stock"] and stored["open"] is True
        assert stored["idem"]["answer"] == 2 and stored["payment"]["status"] == "declined"
        assert [e["event"] for e in (await database["orders"].find_one({"_id": order["_id"]}))["pending"]] == [
            "order.created", "order.status_changed"]


@pytest.mark.gen_test(timeout=60)
async def test_a_transition_of_an_order_changed_meanwhile_keeps_what_changed(mongodb_uri):
    from bookshop.services.orders import OrderStatus
    async with _repo(mongodb_uri) as (database, repo):
        order = _order(repo)
        assert await repo.insert(order)
        assert await repo.record_pending_answer(order["_id"])  # the request answered 202 first
        doc = await repo.transition(order, [OrderStatus.PENDING], OrderStatus.CONFIRMED, by="system",
                                    payment_status="charged")
        assert same(doc, await repo.get(order["_id"]))
        assert doc["status"] == "CONFIRMED" and doc["idem"]["answer"] == 1  # the first answer stays 202
        # a key freed by a 5xx is not given back by a later transition of the order as it was held
        other = _order(repo, "k2")
        assert await repo.insert(other)
        await repo.release_key(other["_id"])
        doc = await repo.transition(other, [OrderStatus.PENDING], OrderStatus.CANCELLED, by="system",
                                    reason="checkout_interrupted", todo=["payment", "stock"])
        assert "idem" not in doc and same(doc, await repo.get(other["_id"]))
        assert doc["todo"] == ["payment", "stock"]
        # and an order no longer in the status asked for is not moved
        assert await repo.transition(order, [OrderStatus.PENDING], OrderStatus.CANCELLED, by="system") is None
