"""The embedded database's process: SecantusDB's own command line, named ``bookshop database`` in ``ps``.

``secantusd-py`` is a console script, which ``ps`` would show as one more ``python`` line; started as
``python -m bookshop.database_process ARGS`` it names itself first. Nothing here runs in the shop's own
processes.

**A planner fix.** SecantusDB's write path (update, delete, and the write half of every ``findAndModify``) picks
its candidate documents with ``Storage._try_index_id_keys``, which gives up on any filter with a top-level
operator (``$and``, ``$or``, ``$expr``) and scans the whole collection. ``findAndModify`` always writes with
``{_id: <the document it found>, $and: [query]}``, so every ``find_one_and_update`` read every document of its
collection (measured: 18 ms of server CPU per order transition over ~600 orders, 578 documents read each).
``plan_operator_filters`` teaches it what mongod does: the plain fields beside the operators (and those of
``$and``'s clauses) choose the index, and the full filter is still applied to each candidate by the caller
(every caller runs ``matches(doc, filter)`` on what comes back), so results are unchanged; only the scan goes.

**Catalog caches.** Every command reads the collection's index catalog (a WiredTiger table) many times over:
the planner, the unique checks, and the delete and write of each index entry each walk it with a cursor and
decode every index's description (measured under the checkout: 26 % of the server's CPU in
``Storage._iter_indexes``); and every command reads the collection's options and the database's profile
setting from two more tables (another 7 %). ``cache_catalogs`` keeps what these tables hold (the stored bytes,
decoded afresh for every caller, so no caller can change another's copy) until something writes them: every
``Storage`` method that writes one (index and collection DDL, the profile command, and what a write may set in
its own transaction: a multikey flag, a new collection's row, its options) empties its cache, and while such a
write is not yet committed (the DDL still running, the write transaction still open, a user transaction that
wrote a catalog still open) every read goes to the table itself, as before. A read inside a user transaction
always does (it must see its own snapshot). What a cache keeps is read in a fresh snapshot of its own, never
the caller's (a thread's snapshot may predate the last catalog write). Results are unchanged: only the
repeated cursor reads go (``tests/integration/test_database_catalog_cache.py``).

**Unchanged index entries.** An update deleted every index entry of the old document, wrote the new document,
then wrote every entry of the new one, and probed each of its unique keys first, though most of an update's
indexes keep their keys (an order's confirmation changes three of its six). ``keep_unchanged_index_entries``
compares, per index, the keys the old and the new document give it (after its partial filter) and leaves the
entries of the indexes where they are equal as they are: no delete, no write, and no probe of a unique key the
document already holds (no other document can hold it). Geo indexes are always rewritten. What the index
tables hold afterwards is what rebuilding every index gives (``tests/integration/test_database_index_rewrites.py``).

``BOOKSHOP_DB_PROFILE=PATH`` (a diagnostic, off by default) makes the server count, per command, collection and
filter shape, how many it served, the CPU time of the thread that served them and the documents its full
collection scans read; the table is rewritten to ``PATH.<pid>`` every 2 s. That is how the checkout's database cost
was taken apart (docs/architecture.md).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import time


def _shape(value, depth: int = 0):
    """A filter with its values replaced by their types (``{"_id": str, "n": {"$gte": int}}``)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_shape(v, depth + 1)}" for k, v in value.items()) + "}" if depth < 3 else "{..}"
    if isinstance(value, list):
        return "[" + (_shape(value[0], depth + 1) if value else "") + "]"
    return type(value).__name__


def _plain_fields(filter: dict) -> dict:
    """The fields of ``filter`` (and of its ``$and`` clauses) that are not operators: every document matching
    ``filter`` matches them too."""
    plain = {k: v for k, v in filter.items() if not k.startswith("$")}
    for clause in filter.get("$and") or ():
        if isinstance(clause, dict):
            for k, v in _plain_fields(clause).items():
                plain.setdefault(k, v)
    return plain


