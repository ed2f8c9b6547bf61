"""What today's totals read of the orders collection: the orders created or changed since an instant, with
only the fields that are counted (the repository of ``bookshop/services/stats.py``)."""
from __future__ import annotations

import datetime
from typing import AsyncIterator

from bson import ObjectId

FIELDS = {"status": 1, "total_cents": 1, "created_at": 1, "history.status": 1, "history.at": 1}


class OrderStatsRepo:
    """Reads of the orders service's ``orders`` collection for the day's totals (writes are
    ``bookshop/storage/orders.py``'s)."""

    def __init__(self, database):
        self.orders = database["orders"]

    async def create_indexes(self) -> None:
        # every status change sets updated_at: the orders changed today without reading the older ones
        await self.orders.create_index("updated_at", name="updated_at")

    async def touched_since(self, since: datetime.datetime) -> AsyncIterator[dict]:
        """Orders created (their id's time: ids are ObjectIds, in creation order) or changed since ``since``,
        each once. Two reads, each on the index it names, rather than one ``$or`` whose plan is the server's
        to choose (a collection scan would read every order the shop ever had, for each dashboard's read)."""
        created = self.orders.find({"_id": {"$gte": str(ObjectId.from_datetime(since))}}, FIELDS, batch_size=1000)
        seen = set()
        async for doc in created.hint("_id_"):
            seen.add(doc["_id"])
            yield doc
        changed = self.orders.find({"updated_at": {"$gte": since}}, FIELDS, batch_size=1000)
        async for doc in changed.hint("updated_at"):
            if doc["_id"] not in seen:
                yield doc
