"""The recommendations service's collections: what each customer holds, the partner lists, and where the
counts stand in the orders stream.

* ``holdings``: one document per customer, ``{_id: user_id, orders: {order_id: [isbn, ...]}}`` for their
  confirmed and shipped orders (bounded, see ``services.recommendations``).
* ``partners``: one document per book, ``{_id: isbn, partners: {isbn: [count, error]}}``, at most
  ``PARTNERS_KEPT`` entries.
* ``meta``: ``orders_stream`` (``built``, ``epoch``, ``last_seq``, ``last_event``) and the ``follower``
  lease (``owner``, ``until``).

A batch is committed without a multi-document transaction (one left open by a follower killed in its middle
would keep the state document locked for the embedded server's 60 s, and the restarted follower waiting):

1. one conditional update of ``meta.orders_stream`` moves ``last_seq`` on, on the condition that it is still
   the one the batch continues and no other batch is half applied, and stores in the same document what the
   batch writes (``pending``: the new holdings and partner documents, whole);
2. those documents are written, each on the condition that no later batch wrote it (every document carries
   the ``seq`` of the batch that last wrote it), so writing them twice, or late, changes nothing;
3. ``pending`` is cleared.

A follower killed between 1 and 3 leaves ``pending`` behind; whoever next reads the state finishes it before
anything else is read (``state``). So a batch is applied entirely or not at all, and never twice. Only
``_id`` lookups: no index beyond the default one.
"""
from __future__ import annotations

import asyncio
import datetime

import bson
import pymongo
from pymongo import ReplaceOne
from pymongo.errors import BulkWriteError

from bookshop.services.recommendations import (BatchTooLarge, CoPurchases, Partners, StreamState, held_books,
                                               partners_doc)
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
    async def state(self) -> StreamState:
        """Where the counts stand; a batch a killed follower left half written is finished first."""
        doc = await self.meta.find_one({"_id": STATE}) or {}
        if doc.get("pending"):
            await self._finish(doc["pending"])
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
    def _pending(seq: int, model: CoPurchases) -> dict:
        """What a batch writes, whole: ``{seq, holdings: [[user_id, orders]], partners: [[isbn, partners]]}``
        (an empty value for a customer or book left with nothing)."""
        pending = {"seq": seq,
                   "holdings": [[c, model.holdings.get(c) or {}] for c in sorted(model.dirty_customers)],
                   "partners": [[b, partners_doc(model.partners.get(b) or {})] for b in sorted(model.dirty_books)]}
        if len(bson.encode(pending)) > PENDING_BYTES:
            raise BatchTooLarge(f"a batch of {len(pending['holdings'])} customers and {len(pending['partners'])} "
                                "lists")
        return pending

    async def _finish(self, pending: dict) -> None:
        """Write a committed batch's documents, each unless a later batch wrote it already; then clear it."""
        seq = pending["seq"]
        not_later = {"$not": {"$gte": seq}}
        for name, field in (("holdings", "orders"), ("partners", "partners")):
            writes = [ReplaceOne({"_id": key, "seq": not_later}, {field: value, "seq": seq}, upsert=True)
                      for key, value in pending[name]]
            for start in range(0, len(writes), CHUNK):
                try:
                    await self.database[name].bulk_write(writes[start:start + CHUNK], ordered=False)
                except BulkWriteError as exc:
                    # a duplicate key: a later batch wrote that document (the condition did not match, and
                    # the upsert met it); anything else is a real failure
                    if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])) or \
                            exc.details.get("writeConcernErrors"):
                        raise
        await self.meta.update_one({"_id": STATE, "pending.seq": seq}, {"$unset": {"pending": ""}})

    async def commit(self, before: StreamState, after: StreamState, model: CoPurchases) -> bool:
        """Write what a batch changed and the stream position it reached, if the position is still
        ``before``'s and no other batch is half written. False (nothing written) otherwise. Raises
        ``BatchTooLarge`` for a batch to be committed in parts."""
        pending = self._pending(after.last_seq, model)
        moved = await self.meta.update_one(
            {"_id": STATE, "built": True, "last_seq": before.last_seq, "pending": None},
            {"$set": {"last_seq": after.last_seq, "last_event": after.last_event, "pending": pending}})
        if moved.matched_count != 1:
            return False
        await self._finish(pending)
        return True

    async def replace_all(self, owner: str, model: CoPurchases, state: StreamState, keep_lease) -> bool:
        """Replace every count with a rebuild's. Marked unbuilt first, so a rebuild cut short (crash, lost
        lease) is done again; readers meanwhile see part of the counts, for the seconds it takes. A batch left
        half written is dropped (the rebuild counts it), and the new documents carry the rebuild's ``seq``, so
        a late write of an earlier batch leaves them alone."""
        await self.meta.update_one({"_id": STATE}, {"$set": {"built": False}, "$unset": {"pending": ""}},
                                   upsert=True)
        await self.holdings.delete_many({})
        await self.partners.delete_many({})
        seq = state.last_seq
        docs = [("holdings", {"_id": c, "orders": o, "seq": seq}) for c, o in model.holdings.items() if o]
        docs += [("partners", {"_id": b, "partners": partners_doc(p), "seq": seq})
                 for b, p in model.partners.items() if p]
        for start in range(0, len(docs), CHUNK):
            chunk = docs[start:start + CHUNK]
            for name in ("holdings", "partners"):
                part = [d for n, d in chunk if n == name]
                if part:
                    await self.database[name].insert_many(part, ordered=False)
            if not await keep_lease():
                return False
        done = await self.meta.update_one(
            {"_id": STATE, "built": False},
            {"$set": {"built": True, "epoch": state.epoch, "last_seq": state.last_seq, "last_event": None}})
        return done.matched_count == 1
