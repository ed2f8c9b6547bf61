"""The payments service's charges: one document per order, with its ledger."""
from __future__ import annotations

import pymongo

from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import utcnow


class ChargeRepo:
    def __init__(self, database):
        self.charges = database["charges"]

    async def get(self, order_id: str) -> dict | None:
        return await self.charges.find_one({"_id": order_id})

    async def record(self, order_id: str, amount_cents: int, currency: str, last4: str, status: str,
                     reason: str | None) -> tuple[dict, bool]:
        """Store the outcome of a charge unless the order has one already; (doc, created)."""
        now = utcnow()
        doc = {"_id": order_id, "amount_cents": amount_cents, "currency": currency, "last4": last4,
               "status": status, "reason": reason, "refunded": False, "created_at": now,
               "ledger": [{"kind": "charge", "amount_cents": amount_cents, "at": now}] if status == "charged" else []}
        try:
            await self.charges.insert_one(doc)
            return doc, True
        except DuplicateKeyError:
            return await self.get(order_id), False

    async def refund(self, order_id: str) -> dict | None:
        """Refund a charged order once; None when there is nothing (left) to refund."""
        doc = await self.get(order_id)
        if doc is None or doc["status"] != "charged" or doc["refunded"]:
            return None
        return await self.charges.find_one_and_update(
            {"_id": order_id, "status": "charged", "refunded": False},
            {"$set": {"refunded": True},
             "$push": {"ledger": {"kind": "refund", "amount_cents": doc["amount_cents"], "at": utcnow()}}},
            return_document=pymongo.ReturnDocument.AFTER)

    async def void(self, order_id: str) -> bool:
        """Mark an order that was never charged so that a late charge request is refused."""
        try:
            await self.charges.insert_one({"_id": order_id, "status": "voided", "refunded": False, "ledger": [],
                                           "created_at": utcnow()})
            return True
        except DuplicateKeyError:
            return False
