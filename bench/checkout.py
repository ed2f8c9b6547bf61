"""Checkouts per second, database writes per order, and where a checkout's time goes.

    python bench/checkout.py [--duration 5] [--concurrency 32] [--hot] [--profile orders]

``--concurrency`` pre-registered customers place orders back to back through the gateway for ``--duration``
seconds: POST /api/v1/orders with a fresh Idempotency-Key, one book (spread over 100 demo books, restocked
first; ``--hot``: all the same book), card 4242424242424242 and a shipping address. Then:

* database ops per order across all services, from the server's ``serverStatus.opcounters`` (writes =
  insert + update + delete), minus the services' background rate measured while idle;
* the CPU each process spent per order (from /proc);
* where the time goes: each upstream call of the saga timed alone, one at a time (price lookup at the
  catalog, reserve and commit at the inventory, charge at the payments service), the orders service's own
  database work timed in-process (the real ``Checkout`` and repositories on their own database, upstreams
  replaced by instant fakes, commands counted with a pymongo listener), and a whole checkout one at a time,
  all as ratios to a bare Tornado round trip measured in the same run.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import collections
import concurrent.futures
import statistics
import sys
import time
import uuid

from bench import _common as c

SERVICES = ("users", "catalog", "inventory", "payments", "orders", "gateway")
RESTOCK = 100_000


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent customers (default 32)")
    parser.add_argument("--books", type=int, default=100, help="books the orders spread over (default 100)")
    parser.add_argument("--hot", action="store_true", help="every order buys the same book")
    parser.add_argument("--samples", type=int, default=15, help="one-at-a-time samples per step (default 15)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds to measure background db ops (2)")
    parser.add_argument("--profile", action="append", default=[], choices=list(SERVICES),
                        help="run this service under cProfile and print its hottest functions")
    return parser.parse_args(argv)


def order_body(isbn: str) -> dict:
    return {"items": [{"isbn": isbn, "quantity": 1}], "shipping_address": c.ADDRESS, "payment": c.TEST_CARD}


async def place_orders(shop: c.Shop, customers: list[dict], isbns: list[str], concurrency: int,
                       duration: float) -> c.LoadResult:
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def place(worker: int, n: int) -> int:
            customer = customers[worker % len(customers)]
            isbn = isbns[(worker * 31 + n) % len(isbns)]
            headers = {"Authorization": f"Bearer {customer['token']}", "Idempotency-Key": uuid.uuid4().hex}
            async with session.post(f"{shop.api}/orders", json=order_body(isbn), headers=headers) as resp:
                await resp.read()
                return resp.status
        return await c.closed_loop(place, concurrency, duration)


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


async def one_at_a_time(shop: c.Shop, customer: dict, isbn: str, samples: int, meter: c.Meter) -> dict:
    """Checkouts one after the other: their latency and database ops per order (the relays number each
    event alone here, where under load they batch)."""
    import aiohttp
    latencies = []
    async with aiohttp.ClientSession() as session:
        meter.start()
        for _ in range(samples):
            started = time.perf_counter()
            async with session.post(f"{shop.api}/orders", json=order_body(isbn), headers={
                    "Authorization": f"Bearer {customer['token']}", "Idempotency-Key": uuid.uuid4().hex}) as resp:
                await resp.read()
                if resp.status != 201:
                    raise RuntimeError(f"checkout answered {resp.status}")
            latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.5)  # the relays number the last events
        ops, cpu, _ = meter.stop()
    return {"ms": round(statistics.median(latencies), 1),
            "db_ops_per_order": {k: round(v / samples, 2) for k, v in ops.items()},
            "cpu_ms_per_order": {k: round(v * 1000 / samples, 2) for k, v in cpu.items()}}


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
    from bookshop.storage.orders import IdempotencyRepo, OrderRepo, new_order_id
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
        repo, idem = OrderRepo(database, EventLog(database)), IdempotencyRepo(database)
        await repo.create_indexes()
        await idem.create_indexes()
        checkout = Checkout(repo, Catalog(), Inventory(), Payments(), "EUR", 10.0, now=utcnow)
        laps = Laps()
        listener.counts.clear()
        for i in range(samples):  # the steps of OrdersHandler.post and Checkout, in their order
            user, key, order_id = f"user-{i}", uuid.uuid4().hex, new_order_id()
            cmd = PlaceOrder(user_id=user, lines=[(isbn, 1)], shipping_address=c.ADDRESS, card=c.TEST_CARD,
                             expected_total_cents=None, from_cart=False)
            laps.start()
            await idem.get(user, key)
            await idem.begin(user, key, "fingerprint", order_id)
            laps.lap("idempotency claim")
            order = await checkout.create(order_id, cmd)
            laps.lap("create order (transaction)")
            await checkout.run(order, c.TEST_CARD)
            laps.lap("saga (instant upstreams) + confirm (transaction)")
            await idem.finish(user, key, 201, {"id": order_id})
            laps.lap("idempotency answer")
        per_order = {name: round(n / samples, 2) for name, n in sorted(listener.counts.items())}
        await database.client.drop_database(database.name)
        medians = {name: statistics.median(v) for name, v in laps.times.items()}
        return {"ms": {k: round(v, 2) for k, v in medians.items()}, "total_ms": round(sum(medians.values()), 2),
                "commands_per_order": per_order, "commands_total": round(sum(per_order.values()), 2)}
    finally:
        database.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with c.Bench("checkout") as bench:
        uri = bench.database()
        bare = bench.bare_server()
        shop = c.Shop(bench, uri, profile=args.profile).start(*SERVICES)
        staff = shop.staff_token()
        isbns = shop.isbns(1 if args.hot else args.books)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda isbn: shop.restock(isbn, RESTOCK, staff), isbns))
        customers = asyncio.run(c.register_customers(shop, args.concurrency))
        meter = c.Meter(uri, {"db": bench.db_pid, **{name: shop.pid(name) for name in SERVICES}})
        print(f"{args.concurrency} customers, {args.duration:g} s, one book per order over "
              f"{len(isbns)} book(s)")

        asyncio.run(place_orders(shop, customers, isbns, 4, 1.0))  # warm-up
        time.sleep(0.5)
        meter.measure_idle(args.idle)
        meter.start()
        load = asyncio.run(place_orders(shop, customers, isbns, args.concurrency, args.duration))
        time.sleep(0.5)  # the relays number the last events
        ops, cpu, _ = meter.stop()
        single = asyncio.run(one_at_a_time(shop, customers[0], isbns[0], args.samples, meter))
        meter.close()
        per_order = {k: round(v / max(1, load.completed), 2) for k, v in ops.items()}
        cpu_per_order = {k: round(v * 1000 / max(1, load.completed), 2) for k, v in cpu.items() if v > 0}

        steps = asyncio.run(time_steps(shop, bare.url, customers[0], isbns[0], args.samples))
        try:
            own = asyncio.run(orders_db_work(uri, isbns[0], args.samples))
        except Exception as exc:  # noqa: BLE001 - the code under test may have changed shape; say so, go on
            own = {"error": f"{type(exc).__name__}: {exc}"}

        confirmed = load.statuses.get("201", 0) / load.seconds
        latency = c.spread(load.latencies_ms)
        c.table(f"Checkouts at {args.concurrency} concurrent customers ({load.seconds:.1f} s until the last "
                f"order ended)",
                ["orders/s (201)", "calls/s", "statuses", "p50 ms", "p99 ms", "db writes/order", "db ops/order",
                 "CPU ms/order by process"],
                [[round(confirmed, 1), round(load.rate, 1), load.statuses, latency["p50"],
                  latency["p99"], per_order["writes"], per_order["all"],
                  " ".join(f"{k}={v}" for k, v in sorted(cpu_per_order.items(), key=lambda kv: -kv[1]))]])
        c.note(f"db ops per order by kind: {per_order}")
        c.note(f"idle background (subtracted): {meter.idle_text()}")
        c.note(f"one at a time ({args.samples} orders): {single['ms']} ms each, "
               f"{single['db_ops_per_order']['all']} db ops per order ({single['db_ops_per_order']['writes']} writes), "
               f"db CPU {single['cpu_ms_per_order'].get('db')} ms per order; by kind {single['db_ops_per_order']}")

        base = steps["bare round trip (baseline)"]
        whole = steps["whole checkout via gateway"]
        rows = [[name, round(ms, 2), c.ratio(ms, base), c.ratio(ms, whole)] for name, ms in steps.items()]
        if "ms" in own:
            rows.insert(-1, ["orders: own db work (in-process)", own["total_ms"], c.ratio(own["total_ms"], base),
                             c.ratio(own["total_ms"], whole)])
        parts = sum(steps[k] for k in ("catalog: price lookup", "inventory: reserve", "payments: charge",
                                       "inventory: commit")) + own.get("total_ms", 0)
        c.table(f"Where a checkout's time goes: each step alone, one at a time (median of {args.samples})",
                ["step", "ms", "x bare round trip", "share of whole checkout"], rows)
        c.note(f"sum of the parts: {parts:.1f} ms of {whole:.1f} ms; the rest ({whole - parts:.1f} ms) is what the "
               "parts alone do not show: the gateway hop, the orders handler, token checks, and the database work "
               "each step sets off in the background (relay passes, change-stream wake-ups: see the one-at-a-time "
               "op count above), which the next step waits behind")
        if "ms" in own:
            c.note(f"orders' own db work by step (ms): {own['ms']}")
            c.note(f"orders' own db commands per order: {own['commands_total']} {own['commands_per_order']}")
        else:
            c.note(f"orders' own db work could not be timed in-process: {own['error']}")
        if args.profile:
            shop.stop(*args.profile)
            for service_name in args.profile:
                print(f"\ncProfile of {service_name}:")
                print(c.profile_report(shop.profile_path(service_name)))
        c.emit({"bench": "checkout", "concurrency": args.concurrency, "duration_s": args.duration,
                "books": len(isbns), "orders_per_s": round(confirmed, 2), "calls_per_s": round(load.rate, 2),
                "orders": load.completed, "seconds": round(load.seconds, 2), "statuses": load.statuses,
                "latency_ms": latency, "db_ops_per_order": per_order, "cpu_ms_per_order": cpu_per_order,
                "idle": meter.idle_figures(),
                "steps_ms": {k: round(v, 3) for k, v in steps.items()},
                "steps_ratio_to_bare": {k: c.ratio(v, base) for k, v in steps.items()},
                "one_at_a_time": single, "orders_own_db": own, "profiled": args.profile})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))
