"""The recommendations service's collections: what each customer holds, the partner lists, and where the
counts stand in the orders stream.

* ``holdings``: one document per customer, ``{_id: user_id, orders: {order_id: [isbn, ...]}, v}`` for their
  confirmed and shipped orders (bounded, see ``services.recommendations``).
* ``partners``: one document per book, ``{_id: isbn, partners: {isbn: [count, error]}, v}``, at most
  ``PARTNERS_KEPT`` entries.
* ``meta``: ``orders_stream`` (``built``, ``epoch``, ``last_seq``, ``last_event``, ``version``, ``pending``)
  and the ``follower`` lease (``owner``, ``until``).

A batch is committed without a multi-document transaction (one left open by a follower killed in its middle
would keep the state document locked for the embedded server's 60 s, and the restarted follower waiting):

1. one conditional update of ``meta.orders_stream`` moves ``last_seq`` on, on the condition that it is still
   the one the batch continues and no other batch is half written, raises ``version`` by one and stores in
   the same document what redoes the batch (``pending``: the customers' new holdings, whole, and the list
   changes in order, a few bytes each where a list document is up to 2 KB);
2. those documents are written, each on the condition that no later version wrote it (every document
   carries in ``v`` the version that last wrote it), so writing them twice, or late, changes nothing;
3. ``pending`` is cleared.

A batch that changes no count (pending orders, repeats) only moves ``last_seq``, in one write. A follower
killed between 1 and 3 leaves ``pending`` behind; the next follower finishes it before it reads anything
else (``state``): a list the batch has not written yet is still as the batch found it (no later batch can be
committed meanwhile), and its changes are applied to it again. So a batch is counted entirely or not at
all, and never twice; a reader may see one half written for the moment it takes. A customer left with no
orders, or a book with no partners, stays as an empty document: it still carries the version that emptied
it, which keeps a late write of an earlier batch out. A rebuild raises the version too and empties every
document before it writes its own, so nothing an earlier follower still writes late lands on top of it.
Only ``_id`` lookups: no index beyond the default one.
"""
from __future__ import annotations

import asyncio
import datetime

import bson
import pymongo
from pymongo import ReplaceOne
from pymongo.errors import BulkWriteError

from bookshop.services.recommendations import (PARTNERS_KEPT, BatchTooLarge, CoPurchases, Partners, StreamState,
                                               bump, held_books, partners_doc, unbump)
from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import utcnow

STATE = "orders_stream"
LEASE = "follower"
CHUNK = 1000
IN_CHUNK = 50
#: a batch whose documents would make the state document larger than this is split by the follower (a
#: document may hold 16 MB)
PENDING_BYTES = 8 * 1024 * 1024


