"""Stock levels and reservations.

A level document per ISBN holds ``on_hand``, ``reserved``, ``available`` (kept equal to on_hand - reserved),
the ``holds`` of orders that reserved it, and its ``pending`` stock.changed events. Every change is ONE
conditional single-document update (an aggregation-pipeline update) that also appends the event carrying
the new levels, so a bestseller's stock never goes through a multi-document transaction on the hot path,
can never go below zero (the filter checks ``available``) and a unit is never held twice for one order
(the filter checks ``holds.order``). The relay moves the pending events out (``pending_events``).
"""
from __future__ import annotations

import datetime

import pymongo
from bson import ObjectId

from bookshop.services.inventory import ReservationState as S, levels_view
from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import utcnow

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _lit(value):
    return {"$literal": value}


def _append_event(now: datetime.datetime) -> dict:
    """Pipeline stage appending a stock.changed event with the levels as they are after the update."""
    event = {"_id": ObjectId(), "event": _lit("stock.changed"), "at": now,
             "data": {"isbn": "$_id", "on_hand": "$on_hand", "reserved": "$reserved", "available": "$available"}}
    return {"$set": {"pending": {"$concatArrays": [{"$ifNull": ["$pending", []]}, [event]]}}}


def _without_hold(order_id: str) -> dict:
    return {"$filter": {"input": "$holds", "cond": {"$ne": ["$$this.order", _lit(order_id)]}}}


class LevelRepo:
    def __init__(self, database):
        self.levels = database["levels"]

    async def create_indexes(self) -> None:
        await self.levels.create_index("pending.at")

    async def get(self, isbn: str) -> dict | None:
        return await self.levels.find_one({"_id": isbn}, {"pending": 0, "holds": 0})

    async def list(self, after: str | None, limit: int) -> list[dict]:
        query = {"_id": {"$gt": after}} if after else {}
        cursor = self.levels.find(query, {"pending": 0, "holds": 0}).sort("_id", 1).hint("_id_").limit(limit)
        return await cursor.to_list(limit)

    async def restock(self, isbn: str, quantity: int) -> dict:
        now = utcnow()
        doc = await self.levels.find_one_and_update(
            {"_id": isbn},
            [{"$set": {"on_hand": {"$add": [{"$ifNull": ["$on_hand", 0]}, quantity]},
                       "reserved": {"$ifNull": ["$reserved", 0]},
                       "available": {"$add": [{"$ifNull": ["$available", 0]}, quantity]},
                       "holds": {"$ifNull": ["$holds", []]}}},
             _append_event(now)],
            upsert=True, projection={"pending": 0, "holds": 0}, return_document=pymongo.ReturnDocument.AFTER)
        return levels_view(isbn, doc)

    async def hold(self, isbn: str, order_id: str, qty: int) -> str:
        """Hold ``qty`` units for an order: "held", "already" (this order holds it) or "short"."""
        now = utcnow()
        doc = await self.levels.find_one_and_update(
            {"_id": isbn, "available": {"$gte": qty}, "holds.order": {"$ne": order_id}},
            [{"$set": {"reserved": {"$add": ["$reserved", qty]}, "available": {"$subtract": ["$available", qty]},
                       "holds": {"$concatArrays": ["$holds", [{"order": _lit(order_id), "qty": qty}]]}}},
             _append_event(now)],
            projection={"_id": 1})
        if doc is not None:
            return "held"
        if await self.levels.count_documents({"_id": isbn, "holds.order": order_id}, limit=1):
            return "already"
        return "short"

    async def unhold(self, isbn: str, order_id: str, qty: int, sold: bool) -> bool:
        """Drop an order's hold: back to available (release) or out of on_hand (commit). Idempotent."""
        now = utcnow()
        if sold:
            change = {"on_hand": {"$subtract": ["$on_hand", qty]}, "reserved": {"$subtract": ["$reserved", qty]}}
        else:
            change = {"reserved": {"$subtract": ["$reserved", qty]}, "available": {"$add": ["$available", qty]}}
        doc = await self.levels.find_one_and_update(
            {"_id": isbn, "holds": {"$elemMatch": {"order": order_id, "qty": qty}}},
            [{"$set": {**change, "holds": _without_hold(order_id)}}, _append_event(now)],
            projection={"_id": 1})
        return doc is not None

    async def put_back(self, isbn: str, qty: int, session) -> None:
        """Return sold units to the shelf (inside the caller's transaction)."""
        now = utcnow()
        await self.levels.update_one(
            {"_id": isbn},
            [{"$set": {"on_hand": {"$add": ["$on_hand", qty]}, "available": {"$add": ["$available", qty]}}},
             _append_event(now)], session=session)

    async def pending_events(self, limit: int):
        """The relay's embedded source: pending events of level documents, with their acknowledgement."""
        docs = await self.levels.find({"pending.at": {"$gte": _EPOCH}}, {"pending": 1}).limit(limit).to_list(limit)
        out = []
        for doc in docs:
            ids = [p["_id"] for p in doc["pending"]]

            async def ack(isbn=doc["_id"], ids=ids):
                await self.levels.update_one({"_id": isbn}, {"$pull": {"pending": {"_id": {"$in": ids}}}})
            for i, pending in enumerate(doc["pending"]):
                out.append((pending, ack if i == len(ids) - 1 else None))
        return out

    async def seed(self, stock: dict[str, int]) -> int:
        if await self.levels.estimated_document_count() > 0:
            return 0
        now = utcnow()
        docs = []
        for isbn, qty in stock.items():
            data = {"isbn": isbn, "on_hand": qty, "reserved": 0, "available": qty}
            docs.append({"_id": isbn, "on_hand": qty, "reserved": 0, "available": qty, "holds": [],
                         "pending": [{"_id": ObjectId(), "event": "stock.changed", "at": now, "data": data}]})
        try:
            await self.levels.insert_many(docs, ordered=False)
        except pymongo.errors.BulkWriteError:
            pass
        return len(docs)


