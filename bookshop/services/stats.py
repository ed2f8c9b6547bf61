"""Today's totals for the staff dashboard: what the shop confirmed, kept, lost and still owes since local
midnight (``BOOKSHOP_TIMEZONE``), and its confirmations per minute over the last hour.

Plain Python: the day's window is worked out from a clock and a time zone, and the totals are tallied from
the orders' histories (``{status, at}`` entries), so every rule here is unit-tested without a database.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
import zoneinfo
from typing import Any, AsyncIterable, Callable, Iterable, Protocol

from bookshop.services.orders import OrderStatus
from bookshop.services.views import iso_z

UTC = datetime.timezone.utc
MINUTE = datetime.timedelta(minutes=1)
CHART_MINUTES = 60
KEPT = (OrderStatus.CONFIRMED.value, OrderStatus.SHIPPED.value)  # a sale the shop keeps the money of
OPEN = (OrderStatus.PENDING.value, OrderStatus.CONFIRMED.value)  # still to ship (or to decide)
# how long before the day (or the chart) an order may have been placed and still be confirmed within it: a
# checkout is decided in seconds, a checkout interrupted by a crash within a saga lease or two
DECIDED_WITHIN = datetime.timedelta(hours=1)


@dataclasses.dataclass(frozen=True)
class ShopDay:
    """One day of the shop: local midnight to the next local midnight, as UTC instants (23 or 25 hours long
    on the days the clocks change)."""
    date: datetime.date
    zone: zoneinfo.ZoneInfo
    start: datetime.datetime
    end: datetime.datetime

    def __contains__(self, at: datetime.datetime) -> bool:
        return self.start <= at < self.end


def shop_day(now: datetime.datetime, zone: zoneinfo.ZoneInfo) -> ShopDay:
    """The shop's day that ``now`` (an aware instant) falls in."""
    date = now.astimezone(zone).date()

    def midnight(day: datetime.date) -> datetime.datetime:
        # a midnight the clocks skip (a change at 00:00) is read with the offset before the change, which
        # lands on the first instant of that day
        return datetime.datetime.combine(day, datetime.time(0), tzinfo=zone).astimezone(UTC)

    return ShopDay(date, zone, midnight(date), midnight(date + datetime.timedelta(days=1)))


def _aware(at: Any) -> datetime.datetime | None:
    if not isinstance(at, datetime.datetime):
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _first(history: Iterable[dict], status: str) -> datetime.datetime | None:
    for entry in history:
        if entry.get("status") == status:
            return _aware(entry.get("at"))
    return None


