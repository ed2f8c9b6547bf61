"""``bookshop.database_process``'s catalog caches, on the real storage engine in-process (``:memory:``).

The caches must never change an answer: every index or collection DDL and profile setting shows at once, a
multikey flag or a new collection from a write that rolled back is not kept, and a user transaction's catalog
writes are seen by nobody else until it commits.
"""
from __future__ import annotations

import inspect

import pytest

from bookshop import database_process

pytest.importorskip("secantus")


@pytest.fixture
def store():
    from secantus.storage import Storage
    database_process.plan_operator_filters()
    database_process.cache_catalogs()
    store = Storage(":memory:")
    store.insert("shop", "orders", [{"_id": f"o{i}", "user": f"u{i % 3}", "n": i} for i in range(20)])
    try:
        yield store
    finally:
        store.close()


def walked(store, coll="orders"):
    """The catalog as the table itself holds it (the uncached walk)."""
    from secantus.storage import Storage
    return list(Storage._iter_indexes.bookshop_walk(store, "shop", coll))


def cached(store, coll="orders"):
    return list(store._iter_indexes("shop", coll))


@pytest.mark.parametrize("cache, table, apart", [
    # the walk is the cache's own reader; a multikey flag is written inside a write's transaction
    ("indexes", "_IDX_TABLE", {"_iter_indexes", "_maybe_mark_multikey"}),
    # the readers; a new collection's row and its options are written inside a write's transaction
    ("collections", "_COLL_TABLE", {"_coll_options", "list_collections", "list_databases",
                                    "prune_ttl_all_collections", "_ensure_collection", "_write_coll_options"}),
    ("profiles", "_PROFILE_TABLE", {"get_profile"}),
])
def test_every_method_that_writes_a_catalog_table_empties_its_cache(cache, table, apart):
    from secantus import storage
    database_process.cache_catalogs()
    users = set()
    for name, member in vars(storage.Storage).items():
        source = inspect.getsource(inspect.unwrap(member)) if inspect.isfunction(member) else ""
        if table in source:
            users.add(name)
    # the constructor and the tables' key formats run before any command
    assert users - {"__init__", "_table_kf"} - apart == set(database_process.CATALOG_WRITERS[cache])


def test_the_cache_answers_what_the_table_holds_in_fresh_copies(store):
    store.create_index("shop", "orders", "user_1", {"user": 1}, {"unique": False})
    store.create_index("shop", "orders", "n_1", {"n": 1}, {"partialFilterExpression": {"n": {"$gt": 5}}})
    first = cached(store)
    assert first == walked(store) and len(first) == 2
    first[0][1]["user"] = -1  # a caller changing its copy changes nobody else's
    first[1][2].clear()
    assert cached(store) == walked(store)
    assert ("shop", "orders") in database_process._catalog(store, "indexes").rows


def test_index_ddl_shows_at_once(store):
    assert cached(store) == []
    store.create_index("shop", "orders", "n_1", {"n": 1}, {"unique": True})
    assert [name for name, _, _ in cached(store)] == ["n_1"]
    _, errors = store.insert("shop", "orders", [{"_id": "dup", "n": 3}])
    assert errors  # the new unique index is enforced at once
    store.drop_index("shop", "orders", "n_1")
    assert cached(store) == walked(store) == []
    _, errors = store.insert("shop", "orders", [{"_id": "dup", "n": 3}])
    assert not errors


def test_a_multikey_flag_from_a_write_shows_at_once(store):
    store.create_index("shop", "orders", "tags_1", {"tags": 1})
    assert cached(store)[0][2].get("multikey") is None
    store.update_matching("shop", "orders", {"_id": "o1"}, {"$set": {"tags": ["a", "b"]}})
    assert cached(store)[0][2].get("multikey") is True
    assert cached(store) == walked(store)


def test_a_multikey_flag_from_a_write_that_rolled_back_is_not_kept(store):
    store.create_index("shop", "orders", "tags_1", {"tags": 1})
    cached(store)
    with store._lock, pytest.raises(RuntimeError):
        with store._batch_transaction():
            indexes = store._all_indexes("shop", "orders")
            store._maybe_mark_multikey("shop", "orders", {"_id": "o1", "tags": [1, 2]}, indexes, set())
            assert cached(store)[0][2].get("multikey") is True  # the transaction sees its own write
            raise RuntimeError("the write fails after the flag: its transaction rolls back")
    assert walked(store)[0][2].get("multikey") is None
    assert cached(store) == walked(store)


def test_a_user_transactions_index_is_seen_by_nobody_else_until_it_commits(store):
    handle = store.begin_user_transaction()
    with store.use_user_transaction(handle):
        store.create_index("shop", "orders", "user_1", {"user": 1})
        assert [name for name, _, _ in cached(store)] == ["user_1"]  # its own write, inside
    assert database_process._catalog(store, "indexes").busy  # open: every reader walks the table
    assert cached(store) == walked(store)
    store.abort_user_transaction(handle)
    catalog = database_process._catalog(store, "indexes")
    assert catalog.busy == 0 and not catalog.txns
    assert cached(store) == walked(store)
    assert ("shop", "orders") in catalog.rows  # cached again once nothing is pending


