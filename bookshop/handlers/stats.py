"""Orders service routes for the staff dashboard: today's totals (``GET /api/v1/orders/summary``)."""
from __future__ import annotations

from bookshop.deps import OrdersDeps
from bookshop.handlers.base import BaseHandler


class OrdersSummaryHandler(BaseHandler):
    """``GET /api/v1/orders/summary`` (staff): orders confirmed, revenue kept, cancellations, shipments and open
    orders since midnight in ``BOOKSHOP_TIMEZONE``, and confirmations per minute over the last hour."""

    deps: OrdersDeps

    async def get(self):
        self.require("staff")
        self.write_json(await self.deps.totals.today())


def routes() -> list[tuple]:
    # listed before the orders routes: /api/v1/orders/{id} would take "summary" for an order id
    return [(r"/api/v1/orders/summary", OrdersSummaryHandler)]