class ReservationRepo:
    """One header per order's reservation: its items, state and expiry. The header serialises
    concurrent duplicates (a lock with a deadline) and remembers the outcome for idempotent replies."""

    def __init__(self, database):
        self.database = database
        self.reservations = database["reservations"]

    async def create_indexes(self) -> None:
        await self.reservations.create_index([("state", 1), ("expires_at", 1)])
        await self.reservations.create_index([("lock_until", 1)], partialFilterExpression={"busy": True})

    async def get(self, order_id: str) -> dict | None:
        return await self.reservations.find_one({"_id": order_id})

    async def begin(self, order_id: str, items: list[tuple[str, int]], lock_seconds: float) -> dict | None:
        """Create the header, locked by the caller; None if the order has one already."""
        now = utcnow()
        doc = {"_id": order_id, "items": [{"isbn": i, "quantity": q} for i, q in items],
               "state": S.RESERVING.value, "created_at": now, "busy": True,
               "lock_until": now + datetime.timedelta(seconds=lock_seconds)}
        try:
            await self.reservations.insert_one(doc)
        except DuplicateKeyError:
            return None
        return doc

    async def take_over(self, order_id: str, lock_seconds: float) -> dict | None:
        """Take the lock of a header whose worker went away (``busy`` with an expired lock)."""
        now = utcnow()
        return await self.reservations.find_one_and_update(
            {"_id": order_id, "busy": True, "lock_until": {"$lt": now}},
            {"$set": {"lock_until": now + datetime.timedelta(seconds=lock_seconds)}},
            return_document=pymongo.ReturnDocument.AFTER)

    async def move(self, order_id: str, from_states: list[S], to: S, *, busy: bool, lock_seconds: float = 0,
                   session=None, **fields) -> dict | None:
        """Change state if it is one of ``from_states``. ``busy`` marks work still to do on the levels
        (a sweeper finishes it if we die before ``done``)."""
        now = utcnow()
        update: dict = {"$set": {"state": to.value, **fields}}
        if busy:
            update["$set"].update(busy=True, lock_until=now + datetime.timedelta(seconds=lock_seconds))
        else:
            update["$unset"] = {"busy": "", "lock_until": ""}
        return await self.reservations.find_one_and_update(
            {"_id": order_id, "state": {"$in": [s.value for s in from_states]}}, update,
            return_document=pymongo.ReturnDocument.AFTER, session=session)

    async def done(self, order_id: str, state: S) -> None:
        await self.reservations.update_one({"_id": order_id, "state": state.value},
                                           {"$unset": {"busy": "", "lock_until": ""}})

    async def expired(self, now: datetime.datetime, limit: int = 100) -> list[dict]:
        cursor = self.reservations.find({"state": S.HELD.value, "expires_at": {"$lt": now}}).limit(limit)
        return await cursor.to_list(limit)

    async def stale(self, before: datetime.datetime, limit: int = 100) -> list[dict]:
        """Headers whose worker died mid-way (still busy, lock expired before ``before``)."""
        cursor = self.reservations.find({"busy": True, "lock_until": {"$lt": before}}).limit(limit)
        return await cursor.to_list(limit)
