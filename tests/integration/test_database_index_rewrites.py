"""``bookshop.database_process.keep_unchanged_index_entries``, on the real storage engine in-process.

An update rewrites only the index entries it changes; what the index tables hold afterwards must be exactly
what rebuilding every index from the documents gives, unique keys still refused, and an update that changes no
indexed field must not touch the index entries at all.
"""
from __future__ import annotations

import random

import pytest

from bookshop import database_process

pytest.importorskip("secantus")

INDEXES = [
    ("user_1__id_1", {"user": 1, "_id": 1}, {}),
    ("status_1", {"status": 1}, {}),
    ("key_1", {"key": 1}, {"unique": True, "partialFilterExpression": {"key": {"$exists": True}}}),
    ("lease_1", {"lease": 1}, {"partialFilterExpression": {"open": True}}),
    ("pending.at_1", {"pending.at": 1}, {}),
    ("tags_1", {"tags": 1}, {"sparse": True}),
]


@pytest.fixture
def store():
    from secantus.storage import Storage
    database_process.plan_operator_filters()
    database_process.cache_catalogs()
    database_process.keep_unchanged_index_entries()
    store = Storage(":memory:")
    store.insert("shop", "orders", [
        {"_id": f"o{i:02}", "user": f"u{i % 3}", "status": "PENDING", "key": f"k{i}", "open": True,
         "lease": i, "pending": [{"at": i}], "n": 0} for i in range(30)])
    for name, key, options in INDEXES:
        store.create_index("shop", "orders", name, key, options)
    try:
        yield store
    finally:
        store.close()


def index_tables(store):
    """Every index entry and unique claim of ``shop.orders``, as stored."""
    from secantus import storage
    found = {}
    for table in (storage._IDX_ENTRIES_TABLE, storage._UNIQ_TABLE):
        c = store._cursor(table)
        rows = []
        while c.next() == 0:
            key = c.get_key()
            if key[0] == "shop" and key[1] == "orders":
                rows.append((tuple(key), c.get_value()))
        found[table] = sorted(rows, key=repr)
    return found


def rebuilt(store):
    """What the index tables hold when every index is made afresh from the documents."""
    for name, key, options in INDEXES:
        store.drop_index("shop", "orders", name)
        store.create_index("shop", "orders", name, key, options)
    return index_tables(store)


def test_random_updates_leave_the_index_tables_as_a_rebuild_would(store):
    rng = random.Random(7)
    for step in range(300):
        _id = f"o{rng.randrange(30):02}"
        change = rng.choice([
            {"$inc": {"n": 1}},  # no indexed field
            {"$set": {"status": rng.choice(["PENDING", "CONFIRMED", "CANCELLED"])}},
            {"$set": {"open": rng.random() < 0.5}},  # in or out of the partial index
            {"$set": {"lease": rng.randrange(5)}},
            {"$push": {"pending": {"at": step}}},
            {"$set": {"pending": []}},
            {"$set": {"tags": [rng.choice("abc"), rng.choice("abc")]}},
            {"$unset": {"tags": ""}},
            {"$set": {"user": rng.choice(["u0", "u1", "u9"])}},
            {"$unset": {"key": ""}},
            {"$set": {"key": f"k{rng.randrange(60)}"}},  # may collide: refused
        ])
        try:
            store.update_matching("shop", "orders", {"_id": _id}, change)
        except Exception as exc:
            assert "key_1" in str(exc) or "duplicate" in str(exc).lower(), exc
        if step % 50 == 0:  # the chunked multi-document path too
            store.update_matching("shop", "orders", {"user": "u1"}, {"$inc": {"n": 1}, "$set": {"lease": step}},
                                  multi=True)
    assert index_tables(store) == rebuilt(store)


def test_a_taken_unique_key_is_still_refused_and_a_freed_one_given(store):
    with pytest.raises(Exception, match="key_1|duplicate"):
        store.update_matching("shop", "orders", {"_id": "o01"}, {"$set": {"key": "k2"}})
    store.update_matching("shop", "orders", {"_id": "o02"}, {"$set": {"key": "k-free"}, "$inc": {"n": 1}})
    store.update_matching("shop", "orders", {"_id": "o01"}, {"$set": {"key": "k2"}})
    store.update_matching("shop", "orders", {"_id": "o01"}, {"$inc": {"n": 1}})  # its key kept, unrewritten
    _, errors = store.insert("shop", "orders", [{"_id": "x", "key": "k2"}])
    assert errors and store.find_matching("shop", "orders", {"_id": "x"}) == []
    _, errors = store.insert("shop", "orders", [{"_id": "z", "key": "k1"}])  # o01 gave k1 up for k2
    assert not errors
    assert index_tables(store) == rebuilt(store)


class Counting:
    """A cursor that counts the index rows written or removed through it."""

    def __init__(self, cursor, writes):
        self._cursor, self._writes = cursor, writes

    def __getattr__(self, name):
        if name in ("insert", "remove"):
            self._writes.append(name)
        return getattr(self._cursor, name)

    def __setitem__(self, key, value):
        self._writes.append("set")
        self._cursor[key] = value


def test_an_update_of_no_indexed_field_does_not_touch_the_index_entries(store, monkeypatch):
    from secantus import storage
    writes = []
    cursor = store._cursor

    def counting(table, **kwargs):
        found = cursor(table, **kwargs)
        return Counting(found, writes) if table in (storage._IDX_ENTRIES_TABLE, storage._UNIQ_TABLE) else found

    probed = []
    taken = storage.Storage._entry_taken

    def probing(*args):
        probed.append(args[3])  # (cursor, db, coll, name, key, exclude_recordid)
        return taken(*args)

    monkeypatch.setattr(store, "_cursor", counting)
    monkeypatch.setattr(storage.Storage, "_entry_taken", staticmethod(probing))
    store.update_matching("shop", "orders", {"_id": "o03"}, {"$inc": {"n": 1}})
    store.update_matching("shop", "orders", {"user": "u0"}, {"$inc": {"n": 1}}, multi=True)
    assert writes == [] and probed == []  # nor is a unique key it keeps looked up
    store.update_matching("shop", "orders", {"_id": "o03"}, {"$set": {"key": "k-new"}})
    assert probed == ["key_1"] and writes.count("insert") == 1  # a new unique key is probed and claimed
    writes.clear()
    store.update_matching("shop", "orders", {"_id": "o03"}, {"$set": {"status": "CONFIRMED"}})
    assert writes.count("remove") == 1 and writes.count("set") == 1  # only the changed index: old out, new in
    assert store.find_matching("shop", "orders", {"status": "CONFIRMED"})[0]["_id"] == "o03"
    monkeypatch.undo()
    assert index_tables(store) == rebuilt(store)