class CoPurchaseRepo:
    def __init__(self, database):
        self.database = database
        self.holdings = database["holdings"]
        self.partners = database["partners"]
        self.meta = database["meta"]

    async def create_indexes(self) -> None:
        """Nothing beyond ``_id``: every read is by customer or by book."""

    # -- reads -----------------------------------------------------------------------------------------------
    async def state(self, finish: bool = True) -> StreamState:
        """Where the counts stand; with ``finish``, a batch a killed follower left half written is written
        first (the follower does this; an instance that only reads the position need not)."""
        doc = await self.meta.find_one({"_id": STATE}) or {}
        if finish and doc.get("pending"):
            await self._finish(doc["pending"], int(doc.get("version", 0)))
        return StreamState(built=bool(doc.get("built")), epoch=doc.get("epoch"), last_seq=int(doc.get("last_seq", 0)),
                           last_event=doc.get("last_event"))

    @staticmethod
    async def _by_ids(collection, ids: list[str]) -> list[dict]:
        """Documents by ``_id``, asked for IN_CHUNK at a time (concurrently): the embedded server's cost of
        one ``$in`` grows much faster than the number of ids in it."""
        chunks = [list(ids[i:i + IN_CHUNK]) for i in range(0, len(ids), IN_CHUNK)]
        found = await asyncio.gather(*(collection.find({"_id": {"$in": chunk}}).to_list(None) for chunk in chunks))
        return [doc for docs in found for doc in docs]

    # a customer who holds nothing any more, or a book left without partners, is kept as an empty document:
    # it still carries the seq that emptied it, which keeps a late write of an older batch out
    async def holdings_of(self, user_ids: list[str]) -> dict[str, dict[str, list[str]]]:
        return {d["_id"]: d["orders"] for d in await self._by_ids(self.holdings, user_ids) if d["orders"]}

    async def partners_of(self, isbns: list[str]) -> dict[str, Partners]:
        return {d["_id"]: d["partners"] for d in await self._by_ids(self.partners, isbns) if d["partners"]}

    async def held_books(self, user_id: str) -> list[str]:
        doc = await self.holdings.find_one({"_id": user_id})
        return held_books(doc["orders"]) if doc else []

    # -- the follower's lease --------------------------------------------------------------------------------
    async def take_lease(self, owner: str, seconds: float) -> bool:
        """Take or renew the lease of following the orders stream (one instance at a time)."""
        now = utcnow()
        try:
            doc = await self.meta.find_one_and_update(
                {"_id": LEASE, "$or": [{"until": {"$lt": now}}, {"owner": owner}]},
                {"$set": {"owner": owner, "until": now + datetime.timedelta(seconds=seconds)}},
                upsert=True, return_document=pymongo.ReturnDocument.AFTER)
        except DuplicateKeyError:  # held by another (the upsert met its document)
            return False
        return doc is not None and doc.get("owner") == owner

    async def release_lease(self, owner: str) -> None:
        await self.meta.update_one({"_id": LEASE, "owner": owner}, {"$set": {"until": utcnow()}})

    # -- writes ----------------------------------------------------------------------------------------------
    @staticmethod
    def _pending(model: CoPurchases) -> dict:
        """What redoes a batch: ``{holdings: [[user_id, orders]], deltas: [[book, partner, step]]}`` (empty
        ``orders`` for a customer left with nothing)."""
        pending = {"holdings": [[c, model.holdings.get(c) or {}] for c in sorted(model.dirty_customers)],
                   "deltas": [[d.book, d.partner, d.step] for d in model.counted]}
        if len(bson.encode(pending)) > PENDING_BYTES:
            raise BatchTooLarge(f"a batch of {len(pending['holdings'])} customers and {len(pending['deltas'])} "
                                "list changes")
        return pending

    @staticmethod
    def _books(pending: dict) -> list[str]:
        return sorted({book for book, _, _ in pending["deltas"]})

    async def _redo(self, pending: dict, version: int) -> dict[str, Partners]:
        """The lists a batch leaves, for those it has not written yet: they are as it found them, and its
        changes are applied to them again."""
        books = self._books(pending)
        docs = {d["_id"]: d for d in await self._by_ids(self.partners, books)}
        lists = {book: (docs[book]["partners"] if book in docs else {}) for book in books
                 if docs.get(book, {}).get("v", -1) < version}
        for book, partner, step in pending["deltas"]:
            if book in lists:
                if step > 0:
                    bump(lists[book], partner, PARTNERS_KEPT)
                else:
                    unbump(lists[book], partner)
        return lists

    async def _write(self, name: str, docs: list[tuple[str, dict]], version: int) -> None:
        """Replace these documents of ``name``, each unless a later version wrote it."""
        writes = [ReplaceOne({"_id": key, "v": {"$not": {"$gte": version}}}, {**doc, "v": version}, upsert=True)
                  for key, doc in docs]
        for start in range(0, len(writes), CHUNK):
            try:
                await self.database[name].bulk_write(writes[start:start + CHUNK], ordered=False)
            except BulkWriteError as exc:
                # a duplicate key: a later version wrote that document (the condition did not match, and the
                # upsert met it); anything else is a real failure
                if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])) or \
                        exc.details.get("writeConcernErrors"):
                    raise

    async def _finish(self, pending: dict, version: int, lists: dict[str, Partners] | None = None) -> None:
        """Write the documents of the batch committed as ``version`` (``lists``: the lists it leaves, when the
        caller has them); then clear it."""
        if lists is None:
            lists = await self._redo(pending, version)
        await self._write("holdings", [(c, {"orders": o}) for c, o in pending["holdings"]], version)
        await self._write("partners", [(b, {"partners": partners_doc(p)}) for b, p in sorted(lists.items())],
                          version)
        await self.meta.update_one({"_id": STATE, "version": version, "pending": {"$ne": None}},
                                   {"$unset": {"pending": ""}})

    async def commit(self, before: StreamState, after: StreamState, model: CoPurchases) -> bool:
        """Write what a batch changed and the stream position it reached, if the position is still
        ``before``'s and no other batch is half written. False (nothing written) otherwise. Raises
        ``BatchTooLarge`` for a batch to be committed in parts."""
        pending = self._pending(model)
        moved = {"last_seq": after.last_seq, "last_event": after.last_event}
        condition = {"_id": STATE, "built": True, "epoch": before.epoch, "last_seq": before.last_seq, "pending": None}
        if not pending["holdings"] and not pending["deltas"]:
            # events that change no count (pending orders, repeats): only the position moves, in one write
            return (await self.meta.update_one(condition, {"$set": moved})).matched_count == 1
        doc = await self.meta.find_one_and_update(
            condition, {"$set": {**moved, "pending": pending}, "$inc": {"version": 1}},
            projection={"version": 1}, return_document=pymongo.ReturnDocument.AFTER)
        if doc is None:
            return False
        await self._finish(pending, doc["version"], {b: model.partners.get(b) or {} for b in model.dirty_books})
        return True

    async def replace_all(self, owner: str, model: CoPurchases, state: StreamState, keep_lease) -> bool:
        """Replace every count with a rebuild's. Marked unbuilt first, so a rebuild cut short (crash, lost
        lease) is done again; readers meanwhile see part of the counts, for the seconds it takes. It takes a
        version of its own: every document, and those of a batch left half written (which it drops: the
        rebuild counts it), is emptied at that version first, so an earlier follower's late writes leave the
        rebuild's documents alone."""
        old = await self.meta.find_one_and_update(
            {"_id": STATE}, {"$set": {"built": False}, "$unset": {"pending": ""}, "$inc": {"version": 1}},
            upsert=True, return_document=pymongo.ReturnDocument.BEFORE) or {}
        version = int(old.get("version", 0)) + 1
        dropped = old.get("pending") or {"holdings": [], "deltas": []}
        for name, field, keys in (("holdings", "orders", [c for c, _ in dropped["holdings"]]),
                                  ("partners", "partners", self._books(dropped))):
            await self.database[name].update_many({}, {"$set": {field: {}, "v": version}})
            await self._write(name, [(key, {field: {}}) for key in keys], version)
        docs = [("holdings", c, {"orders": o}) for c, o in model.holdings.items() if o]
        docs += [("partners", b, {"partners": partners_doc(p)}) for b, p in model.partners.items() if p]
        for start in range(0, len(docs), CHUNK):
            chunk = docs[start:start + CHUNK]
            for name in ("holdings", "partners"):
                part = [ReplaceOne({"_id": key}, {**doc, "v": version}, upsert=True) for n, key, doc in chunk
                        if n == name]
                if part:
                    await self.database[name].bulk_write(part, ordered=False)
            if not await keep_lease():
                return False
        done = await self.meta.update_one(
            {"_id": STATE, "built": False, "version": version},
            {"$set": {"built": True, "epoch": state.epoch, "last_seq": state.last_seq, "last_event": None}})
        return done.matched_count == 1