def plan_operator_filters() -> None:
    """Let filters with top-level operators use an index on their plain fields (see the module's notes)."""
    from secantus import storage

    original = storage.Storage._try_index_id_keys
    if getattr(original, "bookshop_planner", False):
        return

    def try_index_id_keys(self, db, coll, filter, *, collation=None):
        found = original(self, db, coll, filter, collation=collation)
        if found is None and filter and any(isinstance(k, str) and k.startswith("$") for k in filter):
            plain = _plain_fields(filter)
            if plain:
                found = original(self, db, coll, plain, collation=collation)
        return found

    try_index_id_keys.bookshop_planner = True
    storage.Storage._try_index_id_keys = try_index_id_keys


# -- the catalog caches --------------------------------------------------------------------------------------
#: ``Storage`` methods that write a catalog table outside any write's transaction (DDL and the profile
#: command), by the table they write; a test checks these are all of them. Writes a CRUD statement makes inside
#: its own transaction (a multikey flag, a new collection's row, its options) are wrapped apart.
CATALOG_WRITERS = {
    "indexes": ("create_index", "drop_index", "set_index_expiry", "set_index_options", "drop_all_indexes",
                "drop_collection", "drop_database", "rename_collection", "_recover_pending_drops_locked"),
    "collections": ("create_collection", "drop_collection", "drop_database", "rename_collection"),
    "profiles": ("set_profile",),
}
_MISSING = object()


class _Catalog:
    """One store's cache of one catalog table: key -> what the table holds for it (immutable values)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rows: dict = {}
        self.gen = 0  # moves on every catalog write: a read that began before one is not kept
        self.busy = 0  # catalog writes not yet committed: while any, every read goes to the table
        self.txns: dict[int, object] = {}  # user transactions that wrote the table, each holding it once

    def hold(self) -> None:
        with self.lock:
            self.busy += 1
            self.gen += 1
            self.rows.clear()

    def release(self) -> None:
        with self.lock:
            self.busy -= 1
            self.gen += 1
            self.rows.clear()

    def hold_for(self, handle) -> bool:
        """``handle``'s user transaction wrote the table: held until its session closes. False when it
        already held it."""
        with self.lock:
            if id(handle) in self.txns:
                return False
            self.txns[id(handle)] = handle
        self.hold()
        return True

    def release_for(self, handle) -> None:
        with self.lock:
            held = self.txns.pop(id(handle), None) is not None
        if held:
            self.release()

    def forget(self) -> None:
        with self.lock:
            self.gen += 1
            self.rows.clear()


def _catalog(store, table: str) -> _Catalog:
    caches = store.__dict__.get("_bookshop_catalogs")
    if caches is None:
        caches = store.__dict__.setdefault("_bookshop_catalogs", {})
    found = caches.get(table)
    return found if found is not None else caches.setdefault(table, _Catalog())


def _catalog_written(store, table: str) -> None:
    """This thread just wrote ``table``: forget its cache, and keep it off until the write commits."""
    catalog = _catalog(store, table)
    tls = store._tls
    handle = getattr(tls, "user_txn", None)
    if handle is not None:  # commits (or not) with the user transaction: held until its session closes
        if not catalog.hold_for(handle):
            catalog.forget()
        return
    held = getattr(tls, "bookshop_held", None)
    if getattr(tls, "bookshop_batches", 0) and (held is None or table not in held):
        if held is None:
            held = tls.bookshop_held = set()
        held.add(table)  # held until this write transaction ends (see batch_transaction)
        catalog.hold()
    else:
        catalog.forget()


def _cached_read(store, table: str, key, read):
    """``read()`` (immutable) through ``table``'s cache, as this caller would see it without the cache."""
    catalog = _catalog(store, table)
    if catalog.busy or getattr(store._tls, "user_txn", None) is not None:
        return read()
    found = catalog.rows.get(key, _MISSING)
    if found is not _MISSING:
        return found
    gen = catalog.gen
    mine = read()  # what this caller sees, in its own snapshot
    # what is kept is read afresh: this thread's snapshot may predate the table's last write
    with store._committed_read_scope():
        latest = read()
    with catalog.lock:
        if catalog.gen == gen and not catalog.busy:
            catalog.rows[key] = latest
    return mine


