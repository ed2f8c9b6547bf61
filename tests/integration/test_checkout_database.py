"""The embedded database as the checkout uses it: ``bookshop.database_process``'s planner fix.

SecantusDB's write path scanned the whole collection for any filter with a top-level operator, which is what
every ``findAndModify`` writes with (``{_id: found, $and: [query]}``): each order transition read every order.
These run the real storage engine in-process (``:memory:``) and count the documents its scans read.
"""
from __future__ import annotations

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