def test_a_reader_on_an_old_snapshot_does_not_fill_the_cache_with_it(store):
    import threading
    from secantus import storage
    store.create_index("shop", "orders", "user_1", {"user": 1}, {})
    store._cursor(storage._IDX_TABLE).next()  # this thread's snapshot is pinned here, before the next DDL
    other = threading.Thread(target=store.create_index, args=("shop", "orders", "n_1", {"n": 1}, {}))
    other.start()
    other.join()
    # this thread still sees its own snapshot (as without the cache) ...
    assert [name for name, _, _ in cached(store)] == ["user_1"]
    # ... but what the cache keeps is the catalog as committed, so everyone else sees the new index
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(name for name, _, _ in cached(store)))
    reader.start()
    reader.join()
    assert seen == ["n_1", "user_1"]


def options(store, coll="orders"):
    from secantus.storage import Storage
    return store._coll_options("shop", coll), Storage._coll_options.bookshop_read(store, "shop", coll)


def test_collection_ddl_and_options_show_at_once(store):
    assert options(store, "carts") == (None, None)
    assert store.create_collection("shop", "carts", {"validator": {"n": {"$gte": 0}}})
    cached_options, stored = options(store, "carts")
    assert cached_options == stored and cached_options["validator"] == {"n": {"$gte": 0}}
    cached_options["validator"].clear()  # a fresh copy each time
    assert options(store, "carts")[0]["validator"] == {"n": {"$gte": 0}}
    store.set_collection_options("shop", "carts", validator={"n": {"$gte": 1}})
    assert options(store, "carts")[0]["validator"] == {"n": {"$gte": 1}}
    store.rename_collection("shop", "carts", "shop", "baskets")
    assert options(store, "carts") == (None, None)
    renamed, stored = options(store, "baskets")
    assert renamed is not None and renamed == stored
    store.drop_collection("shop", "baskets")
    assert options(store, "baskets") == (None, None)
    store.insert("shop", "baskets", [{"_id": 1}])  # made again by a write
    assert options(store, "baskets")[0] is not None
    assert store.find_matching("shop", "baskets", {}) == [{"_id": 1}]


def test_a_collection_made_by_a_write_that_rolled_back_is_not_kept(store):
    assert options(store, "ghosts") == (None, None)
    with store._lock, pytest.raises(RuntimeError):
        with store._batch_transaction():
            store._ensure_collection("shop", "ghosts")
            assert options(store, "ghosts")[0] is not None  # the transaction sees its own write
            raise RuntimeError("the write fails after the collection was made: its transaction rolls back")
    assert options(store, "ghosts") == (None, None)


def test_a_user_transactions_collection_is_seen_by_nobody_else_until_it_commits(store):
    handle = store.begin_user_transaction()
    with store.use_user_transaction(handle):
        store.insert("shop", "fresh", [{"_id": 1}])
        assert options(store, "fresh")[0] is not None
    assert options(store, "fresh") == (None, None)
    store.commit_user_transaction(handle)
    assert options(store, "fresh")[0] is not None
    catalog = database_process._catalog(store, "collections")
    assert catalog.busy == 0 and not catalog.txns


def test_profile_settings_show_at_once(store):
    from secantus.storage import Storage
    assert store.get_profile("shop") == {"level": 0, "slowms": 100, "sampleRate": 1.0}
    store.get_profile("shop")["level"] = 2  # a fresh copy each time
    assert store.get_profile("shop")["level"] == 0
    store.set_profile("shop", level=1, slowms=0, sample_rate=0.5)
    assert store.get_profile("shop") == Storage.get_profile.bookshop_read(store, "shop") == {
        "level": 1, "slowms": 0, "sampleRate": 0.5}
    assert store.get_profile("other")["level"] == 0


VIEWS = ("_all_indexes", "_partial_filters", "_index_options_map", "_multikey_index_names")


def views(store, coll="orders"):
    return {name: getattr(store, name)("shop", coll) for name in VIEWS}


def uncached_views(store, coll="orders"):
    from secantus.storage import Storage
    return {name: getattr(Storage, name).bookshop_read(store, "shop", coll) for name in VIEWS}


def test_the_catalogs_views_follow_every_change_and_come_in_fresh_containers(store):
    assert views(store) == uncached_views(store)
    store.create_index("shop", "orders", "tags_1", {"tags": 1}, {"partialFilterExpression": {"n": {"$gt": 1}}})
    assert views(store) == uncached_views(store) and views(store)["_multikey_index_names"] == set()
    store.update_matching("shop", "orders", {"_id": "o5"}, {"$set": {"tags": ["a", "b"]}})
    assert views(store) == uncached_views(store) and views(store)["_multikey_index_names"] == {"tags_1"}
    found = views(store)
    found["_multikey_index_names"].add("user_1")  # what a write does with the set it gets
    found["_all_indexes"].clear()
    found["_partial_filters"].clear()
    assert views(store) == uncached_views(store)
    store.drop_index("shop", "orders", "tags_1")
    assert views(store) == uncached_views(store) and views(store)["_all_indexes"] == []
