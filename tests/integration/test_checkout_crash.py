"""A service killed with SIGKILL in the middle of 200 concurrent checkouts, then started again.

Twenty customers each buy each of ten books once (200 checkouts at the same time, 16 copies of each book: some
end out of stock), through the gateway. Every client keeps its own Idempotency-Key and retries until it gets an
answer that is not a 5xx (nor 429, nor a 409 telling it to retry), honouring Retry-After. In the middle of the
rush (10 orders confirmed, at least 4 still running) orders, inventory or payments is killed and started again
at once. Then, with deadlines:

* every order that exists when the service is back becomes terminal (CONFIRMED or CANCELLED, payment not
  ``refund_pending``), and so do the orders the retries place after that; the time each took is printed. The
  deadline here is generous (a loaded CI machine runs the services under coverage): the contract's figure,
  within 10 s of the restart, is measured by ``bench/checkout.py`` (kill -9 of orders mid-rush), which keeps
  timing out of pass/fail tests;
* stock is conserved: on_hand + sold = the copies restocked, nothing left reserved;
* every confirmed order was charged exactly once (its ledger: one charge of its total, no refund), no
  cancelled order is left charged (as many refunds as charges), and no client, whatever it retried, got two
  confirmed orders for its one key.

Everything is read through the public API as staff. The shop's saga lease and reservation TTL are short so
that what a dead process left is taken over quickly.
"""
from __future__ import annotations

import asyncio
import collections
import time
import uuid

import aiohttp
import pytest

from client import Api
from harness import until

BOOKS = 10
CUSTOMERS = 20  # x BOOKS checkouts, one client (and one key) per customer and book
COPIES = 16
SETTLE = 60.0  # seconds: a deadline, not the figure (see above)
SHOP_ENV = {
    "BOOKSHOP_SAGA_LEASE": "2",
    "BOOKSHOP_RESERVATION_TTL": "5",
    "BOOKSHOP_PAYMENTS_LATENCY_MS": "100",  # charges take a moment: a kill catches some in flight
}
RETRY_409 = {"request_in_progress", "request_failed"}  # "the first request with this key ...; retry"
TERMINAL = {"CONFIRMED", "CANCELLED"}


async def register(api: Api, count: int, parallel: int = 8) -> list[Api]:
    gate = asyncio.Semaphore(parallel)

    async def one() -> Api:
        async with gate:
            return await api.customer()
    return await asyncio.gather(*(one() for _ in range(count)))


def error_code(reply) -> str | None:
    body = reply.body if isinstance(reply.body, dict) else {}
    return (body.get("error") or {}).get("code")


def answered_order(reply) -> str | None:
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.status in (201, 202):
        return body.get("id")
    return ((body.get("error") or {}).get("details") or {}).get("order_id")