def cache_catalogs() -> None:
    """Cache the index, collection and profile catalogs until they are written (see the module's notes)."""
    import bson
    from secantus import storage

    Storage = storage.Storage
    if getattr(Storage._iter_indexes, "bookshop_cached", False):
        return
    walk, coll_options, get_profile = Storage._iter_indexes, Storage._coll_options, Storage.get_profile

    def stored_indexes(self, db, coll):
        c = self._cursor(storage._IDX_TABLE)
        c.set_key(db, coll, "")
        rc = c.search_near()
        if rc == storage.wt.WT_NOTFOUND or rc < 0 and c.next() != 0:
            return ()
        rows = []
        while True:
            key = c.get_key()
            if key[0] != db or key[1] != coll:
                break
            rows.append((key[2], bytes(c.get_value())))
            if c.next() != 0:
                break
        return tuple(rows)

    def iter_indexes(self, db, coll):
        for name, raw in _cached_read(self, "indexes", (db, coll), lambda: stored_indexes(self, db, coll)):
            payload = bson.decode(raw)
            yield name, payload.get("key", {}), payload.get("options", {})

    def derived(name, freeze, thaw):
        """``Storage.<name>(db, coll)``, a view of the index catalog, kept with it (frozen) and handed out in a
        fresh outer container each time (``thaw``): callers add to the set of multikey names they get."""
        view = getattr(Storage, name)

        @functools.wraps(view)
        def cached_view(self, db, coll):
            return thaw(_cached_read(self, "indexes", (name, db, coll), lambda: freeze(view(self, db, coll))))
        cached_view.bookshop_read = view
        return cached_view

    forms = {"_all_indexes": (tuple, list), "_partial_filters": (dict, dict), "_index_options_map": (dict, dict),
             "_multikey_index_names": (frozenset, set)}  # (as kept, as handed out)
    views = {name: derived(name, *form) for name, form in forms.items()}

    def stored_options(self, db, coll):
        c = self._cursor(storage._COLL_TABLE)
        c.set_key(db, coll)
        return bytes(c.get_value()) if c.search() == 0 else None

    @functools.wraps(coll_options)
    def cached_coll_options(self, db, coll):
        blob = _cached_read(self, "collections", (db, coll), lambda: stored_options(self, db, coll))
        return None if blob is None else bson.decode(blob) if blob else {}

    @functools.wraps(get_profile)
    def cached_get_profile(self, db):
        return dict(_cached_read(self, "profiles", db, lambda: tuple(get_profile(self, db).items())))

    def writer(method, tables):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            catalogs = [_catalog(self, table) for table in tables]
            for catalog in catalogs:
                catalog.hold()
            try:
                return method(self, *args, **kwargs)
            finally:
                handle = getattr(self._tls, "user_txn", None)
                for catalog in catalogs:
                    if handle is not None:
                        catalog.hold_for(handle)  # held again until the transaction ends
                    catalog.release()
        return wrapped

    mark = Storage._maybe_mark_multikey

    @functools.wraps(mark)
    def maybe_mark_multikey(self, db, coll, doc, indexes, already_multikey):
        before = len(already_multikey)
        found = mark(self, db, coll, doc, indexes, already_multikey)
        if len(found) > before:  # a flag was written (or found written by a walk older than the cache)
            _catalog_written(self, "indexes")
        return found

    ensure = Storage._ensure_collection

    @functools.wraps(ensure)
    def ensure_collection(self, db, coll):
        if self._coll_options(db, coll) is not None:
            return  # there already: nothing to write
        ensure(self, db, coll)
        _catalog_written(self, "collections")

    write_options = Storage._write_coll_options

    @functools.wraps(write_options)
    def write_coll_options(self, db, coll, opts):
        write_options(self, db, coll, opts)
        _catalog_written(self, "collections")

    batch = Storage._batch_transaction

    @contextlib.contextmanager
    def batch_transaction(self, *, sync=False):
        tls = self._tls
        tls.bookshop_batches = getattr(tls, "bookshop_batches", 0) + 1
        try:
            with batch(self, sync=sync) as session:
                yield session
        finally:
            tls.bookshop_batches -= 1
            held = getattr(tls, "bookshop_held", None)
            if not tls.bookshop_batches and held:
                for table in held:
                    _catalog(self, table).release()
                held.clear()

    close_txn = Storage._close_user_txn_session

    @functools.wraps(close_txn)
    def close_user_txn_session(self, handle):
        try:
            return close_txn(self, handle)
        finally:
            for catalog in self.__dict__.get("_bookshop_catalogs", {}).values():
                catalog.release_for(handle)

    iter_indexes.bookshop_cached = True
    iter_indexes.bookshop_walk = walk  # the uncached reads (tests compare)
    cached_coll_options.bookshop_read = coll_options
    cached_get_profile.bookshop_read = get_profile
    Storage._iter_indexes = iter_indexes
    for name, view in views.items():
        setattr(Storage, name, view)
    Storage._coll_options = cached_coll_options
    Storage.get_profile = cached_get_profile
    tables_of: dict[str, list[str]] = {}
    for table, names in CATALOG_WRITERS.items():
        for name in names:
            tables_of.setdefault(name, []).append(table)
    for name, tables in tables_of.items():
        setattr(Storage, name, writer(getattr(Storage, name), tables))
    Storage._maybe_mark_multikey = maybe_mark_multikey
    Storage._ensure_collection = ensure_collection
    Storage._write_coll_options = write_coll_options
    Storage._batch_transaction = batch_transaction
    Storage._close_user_txn_session = close_user_txn_session


