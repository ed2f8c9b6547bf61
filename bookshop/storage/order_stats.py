"""What today's totals read of the orders collection: the orders created or changed since an instant, with
only the fields that are counted (the repository of ``bookshop/services/stats.py``)."""
from __future__ import annotations

import datetime
from typing import AsyncIterator

from bson import ObjectId

FIELDS = {"_id": 0, "status": 1, "total_cents": 1, "created_at": 1, "history.status": 1, "history.at": 1}


class OrderStatsRepo:
    """Reads of the orders service's ``orders`` collection for the day's totals (writes are
    ``bookshop/storage/orders.py``'s)."""

    def __init__(self, database):
        self.orders = database["orders"]

    async def create_indexes(self) -> None:
        # every status change sets updated_at: the orders changed today without reading the older ones
        await self.orders.create_index("updated_at", name="updated_at")

    async def touched_since(self, since: datetime.datetime) -> AsyncIterator[dict]:
        """Orders created (their id's time: ids are ObjectIds, in creation order) or changed since ``since``."""
        first_id = str(ObjectId.from_datetime(since))
        query = {"$or": [{"_id": {"$gte": first_id}}, {"updated_at": {"$gte": since}}]}
        async for doc in self.orders.find(query, FIELDS, batch_size=1000):
            yield doc
