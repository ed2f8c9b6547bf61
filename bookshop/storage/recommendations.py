"""The recommendations service's collections: what each customer holds, the partner lists, and where the
counts stand in the orders stream.

* ``holdings``: one document per customer, ``{_id: user_id, orders: {order_id: [isbn, ...]}}`` for their
  confirmed and shipped orders (bounded, see ``services.recommendations``).
* ``partners``: one document per book, ``{_id: isbn, partners: {isbn: [count, error]}}``, at most
  ``PARTNERS_KEPT`` entries.
* ``meta``: ``orders_stream`` (``built``, ``epoch``, ``last_seq``, ``last_event``) and the ``follower``
  lease (``owner``, ``until``).

Everything an event batch changes is written in one transaction with the ``last_seq`` it reaches, on the
condition that ``last_seq`` is still the one the batch continues: a batch is applied entirely or not at all,
and never twice. Only ``_id`` lookups: no index beyond the default one.
"""
from __future__ import annotations

import asyncio
import datetime

import pymongo
from pymongo import DeleteOne, ReplaceOne

from bookshop.services.recommendations import CoPurchases, Partners, StreamState, held_books, partners_doc
from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import utcnow

STATE = "orders_stream"
LEASE = "follower"
CHUNK = 1000
IN_CHUNK = 50


class _Moved(Exception):
    """The stream state is not the one a batch continues (another follower committed first)."""


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
        doc = await self.meta.find_one({"_id": STATE}) or {}
        return StreamState(built=bool(doc.get("built")), epoch=doc.get("epoch"), last_seq=int(doc.get("last_seq", 0)),
                           last_event=doc.get("last_event"))

    @staticmethod
    async def _by_ids(collection, ids: list[str]) -> list[dict]:
        """Documents by ``_id``, asked for IN_CHUNK at a time (concurrently): the embedded server's cost of
        one ``$in`` grows much faster than the number of ids in it."""
        chunks = [list(ids[i:i + IN_CHUNK]) for i in range(0, len(ids), IN_CHUNK)]
        found = await asyncio.gather(*(collection.find({"_id": {"$in": chunk}}).to_list(None) for chunk in chunks))
        return [doc for docs in found for doc in docs]

    async def holdings_of(self, user_ids: list[str]) -> dict[str, dict[str, list[str]]]:
        return {d["_id"]: d["orders"] for d in await self._by_ids(self.holdings, user_ids)}

    async def partners_of(self, isbns: list[str]) -> dict[str, Partners]:
        return {d["_id"]: d["partners"] for d in await self._by_ids(self.partners, isbns)}

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
    def _writes(model: CoPurchases) -> tuple[list, list]:
        holdings = [ReplaceOne({"_id": c}, {"_id": c, "orders": model.holdings[c]}, upsert=True)
                    if model.holdings.get(c) else DeleteOne({"_id": c}) for c in sorted(model.dirty_customers)]
        partners = [ReplaceOne({"_id": b}, {"_id": b, "partners": partners_doc(model.partners[b])}, upsert=True)
                    if model.partners.get(b) else DeleteOne({"_id": b}) for b in sorted(model.dirty_books)]
        return holdings, partners

    async def commit(self, before: StreamState, after: StreamState, model: CoPurchases) -> bool:
        """Write what a batch changed and the stream position it reached, if the position is still
        ``before``'s. False (nothing written) otherwise."""
        holdings, partners = self._writes(model)

        async def work(session):
            moved = await self.meta.update_one(
                {"_id": STATE, "built": True, "last_seq": before.last_seq},
                {"$set": {"last_seq": after.last_seq, "last_event": after.last_event}}, session=session)
            if moved.matched_count != 1:
                raise _Moved()
            if holdings:
                await self.holdings.bulk_write(holdings, ordered=True, session=session)
            if partners:
                await self.partners.bulk_write(partners, ordered=True, session=session)
        try:
            await self.database.transaction(work)
        except _Moved:
            return False
        return True

    async def replace_all(self, owner: str, model: CoPurchases, state: StreamState, keep_lease) -> bool:
        """Replace every count with a rebuild's. Marked unbuilt first, so a rebuild cut short (crash, lost
        lease) is done again; readers meanwhile see part of the counts, for the seconds it takes."""
        await self.meta.update_one({"_id": STATE}, {"$set": {"built": False}}, upsert=True)
        await self.holdings.delete_many({})
        await self.partners.delete_many({})
        docs = [("holdings", {"_id": c, "orders": o}) for c, o in model.holdings.items() if o]
        docs += [("partners", {"_id": b, "partners": partners_doc(p)}) for b, p in model.partners.items() if p]
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
