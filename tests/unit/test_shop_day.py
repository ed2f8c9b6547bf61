"""Today's totals without a server: the shop's day in its time zone, and what each order's history counts."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import zoneinfo

import pytest

from bookshop.deps import OrdersDeps
from bookshop.handlers import stats
from bookshop.services.stats import CHART_MINUTES, TodaysTotals, Totals, chart_start, shop_day
from bookshop.settings import Settings, SettingsError
from harness import run

UTC = datetime.timezone.utc
PARIS = zoneinfo.ZoneInfo("Europe/Paris")


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).astimezone(UTC)


def order(status: str, total: int = 1000, **steps: str) -> dict:
    """An order whose history reached ``status``, with the instants of its steps (created, confirmed, ...)."""
    history = [{"status": "PENDING", "at": at(steps["created"])}]
    for name in ("confirmed", "shipped", "cancelled"):
        if name in steps:
            history.append({"status": name.upper(), "at": at(steps[name])})
    return {"status": status, "total_cents": total, "created_at": at(steps["created"]), "history": history}


def totals(now: str, zone=PARIS) -> Totals:
    moment = at(now)
    return Totals(shop_day(moment, zone), "EUR", chart_start(moment))


def test_the_day_runs_from_local_midnight_to_the_next():
    day = shop_day(at("2026-12-02T00:30:00+01:00"), PARIS)  # 23:30 UTC the evening before
    assert day.date == datetime.date(2026, 12, 2)
    assert (day.start, day.end) == (at("2026-12-01T23:00:00+00:00"), at("2026-12-02T23:00:00+00:00"))
    utc_day = shop_day(at("2026-12-02T00:30:00+01:00"), zoneinfo.ZoneInfo("UTC"))
    assert utc_day.date == datetime.date(2026, 12, 1)


@pytest.mark.parametrize("date, hours", [("2026-03-29", 23), ("2026-10-25", 25), ("2026-06-01", 24)])
def test_a_day_when_the_clocks_change_is_23_or_25_hours_long(date, hours):
    day = shop_day(at(f"{date}T12:00:00+00:00"), PARIS)
    assert day.end - day.start == datetime.timedelta(hours=hours)


def test_a_midnight_the_clocks_skip_starts_the_day_at_its_first_instant():
    # Chile moved its clocks from 00:00 to 01:00 on 2022-09-11: that day began at 04:00 UTC
    day = shop_day(at("2022-09-11T12:00:00+00:00"), zoneinfo.ZoneInfo("America/Santiago"))
    assert day.start == at("2022-09-11T04:00:00+00:00")


def test_each_tile_counts_what_happened_today_in_shop_time():
    t = totals("2026-12-02T15:00:00+01:00")
    t.add(order("CONFIRMED", 3500, created="2026-12-02T09:00:00+01:00", confirmed="2026-12-02T09:00:01+01:00"))
    t.add(order("SHIPPED", 1000, created="2026-12-02T10:00:00+01:00", confirmed="2026-12-02T10:00:01+01:00",
                shipped="2026-12-02T11:00:00+01:00"))
    # confirmed and cancelled today: a confirmation and a cancellation, no revenue
    t.add(order("CANCELLED", 700, created="2026-12-02T12:00:00+01:00", confirmed="2026-12-02T12:00:01+01:00",
                cancelled="2026-12-02T12:30:00+01:00"))
    # yesterday's sale cancelled today: a cancellation only
    t.add(order("CANCELLED", 900, created="2026-12-01T20:00:00+01:00", confirmed="2026-12-01T20:00:01+01:00",
                cancelled="2026-12-02T08:00:00+01:00"))
    # a checkout still running
    t.add(order("PENDING", 400, created="2026-12-02T14:59:00+01:00"))
    # before local midnight (but after midnight UTC): yesterday's
    t.add(order("CONFIRMED", 5000, created="2026-12-01T23:59:00+01:00", confirmed="2026-12-01T23:59:30+01:00"))
    assert (t.orders_confirmed, t.revenue_cents, t.cancellations, t.orders_shipped, t.open_orders) == (
        3, 4500, 2, 1, 2)


def test_the_chart_counts_confirmations_per_minute_over_the_last_hour_across_midnight():
    t = totals("2026-12-02T00:10:30+01:00")
    assert t.chart_start == at("2026-12-01T23:11:00+01:00")
    t.add(order("CONFIRMED", created="2026-12-01T23:11:05+01:00", confirmed="2026-12-01T23:11:10+01:00"))
    t.add(order("CONFIRMED", created="2026-12-02T00:10:00+01:00", confirmed="2026-12-02T00:10:02+01:00"))
    t.add(order("CONFIRMED", created="2026-12-02T00:10:00+01:00", confirmed="2026-12-02T00:10:20+01:00"))
    t.add(order("CONFIRMED", created="2026-12-01T23:10:00+01:00", confirmed="2026-12-01T23:10:59+01:00"))  # too old
    assert len(t.confirmed_per_minute) == CHART_MINUTES
    assert t.confirmed_per_minute[0] == 1 and t.confirmed_per_minute[-1] == 2 and sum(t.confirmed_per_minute) == 3
    assert t.orders_confirmed == 2  # the chart reaches into yesterday, the tiles do not


def test_the_answer_names_the_day_and_its_zone():
    body = totals("2026-12-02T15:00:00+01:00").as_dict(at("2026-12-02T15:00:00+01:00"))
    assert body["date"] == "2026-12-02" and body["timezone"] == "Europe/Paris"
    assert (body["from"], body["until"]) == ("2026-12-01T23:00:00.000Z", "2026-12-02T23:00:00.000Z")
    assert len(body["confirmed_per_minute"]["counts"]) == CHART_MINUTES


def test_bookshop_timezone_is_an_iana_name_checked_at_start_up():
    assert Settings.from_env({}).timezone == "UTC"
    assert Settings.from_env({"BOOKSHOP_TIMEZONE": "Europe/Paris"}).zone == PARIS
    for bad in ("Mars/Olympus", "UTC+1", "../../etc/passwd", "Europe/"):
        with pytest.raises(SettingsError, match="BOOKSHOP_TIMEZONE must be an IANA time zone name"):
            Settings.from_env({"BOOKSHOP_TIMEZONE": bad})


class CountingOrders:
    """A fake orders repository that counts its reads, how many run at once, and can hold them."""

    def __init__(self):
        self.reads = self.running = self.most_at_once = 0
        self.orders: list[dict] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def touched_since(self, placed_since, finished_since):
        self.reads += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.gate.wait()
            for doc in list(self.orders):
                yield doc
        finally:
            self.running -= 1


class Clock:
    def __init__(self):
        self.seconds = 100.0

    def __call__(self) -> float:
        return self.seconds


async def settle() -> None:
    """Lets every task that can run, run (no time passes: the clock is the test's)."""
    for _ in range(20):
        await asyncio.sleep(0)


def use_case(orders: CountingOrders, clock: Clock) -> TodaysTotals:
    now = at("2026-12-02T15:00:00+01:00")
    return TodaysTotals(orders, PARIS, "EUR", lambda: now, clock=clock)


def confirmed_today() -> dict:
    return order("CONFIRMED", created="2026-12-02T14:00:00+01:00", confirmed="2026-12-02T14:00:01+01:00")


def test_many_pages_asking_at_once_share_one_read():
    async def main():
        orders, clock = CountingOrders(), Clock()
        totals = use_case(orders, clock)
        answers = await asyncio.gather(*(totals.today() for _ in range(50)))
        assert orders.reads == 1
        assert all(answer is answers[0] for answer in answers)
        clock.seconds += TodaysTotals.MAX_AGE / 2  # a page asking just after: the same answer
        assert await totals.today() is answers[0] and orders.reads == 1
    run(main())  # a private loop, closed (asyncio.run would drop pytest-tornado's)


def test_a_shared_answer_never_comes_from_a_read_begun_long_before_the_question():
    async def main():
        orders, clock = CountingOrders(), Clock()
        totals = use_case(orders, clock)
        assert (await totals.today())["orders_confirmed"] == 0
        orders.orders.append(confirmed_today())  # an order written after that read
        clock.seconds += TodaysTotals.MAX_AGE * 2  # the page asks 80 ms after the order's events
        assert (await totals.today())["orders_confirmed"] == 1 and orders.reads == 2
    run(main())  # a private loop, closed (asyncio.run would drop pytest-tornado's)


def test_a_question_during_an_older_read_waits_for_it_then_shares_the_next_one():
    async def main():
        orders, clock = CountingOrders(), Clock()
        totals = use_case(orders, clock)
        orders.gate.clear()  # a slow read of a busy day
        first = asyncio.ensure_future(totals.today())
        await settle()
        assert orders.reads == 1
        orders.orders.append(confirmed_today())  # written while the first read runs (it may miss it)
        clock.seconds += TodaysTotals.MAX_AGE * 2
        later = [asyncio.ensure_future(totals.today()) for _ in range(10)]
        await settle()
        assert orders.reads == 1, "no second read while one runs"
        orders.gate.set()
        await first
        answers = await asyncio.gather(*later)
        assert orders.reads == 2 and orders.most_at_once == 1
        assert all(answer["orders_confirmed"] == 1 for answer in answers)
    run(main())  # a private loop, closed (asyncio.run would drop pytest-tornado's)


def test_a_caller_that_goes_away_does_not_cancel_the_read_the_others_wait_for():
    async def main():
        orders, clock = CountingOrders(), Clock()
        totals = use_case(orders, clock)
        orders.gate.clear()
        gone, staying = asyncio.ensure_future(totals.today()), asyncio.ensure_future(totals.today())
        await settle()
        gone.cancel()
        orders.gate.set()
        assert (await staying)["orders_confirmed"] == 0 and orders.reads == 1
    run(main())  # a private loop, closed (asyncio.run would drop pytest-tornado's)


def test_the_summary_route_reads_its_use_case_from_the_orders_deps():
    # like every other handler (STYLE.md): one frozen dataclass of collaborators, no route kwargs of its own
    assert "totals" in {field.name for field in dataclasses.fields(OrdersDeps)}
    [(pattern, handler, *kwargs)] = stats.routes()
    assert pattern == r"/api/v1/orders/summary" and kwargs == []
    assert handler.__annotations__["deps"] in ("OrdersDeps", OrdersDeps)