# -- index entries an update leaves as they were -------------------------------------------------------------
def keep_unchanged_index_entries() -> None:
    """An update rewrites only the index entries it changes (see the module's notes)."""
    import inspect
    import sys

    from secantus import storage

    Storage = storage.Storage
    if getattr(Storage._write_index_entries, "bookshop_paired", False):
        return
    delete, write, probe = Storage._delete_index_entries, Storage._write_index_entries, Storage._unique_conflict
    # the update bodies: each probes a document's new unique keys, deletes its old entries, writes the document,
    # then its new entries
    updaters = {inspect.unwrap(Storage._update_chunk).__code__,
                inspect.unwrap(Storage._chunk_doc_update_checked).__code__,
                inspect.unwrap(Storage._update_matching_single_txn).__code__}

    def entries(doc, name, key_spec, sparse, partials, index_options):
        partial = partials.get(name)
        if partial is not None and not storage.matches(doc, partial):
            return ()
        collation = storage._parse_index_collation(index_options.get(name, {}).get("collation"))
        return tuple(storage._index_key_variants(doc, key_spec, sparse=sparse, collation=collation))

    def kept(self, db, coll, old, new, indexes, partials, recordid):
        """The indexes whose entries the update of ``recordid`` from ``old`` to ``new`` leaves as they are, kept
        for the rest of this update (its delete and write of the entries)."""
        if partials is None:
            partials = self._partial_filters(db, coll)
        index_options = self._index_options_map(db, coll)
        same = frozenset(
            name for name, key_spec, sparse, _unique in indexes
            if storage._geo_type_of(key_spec) is None
            and entries(old, name, key_spec, sparse, partials, index_options)
            == entries(new, name, key_spec, sparse, partials, index_options))
        self._tls.bookshop_kept = (old, new, db, coll, recordid, same)
        return same

    def update_of(caller, recordid):
        """The (old, new) documents of the update body ``caller`` is, writing ``recordid``; else None."""
        if recordid is None or caller.f_code not in updaters:
            return None
        found = caller.f_locals
        old, new = found.get("doc"), found.get("new")
        if found.get("recordid") != recordid or not isinstance(old, dict) or not isinstance(new, dict):
            return None
        return old, new

    def unique_conflict(self, db, coll, candidate_doc, indexes, *, exclude_recordid, partials=None):
        update = update_of(sys._getframe(1), exclude_recordid) if indexes else None
        if update is not None and update[1] is candidate_doc:
            same = kept(self, db, coll, *update, indexes, partials, exclude_recordid)
            # a unique key the document keeps is its own: no other document can hold it
            indexes = [index for index in indexes if not (index[3] and index[0] in same)]
        return probe(self, db, coll, candidate_doc, indexes, exclude_recordid=exclude_recordid, partials=partials)

    def delete_index_entries(self, db, coll, doc, indexes, partials=None, *, recordid):
        if indexes:
            known = getattr(self._tls, "bookshop_kept", None)
            if known is not None and known[0] is doc and known[2:5] == (db, coll, recordid):
                same = known[5]  # found by this update's unique probe
            else:
                update = update_of(sys._getframe(1), recordid)
                same = kept(self, db, coll, doc, update[1], indexes, partials, recordid) if (
                    update is not None and update[0] is doc) else None
            if same:
                indexes = [index for index in indexes if index[0] not in same]
        return delete(self, db, coll, doc, indexes, partials, recordid=recordid)

    def write_index_entries(self, db, coll, doc, indexes, partials=None, *, recordid):
        known = getattr(self._tls, "bookshop_kept", None)
        if known is not None:
            self._tls.bookshop_kept = None
            if known[1] is doc and known[2:5] == (db, coll, recordid):
                indexes = [index for index in indexes if index[0] not in known[5]]
        return write(self, db, coll, doc, indexes, partials, recordid=recordid)

    write_index_entries.bookshop_paired = True
    Storage._unique_conflict = functools.wraps(probe)(unique_conflict)
    Storage._delete_index_entries = functools.wraps(delete)(delete_index_entries)
    Storage._write_index_entries = functools.wraps(write)(write_index_entries)


