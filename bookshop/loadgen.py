"""``python run.py loadgen``: a mixed shopping load against a running shop, then proof that it stayed correct.

Virtual shoppers (each a customer registered for the run) browse, search, fill their cart, check out (some
orders big enough for the promotion, some from the cart), and cancel now and then; one staff worker restocks.
A live progress line shows requests/s, errors and confirmed orders. At the end the shop gets up to
``--settle`` seconds to finish what is in flight, and then its invariants are checked through the public API
only, as any client could:

* ``no_stock_below_zero`` — every level has ``on_hand``, ``reserved`` and ``available`` ≥ 0 and
  ``available = on_hand - reserved``;
* ``stock_conserved`` — for every book the run touched: final ``on_hand`` = initial + restocked − copies in
  the run's confirmed and shipped orders, and nothing is left reserved beyond what was before (so nothing was
  sold twice or lost); a cancelled order gives its stock back just after it reads ``CANCELLED``, so the levels
  are read again until they add up or the settling time is over;
* ``confirmed_charged_once`` — every confirmed or shipped order has exactly one charge of its total, no
  refund, and ``payment.status`` ``charged``;
* ``cancelled_not_charged`` — every cancelled order's refunds equal its charges and it is not ``charged``;
* ``nothing_left_pending`` — no order of the run is ``PENDING`` or ``refund_pending`` once settled.

The exit code is 0 only when every invariant holds; the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import sys
import time
import uuid
from typing import Any

import aiohttp

CARD = {"card_number": "4242 4242 4242 4242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}
ADDRESS = {"name": "Load Tester", "line1": "1 Test Street", "city": "Lyon", "postal_code": "69001", "country": "FR"}
SEARCH_WORDS = ("the", "of", "city", "night", "river", "garden", "sea", "book", "light", "house")
#: what a shopper does next, by weight
ACTIONS = (("browse", 30), ("search", 15), ("cart", 15), ("checkout", 20), ("checkout_promo", 5),
           ("checkout_cart", 5), ("cancel", 5), ("account", 5))
PAGE = 100


@dataclasses.dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    confirmed: int = 0
    latencies: dict[str, list[float]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    error_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class ShopClient:
    """The public API as one caller sees it: every call timed under its route's name."""

    def __init__(self, session: aiohttp.ClientSession, base: str, stats: Stats, token: str | None = None):
        self.session = session
        self.base = base
        self.stats = stats
        self.token = token

    async def call(self, route: str, method: str, path: str, body: Any = None, *, expect=(200,), headers=None,
                   params=None, count: bool = True) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        started = time.perf_counter()
        try:
            async with self.session.request(method, self.base + path, json=body, headers=hdrs,
                                            params=params) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if count:
                self.stats.requests += 1
                self.stats.errors += 1
                self.stats.error_kinds[f"{route}: {type(exc).__name__}"] += 1
            return 0, None
        if count:
            self.stats.requests += 1
            self.stats.latencies[route].append((time.perf_counter() - started) * 1000.0)
            if status >= 500 or status not in expect:
                self.stats.errors += 1
                self.stats.error_kinds[f"{route}: {status}"] += 1
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return status, data


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class LoadGen:
    def __init__(self, url: str, users: int, duration: float, staff_email: str, staff_password: str,
                 settle: float = 60.0, seed: int | None = None, out=None, progress: bool = True):
        self.base = url.rstrip("/") + "/api/v1"
        self.users = users
        self.duration = duration
        self.staff_credentials = {"email": staff_email, "password": staff_password}
        self.settle = settle
        self.random = random.Random(seed)
        self.out = out or sys.stdout
        self.progress = progress
        self.stats = Stats()
        self.isbns: list[str] = []
        self.initial: dict[str, dict] = {}
        self.restocked: collections.Counter = collections.Counter()
        self.customer_ids: set[str] = set()
        self.placed: list[str] = []

    # -- set-up --------------------------------------------------------------------------------------
    async def _shed(self, client: ShopClient, route: str, path: str, body: dict, ok: int) -> tuple[int, Any]:
        """POST, retried while the users service sheds a flood of password hashes (503) or registrations
        (429): a load test's many sign-ups at once are exactly such a flood."""
        for _ in range(30):
            status, reply = await client.call(route, "POST", path, body, expect=(ok, 429, 503), count=False)
            if status not in (0, 429, 503):
                return status, reply
            await asyncio.sleep(0.5 + self.random.random())
        return status, reply

    async def _login(self, client: ShopClient, email: str, password: str) -> str:
        status, body = await self._shed(client, "POST /tokens", "/tokens", {"email": email, "password": password},
                                        200)
        if status != 200:
            raise RuntimeError(f"cannot log in as {email}: {status} {body}")
        return body["access_token"]

    async def _books(self, client: ShopClient) -> list[str]:
        isbns, cursor = [], None
        while len(isbns) < 1000:
            params = {"limit": str(PAGE), **({"cursor": cursor} if cursor else {})}
            status, body = await client.call("GET /books", "GET", "/books", params=params, count=False)
            if status != 200:
                raise RuntimeError(f"cannot list books: {status} {body}")
            isbns += [b["isbn"] for b in body["items"]]
            cursor = body.get("next_cursor")
            if not cursor:
                return isbns
        return isbns

    async def _levels(self, client: ShopClient, isbns: list[str]) -> dict[str, dict]:
        async def one(isbn):
            status, body = await client.call("GET /inventory/{isbn}", "GET", f"/inventory/{isbn}", count=False)
            return isbn, (body if status == 200 else None)
        out = {}
        for i in range(0, len(isbns), 50):
            for isbn, level in await asyncio.gather(*(one(x) for x in isbns[i:i + 50])):
                out[isbn] = level
        return out

    async def _customer(self, session: aiohttp.ClientSession) -> ShopClient:
        client = ShopClient(session, self.base, self.stats)
        email = f"load-{uuid.uuid4().hex[:16]}@example.com"
        status, body = await self._shed(client, "POST /users", "/users", {
            "email": email, "password": "load-test-password", "name": "Load tester"}, 201)
        if status != 201:
            raise RuntimeError(f"cannot register a shopper: {status} {body} (for a big load test, "
                               "BOOKSHOP_REGISTRATION_LIMIT=0 lifts the limit per client address)")
        self.customer_ids.add(body["id"])
        client.token = await self._login(client, email, "load-test-password")
        return client

    # -- shoppers -------------------------------------------------------------------------------------
    def _pick(self) -> str:
        return self.random.choice(self.isbns)

    async def _checkout(self, client: ShopClient, body: dict) -> None:
        body = {**body, "shipping_address": ADDRESS, "payment": CARD}
        key = uuid.uuid4().hex
        for _ in range(5):  # a 5xx or 429 is not stored: retry it with the same key, as a client would
            status, reply = await client.call("POST /orders", "POST", "/orders", body,
                                              headers={"Idempotency-Key": key},
                                              expect=(201, 202, 402, 409))
            if reply and isinstance(reply, dict):
                order_id = reply.get("id") or (reply.get("error", {}).get("details") or {}).get("order_id")
                if order_id and order_id not in self.placed:
                    self.placed.append(order_id)
            if status == 201:
                self.stats.confirmed += 1
            if status not in (0, 429) and status < 500:
                return
            await asyncio.sleep(0.2)

    async def _act(self, client: ShopClient, action: str) -> None:
        if action == "browse":
            await client.call("GET /books", "GET", "/books", params={"limit": "20"})
            await client.call("GET /books/{isbn}", "GET", f"/books/{self._pick()}")
        elif action == "search":
            await client.call("GET /books?q=", "GET", "/books", params={"q": self.random.choice(SEARCH_WORDS)})
        elif action == "cart":
            await client.call("PUT /cart/items/{isbn}", "PUT", f"/cart/items/{self._pick()}",
                              {"quantity": self.random.randint(1, 2)}, expect=(200, 404, 409))
            await client.call("GET /cart", "GET", "/cart")
        elif action == "checkout":
            await self._checkout(client, {"items": [{"isbn": self._pick(), "quantity": 1}]})
        elif action == "checkout_promo":  # three copies: the cheapest is free, once per customer
            await self._checkout(client, {"items": [{"isbn": self._pick(), "quantity": 2},
                                                    {"isbn": self._pick(), "quantity": 1}]})
        elif action == "checkout_cart":
            status, cart = await client.call("GET /cart", "GET", "/cart")
            if status == 200 and cart["items"]:
                await self._checkout(client, {"from_cart": True})
        elif action == "cancel":
            status, page = await client.call("GET /orders", "GET", "/orders", params={"status": "CONFIRMED"})
            if status == 200 and page["items"]:
                order = self.random.choice(page["items"])
                await client.call("POST /orders/{id}/cancel", "POST", f"/orders/{order['id']}/cancel",
                                  expect=(200, 409))
        else:
            await client.call("GET /users/me", "GET", "/users/me")

    async def _shopper(self, session: aiohttp.ClientSession, deadline: float) -> None:
        client = await self._customer(session)
        names = [a for a, _ in ACTIONS]
        weights = [w for _, w in ACTIONS]
        while time.monotonic() < deadline:
            await self._act(client, self.random.choices(names, weights)[0])

    async def _staff_worker(self, staff: ShopClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            isbn = self._pick()
            quantity = self.random.randint(1, 5)
            status, _ = await staff.call("POST /inventory/{isbn}/restock", "POST", f"/inventory/{isbn}/restock",
                                         {"quantity": quantity})
            if status == 200:
                self.restocked[isbn] += quantity
            await asyncio.sleep(0.5)

    async def _show_progress(self, deadline: float, started: float) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        columns = (TextColumn("[bold]loadgen"), BarColumn(), TextColumn("{task.fields[line]}"),
                   TimeRemainingColumn())
        with Progress(*columns, transient=False, disable=not self.progress) as bar:
            task = bar.add_task("load", total=self.duration, line="")
            while True:
                now = time.monotonic()
                elapsed = max(0.001, now - started)
                bar.update(task, completed=min(self.duration, elapsed),
                           line=f"{self.stats.requests / elapsed:7.1f} req/s  errors {self.stats.errors}  "
                                f"confirmed {self.stats.confirmed}")
                if now >= deadline:
                    return
                await asyncio.sleep(min(0.25, deadline - now))

    # -- invariants -----------------------------------------------------------------------------------
    async def _orders_of_run(self, staff: ShopClient) -> list[dict]:
        orders, cursor = [], None
        while True:
            params = {"limit": str(PAGE), **({"cursor": cursor} if cursor else {})}
            status, page = await staff.call("GET /orders", "GET", "/orders", params=params, count=False)
            if status != 200:
                raise RuntimeError(f"cannot list orders: {status} {page}")
            orders += [o for o in page["items"] if o["user_id"] in self.customer_ids]
            cursor = page.get("next_cursor")
            if not cursor:
                return orders

    async def _settle(self, staff: ShopClient, deadline: float) -> list[dict]:
        while True:
            orders = await self._orders_of_run(staff)
            open_ = [o for o in orders if o["status"] == "PENDING" or o["payment"]["status"] == "refund_pending"]
            if not open_ or time.monotonic() >= deadline:
                return orders
            await asyncio.sleep(0.5)

    def _unconserved(self, final: dict[str, dict], sold: collections.Counter) -> list[tuple[str, int, int]]:
        """The books whose final level is not what the run explains: (isbn, expected on_hand, reserved)."""
        unconserved = []
        for isbn in self.isbns:
            before, after = self.initial.get(isbn), final.get(isbn)
            on_hand = (before or {}).get("on_hand", 0) + self.restocked[isbn] - sold[isbn]
            reserved = (before or {}).get("reserved", 0)
            if after is None or after["on_hand"] != on_hand or after["reserved"] != reserved:
                unconserved.append((isbn, on_hand, reserved))
        return unconserved

    async def check(self, staff: ShopClient) -> tuple[dict[str, bool], list[str]]:
        deadline = time.monotonic() + self.settle
        orders = await self._settle(staff, deadline)
        problems: list[str] = []
        sold: collections.Counter = collections.Counter()
        for order in orders:
            if order["status"] in ("CONFIRMED", "SHIPPED"):
                for item in order["items"]:
                    sold[item["isbn"]] += item["quantity"]
        # a cancelled order is CANCELLED before its stock is given back (its compensation follows): the levels
        # get the rest of the settling time to come back
        final = await self._levels(staff, self.isbns)
        unconserved = self._unconserved(final, sold)
        while unconserved and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            final = await self._levels(staff, self.isbns)
            unconserved = self._unconserved(final, sold)

        negative = [isbn for isbn, lv in final.items() if lv is not None and (
            min(lv["on_hand"], lv["reserved"], lv["available"]) < 0
            or lv["available"] != lv["on_hand"] - lv["reserved"])]
        problems += [f"no_stock_below_zero: {isbn} {final[isbn]}" for isbn in negative[:10]]

        for isbn, on_hand, reserved in unconserved:
            after = final.get(isbn)
            problems.append(f"stock_conserved: {isbn} expected on_hand {on_hand} reserved {reserved}, "
                            f"found {after and {k: after[k] for k in ('on_hand', 'reserved')}}")

        async def ledger(order):
            status, rows = await staff.call("GET /orders/{id}/payments", "GET", f"/orders/{order['id']}/payments",
                                            count=False)
            return order, (rows if status == 200 else None)
        ledgers = []
        for i in range(0, len(orders), 50):
            ledgers += await asyncio.gather(*(ledger(o) for o in orders[i:i + 50]))
        twice, charged_cancelled, pending = [], [], []
        for order, rows in ledgers:
            if rows is None:
                twice.append(order["id"])
                continue
            charges = [r["amount_cents"] for r in rows if r["kind"] == "charge"]
            refunds = [r["amount_cents"] for r in rows if r["kind"] == "refund"]
            if order["status"] in ("CONFIRMED", "SHIPPED"):
                if charges != [order["total_cents"]] or refunds or order["payment"]["status"] != "charged":
                    twice.append(order["id"])
            elif order["status"] == "CANCELLED":
                if sum(charges) != sum(refunds) or order["payment"]["status"] == "charged":
                    charged_cancelled.append(order["id"])
            if order["status"] == "PENDING" or order["payment"]["status"] == "refund_pending":
                pending.append(order["id"])
        problems += [f"confirmed_charged_once: order {i}" for i in twice[:10]]
        problems += [f"cancelled_not_charged: order {i}" for i in charged_cancelled[:10]]
        problems += [f"nothing_left_pending: order {i}" for i in pending[:10]]
        invariants = {"no_stock_below_zero": not negative, "stock_conserved": not unconserved,
                      "confirmed_charged_once": not twice, "cancelled_not_charged": not charged_cancelled,
                      "nothing_left_pending": not pending}
        self.stats.confirmed = sum(1 for o in orders if o["status"] in ("CONFIRMED", "SHIPPED")
                                   or any(h["status"] == "CONFIRMED" for h in o["history"]))
        return invariants, problems

    # -- the run ----------------------------------------------------------------------------------------
    async def run(self) -> dict:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            staff = ShopClient(session, self.base, self.stats)
            staff.token = await self._login(staff, self.staff_credentials["email"],
                                            self.staff_credentials["password"])
            self.isbns = await self._books(staff)
            if not self.isbns:
                raise RuntimeError("the shop has no books to sell")
            self.initial = await self._levels(staff, self.isbns)
            started = time.monotonic()
            deadline = started + self.duration
            workers = [self._shopper(session, deadline) for _ in range(self.users)]
            workers.append(self._staff_worker(staff, deadline))
            await asyncio.gather(self._show_progress(deadline, started), *workers)
            elapsed = time.monotonic() - started
            invariants, problems = await self.check(staff)
        return self.report(invariants, problems, elapsed)

    def report(self, invariants: dict[str, bool], problems: list[str], elapsed: float) -> dict:
        p = self.out
        print(f"\n{self.stats.requests} requests in {elapsed:.1f} s ({self.stats.requests / elapsed:.1f}/s), "
              f"{self.stats.errors} errors, {self.stats.confirmed} orders confirmed", file=p)
        print(f"\n{'route':<32} {'n':>7} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}", file=p)
        latency = {}
        for route in sorted(self.stats.latencies):
            values = self.stats.latencies[route]
            q = {k: round(percentile(values, v), 1) for k, v in (("p50", .5), ("p95", .95), ("p99", .99))}
            latency[route] = {"p50": q["p50"], "p99": q["p99"]}
            print(f"{route:<32} {len(values):>7} {q['p50']:>9.1f} {q['p95']:>9.1f} {q['p99']:>9.1f}", file=p)
        if self.stats.error_kinds:
            print("\nerrors:", file=p)
            for kind, n in self.stats.error_kinds.most_common(10):
                print(f"  {kind}: {n}", file=p)
        print("\ninvariants:", file=p)
        for name, held in invariants.items():
            print(f"  {'ok    ' if held else 'BROKEN'} {name}", file=p)
        for problem in problems[:20]:
            print(f"    {problem}", file=p)
        summary = {"requests": self.stats.requests, "orders_confirmed": self.stats.confirmed,
                   "errors": self.stats.errors, "latency_ms": latency, "invariants": invariants}
        print(json.dumps(summary, separators=(",", ":")), file=p)
        return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py loadgen", description="Drive a mixed shopping load against a "
                                     "running shop, then check its invariants through the public API.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway (default %(default)s)")
    parser.add_argument("--users", type=int, default=10, help="concurrent shoppers (default %(default)s)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default %(default)s)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds the shop gets to finish in-flight orders before the check (max 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable mix")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    args = parser.parse_args(argv)
    if args.users < 1 or args.duration <= 0 or not 0 <= args.settle <= 60:
        parser.error("--users must be ≥ 1, --duration > 0 and --settle between 0 and 60")
    return args


def main(argv: list[str], staff_email: str | None, staff_password: str | None) -> int:
    args = parse_args(argv)
    if not staff_email or not staff_password:
        print("bookshop: error: loadgen needs the staff credentials in BOOKSHOP_ADMIN_EMAIL and "
              "BOOKSHOP_ADMIN_PASSWORD (to restock and to check the invariants)", file=sys.stderr)
        return 2
    gen = LoadGen(args.url, args.users, args.duration, staff_email, staff_password, settle=args.settle,
                  seed=args.seed, progress=not args.no_progress)
    try:
        summary = asyncio.run(gen.run())
    except (RuntimeError, aiohttp.ClientError, OSError) as exc:
        print(f"bookshop: error: loadgen: {exc}", file=sys.stderr)
        return 2
    return 0 if all(summary["invariants"].values()) else 1
