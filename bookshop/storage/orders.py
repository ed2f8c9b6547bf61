"""The orders service's collections: orders (with their saga state), carts, promotion claims and
idempotency records."""
from __future__ import annotations

import datetime

import pymongo
from bson import ObjectId

from bookshop.services.orders import OrderStatus
from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import EventLog, new_event, utcnow


def iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z") if value else None


def order_view(doc: dict) -> dict:
    return {
        "id": doc["_id"], "user_id": doc["user_id"], "status": doc["status"],
        "items": doc["items"], "subtotal_cents": doc["subtotal_cents"], "discount_cents": doc["discount_cents"],
        "total_cents": doc["total_cents"], "currency": doc["currency"],
        "promotion_applied": doc["promotion_applied"], "shipping_address": doc["shipping_address"],
        "payment": {"status": doc["payment"]["status"], "last4": doc["payment"].get("last4")},
        "history": [{k: (iso(v) if k == "at" else v) for k, v in h.items()} for h in doc["history"]],
        "created_at": iso(doc["created_at"]),
    }


def event_data(doc: dict, **extra) -> dict:
    data = {"id": doc["_id"], "user_id": doc["user_id"], "status": doc["status"],
            "total_cents": doc["total_cents"], "currency": doc["currency"],
            "items": sum(i["quantity"] for i in doc["items"]), "created_at": iso(doc["created_at"])}
    data.update(extra)
    return data


def new_order_id() -> str:
    return str(ObjectId())


class OrderRepo:
    def __init__(self, database, events: EventLog):
        self.database = database
        self.orders = database["orders"]
        self.promotions = database["promotions"]
        self.carts = database["carts"]
        self.events = events

    async def create_indexes(self) -> None:
        await self.orders.create_index([("user_id", 1), ("_id", -1)])
        await self.orders.create_index([("status", 1), ("_id", -1)])
        await self.orders.create_index([("saga_lease", 1)], partialFilterExpression={"open": True})
        await self.orders.create_index([("user_id", 1), ("items.isbn", 1)])

    # -- reads --------------------------------------------------------------------------------------
    async def get(self, order_id: str) -> dict | None:
        return await self.orders.find_one({"_id": order_id})

    async def page(self, user_id: str | None, status: str | None, before: str | None, limit: int) -> list[dict]:
        query: dict = {}
        hint = "_id_"
        if user_id is not None:
            query["user_id"] = user_id
            hint = [("user_id", 1), ("_id", -1)]
        if status is not None:
            query["status"] = status
            if user_id is None:
                hint = [("status", 1), ("_id", -1)]
        if before is not None:
            query["_id"] = {"$lt": before}
        cursor = self.orders.find(query).sort("_id", -1).hint(hint).limit(limit)
        return await cursor.to_list(limit)

    async def purchased(self, user_id: str) -> list[str]:
        docs = await self.orders.find({"user_id": user_id, "status": {"$in": ["CONFIRMED", "SHIPPED"]}},
                                      {"items.isbn": 1}).to_list(1000)
        return sorted({i["isbn"] for d in docs for i in d["items"]})

    async def promotion_claimed(self, user_id: str) -> bool:
        return await self.promotions.count_documents({"_id": user_id}, limit=1) > 0

    # -- writes -------------------------------------------------------------------------------------
    async def create(self, doc: dict, claim_promotion: bool) -> bool:
        """Insert a PENDING order with its order.created event (and its promotion claim, when it takes
        the promotion), atomically. False when the promotion was claimed by another order meanwhile."""
        async def work(session):
            if claim_promotion:
                await self.promotions.insert_one({"_id": doc["user_id"], "order_id": doc["_id"], "at": utcnow()},
                                                 session=session)
            await self.orders.insert_one(doc, session=session)
            await self.events.record(new_event("order.created", event_data(doc), doc["user_id"]), session=session)
            return True
        try:
            return await self.database.transaction(work)
        except DuplicateKeyError:
            return False

    async def transition(self, order_id: str, from_status: list[OrderStatus], to: OrderStatus, *,
                         reason: str | None = None, set_fields: dict | None = None, todo: list[str] | None = None,
                         release_promotion: bool = False, clear_cart: bool = False,
                         by: str = "system") -> dict | None:
        """Move an order to ``to`` if it is in ``from_status``, with its order.status_changed event, in one
        transaction. Returns the updated order, or None if it was not in one of those statuses."""
        now = utcnow()
        entry = {"status": to.value, "at": now, "by": by}
        if reason:
            entry["reason"] = reason
        fields = {"status": to.value, "updated_at": now, **(set_fields or {})}
        if to is not OrderStatus.PENDING:
            fields["open"] = False
        update: dict = {"$set": fields, "$push": {"history": entry}}
        if todo:
            update["$addToSet"] = {"todo": {"$each": todo}}
            fields["open"] = True

        async def work(session):
            doc = await self.orders.find_one_and_update(
                {"_id": order_id, "status": {"$in": [s.value for s in from_status]}}, update,
                return_document=pymongo.ReturnDocument.AFTER, session=session)
            if doc is None:
                return None
            extra = {"reason": reason} if reason else {}
            await self.events.record(new_event("order.status_changed", event_data(doc, **extra), doc["user_id"]),
                                     session=session)
            if release_promotion and doc.get("promotion_applied"):
                await self.promotions.delete_one({"_id": doc["user_id"], "order_id": order_id}, session=session)
            if clear_cart:
                await self.carts.update_one({"_id": doc["user_id"]}, without_lines(doc["items"]), session=session)
            return doc
        return await self.database.transaction(work)

    async def done_todo(self, order_id: str, item: str, set_fields: dict | None = None) -> dict | None:
        update: dict = {"$pull": {"todo": item}}
        if set_fields:
            update["$set"] = set_fields
        doc = await self.orders.find_one_and_update({"_id": order_id}, update,
                                                    return_document=pymongo.ReturnDocument.AFTER)
        if doc is not None and not doc.get("todo") and doc["status"] != OrderStatus.PENDING.value:
            await self.orders.update_one({"_id": order_id, "todo": {"$size": 0}}, {"$set": {"open": False}})
        return doc

    async def take_lease(self, order_id: str, seconds: float) -> dict | None:
        """Take over an order whose owner's lease ran out. Done in a transaction: the embedded server
        clears a transaction abandoned by a killed process (which may still lock this very order) only
        when another transaction arrives, and a plain write would wait on that lock."""
        async def work(session):
            now = utcnow()
            return await self.orders.find_one_and_update(
                {"_id": order_id, "open": True, "saga_lease": {"$lt": now}},
                {"$set": {"saga_lease": now + datetime.timedelta(seconds=seconds)}},
                return_document=pymongo.ReturnDocument.AFTER, session=session)
        return await self.database.transaction(work)

    async def unfinished(self, limit: int = 100) -> list[dict]:
        """Open orders (saga or compensation left to do) whose owner's lease ran out."""
        cursor = self.orders.find({"open": True, "saga_lease": {"$lt": utcnow()}}).limit(limit)
        return await cursor.to_list(limit)

    async def recent(self, user_id: str | None, limit: int) -> list[dict]:
        return await self.page(user_id, None, None, limit)


