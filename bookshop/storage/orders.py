"""The orders service's collections: orders (with their saga state, idempotency key and pending events), carts
and promotion claims.

Every change of an order is ONE conditional single-document write that also appends the event describing it
to the order's ``pending`` array (an aggregation-pipeline update, as inventory's level documents do); the relay
moves those events into the numbered log (``pending_events``). No per-order path uses a multi-document
transaction, so a process killed at any point leaves no lock behind: recovery can take its orders at once.

The ``Idempotency-Key`` a customer sent lives in the order it created (``idem``: key, fingerprint, and the
first answer as the number of history entries it showed), so one insert claims the key and stores the order;
a unique index on ``(user_id, idem.key)`` makes exactly one of any number of concurrent duplicates win.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import re

import pymongo
import pymongo.errors
from bson import ObjectId

from bookshop.services.orders import OrderStatus, order_view  # noqa: F401 (order_view: its old home)
from bookshop.services.views import iso_z
from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import EventLog, new_event, utcnow

log = logging.getLogger(__name__)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
SCHEMA_VERSION = 2  # 1: idempotency records of their own, transactions; 2: folded into the orders
_NOT_PENDING = {"pending": 0}


def _lit(value):
    return {"$literal": value}


def event_data(doc: dict, status: str | None = None, **extra) -> dict:
    """An order event's data, from the order's fields that never change after it was created."""
    data = {"id": doc["_id"], "user_id": doc["user_id"], "status": status or doc["status"],
            "total_cents": doc["total_cents"], "currency": doc["currency"],
            "items": sum(i["quantity"] for i in doc["items"]),
            "lines": [{"isbn": i["isbn"], "quantity": i["quantity"]} for i in doc["items"]],
            "created_at": iso_z(doc["created_at"])}
    data.update(extra)
    return data


def new_order_id() -> str:
    return str(ObjectId())


def _append(field: str, value) -> dict:
    return {"$concatArrays": [{"$ifNull": [f"${field}", []]}, [_lit(value)]]}


class OrderRepo:
    """Orders, their events (embedded until the relay moves them), carts' ordered lines and promotion claims.

    ``wake`` is called after every write that embedded an event (the relay moves it at once); by default the
    event log's ``announce``.
    """

    #: seconds a new PENDING order's order.created waits for the saga's decision before the relay moves it
    CREATED_HOLD = 1.0

    def __init__(self, database, events: EventLog | None = None, wake=None, created_hold: float = CREATED_HOLD):
        self.created_hold = created_hold
        self.database = database
        self.orders = database["orders"]
        self.promotions = database["promotions"]
        self.carts = database["carts"]
        self.meta = database["meta"]
        self.events = events
        self.wake = wake or (events.announce if events is not None else (lambda: None))

    #: indexes of earlier versions that no query needs: the embedded server rewrites every index entry of a
    #: document on each update, so each index costs every order write (measured: 7 indexes doubled the CPU of
    #: an order update over none). ``owner`` is found through the ``saga_lease`` index (open orders only);
    #: ``purchased`` reads through ``user_id``.
    RETIRED_INDEXES = ("owner_1", "user_id_1_items.isbn_1")

    async def create_indexes(self) -> None:
        await self.orders.create_index([("user_id", 1), ("_id", -1)])
        await self.orders.create_index([("status", 1), ("_id", -1)])
        await self.orders.create_index([("saga_lease", 1)], partialFilterExpression={"open": True})
        await self.orders.create_index([("user_id", 1), ("idem.key", 1)], unique=True, name="idempotency_key",
                                       partialFilterExpression={"idem.key": {"$exists": True}})
        await self.orders.create_index("pending.at")
        for name in self.RETIRED_INDEXES:
            try:
                await self.orders.drop_index(name)
            except pymongo.errors.OperationFailure:
                pass

    @staticmethod
    def new_id() -> str:
        """A new order's id (an ObjectId's hex: ids sort by creation time)."""
        return new_order_id()

    # -- reads --------------------------------------------------------------------------------------
    async def get(self, order_id: str) -> dict | None:
        return await self.orders.find_one({"_id": order_id}, _NOT_PENDING)

    async def by_key(self, user_id: str, key: str) -> dict | None:
        """The order a customer's Idempotency-Key created, if any."""
        return await self.orders.find_one({"user_id": user_id, "idem.key": key}, _NOT_PENDING)

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
        cursor = self.orders.find(query, {"pending": 0, "idem": 0}).sort("_id", -1).hint(hint).limit(limit)
        return await cursor.to_list(limit)

    async def purchased(self, user_id: str) -> list[str]:
        docs = await self.orders.find({"user_id": user_id, "status": {"$in": ["CONFIRMED", "SHIPPED"]}},
                                      {"items.isbn": 1}).to_list(1000)
        return sorted({i["isbn"] for d in docs for i in d["items"]})

    async def recent(self, user_id: str | None, limit: int) -> list[dict]:
        return await self.page(user_id, None, None, limit)

    async def purchases(self, after: str | None, limit: int) -> list[dict]:
        """Confirmed and shipped orders by id, after the order ``after`` (for followers rebuilding from orders)."""
        query: dict = {"status": {"$in": [OrderStatus.CONFIRMED.value, OrderStatus.SHIPPED.value]}}
        if after is not None:
            query["_id"] = {"$gt": after}
        cursor = self.orders.find(query, {"user_id": 1, "status": 1, "items.isbn": 1, "items.quantity": 1})
        return await cursor.sort("_id", 1).hint("_id_").limit(limit).to_list(limit)

    # -- the promotion claim ------------------------------------------------------------------------------
    async def promotion_holder(self, user_id: str) -> dict | None:
        """The customer's promotion claim ``{order_id, key, at}``, or None."""
        return await self.promotions.find_one({"_id": user_id})

    async def claim_promotion(self, user_id: str, order_id: str, key: str | None) -> bool:
        """Claim the customer's promotion for an order about to be created (one conditional insert)."""
        try:
            await self.promotions.insert_one({"_id": user_id, "order_id": order_id, "key": key, "at": utcnow()})
            return True
        except DuplicateKeyError:
            return False

    async def release_promotion(self, user_id: str, order_id: str) -> None:
        """Give the promotion back, if that order holds it."""
        await self.promotions.delete_one({"_id": user_id, "order_id": order_id})

    # -- writes -------------------------------------------------------------------------------------
    async def insert(self, doc: dict) -> bool:
        """Store a new PENDING order with its order.created event (and its Idempotency-Key, when ``doc`` has
        ``idem``): one insert. False when the customer's key already belongs to another order."""
        doc = {**doc, "pending": [new_event("order.created", event_data(doc), doc["user_id"])]}
        try:
            await self.orders.insert_one(doc)
        except DuplicateKeyError:
            return False
        # the relay leaves a young PENDING order's order.created for the saga's decision (see pending_events);
        # if the saga is not done by then, this wakes it
        asyncio.get_running_loop().call_later(self.created_hold, self.wake)
        return True

    async def transition(self, order: dict, from_status: list[OrderStatus], to: OrderStatus, *, by: str,
                         reason: str | None = None, payment_status: str | None = None,
                         todo: list[str] | None = None, outcome: dict | None = None,
                         release_key: bool = False) -> dict | None:
        """Move an order to ``to`` if it is in one of ``from_status``: one conditional update that appends the
        history entry and the order.status_changed event, adds ``todo`` (work still owed: the order stays
        ``open`` until it is done) and records the order's first answer if none was given yet.
        ``release_key`` frees its Idempotency-Key instead, unless an answer was already given (a 5xx is
        not an answer: the client may retry with the same key). ``outcome`` keeps what the answer tells beyond
        the order (the short items, a decline's reason). Returns the updated order, or None."""
        now = utcnow()
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as stored: milliseconds
        entry = {"status": to.value, "at": now, "by": by}
        extra = {}
        if reason:
            entry["reason"] = extra["reason"] = reason
        event = new_event("order.status_changed", event_data(order, to.value, **extra), order["user_id"])
        if order.get("status") in {s.value for s in from_status}:
            doc = await self._transition_known(order, to, now, entry, event, payment_status, todo, outcome,
                                               release_key)
            if doc is not None:
                self.wake()
                return doc
        todo_now: dict = {"$ifNull": ["$todo", []]}
        if todo:
            todo_now = {"$setUnion": [todo_now, _lit(todo)]}
        fields: dict = {"status": _lit(to.value), "updated_at": _lit(now), "history": _append("history", entry),
                        "pending": _append("pending", event), "todo": todo_now}
        if payment_status:
            fields["payment"] = {"$mergeObjects": ["$payment", {"status": _lit(payment_status)}]}
        if outcome:
            fields["outcome"] = _lit(outcome)
        answered = {"$mergeObjects": ["$idem", {"answer": {"$ifNull": ["$idem.answer", {"$size": "$history"}]}}]}
        if release_key:
            answered = {"$cond": [{"$eq": [{"$ifNull": ["$idem.answer", None]}, None]}, "$$REMOVE", answered]}
        pipeline = [
            {"$set": fields},
            {"$set": {"open": {"$gt": [{"$size": "$todo"}, 0]},
                      "idem": {"$cond": [{"$eq": [{"$type": "$idem"}, "object"]}, answered, "$$REMOVE"]}}},
        ]
        doc = await self.orders.find_one_and_update(
            {"_id": order["_id"], "status": {"$in": [s.value for s in from_status]}}, pipeline,
            projection=_NOT_PENDING, return_document=pymongo.ReturnDocument.AFTER)
        if doc is not None:
            self.wake()
        return doc

    async def _transition_known(self, order: dict, to: OrderStatus, now, entry: dict, event: dict,
                                payment_status: str | None, todo: list[str] | None, outcome: dict | None,
                                release_key: bool) -> dict | None:
        """``transition`` when the order is as the caller holds it (its status, history, todo and key
        unchanged, which the filter checks): a plain update, and the new order made here. The general form
        is an aggregation pipeline behind a findAndModify, which costs the embedded server about twice as much
        (it evaluates every expression and finds the document twice). None when the order changed meanwhile:
        the caller then takes the general form."""
        history, held_todo, idem = order.get("history"), order.get("todo"), order.get("idem")
        if not isinstance(history, list) or not isinstance(held_todo, list) or not (idem is None or isinstance(
                idem, dict) and "key" in idem and "legacy" not in idem) or not isinstance(order.get("payment"), dict):
            return None  # a shape the general form handles (an order of an earlier version)
        new_todo = held_todo + [t for t in dict.fromkeys(todo or []) if t not in held_todo]
        query: dict = {"_id": order["_id"], "status": order["status"], "history": {"$size": len(history)},
                       "todo": {"$size": len(held_todo)}}
        fields: dict = {"status": to.value, "updated_at": now, "todo": new_todo, "open": bool(new_todo)}
        update: dict = {"$set": fields, "$push": {"history": entry, "pending": event}}
        new = {k: v for k, v in order.items() if k != "pending"}
        new.update(status=to.value, updated_at=now, history=history + [entry], todo=new_todo, open=bool(new_todo))
        if payment_status:
            fields["payment.status"] = payment_status
            new["payment"] = {**order["payment"], "status": payment_status}
        if outcome:
            fields["outcome"] = outcome
            new["outcome"] = outcome
        if idem is None:
            query["idem"] = {"$exists": False}
        else:
            query["idem.key"], query["idem.answer"] = idem["key"], idem.get("answer")
            if idem.get("answer") is None and release_key:
                update["$unset"] = {"idem": ""}
                del new["idem"]
            elif idem.get("answer") is None:
                fields["idem.answer"] = len(history) + 1
                new["idem"] = {**idem, "answer": len(history) + 1}
        result = await self.orders.update_one(query, update)
        return new if result.modified_count == 1 else None

    async def done_todo(self, order_id: str, item: str, payment_status: str | None = None) -> dict | None:
        """One piece of owed work is done; the order closes when nothing is left."""
        fields: dict = {"todo": {"$filter": {"input": {"$ifNull": ["$todo", []]}, "as": "t",
                                             "cond": {"$ne": ["$$t", _lit(item)]}}}}
        if payment_status:
            fields["payment"] = {"$mergeObjects": ["$payment", {"status": _lit(payment_status)}]}
        pipeline = [{"$set": fields},
                    {"$set": {"open": {"$or": [{"$eq": ["$status", OrderStatus.PENDING.value]},
                                               {"$gt": [{"$size": "$todo"}, 0]}]}}}]
        return await self.orders.find_one_and_update({"_id": order_id}, pipeline, projection=_NOT_PENDING,
                                                     return_document=pymongo.ReturnDocument.AFTER)

    async def record_pending_answer(self, order_id: str) -> bool:
        """Record that the order's first answer is ``202 PENDING`` (its one history entry), unless its saga
        decided first. True when that is now the answer."""
        result = await self.orders.update_one(
            {"_id": order_id, "status": OrderStatus.PENDING.value, "idem.key": {"$exists": True},
             "idem.answer": None}, {"$set": {"idem.answer": 1}})
        return result.matched_count == 1

    async def release_key(self, order_id: str) -> None:
        """Free an order's Idempotency-Key when no answer was given (the request failed with a 500)."""
        await self.orders.update_one({"_id": order_id, "idem.answer": None}, {"$unset": {"idem": ""}})

    async def take_lines(self, user_id: str, order_id: str, lines: list[dict]) -> None:
        """Take a confirmed order's lines (their quantities) out of its customer's cart, once per order: lines
        raised or added while the checkout ran keep what was not ordered."""
        ordered = {"$switch": {"branches": [{"case": {"$eq": ["$$line.isbn", _lit(line["isbn"])]},
                                             "then": line["quantity"]} for line in lines], "default": 0}}
        left = {"$map": {"input": {"$ifNull": ["$items", []]}, "as": "line",
                         "in": {"isbn": "$$line.isbn", "quantity": {"$subtract": ["$$line.quantity", ordered]}}}}
        await self.carts.update_one(
            {"_id": user_id, "taken": {"$ne": order_id}},
            [{"$set": {"items": {"$filter": {"input": left, "as": "line", "cond": {"$gt": ["$$line.quantity", 0]}}},
                       "taken": {"$slice": [_append("taken", order_id), -20]}}}])

    # -- leases and recovery -----------------------------------------------------------------------------------
    async def take_lease(self, order_id: str, seconds: float, owner: str, dead_owner: str | None = None
                         ) -> dict | None:
        """Take over an open order whose owner's lease ran out (or whose owner is known to be dead)."""
        now = utcnow()
        taken_from: dict = {"saga_lease": {"$lt": now}}
        if dead_owner is not None:
            taken_from = {"$or": [taken_from, {"owner": dead_owner}]}
        return await self.orders.find_one_and_update(
            {"_id": order_id, "open": True, **taken_from},
            {"$set": {"saga_lease": now + datetime.timedelta(seconds=seconds), "owner": owner}},
            projection=_NOT_PENDING, return_document=pymongo.ReturnDocument.AFTER)

    async def give_back_lease(self, order_id: str, owner: str) -> None:
        """A recovery that must wait for an upstream lets go at once, so the next pass may try again."""
        await self.orders.update_one({"_id": order_id, "open": True, "owner": owner},
                                     {"$set": {"saga_lease": utcnow()}})

    async def renew_leases(self, order_ids: list[str], seconds: float, owner: str) -> None:
        """Extend the leases of sagas this process is still running (one write for all of them)."""
        await self.orders.update_many(
            {"_id": {"$in": order_ids}, "open": True, "owner": owner},
            {"$set": {"saga_lease": utcnow() + datetime.timedelta(seconds=seconds)}})

    async def unfinished(self, limit: int = 1000) -> list[dict]:
        """Open orders (saga or compensation left to do) whose owner's lease ran out."""
        cursor = self.orders.find({"open": True, "saga_lease": {"$lt": utcnow()}},
                                  {"_id": 1, "owner": 1}).limit(limit)
        return await cursor.to_list(limit)

    async def open_owned_by(self, prefix: str, limit: int = 1000) -> list[dict]:
        """Open orders whose owner's identity starts with ``prefix`` (this host's earlier processes)."""
        cursor = self.orders.find({"open": True, "saga_lease": {"$gte": _EPOCH},  # the partial index of open orders
                                   "owner": {"$regex": "^" + re.escape(prefix)}}, {"_id": 1, "owner": 1}).limit(limit)
        return await cursor.to_list(limit)

    async def seed_demo(self, docs: list[dict]) -> int:
        """Insert a made-up purchase history into an empty shop, each order with its events (created, then
        confirmed) for the relay, once even with several instances (a claim in ``meta``)."""
        if await self.orders.estimated_document_count() > 0:
            return 0
        try:
            await self.meta.insert_one({"_id": "demo_orders", "at": utcnow()})
        except DuplicateKeyError:
            return 0
        for doc in docs:
            doc["pending"] = [new_event("order.created", event_data(doc, OrderStatus.PENDING.value), doc["user_id"]),
                              new_event("order.status_changed", event_data(doc), doc["user_id"])]
        await self.orders.insert_many(docs, ordered=False)
        self.wake()
        return len(docs)

    # -- the relay's embedded source ---------------------------------------------------------------------------
    async def pending_events(self, limit: int):
        """Pending events of orders, in each order's own order; one acknowledgement (one write) pulls them all
        out of their documents once they are numbered.

        The ``order.created`` of a PENDING order younger than ``created_hold`` waits for its saga's decision, so
        that both of its events leave the order with one acknowledgement: taking an event out rewrites the
        whole order document and its index entries, the largest single cost of a checkout on the embedded
        server before (measured: about 4 ms of server CPU per order and pass)."""
        young = utcnow() - datetime.timedelta(seconds=self.created_hold)
        query = {"pending.at": {"$gte": _EPOCH},
                 "$or": [{"status": {"$ne": OrderStatus.PENDING.value}}, {"created_at": {"$lte": young}}]}
        docs = await self.orders.find(query, {"pending": 1}).limit(limit).to_list(limit)
        items = [(pending, None) for doc in docs for pending in doc["pending"]]
        if not items:
            return []
        # one statement per order naming its own events, in one command: a single update_many naming every
        # event of the batch made the server match each order's events against all of them (measured: its cost
        # per order grew with the batch, 3 -> 6 ms of server CPU from 8 to 13 orders a pass)
        pulls = [pymongo.UpdateOne({"_id": doc["_id"]}, {"$pull": {"pending": {"_id": {"$in": [
            p["_id"] for p in doc["pending"]]}}}}) for doc in docs]

        async def ack():
            await self.orders.bulk_write(pulls, ordered=False)
        items[-1] = (items[-1][0], ack)
        return items

    # -- data written by earlier versions ----------------------------------------------------------------------
    async def convert_legacy(self) -> int:
        """Bring a database written by the version with separate idempotency records up to date, once: each
        record is folded into the order it created (its stored answer kept verbatim; its fingerprint, an HMAC
        over the full card number and CVC, dropped), records without an order are dropped (their requests
        made nothing), and cancelled orders that showed ``charged`` while their refund waited show
        ``refund_pending``. Returns how many records were folded."""
        if ((await self.meta.find_one({"_id": "orders_schema"})) or {}).get("version", 1) >= SCHEMA_VERSION:
            return 0
        records = self.database["idempotency"]
        folded = 0
        async for record in records.find({}):
            user_id, _, key = record["_id"].partition(":")
            order = await self.orders.find_one({"_id": record.get("order_id"), "user_id": user_id},
                                               {"status": 1, "history": 1, "idem": 1})
            if order is not None and "idem" not in order:
                idem: dict = {"key": key, "fp": None, "answer": None}
                if record.get("response") is not None:
                    idem["legacy"] = record["response"]
                elif order["status"] != OrderStatus.PENDING.value:  # its request died; the order was decided since
                    idem["answer"] = 1 + next(i for i, h in enumerate(order["history"])
                                              if h["status"] != OrderStatus.PENDING.value)
                try:
                    await self.orders.update_one({"_id": order["_id"], "idem": {"$exists": False}},
                                                 {"$set": {"idem": idem}})
                    folded += 1
                except DuplicateKeyError:  # the key was used again since: the newer order keeps it
                    pass
            await records.delete_one({"_id": record["_id"]})
        await self.orders.update_many(
            {"status": OrderStatus.CANCELLED.value, "payment.status": "charged", "todo": "payment"},
            {"$set": {"payment.status": "refund_pending"}})
        await self.meta.update_one({"_id": "orders_schema"}, {"$set": {"version": SCHEMA_VERSION}}, upsert=True)
        if folded:
            log.info("folded %d idempotency records into their orders", folded)
        return folded


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
