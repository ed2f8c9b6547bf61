"""Checkout speed and crash recovery: the figures of issue 11, each against its goal, in one run.

    python bench/checkout.py [--duration 10] [--customers 32] [--overload 128] [--crash-after 3]
                             [--separate] [--steps] [--profile orders]

The shop runs as a user runs it, ``python run.py`` (the all-in-one mode: its embedded database(s) in a data
directory of the run's own, every service its own process); ``--separate`` runs the services as
``run.py --service NAME`` processes against one in-memory database the bench starts (needed by ``--profile``).
Customers place one-book orders (spread over 100 demo books, restocked first; ``--hot``: all the same book)
back to back through the gateway: POST /api/v1/orders with a fresh Idempotency-Key, card 4242424242424242 and a
shipping address. A 503 or 429 is retried with the same key after its Retry-After (at most 5 s), as a client
should; every HTTP call is counted and timed on its own. An order answered 202 is followed to its end.

Phases, in this order:

1. idle: the CPU the database server(s) spend while the shop, warmed up, has nothing to do (ms per second,
   from the threads' scheduler statistics: finer than the 10 ms ticks used elsewhere); measured 6 s after the
   warm-up, once its deferred work (inventory's leftover pulls, after 5 s) is done;
2. ceiling: conditional ``$inc`` updates per second (8 writers over 100 documents, ``{_id, available >= 1}``)
   on a fresh ``:memory:`` embedded server of its own, measured right before the load phase and right after
   it (the shop idle meanwhile), so that both see the machine as the load did; their mean is the same-run
   ceiling the order rate is divided by;
3. load: ``--customers`` customers for ``--duration`` s: confirmed orders/s, latency, and, over every database
   server, writes per confirmed order (insert + update + delete statements as the servers count them: one per
   command, a batch insert of n documents is one) and CPU per confirmed order (database(s), all processes);
   nothing is subtracted: the background work of the services under load is part of what an order costs;
4. overload: ``--overload`` customers, each its own account: confirmed orders/s against the load phase, and
   what else was answered (goal: 503 with Retry-After, nothing else: a 202 here is an order left waiting in a
   queue, as payments answers at once);
5. crash: ``--customers`` customers place orders for ``--crash-after`` s, then the orders process is killed with
   SIGKILL (the customers stop placing new orders), run.py restarts it (``--separate``: the bench does); the
   seconds from its /readyz answering again until no order is PENDING (and until none is ``refund_pending``).

The database servers are found among run.py's descendants (any process whose port answers ``serverStatus``
with its own pid), so a shop with one embedded database per service is metered in full. Each run also writes
per-collection write counts (the servers' ``top``) so it shows where the writes come from. ``--steps`` adds
the old diagnostics: each saga step alone, one at a time, against a bare Tornado round trip, and the orders
service's own database work timed in-process.

The machine is small and shared: the order rate means something only as a ratio to the ceiling measured in
the same run; CPU per order is steadier than throughput. The last line is one JSON object with every figure,
its goal and whether it was met.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import random
import statistics
import sys
import time
import uuid

from bench import _common as c

SEPARATE_SERVICES = ("users", "catalog", "inventory", "payments", "orders", "gateway")
RESTOCK = 100_000
RETRY_AFTER_CAP = 5.0  # seconds a client waits at most before retrying a 503/429
# the warm-up's orders leave deferred work: inventory pulls the numbered events and archived holds its next
# write did not take out of a level document after 5 s (LEFTOVER_SECONDS); an idle shop is one with none left
SETTLE_AFTER_WARM_UP = 6.0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each load phase (default 10)")
    parser.add_argument("--customers", "--concurrency", type=int, default=32, dest="customers",
                        help="concurrent customers of the load phase (default 32)")
    parser.add_argument("--overload", type=int, default=128,
                        help="concurrent customers of the overload phase (default 128; 0 skips it)")
    parser.add_argument("--crash-after", type=float, default=3.0,
                        help="seconds of orders before the orders process is killed (default 3; 0 skips it)")
    parser.add_argument("--crash-timeout", type=float, default=60.0,
                        help="seconds to wait for the orders to settle after the crash (default 60)")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds of each ceiling run (3)")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of the idle measurement (default 5)")
    parser.add_argument("--books", type=int, default=100, help="books the orders spread over (default 100)")
    parser.add_argument("--hot", action="store_true", help="every order buys the same book")
    parser.add_argument("--separate", action="store_true",
                        help="services as run.py --service processes on one bench database, not run.py")
    parser.add_argument("--steps", action="store_true", help="also time each saga step alone, one at a time")
    parser.add_argument("--samples", type=int, default=15, help="one-at-a-time samples per step (--steps; 15)")
    parser.add_argument("--profile", action="append", default=[], choices=list(SEPARATE_SERVICES),
                        help="run this service under cProfile (implies --separate) and print its hottest functions")
    parser.add_argument("--db-profile", metavar="PATH",
                        help="the shop's database server(s) count CPU per command, collection and filter shape, "
                             "written to PATH.<pid> (BOOKSHOP_DB_PROFILE; slows the database a little)")
    args = parser.parse_args(argv)
    if args.profile:
        args.separate = True
    if args.customers < 1 or args.overload < 0:
        parser.error("--customers must be at least 1, --overload at least 0")
    return args


# -- goals (issue 11) -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Figure:
    key: str
    what: str
    value: float | None
    goal: str
    ok: bool | None  # None: not measured
    shown: str = ""

    def row(self) -> list:
        return [self.what, self.shown or ("-" if self.value is None else self.value), self.goal,
                {True: "pass", False: "FAIL", None: "-"}[self.ok]]

    def as_json(self) -> dict:
        return {"value": self.value, "goal": self.goal, "pass": self.ok}


def at_most(value, limit) -> bool | None:
    return None if value is None else value <= limit


# -- the ceiling: the database's own rate of conditional single-document updates ------------------------------
async def _update_rate(uri: str, pid: int, writers: int, docs: int, seconds: float) -> tuple[float, float]:
    from motor.motor_asyncio import AsyncIOMotorClient
    client = AsyncIOMotorClient(uri)
    try:
        coll = client["bench_ceiling"]["levels"]
        await coll.insert_many([{"_id": i, "available": 10 ** 9, "sold": 0} for i in range(docs)])
        loop = asyncio.get_running_loop()
        counted = False
        done = 0

        async def writer(w: int, until: float) -> None:
            nonlocal done
            rnd = random.Random(w)
            while loop.time() < until:
                result = await coll.update_one({"_id": rnd.randrange(docs), "available": {"$gte": 1}},
                                               {"$inc": {"available": -1, "sold": 1}})
                if counted:
                    done += result.modified_count

        await asyncio.gather(*(writer(w, loop.time() + 0.5) for w in range(writers)))  # warm-up
        counted = True
        started, cpu = loop.time(), c.cpu_seconds(pid)
        await asyncio.gather(*(writer(w, started + seconds) for w in range(writers)))
        return done / (loop.time() - started), (c.cpu_seconds(pid) - cpu) * 1000 / max(1, done)
    finally:
        client.close()


def update_ceiling(bench: c.Bench, seconds: float, writers: int = 8, docs: int = 100) -> tuple[float, float]:
    """Conditional ``$inc`` updates per second on a fresh in-memory embedded server, and the server's CPU
    milliseconds per update (steadier than the rate on a shared machine)."""
    from bookshop.embedded_db import EmbeddedDatabase
    db = EmbeddedDatabase(":memory:", log_path=bench.path("ceiling-db.log"))
    db.launch()
    c.adopt(db.proc, last=True)
    try:
        return asyncio.run(_update_rate(db.wait_ready(), db.proc.pid, writers, docs, seconds))
    finally:
        db.stop()


# -- customers placing orders -----------------------------------------------------------------------------------
def order_body(isbn: str) -> dict:
    return {"items": [{"isbn": isbn, "quantity": 1}], "shipping_address": c.ADDRESS, "payment": c.TEST_CARD}


def answered_order_id(status: int, body) -> str | None:
    if not isinstance(body, dict):
        return None
    if status in (201, 202):
        return body.get("id")
    details = (body.get("error") or {}).get("details") or {}
    return details.get("order_id")


@dataclasses.dataclass
class Calls:
    seconds: float  # from the start until the last call ended
    statuses: collections.Counter
    latencies_ms: list
    answered: dict  # order id -> HTTP status of its (last) answer
    unhinted: int  # 503/429 answers without Retry-After

    @property
    def count(self) -> int:
        return len(self.latencies_ms)


async def place_orders(shop: c.Shop, customers: list[dict], isbns: list[str], concurrency: int,
                       duration: float, stop: asyncio.Event | None = None) -> Calls:
    """``concurrency`` customers placing orders back to back for ``duration`` s (or until ``stop``)."""
    import aiohttp
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + duration
    stop = stop or asyncio.Event()
    statuses: collections.Counter = collections.Counter()
    latencies: list[float] = []
    answered: dict[str, int] = {}
    unhinted = 0

    def running() -> bool:
        return loop.time() < deadline and not stop.is_set()

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        async def worker(w: int) -> None:
            nonlocal unhinted
            customer = customers[w % len(customers)]
            headers = {"Authorization": f"Bearer {customer['token']}"}
            n = 0
            while running():
                isbn = isbns[(w * 31 + n) % len(isbns)]
                n += 1
                headers["Idempotency-Key"] = uuid.uuid4().hex
                while True:  # one order: retried with its key while the answer says to
                    began = loop.time()
                    wait = None
                    try:
                        async with session.post(f"{shop.api}/orders", json=order_body(isbn), headers=headers) as r:
                            raw = await r.read()
                            status = r.status
                            hint = r.headers.get("Retry-After")
                        try:
                            body = json.loads(raw) if raw else None
                        except ValueError:
                            body = None
                        label = str(status)
                        if status in (503, 429):
                            if hint is None:
                                unhinted += 1
                            wait = min(RETRY_AFTER_CAP, float(hint)) if hint and hint.isdigit() else 1.0
                        else:
                            order_id = answered_order_id(status, body)
                            if order_id:
                                answered[order_id] = status
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                        label, wait = type(exc).__name__, 0.5
                    statuses[label] += 1
                    latencies.append((loop.time() - began) * 1000.0)
                    if wait is None or not running():
                        break
                    await asyncio.sleep(wait)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Calls(loop.time() - start, statuses, latencies, answered, unhinted)


async def final_statuses(shop: c.Shop, staff_token: str, order_ids: list[str], timeout: float = 30.0) -> dict:
    """The status each order ends in (orders still PENDING after ``timeout`` stay PENDING)."""
    import aiohttp
    out: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {staff_token}"}
    gate = asyncio.Semaphore(8)
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        async def one(order_id: str) -> None:
            while True:
                async with gate:
                    async with session.get(f"{shop.api}/orders/{order_id}", headers=headers) as r:
                        body = await r.json() if r.status == 200 else {}
                out[order_id] = body.get("status", "PENDING")
                if out[order_id] != "PENDING" or asyncio.get_running_loop().time() > deadline:
                    return
                await asyncio.sleep(0.2)
        await asyncio.gather(*(one(i) for i in order_ids))
    return out


def confirmed_orders(shop: c.Shop, staff_token: str, calls: Calls) -> tuple[int, int]:
    """(orders confirmed, orders still PENDING 30 s after the phase) among those the phase placed."""
    later = [i for i, status in calls.answered.items() if status == 202]
    final = asyncio.run(final_statuses(shop, staff_token, later)) if later else {}
    confirmed = sum(1 for status in calls.answered.values() if status == 201)
    confirmed += sum(1 for status in final.values() if status == "CONFIRMED")
    return confirmed, sum(1 for status in final.values() if status == "PENDING")


# -- the crash --------------------------------------------------------------------------------------------------
async def count_orders(shop: c.Shop, staff_token: str, status: str, payment: str | None = None,
                       everything: bool = True) -> int | None:
    """Orders with ``status`` (and ``payment.status``) as the public API lists them to staff; None if the
    listing is not answered. ``everything=False`` stops at the first page (enough to tell none from some)."""
    import aiohttp
    count, cursor = 0, None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            params = {"status": status, "limit": "100", **({"cursor": cursor} if cursor else {})}
            try:
                async with session.get(f"{shop.api}/orders", params=params,
                                       headers={"Authorization": f"Bearer {staff_token}"}) as r:
                    if r.status != 200:
                        return None
                    page = await r.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                return None
            count += sum(1 for o in page["items"] if payment is None or o["payment"]["status"] == payment)
            cursor = page.get("next_cursor")
            if not cursor or (not everything and count):
                return count


async def crash(shop: c.Shop, staff_token: str, customers: list[dict], isbns: list[str], concurrency: int,
                after: float, timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    rush = asyncio.ensure_future(place_orders(shop, customers, isbns, concurrency, after + 60, stop))
    await asyncio.sleep(after)
    old_pid = await loop.run_in_executor(None, shop.kill, "orders")
    killed = loop.time()
    stop.set()
    calls = await rush
    # restart_killed answers in time.monotonic(), the clock of asyncio's default loop.time()
    ready = await loop.run_in_executor(None, shop.restart_killed, "orders", old_pid, 60.0)
    out = {"down_s": round(ready - killed, 2), "calls": calls.count, "statuses": dict(calls.statuses)}
    out["pending_at_restart"] = await count_orders(shop, staff_token, "PENDING")
    deadline = ready + timeout
    for figure, status, payment in (("pending_s", "PENDING", None),
                                    ("refund_pending_s", "CANCELLED", "refund_pending")):
        out[figure] = None
        while loop.time() < deadline:
            left = await count_orders(shop, staff_token, status, payment, everything=False)
            if left == 0:
                out[figure] = round(loop.time() - ready, 2)
                break
            await asyncio.sleep(0.25)
    return out


# -- the old diagnostics (--steps) --------------------------------------------------------------------------------
async def time_steps(shop: c.Shop, bare_url: str, customer: dict, isbn: str, samples: int) -> dict:
    """Milliseconds of each step alone (median of ``samples``), one call at a time."""
    import aiohttp
    service = {"Authorization": f"Bearer {shop.service_token('orders')}"}
    times: dict[str, list[float]] = collections.defaultdict(list)

    async with aiohttp.ClientSession() as session:
        async def timed(name: str, method: str, url: str, ok: tuple, **kw) -> None:
            started = time.perf_counter()
            async with session.request(method, url, **kw) as resp:
                body = await resp.read()
                if resp.status not in ok:
                    raise RuntimeError(f"{name}: {resp.status} {body[:200]!r}")
            times[name].append((time.perf_counter() - started) * 1000)

        for _ in range(samples):
            order_id = uuid.uuid4().hex[:24]
            await timed("bare round trip (baseline)", "GET", bare_url + "/json", (200,))
            await timed("gateway /healthz", "GET", shop.url("gateway") + "/healthz", (200,))
            await timed("catalog: price lookup", "GET", shop.url("catalog") + "/internal/books",
                        (200,), params={"isbns": isbn}, headers=service)
            await timed("inventory: reserve", "POST", shop.url("inventory") + "/internal/reservations", (200,),
                        json={"order_id": order_id, "items": [{"isbn": isbn, "quantity": 1}]}, headers=service)
            await timed("payments: charge", "POST", shop.url("payments") + "/internal/charges", (200, 201),
                        json={"order_id": order_id, "amount_cents": 1000, "currency": "EUR", "card": c.TEST_CARD},
                        headers=service)
            await timed("inventory: commit", "POST",
                        shop.url("inventory") + f"/internal/reservations/{order_id}/commit", (200,), headers=service)
            await timed("whole checkout via gateway", "POST", f"{shop.api}/orders", (201,), json=order_body(isbn),
                        headers={"Authorization": f"Bearer {customer['token']}",
                                 "Idempotency-Key": uuid.uuid4().hex})
    return {name: statistics.median(v) for name, v in times.items()}


async def one_at_a_time(shop: c.Shop, customer: dict, isbn: str, samples: int, meter: c.ShopMeter) -> dict:
    """Checkouts one after the other: their latency and database ops per order (the relays number each
    event alone here, where under load they batch)."""
    import aiohttp
    latencies = []
    async with aiohttp.ClientSession() as session:
        reading = meter.read()
        for _ in range(samples):
            started = time.perf_counter()
            async with session.post(f"{shop.api}/orders", json=order_body(isbn), headers={
                    "Authorization": f"Bearer {customer['token']}", "Idempotency-Key": uuid.uuid4().hex}) as resp:
                await resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"checkout answered {resp.status}")
            latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.5)  # the relays number the last events
        usage = meter.since(reading)
    return {"ms": round(statistics.median(latencies), 1),
            "db_ops_per_order": {k: round(v / samples, 2) for k, v in usage.ops.items()},
            "cpu_ms_per_order": {k: round(v * 1000 / samples, 2) for k, v in usage.cpu.items()}}


class Laps:
    """Milliseconds between consecutive ``lap`` calls, by name."""

    def __init__(self):
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name].append((now - self._last) * 1000)
        self._last = now


async def orders_db_work(uri: str, isbn: str, samples: int) -> dict:
    """The orders service's own database work for one checkout, in-process: the real Checkout and
    repositories on a scratch database, the upstreams replaced by instant fakes."""
    from pymongo import monitoring

    from bookshop.services.checkout import Checkout, PlaceOrder
    from bookshop.storage.mongo import Database
    from bookshop.storage.orders import OrderRepo, new_order_id
    from bookshop.storage.outbox import EventLog, utcnow

    class Catalog:
        async def books(self, isbns):
            return {i: {"isbn": i, "title": "A Book", "price_cents": 1000, "currency": "EUR"} for i in isbns}

    class Inventory:
        async def reserve(self, order_id, lines):
            return {"order_id": order_id, "state": "held", "items": lines}

        async def commit(self, order_id):
            return {"order_id": order_id, "state": "committed"}

    class Payments:
        is_open = False

        async def charge(self, order_id, amount_cents, currency, card):
            return {"order_id": order_id, "status": "charged"}

    listener = c.CommandCounter()
    monitoring.register(listener)  # applies to clients created from now on: the Database below
    database = Database(uri, "bench_orders_" + uuid.uuid4().hex[:8])
    try:
        repo = OrderRepo(database, EventLog(database))
        await repo.create_indexes()
        checkout = Checkout(repo, Catalog(), Inventory(), Payments(), "EUR", 10.0, now=utcnow)
        laps = Laps()
        listener.counts.clear()
        for i in range(samples):  # the steps of OrdersHandler.post and Checkout, in their order
            user, key, order_id = f"user-{i}", uuid.uuid4().hex, new_order_id()
            cmd = PlaceOrder(user_id=user, lines=[(isbn, 1)], shipping_address=c.ADDRESS, card=c.TEST_CARD,
                             expected_total_cents=None, from_cart=False)
            laps.start()
            await repo.by_key(user, key)
            laps.lap("idempotency lookup")
            order = await checkout.create(order_id, cmd, key, "fingerprint")  # the key lives in the order
            laps.lap("create order (with its key)")
            await checkout.run(order, c.TEST_CARD)
            laps.lap("saga (instant upstreams) + confirm (records the answer)")
        per_order = {name: round(n / samples, 2) for name, n in sorted(listener.counts.items())}
        await database.client.drop_database(database.name)
        medians = {name: statistics.median(v) for name, v in laps.times.items()}
        return {"ms": {k: round(v, 2) for k, v in medians.items()}, "total_ms": round(sum(medians.values()), 2),
                "commands_per_order": per_order, "commands_total": round(sum(per_order.values()), 2)}
    finally:
        database.close()


def steps_report(bench: c.Bench, shop: c.Shop, meter: c.ShopMeter, customer: dict, isbn: str,
                 samples: int) -> dict:
    bare = bench.bare_server()
    single = asyncio.run(one_at_a_time(shop, customer, isbn, samples, meter))
    steps = asyncio.run(time_steps(shop, bare.url, customer, isbn, samples))
    try:
        own = asyncio.run(orders_db_work(meter.databases[0].uri, isbn, samples))
    except Exception as exc:  # noqa: BLE001 - the code under test may have changed shape; say so, go on
        own = {"error": f"{type(exc).__name__}: {exc}"}
    c.note(f"one at a time ({samples} orders): {single['ms']} ms each, "
           f"{single['db_ops_per_order']['all']} db ops per order ({single['db_ops_per_order']['writes']} writes); "
           f"by kind {single['db_ops_per_order']}; CPU ms per order {single['cpu_ms_per_order']}")
    base = steps["bare round trip (baseline)"]
    whole = steps["whole checkout via gateway"]
    rows = [[name, round(ms, 2), c.ratio(ms, base), c.ratio(ms, whole)] for name, ms in steps.items()]
    if "ms" in own:
        rows.insert(-1, ["orders: own db work (in-process)", own["total_ms"], c.ratio(own["total_ms"], base),
                         c.ratio(own["total_ms"], whole)])
    c.table(f"Where a checkout's time goes: each step alone, one at a time (median of {samples})",
            ["step", "ms", "x bare round trip", "share of whole checkout"], rows)
    if "ms" in own:
        c.note(f"orders' own db work by step (ms): {own['ms']}")
        c.note(f"orders' own db commands per order: {own['commands_total']} {own['commands_per_order']}")
    else:
        c.note(f"orders' own db work could not be timed in-process: {own['error']}")
    return {"steps_ms": {k: round(v, 3) for k, v in steps.items()},
            "steps_ratio_to_bare": {k: c.ratio(v, base) for k, v in steps.items()},
            "one_at_a_time": single, "orders_own_db": own}


# -- the run ------------------------------------------------------------------------------------------------------
def by_collection(usage: c.Usage, orders: int, prefix: str, limit: int = 12) -> dict:
    """Write commands per order by collection, named ``service.collection`` (the shop's prefix left out)."""
    top = sorted(usage.writes_by_collection.items(), key=lambda kv: -kv[1])[:limit]
    return {ns.removeprefix(prefix + "_"): round(n / max(1, orders), 2) for ns, n in top}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    figures: dict[str, Figure] = {}
    out: dict = {"bench": "checkout", "mode": "separate" if args.separate else "run.py",
                 "customers": args.customers, "overload_customers": args.overload, "duration_s": args.duration}
    began = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - began:5.1f}s] {text}", flush=True)

    with c.Bench("checkout") as bench:
        env = {"BOOKSHOP_REGISTRATION_LIMIT": "0"}
        if args.db_profile:
            env["BOOKSHOP_DB_PROFILE"] = args.db_profile
        if args.separate:
            shop = c.Shop(bench, bench.database(), env=env, profile=args.profile).start(*SEPARATE_SERVICES)
        else:
            shop = c.RunPy(bench, env=env).start()
        staff = shop.staff_token()
        isbns = shop.isbns(1 if args.hot else args.books)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda isbn: shop.restock(isbn, RESTOCK, staff), isbns))
        customers = asyncio.run(c.register_customers(shop, max(args.customers, args.overload)))
        processes = shop.processes()
        databases = shop.databases()
        db_names = [db.name for db in databases]
        meter = c.ShopMeter(databases, processes)
        out["processes"] = sorted(processes)
        progress(f"shop: {out['mode']}, {len(processes)} processes, database server(s): "
                 f"{', '.join(f'{db.name} (pid {db.pid})' for db in databases)}; one book per order over "
                 f"{len(isbns)} book(s), {len(customers)} customers registered")

        # idle
        progress(f"warm-up 1 s, {SETTLE_AFTER_WARM_UP:g} s for its deferred work, then idle {args.idle:g} s")
        asyncio.run(place_orders(shop, customers, isbns, 4, 1.0))  # warm-up
        time.sleep(SETTLE_AFTER_WARM_UP)
        reading, fine = meter.read(), c.cpu_snapshot_fine(processes)
        time.sleep(args.idle)
        idle = meter.since(reading)
        idle.cpu = c.cpu_used_fine(fine, c.cpu_snapshot_fine(processes))  # 10 ms ticks are coarse here
        idle_db = idle.cpu_of(db_names) * 1000 / idle.seconds
        figures["idle_db_cpu_ms_per_s"] = Figure("idle_db_cpu_ms_per_s", "database CPU of an idle shop, ms/s",
                                                 round(idle_db, 2), "<= 5", at_most(idle_db, 5))
        out["idle"] = {"db_ops_per_s": {k: round(v / idle.seconds, 2) for k, v in idle.ops.items()},
                       "cpu_ms_per_s": {k: round(v * 1000 / idle.seconds, 2) for k, v in idle.cpu.items()}}

        # load, between two measurements of the ceiling
        progress(f"ceiling: conditional $inc updates/s, 8 writers over 100 documents, fresh :memory: server, "
                 f"{args.ceiling_seconds:g} s")
        ceilings = [update_ceiling(bench, args.ceiling_seconds)]
        progress(f"load: {args.customers} customers, {args.duration:g} s")
        reading = meter.read()
        load = asyncio.run(place_orders(shop, customers, isbns, args.customers, args.duration))
        confirmed, stuck = confirmed_orders(shop, staff, load)
        time.sleep(0.5)  # the relays move the last events
        usage = meter.since(reading)
        progress(f"ceiling again, {args.ceiling_seconds:g} s")
        ceilings.append(update_ceiling(bench, args.ceiling_seconds))
        rate = confirmed / load.seconds
        latency = c.spread(load.latencies_ms)
        per_order = {k: round(v / max(1, confirmed), 2) for k, v in usage.ops.items()}
        cpu_per_order = {k: round(v * 1000 / max(1, confirmed), 2) for k, v in usage.cpu.items()}
        db_cpu = usage.cpu_of(db_names) * 1000 / max(1, confirmed)
        all_cpu = usage.cpu_of(processes) * 1000 / max(1, confirmed)
        writes = usage.ops["writes"] / max(1, confirmed)
        figures["orders_per_s"] = Figure("orders_per_s", f"confirmed orders/s at {args.customers} customers",
                                         round(rate, 2), "-", None)
        figures["p50_ms"] = Figure("p50_ms", f"p50 latency at {args.customers} customers, ms",
                                   latency["p50"], "<= 1000", at_most(latency["p50"], 1000))
        figures["writes_per_order"] = Figure("writes_per_order", "database writes per order", round(writes, 2),
                                             "<= 8", at_most(writes, 8) if confirmed else None)
        figures["db_cpu_ms_per_order"] = Figure("db_cpu_ms_per_order", "database CPU per order, ms",
                                                round(db_cpu, 1), "<= 20", at_most(db_cpu, 20) if confirmed else None)
        figures["cpu_ms_per_order"] = Figure("cpu_ms_per_order", "CPU per order, all processes, ms",
                                             round(all_cpu, 1), "<= 40", at_most(all_cpu, 40) if confirmed else None)
        out["load"] = {"orders_confirmed": confirmed, "still_pending_after_30s": stuck, "calls": load.count,
                       "seconds": round(load.seconds, 2), "statuses": dict(load.statuses), "latency_ms": latency,
                       "db_ops_per_order": per_order, "db_ops_per_order_by_server": {
                           name: round(ops["writes"] / max(1, confirmed), 2)
                           for name, ops in usage.ops_by_server.items()},
                       "writes_per_order_by_collection": by_collection(usage, confirmed, shop.prefix),
                       "cpu_ms_per_order": cpu_per_order}

        # overload
        if args.overload:
            progress(f"overload: {args.overload} customers, {args.duration:g} s")
            over = asyncio.run(place_orders(shop, customers, isbns, args.overload, args.duration))
            over_confirmed, over_stuck = confirmed_orders(shop, staff, over)
            over_rate = over_confirmed / over.seconds
            # what the shop cannot take now is answered 503 at once; a 202 is an order left waiting in a queue
            other = sum(n for s, n in over.statuses.items() if s not in ("201", "503"))
            share_503 = over.statuses.get("503", 0) / max(1, over.count)
            kept = over_rate / rate if rate else None
            figures["overload_rate_ratio"] = Figure(
                "overload_rate_ratio", f"confirmed orders/s at {args.overload} ÷ at {args.customers}",
                c.rnd(kept), ">= 0.8", None if kept is None else kept >= 0.8,
                shown=f"{over_rate:.1f}/s ÷ {rate:.1f}/s = {kept:.2f}" if kept else "-")
            figures["overload_503_share"] = Figure(
                "overload_503_share", f"answers at {args.overload} that are 503 (the rest must be 201)",
                round(share_503, 3), "rest 201", other == 0 and over.unhinted == 0,
                shown=f"{share_503:.1%}; {other} not 201, {over.unhinted} w/o Retry-After")
            over_latency = c.spread(over.latencies_ms)
            figures["overload_p50_ms"] = Figure("overload_p50_ms", f"p50 latency at {args.overload} customers, ms",
                                                over_latency["p50"], "-", None)
            out["overload"] = {"orders_confirmed": over_confirmed, "orders_per_s": round(over_rate, 2),
                               "still_pending_after_30s": over_stuck, "calls": over.count,
                               "seconds": round(over.seconds, 2), "statuses": dict(over.statuses),
                               "latency_ms": over_latency, "without_retry_after": over.unhinted}

        # crash
        if args.crash_after:
            progress(f"crash: {args.customers} customers for {args.crash_after:g} s, then kill -9 of orders")
            crashed = asyncio.run(crash(shop, staff, customers, isbns, args.customers, args.crash_after,
                                        args.crash_timeout))
            pending_s = crashed["pending_s"]
            figures["crash_pending_s"] = Figure(
                "crash_pending_s", "after kill -9 of orders: s from its restart until no order PENDING",
                pending_s, "<= 10", pending_s is not None and pending_s <= 10,
                shown=f"> {args.crash_timeout:g}" if pending_s is None else f"{pending_s}")
            out["crash"] = crashed

        meter.close()
        steps = {}
        if args.steps:
            steps = steps_report(bench, shop, c.ShopMeter(databases, shop.processes()), customers[0], isbns[0],
                                 args.samples)
        shop.stop()
        ceiling = statistics.mean(rate_ for rate_, _ in ceilings)
        update_cpu = statistics.mean(cpu for _, cpu in ceilings)
        share = rate / ceiling if ceiling else None
        figures["rate_to_ceiling"] = Figure(
            "rate_to_ceiling", "orders/s ÷ the database's conditional-update rate, same run", c.rnd(share, 4),
            ">= 1/16", None if share is None else share >= 1 / 16,
            shown=f"{rate:.1f} / {ceiling:.0f} = 1/{1 / share:.0f}" if share else "-")
        out["ceiling_updates_per_s"] = {"before_load": round(ceilings[0][0], 1), "after_load": round(ceilings[1][0], 1),
                                        "mean": round(ceiling, 1)}
        out["ceiling_cpu_ms_per_update"] = round(update_cpu, 3)
        # the same comparison in CPU, which the other engineers' load disturbs less: what an order costs the
        # shop's processes, in updates of the ceiling server (the goal's 1/16 on 2 cores is about 40 ms/order)
        out["order_cpu_in_updates"] = {"db": c.rnd(db_cpu / update_cpu, 1) if update_cpu else None,
                                       "all": c.rnd(all_cpu / update_cpu, 1) if update_cpu else None}

        order = ["rate_to_ceiling", "orders_per_s", "p50_ms", "writes_per_order", "db_cpu_ms_per_order",
                 "cpu_ms_per_order", "idle_db_cpu_ms_per_s", "overload_rate_ratio", "overload_503_share",
                 "overload_p50_ms", "crash_pending_s"]
        shown = [figures[k] for k in order if k in figures]
        c.table(f"Issue 11 figures ({out['mode']}; ceiling {ceilings[0][0]:.0f} and {ceilings[1][0]:.0f} updates/s, "
                f"mean {ceiling:.0f})", ["figure", "value", "goal", ""], [f.row() for f in shown])
        c.note(f"ceiling server CPU per update: {update_cpu:.2f} ms; an order costs the database(s) as much CPU as "
               f"{out['order_cpu_in_updates']['db']} updates, all processes {out['order_cpu_in_updates']['all']}")
        c.note(f"load: {confirmed} orders confirmed in {load.seconds:.1f} s, {load.count} calls {dict(load.statuses)}, "
               f"latency ms {latency}")
        c.note(f"db ops per order (all servers): {per_order}")
        c.note(f"writes per order by collection (top): {out['load']['writes_per_order_by_collection']}")
        c.note(f"CPU ms per order by process: {cpu_per_order}")
        c.note(f"idle: db ops/s {out['idle']['db_ops_per_s']}; CPU ms/s {out['idle']['cpu_ms_per_s']}")
        if "overload" in out:
            o = out["overload"]
            c.note(f"overload: {o['orders_confirmed']} confirmed in {o['seconds']} s, statuses {o['statuses']}, "
                   f"latency ms {o['latency_ms']}")
        if "crash" in out:
            k = out["crash"]
            c.note(f"crash: orders down {k['down_s']} s (kill to /readyz), {k['pending_at_restart']} PENDING at "
                   f"the restart, none PENDING after {k['pending_s']} s, none refund_pending after "
                   f"{k['refund_pending_s']} s; the rush's answers {k['statuses']}")
        if args.profile:
            for service_name in args.profile:
                print(f"\ncProfile of {service_name}:")
                print(c.profile_report(shop.profile_path(service_name)))
        measured = [f.ok for f in shown if f.ok is not None]
        out["run_s"] = round(time.monotonic() - began, 1)
        c.emit({**out, "figures": {f.key: f.as_json() for f in shown},
                "all_met": bool(measured) and all(measured), **steps, "profiled": args.profile})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))
