"""What today's totals read of the orders collection (the repository of ``bookshop/services/stats.py``): the
orders placed since an instant, and those shipped or cancelled since another, with only the fields counted."""
from __future__ import annotations

import datetime
from typing import AsyncIterator

from bson import ObjectId

FIELDS = {"status": 1, "total_cents": 1, "created_at": 1, "history.status": 1, "history.at": 1}
FINISHED = ["SHIPPED", "CANCELLED"]


class OrderStatsRepo:
    """Reads of the orders service's ``orders`` collection for the day's totals (writes are
    ``bookshop/storage/orders.py``'s)."""

    def __init__(self, database):
        self.orders = database["orders"]

    async def create_indexes(self) -> None:
        # Orders placed since an instant are an _id range (ids are ObjectIds, in creation order). Those that
        # ended since, however old, are found by the time of their last change: a partial index, so only
        # shipping and cancelling write to it, not a checkout's insert and confirmation.
        await self.orders.create_index("updated_at", name="finished_at",
                                       partialFilterExpression={"status": {"$in": FINISHED}})

    async def touched_since(self, placed_since: datetime.datetime, finished_since: datetime.datetime
                            ) -> AsyncIterator[dict]:
        """The orders placed since ``placed_since``, then those shipped or cancelled since ``finished_since``
        and placed before, each once. Two reads on the indexes they name, not one ``$or`` whose plan would be
        the server's to choose (a collection scan reads every order the shop ever had)."""
        first_id = str(ObjectId.from_datetime(placed_since))
        placed = self.orders.find({"_id": {"$gte": first_id}}, FIELDS, batch_size=1000).hint("_id_")
        async for doc in placed:
            yield doc
        finished = self.orders.find({"status": {"$in": FINISHED}, "updated_at": {"$gte": finished_since},
                                     "_id": {"$lt": first_id}}, FIELDS, batch_size=1000).hint("finished_at")
        async for doc in finished:
            yield doc