def without_lines(lines: list[dict]) -> list[dict]:
    """A pipeline update taking an order's lines (their quantities) out of a cart; lines the customer added or
    raised meanwhile keep what was not ordered."""
    ordered = {"$switch": {"branches": [{"case": {"$eq": ["$$line.isbn", {"$literal": line["isbn"]}]},
                                         "then": line["quantity"]} for line in lines], "default": 0}}
    left = {"$map": {"input": {"$ifNull": ["$items", []]}, "as": "line",
                     "in": {"isbn": "$$line.isbn", "quantity": {"$subtract": ["$$line.quantity", ordered]}}}}
    return [{"$set": {"items": {"$filter": {"input": left, "as": "line", "cond": {"$gt": ["$$line.quantity", 0]}}}}}]


class CartRepo:
    MAX_LINES = 100

    def __init__(self, database):
        self.carts = database["carts"]

    async def get(self, user_id: str) -> list[dict]:
        doc = await self.carts.find_one({"_id": user_id})
        return doc["items"] if doc else []

    async def set_quantity(self, user_id: str, isbn: str, quantity: int) -> bool:
        """Set one line (0 removes it). False when the cart is full."""
        if quantity == 0:
            await self.carts.update_one({"_id": user_id}, {"$pull": {"items": {"isbn": isbn}}})
            return True
        result = await self.carts.update_one({"_id": user_id, "items.isbn": isbn},
                                             {"$set": {"items.$.quantity": quantity}})
        if result.matched_count:
            return True
        try:
            result = await self.carts.update_one(
                {"_id": user_id, "items.isbn": {"$ne": isbn}, f"items.{self.MAX_LINES - 1}": {"$exists": False}},
                {"$push": {"items": {"isbn": isbn, "quantity": quantity}}}, upsert=True)
        except DuplicateKeyError:  # the cart exists but is full (or the line appeared meanwhile)
            return await self.set_quantity(user_id, isbn, quantity) if await self.carts.count_documents(
                {"_id": user_id, "items.isbn": isbn}, limit=1) else False
        return True

    async def drop(self, user_id: str, isbns: list[str]) -> None:
        await self.carts.update_one({"_id": user_id}, {"$pull": {"items": {"isbn": {"$in": isbns}}}})


class IdempotencyRepo:
    """One record per (customer, Idempotency-Key): the body's fingerprint, the order, and the first answer."""

    def __init__(self, database):
        self.records = database["idempotency"]

    async def create_indexes(self) -> None:
        await self.records.create_index("created_at", expireAfterSeconds=7 * 24 * 3600)

    async def begin(self, user_id: str, key: str, fingerprint: str, order_id: str) -> dict | None:
        """Claim the key for this request; returns the existing record when it was claimed before."""
        doc = {"_id": f"{user_id}:{key}", "fingerprint": fingerprint, "order_id": order_id, "response": None,
               "created_at": utcnow()}
        try:
            await self.records.insert_one(doc)
            return None
        except DuplicateKeyError:
            existing = await self.records.find_one({"_id": doc["_id"]})
            return existing or await self.begin(user_id, key, fingerprint, order_id)

    async def get(self, user_id: str, key: str) -> dict | None:
        return await self.records.find_one({"_id": f"{user_id}:{key}"})

    async def finish(self, user_id: str, key: str, status: int, body: dict) -> None:
        await self.records.update_one({"_id": f"{user_id}:{key}", "response": None},
                                      {"$set": {"response": {"status": status, "body": body}}})

    async def forget(self, user_id: str, key: str) -> None:
        await self.records.delete_one({"_id": f"{user_id}:{key}", "response": None})