@dataclasses.dataclass
class Totals:
    """Today's totals. ``confirmed_per_minute[i]`` counts the confirmations in the minute starting
    ``chart_start + i`` minutes (the last one is the current minute)."""
    day: ShopDay
    currency: str
    chart_start: datetime.datetime
    orders_confirmed: int = 0
    revenue_cents: int = 0
    cancellations: int = 0
    orders_shipped: int = 0
    open_orders: int = 0
    confirmed_per_minute: list[int] = dataclasses.field(default_factory=lambda: [0] * CHART_MINUTES)

    def add(self, order: dict) -> None:
        """Count one order (``status``, ``total_cents``, ``created_at``, ``history``) in."""
        history = order.get("history") or []
        status = order.get("status")
        confirmed = _first(history, OrderStatus.CONFIRMED.value)
        if confirmed is not None and confirmed in self.day:
            self.orders_confirmed += 1
            if status in KEPT:  # confirmed today and cancelled since: refunded, not revenue
                self.revenue_cents += int(order.get("total_cents") or 0)
        if confirmed is not None:
            minute = int((confirmed - self.chart_start) // MINUTE)
            if 0 <= minute < CHART_MINUTES:
                self.confirmed_per_minute[minute] += 1
        cancelled = _first(history, OrderStatus.CANCELLED.value)
        if cancelled is not None and cancelled in self.day:
            self.cancellations += 1
        shipped = _first(history, OrderStatus.SHIPPED.value)
        if shipped is not None and shipped in self.day:
            self.orders_shipped += 1
        created = _aware(order.get("created_at"))
        if created is not None and created in self.day and status in OPEN:
            self.open_orders += 1

    def as_dict(self, now: datetime.datetime) -> dict:
        return {
            "date": self.day.date.isoformat(), "timezone": self.day.zone.key,
            "from": iso_z(self.day.start), "until": iso_z(self.day.end), "as_of": iso_z(now), "currency": self.currency,
            "orders_confirmed": self.orders_confirmed, "revenue_cents": self.revenue_cents,
            "cancellations": self.cancellations, "orders_shipped": self.orders_shipped,
            "open_orders": self.open_orders,
            "confirmed_per_minute": {"from": iso_z(self.chart_start), "counts": list(self.confirmed_per_minute)},
        }


def chart_start(now: datetime.datetime) -> datetime.datetime:
    """The first minute of the chart: the current minute is its last bar."""
    minute = now.astimezone(UTC).replace(second=0, microsecond=0)
    return minute - (CHART_MINUTES - 1) * MINUTE


class OrdersSince(Protocol):
    def touched_since(self, placed_since: datetime.datetime, finished_since: datetime.datetime
                      ) -> AsyncIterable[dict]:
        """The orders placed since ``placed_since`` and those shipped or cancelled since ``finished_since``,
        each once."""


class TodaysTotals:
    """The use case behind ``GET /api/v1/orders/summary``: today's totals, in the shop's time zone.

    A read walks every order of the day, and every staff page asks after each burst of order events, all at
    about the same moment. So there is one read at a time, shared by every caller it can answer: an answer
    is given to a caller only when its read began at most ``MAX_AGE`` before the caller asked, whether that
    read is still running or has finished. A caller that finds an older read running waits for it to end, and
    then shares the next one. ``MAX_AGE`` is shorter than the 80 ms a page waits after an order event before
    it asks (``TOTALS_SETTLE_MS`` in dashboard.js), so the answer to that question always comes from a read
    begun after the event's order was written: sharing never hides an order from a page."""

    MAX_AGE = 0.05  # seconds (of ``clock``)

    def __init__(self, orders: OrdersSince, zone: zoneinfo.ZoneInfo, currency: str,
                 now: Callable[[], datetime.datetime], clock: Callable[[], float] = time.monotonic):
        self.orders = orders
        self.zone = zone
        self.currency = currency
        self.now = now
        self.clock = clock
        self._running: asyncio.Future | None = None  # the read in flight
        self._running_since = 0.0
        self._last: tuple[float, dict] | None = None  # (when its read began, the answer)

    async def today(self) -> dict:
        asked = self.clock()
        while True:
            if self._last is not None and asked - self._last[0] <= self.MAX_AGE:
                return self._last[1]
            running = self._running
            if running is None:
                self._running_since = self.clock()
                running = self._running = asyncio.ensure_future(self._read(self._running_since))
            elif asked - self._running_since > self.MAX_AGE:
                await asyncio.wait([running])  # too old for this caller: one read at a time, then the next
                continue
            # shielded: a caller that goes away (a closed connection) does not cancel the others' answer
            return await asyncio.shield(running)

    async def _read(self, began: float) -> dict:
        try:
            answer = await self.count()
            self._last = (began, answer)
            return answer
        finally:
            self._running = None

    async def count(self) -> dict:
        now = self.now()
        totals = Totals(shop_day(now, self.zone), self.currency, chart_start(now))
        # What counts today was placed today (or within DECIDED_WITHIN before, for the confirmations), or was
        # shipped or cancelled today however old; the chart may reach back into yesterday. An order placed
        # more than that before midnight (or the chart's start) and confirmed today (recovered after a long
        # outage) is not counted as confirmed.
        placed_since = min(totals.day.start, totals.chart_start) - DECIDED_WITHIN
        async for order in self.orders.touched_since(placed_since, totals.day.start):
            totals.add(order)
        return totals.as_dict(now)
