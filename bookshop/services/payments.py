"""Use cases of the payments service that take more than one step of the repository."""
from __future__ import annotations

from typing import Protocol


class ChargeStore(Protocol):
    async def get(self, order_id: str) -> dict | None: ...
    async def refund(self, order_id: str) -> dict | None: ...
    async def void(self, order_id: str) -> bool: ...


class RefundPayment:
    """Make sure an order's money is not (or no longer) taken: refund its charge once, or, when it was never
    charged, void it so that a charge arriving late is refused. Answers the charge document as it ends up
    (refunded, declined, voided), and whether this call refunded it."""

    def __init__(self, charges: ChargeStore):
        self.charges = charges

    async def __call__(self, order_id: str) -> tuple[dict, bool]:
        while True:
            doc = await self.charges.refund(order_id)
            if doc is not None:
                return doc, True
            doc = await self.charges.get(order_id)
            if doc is not None and not (doc["status"] == "charged" and not doc["refunded"]):
                return doc, False  # declined, voided or refunded already
            if doc is not None:
                continue  # charged after our refund looked: refund it
            if await self.charges.void(order_id):  # never charged: a late charge is refused from now on
                return await self.charges.get(order_id), False
            # a charge landed between our read and the void: go round and refund it
