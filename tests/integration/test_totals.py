"""``GET /api/v1/orders/summary``: today's totals for staff, counted in the shop's time zone, through the gateway."""
from __future__ import annotations

import datetime
import zoneinfo

import aiohttp
import pytest
from bson import ObjectId
from motor.motor_asyncio import AsyncIOMotorClient

from client import Api

TILES = ("orders_confirmed", "revenue_cents", "cancellations", "orders_shipped", "open_orders")
DECLINED = {"card_number": "4000000000000002", "exp_month": 12, "exp_year": 2040, "cvc": "123"}


async def summary(api: Api) -> dict:
    r = await api.get("/orders/summary")
    assert r.status == 200, r
    return r.body


def moved(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in TILES}


@pytest.mark.gen_test(timeout=60)
async def test_todays_totals_are_for_staff_only(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        anonymous = await api.get("/orders/summary")
        assert anonymous.status == 401 and anonymous.body["error"]["code"] == "unauthenticated"
        customer = await (await api.customer()).get("/orders/summary")
        assert customer.status == 403 and customer.body["error"]["code"] == "forbidden"
        # the orders service itself asks the same (the gateway only forwards)
        direct = api.as_(None)
        assert (await direct.get(shop.url("orders") + "/api/v1/orders/summary")).status == 401
        customer_token = (await api.login(*await api.register()))["access_token"]
        assert (await direct.get(shop.url("orders") + "/api/v1/orders/summary", token=customer_token)).status == 403
        staff = await api.staff()
        before = datetime.datetime.now(datetime.timezone.utc).date()
        body = await summary(staff)
        after = datetime.datetime.now(datetime.timezone.utc).date()
        assert body["timezone"] == "UTC" and body["currency"] == "EUR"
        # the UTC date when it was asked or answered: a run across UTC midnight may see either
        assert body["date"] in {before.isoformat(), after.isoformat()}
        assert len(body["confirmed_per_minute"]["counts"]) == 60


@pytest.mark.gen_test(timeout=60)
async def test_todays_totals_move_with_the_orders_of_the_day(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        customer = await api.customer()
        isbn = await api.new_book(staff, stock=20, price_cents=1750)
        for _attempt in range(3):  # a run across midnight counts on another day: once more
            before = await summary(staff)
            kept = await customer.order([(isbn, 2)])  # 35.00, confirmed, stays open until shipped
            shipped = await customer.order([(isbn, 1)])
            cancelled = await customer.order([(isbn, 1)])
            declined = await customer.order([(isbn, 1)], card=DECLINED)  # a cancellation, never confirmed
            assert (kept.status, shipped.status, cancelled.status, declined.status) == (201, 201, 201, 402)
            assert (await staff.post(f"/orders/{shipped.body['id']}/ship")).status == 200
            assert (await customer.post(f"/orders/{cancelled.body['id']}/cancel")).status == 200
            after = await summary(staff)
            if after["date"] == before["date"]:
                break
        assert moved(before, after) == {"orders_confirmed": 3, "revenue_cents": 3500 + 1750,
                                        "cancellations": 2, "orders_shipped": 1, "open_orders": 1}
        assert sum(after["confirmed_per_minute"]["counts"]) - sum(before["confirmed_per_minute"]["counts"]) >= 3


@pytest.mark.gen_test(timeout=90)
async def test_the_day_starts_at_midnight_in_bookshop_timezone(make_shop):
    # Kiritimati is 14 hours ahead of UTC: its day is another date than UTC's for ten hours of every day
    zone = zoneinfo.ZoneInfo("Pacific/Kiritimati")
    shop = make_shop({"BOOKSHOP_TIMEZONE": zone.key}, services=["users", "orders", "gateway"])
    now = datetime.datetime.now(datetime.timezone.utc)
    midnight = datetime.datetime.combine(now.astimezone(zone).date(), datetime.time(0), tzinfo=zone)
    utc = datetime.timezone.utc

    def stored(created: datetime.datetime, status: str, total: int, *steps) -> dict:
        history = [{"status": "PENDING", "at": created, "by": "system"}]
        history += [{"status": s, "at": t, "by": "system"} for s, t in steps]
        return {"_id": str(ObjectId.from_datetime(created)), "user_id": "reader-tz", "status": status,
                "items": [{"isbn": "9780306406157", "title": "T", "quantity": 1, "unit_price_cents": total}],
                "subtotal_cents": total, "discount_cents": 0, "total_cents": total, "currency": "EUR",
                "promotion_applied": False, "shipping_address": {}, "payment": {"status": "charged"},
                "history": history, "created_at": created, "updated_at": history[-1]["at"]}

    minute = datetime.timedelta(minutes=1)
    docs = [
        # confirmed a minute before local midnight: yesterday's sale, though the same UTC date
        stored(midnight - 2 * minute, "CONFIRMED", 1000, ("CONFIRMED", midnight - minute)),
        # confirmed then, cancelled a minute after midnight: today's cancellation only
        stored(midnight - 3 * minute, "CANCELLED", 2000, ("CONFIRMED", midnight - 2 * minute),
               ("CANCELLED", midnight + minute)),
        # created a minute after midnight: today's
        stored(midnight + minute, "CONFIRMED", 4000, ("CONFIRMED", midnight + 2 * minute)),
        # placed and confirmed hours ago, shipped three minutes after midnight: today's shipment only
        stored(midnight - 180 * minute, "SHIPPED", 8000, ("CONFIRMED", midnight - 179 * minute),
               ("SHIPPED", midnight + 3 * minute)),
    ]
    mongo = AsyncIOMotorClient(shop.mongodb_uri, tz_aware=True)
    try:
        await mongo[f"{shop.prefix}_orders"]["orders"].insert_many(
            [{**d, "created_at": d["created_at"].astimezone(utc)} for d in docs])
    finally:
        mongo.close()
    async with aiohttp.ClientSession() as session:
        body = await summary(await Api(shop, session).staff())
    if body["date"] != midnight.date().isoformat():
        pytest.skip("the stored orders were of a day that has ended (run across Kiritimati's midnight)")
    assert body["timezone"] == "Pacific/Kiritimati"
    assert body["from"] == midnight.astimezone(utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert {k: body[k] for k in TILES} == {"orders_confirmed": 1, "revenue_cents": 4000, "cancellations": 1,
                                           "orders_shipped": 1, "open_orders": 1}