def install_profile(path: str) -> None:
    from secantus import commands, storage

    path = f"{path}.{os.getpid()}"

    stats: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0, 0])  # count, cpu s, docs scanned
    local = threading.local()
    lock = threading.Lock()
    dispatch = commands.dispatch
    scan_docs = storage.Storage._scan_docs

    def profiled_dispatch(doc, ctx):
        name = commands.command_name(doc)
        coll = doc.get(name) if isinstance(doc.get(name), str) else ""
        what = doc.get("filter") or doc.get("query") or (doc.get("updates") or doc.get("deletes") or [{}])[0].get("q")
        if name == "aggregate":
            what = [next(iter(stage)) for stage in doc.get("pipeline", [])]
        key = (ctx.db_name, name, coll, _shape(what) if what is not None else "")
        local.scanned = 0
        started = time.thread_time()
        try:
            return dispatch(doc, ctx)
        finally:
            spent = time.thread_time() - started
            with lock:
                entry = stats[key]
                entry[0] += 1
                entry[1] += spent
                entry[2] += getattr(local, "scanned", 0)

    def counted_scan(self, db, coll):
        for row in scan_docs(self, db, coll):
            local.scanned = getattr(local, "scanned", 0) + 1
            yield row

    def dump() -> None:
        while True:
            time.sleep(2)
            with lock:
                rows = sorted(stats.items(), key=lambda kv: -kv[1][1])
            lines = [f"{'cpu_ms':>9} {'count':>7} {'ms/op':>7} {'scanned':>9}  db command collection filter"]
            for (db, name, coll, shape), (count, cpu, scanned) in rows:
                lines.append(f"{cpu * 1000:9.1f} {count:7d} {cpu * 1000 / count:7.2f} {scanned:9d}  "
                             f"{db} {name} {coll} {shape}")
            with open(path + ".tmp", "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(path + ".tmp", path)

    commands.dispatch = profiled_dispatch
    storage.Storage._scan_docs = counted_scan
    from secantus import server
    if getattr(server, "dispatch", None) is dispatch:
        server.dispatch = profiled_dispatch
    threading.Thread(target=dump, name="bookshop-db-profile", daemon=True).start()


if __name__ == "__main__":
    import sys

    from secantus.cli import main

    from bookshop.procs import DATABASE_TITLE, set_title

    set_title(DATABASE_TITLE)
    plan_operator_filters()
    cache_catalogs()
    keep_unchanged_index_entries()
    if os.environ.get("BOOKSHOP_DB_PROFILE"):
        install_profile(os.environ["BOOKSHOP_DB_PROFILE"])
    sys.exit(main(sys.argv[1:]))