class Clients:
    """The customers' checkouts: each retried with its own key until a final answer or the deadline."""

    def __init__(self, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.retries = collections.Counter()

    async def checkout(self, buyer: Api, isbn: str):
        key = uuid.uuid4().hex
        last = None
        while time.monotonic() < self.deadline:
            try:
                reply = await buyer.order([(isbn, 1)], key=key)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.retries[type(exc).__name__] += 1
                await asyncio.sleep(0.5)
                continue
            last = reply
            final = reply.status < 500 and reply.status != 429 \
                and not (reply.status == 409 and error_code(reply) in RETRY_409)
            if final:
                return reply
            self.retries[str(reply.status)] += 1
            hint = reply.headers.get("Retry-After", "1")
            await asyncio.sleep(min(2.0, float(hint)) if hint.isdigit() else 1.0)
        return last


async def every_order(staff: Api) -> list[dict] | None:
    """All orders of the shop as staff lists them (None while the listing is not answered)."""
    out, cursor = [], None
    while True:
        params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
        try:
            r = await staff.get("/orders", params=params)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        if r.status != 200:
            return None
        out += r.body["items"]
        cursor = r.body["next_cursor"]
        if not cursor:
            return out


def brief(items) -> str:
    if not isinstance(items, list):
        return str(items)
    return f"{len(items)} (first: {items[:4]})"


def unsettled(order: dict) -> bool:
    return order["status"] not in TERMINAL or order["payment"]["status"] == "refund_pending"


class Rush:
    """One shop, its staff, ten books, twenty customers and their 200 checkouts."""

    def __init__(self, shop, session: aiohttp.ClientSession):
        self.shop = shop
        self.api = Api(shop, session)
        self.clients: Clients | None = None
        self.tasks: list[asyncio.Future] = []
        self.state: dict = {}
        self.began = time.monotonic()
        self.timeline: dict[str, float] = {}

    def mark(self, what: str) -> None:
        self.timeline[what] = round(time.monotonic() - self.began, 1)

    async def prepare(self) -> None:
        self.staff = await self.api.staff()
        self.isbns = [await self.api.new_book(self.staff, stock=COPIES, price_cents=1000 + 100 * i)
                      for i in range(BOOKS)]
        self.buyers = await register(self.api, CUSTOMERS)
        self.user_ids = [(await b.get("/users/me")).body["id"] for b in self.buyers]
        self.pairs = [(u, isbn) for u in range(CUSTOMERS) for isbn in self.isbns]
        self.mark("ready")

    def start(self) -> None:
        self.clients = Clients(timeout=60)
        self.tasks = [asyncio.ensure_future(self.clients.checkout(self.buyers[u], isbn)) for u, isbn in self.pairs]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def mid_rush(self) -> None:
        """Wait until some orders are confirmed and others are still running (a shop that bounds how many
        sagas run at once may have only a few running at any moment)."""
        async def check():
            confirmed = await self.staff.get("/orders", params={"status": "CONFIRMED", "limit": "10"})
            pending = await self.staff.get("/orders", params={"status": "PENDING", "limit": "4"})
            assert confirmed.status == pending.status == 200, (confirmed, pending)
            return len(confirmed.body["items"]) >= 10 and len(pending.body["items"]) >= 4
        await until(check, 30, every=0.1, describe=lambda: "the rush never had 10 orders confirmed and 4 running")
        self.mark("mid-rush")

    async def kill_and_restart(self, victim: str) -> None:
        self.shop.kill(victim)
        self.mark(f"{victim} killed")
        await asyncio.get_running_loop().run_in_executor(None, self.shop.start, victim)
        self.back = time.monotonic()
        self.mark(f"{victim} ready again")
        self.clients.deadline = self.back + SETTLE  # every client must have its answer by then

    async def orders_there_at_the_restart_settle(self, victim: str) -> None:
        state = self.state

        async def check():
            orders = await every_order(self.staff)
            if orders is None:
                state["left"] = "the order listing is not answered"
                return None
            ids = state.setdefault("at_restart", {o["id"] for o in orders})
            state["left"] = [(o["id"], o["status"], o["payment"]["status"]) for o in orders
                             if o["id"] in ids and unsettled(o)]
            return not state["left"]
        await until(check, SETTLE, describe=lambda: f"{victim} back for {SETTLE:g}s: {brief(state.get('left'))} "
                                                    f"of the {len(state.get('at_restart', ()))} orders there at the "
                                                    "restart not settled", every=0.25)
        self.mark(f"the {len(state['at_restart'])} orders there at the restart settled")

    async def final_answers(self) -> list:
        self.replies = await asyncio.gather(*self.tasks)
        self.mark("every client answered")
        lacking = [(self.pairs[i][1], r) for i, r in enumerate(self.replies) if r is None or r.status >= 500
                   or r.status == 429 or (r.status == 409 and error_code(r) in RETRY_409)]
        assert not lacking, f"{len(lacking)} clients got no final answer: {lacking[:3]}"
        self.answers = collections.Counter(r.status for r in self.replies)
        assert set(self.answers) <= {201, 202, 402, 409}, self.answers
        assert {error_code(r) for r in self.replies if r.status == 409} <= {"out_of_stock", "order_cancelled"}
        return self.replies

    async def everything_settles(self) -> list[dict]:
        """Every order terminal (those the retries placed too) and nothing left reserved."""
        state = self.state

        async def check():
            orders = await every_order(self.staff)
            if orders is None or any(unsettled(o) for o in orders):
                state["left"] = orders and [(o["id"], o["status"], o["payment"]["status"])
                                            for o in orders if unsettled(o)]
                return None
            levels = {}
            for isbn in self.isbns:
                r = await self.staff.get(f"/inventory/{isbn}")
                assert r.status == 200, r
                levels[isbn] = (r.body["on_hand"], r.body["reserved"], r.body["available"])
            state["levels"] = levels
            return orders if not any(reserved for _, reserved, _ in levels.values()) else None
        self.orders = await until(check, SETTLE, describe=lambda: f"not settled: {brief(state.get('left'))}; "
                                                                  f"stock (on_hand, reserved, available): "
                                                                  f"{state.get('levels')}", every=0.25)
        self.by_id = {o["id"]: o for o in self.orders}
        self.mark(f"all {len(self.orders)} orders settled")
        return self.orders

    def stock_is_conserved(self) -> None:
        sold = collections.Counter()
        for o in self.orders:
            if o["status"] == "CONFIRMED":
                for item in o["items"]:
                    sold[item["isbn"]] += item["quantity"]
        for isbn, (on_hand, reserved, available) in self.state["levels"].items():
            assert (on_hand + sold[isbn], reserved, available) == (COPIES, 0, on_hand), \
                (isbn, "on_hand, reserved, available:", (on_hand, reserved, available), "sold:", sold[isbn])

    async def money_is_right(self) -> None:
        """Confirmed orders charged exactly once, cancelled ones not left charged."""
        gate = asyncio.Semaphore(16)

        async def ledger(order_id: str):
            async with gate:
                r = await self.staff.get(f"/orders/{order_id}/payments")
            assert r.status == 200, r
            return r.body
        ledgers = await asyncio.gather(*(ledger(i) for i in self.by_id))
        for order, entries in zip(self.by_id.values(), ledgers):
            charges = [e["amount_cents"] for e in entries if e["kind"] == "charge"]
            refunds = [e["amount_cents"] for e in entries if e["kind"] == "refund"]
            assert len(charges) <= 1, (order, entries)
            if order["status"] == "CONFIRMED":
                assert order["payment"]["status"] == "charged", order
                assert charges == [order["total_cents"]] and not refunds, (order, entries)
            else:
                assert order["payment"]["status"] in ("none", "refunded"), order
                assert len(refunds) == len(charges) and sum(refunds) == sum(charges), (order, entries)

    def one_confirmed_order_per_key(self) -> None:
        """No client got two confirmed orders for its one key; its final answer is what its order became."""
        confirmed = collections.Counter((o["user_id"], o["items"][0]["isbn"]) for o in self.orders
                                        if o["status"] == "CONFIRMED")
        assert confirmed, "no order was confirmed"
        assert max(confirmed.values()) == 1, [k for k, n in confirmed.items() if n > 1]
        for (u, isbn), reply in zip(self.pairs, self.replies):
            order_id = answered_order(reply)
            if order_id is None:
                continue
            order = self.by_id[order_id]
            assert (order["user_id"], order["items"][0]["isbn"]) == (self.user_ids[u], isbn), (reply, order)
            if reply.status == 201:
                assert order["status"] == "CONFIRMED", (reply, order)
            elif reply.status != 202:
                assert order["status"] == "CANCELLED", (reply, order)


@pytest.mark.parametrize("victim", ["orders", "inventory", "payments"])
@pytest.mark.gen_test(timeout=120)
async def test_kill_mid_rush_every_order_settles_stock_and_money_add_up(make_shop, private_mongodb_uri, victim):
    shop = make_shop({**SHOP_ENV, "MONGODB_URI": private_mongodb_uri})
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        rush = Rush(shop, session)
        await rush.prepare()
        rush.start()
        try:
            await rush.mid_rush()
            await rush.kill_and_restart(victim)
            try:
                await rush.orders_there_at_the_restart_settle(victim)
                await rush.final_answers()
                await rush.everything_settles()
            finally:
                print(f"\n{victim}: {rush.timeline} (seconds from the start); retries {dict(rush.clients.retries)}")
            print(f"answers {dict(rush.answers)}; orders {collections.Counter(o['status'] for o in rush.orders)}")
            rush.stock_is_conserved()
            await rush.money_is_right()
            rush.one_confirmed_order_per_key()
        finally:
            await rush.stop()
