"""Recommendations: how often the bought-together list names the next book a shopper buys, what applying an
orders event costs, and how fast the lists are read.

    python bench/recommendations.py [--duration 5] [--readers 100] [--quality-only]

1. Quality, with the issue's fixed parameters so the figure means something: 200 books in 10 categories,
   1,000 shoppers, 10 hidden taste groups of 15 books each spread over at least 4 categories, each shopper
   4-12 purchases (one book per order) of which 70 % from their group and 30 % uniformly at random, seed 42.
   Each shopper's last purchase is held out; the counts are learned from every other purchase (in one
   interleaved timeline, through the service's own code with its bound of 50 partners per book), and for
   each shopper's previous purchase we ask whether the held-out book is in the top 5 of: the bought-together
   list alone, the list as served (bought together, then same category), the same-category list (newest
   first) and a most-popular list. Books the shopper already bought are never listed, as in the service.
   Goal: the bought-together hit rate at least 2x the same-category one.
2. Cost per applied event: the same timeline through ``CoPurchases`` in-process (the algorithm alone), then
   through a running recommendations service: the events are written into the orders service's event log
   (as its relay numbers them) and the service follows its stream until it has applied them all. Reported as
   the recommendations process's CPU time per event (steadier than wall time on a shared machine) and the
   events per second it kept up with.
3. Read latency: wrk with ``--readers`` connections (default 100) on ``GET /api/v1/recommendations?isbn=``
   at the service (over 50 books, each a database read and two catalog calls), against the bare Tornado
   handler in the same run (before and after).
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import datetime
import random
import sys
import time
import uuid
from collections import Counter

from bench import _common as c
from bookshop.services import recommendations as rec
from bookshop.services.isbn import isbn13_check_digit

BOOKS = 200
CATEGORIES = 10
SHOPPERS = 1000
GROUPS = 10
GROUP_BOOKS = 15
GROUP_MIN_CATEGORIES = 4
PURCHASES = (4, 12)
IN_GROUP = 0.70
SEED = 42
TOP = 5
GOAL = 2.0
SERVICES = ("users", "catalog", "orders", "recommendations")

LUA = """
local paths = {%(paths)s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n %% #paths) + 1])
end
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured wrk before each (1)")
    parser.add_argument("--readers", type=int, default=100, help="concurrent readers (wrk connections, 100)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--quality-only", action="store_true", help="only part 1 (no services)")
    parser.add_argument("--profile", action="append", default=[], choices=list(SERVICES),
                        help="run this service under cProfile and print its hottest functions")
    return parser.parse_args(argv)


# -- the synthetic shop ------------------------------------------------------------------------------------
def make_isbn(n: int) -> str:
    first12 = f"979{n:09d}"
    return first12 + str(isbn13_check_digit(first12))


def make_world(rng: random.Random) -> tuple[list[dict], list[list[str]]]:
    """200 books (20 per category, each with a publication year) and 10 disjoint taste groups of 15 books,
    each over at least 4 categories."""
    books = [{"isbn": make_isbn(n), "category": f"category-{n % CATEGORIES}", "published_year": rng.randint(1950, 2025)}
             for n in range(BOOKS)]
    category = {b["isbn"]: b["category"] for b in books}
    while True:
        isbns = [b["isbn"] for b in books]
        rng.shuffle(isbns)
        groups = [isbns[g * GROUP_BOOKS:(g + 1) * GROUP_BOOKS] for g in range(GROUPS)]
        if all(len({category[i] for i in group}) >= GROUP_MIN_CATEGORIES for group in groups):
            return books, groups


def make_shoppers(rng: random.Random, books: list[dict], groups: list[list[str]]) -> list[list[str]]:
    """Each shopper's purchases in order: 4-12 distinct books, 70 % from their group, 30 % from anywhere."""
    everything = [b["isbn"] for b in books]
    shoppers = []
    for _ in range(SHOPPERS):
        group = groups[rng.randrange(GROUPS)]
        bought: list[str] = []
        for _ in range(rng.randint(*PURCHASES)):
            pool = group if rng.random() < IN_GROUP else everything
            choices = [i for i in pool if i not in bought] or [i for i in everything if i not in bought]
            bought.append(rng.choice(choices))
        shoppers.append(bought)
    return shoppers


def timeline(rng: random.Random, shoppers: list[list[str]]) -> list[tuple[int, str]]:
    """Every purchase but each shopper's last, interleaved across shoppers, each shopper's in their order."""
    slots = [s for s, bought in enumerate(shoppers) for _ in bought[:-1]]
    rng.shuffle(slots)
    nth = Counter()
    out = []
    for s in slots:
        out.append((s, shoppers[s][nth[s]]))
        nth[s] += 1
    return out


def order_id(n: int) -> str:
    return f"{n + 1:024x}"


def learn(purchases: list[tuple[int, str]]) -> tuple[rec.CoPurchases, float]:
    model = rec.CoPurchases()
    changes = [rec.OrderChange(f"shopper-{s}", order_id(n), True, (isbn,)) for n, (s, isbn) in enumerate(purchases)]
    started = time.process_time()  # CPU time: steadier than wall time on a shared machine
    for change in changes:
        model.learn(change)
    return model, (time.process_time() - started) / len(changes) * 1e6


def quality(books: list[dict], shoppers: list[list[str]], model: rec.CoPurchases) -> dict:
    by_isbn = {b["isbn"]: b for b in books}
    newest = {}
    for b in sorted(books, key=lambda b: (-b["published_year"], b["isbn"])):
        newest.setdefault(b["category"], []).append(b["isbn"])
    popularity = Counter(isbn for bought in shoppers for isbn in bought[:-1])
    popular = sorted(popularity, key=lambda i: (-popularity[i], i))

    def first(ranked, exclude, n=TOP):
        return [i for i in ranked if i not in exclude][:n]

    hits = Counter()
    for bought in shoppers:
        held_out, previous, exclude = bought[-1], bought[-2], set(bought[:-1])
        together = first(rec.ranked_partners([model.partners.get(previous, {})], exclude), exclude)
        same = first(newest[by_isbn[previous]["category"]], exclude)
        served = together + [i for i in same if i not in together][:TOP - len(together)]
        lists = {"bought_together": together, "as_served": served, "same_category": same,
                 "most_popular": first(popular, exclude)}
        for name, listed in lists.items():
            hits[name] += held_out in listed
    return {name: round(hits[name] / len(shoppers), 4) for name in
            ("bought_together", "as_served", "same_category", "most_popular")}


# -- the service -------------------------------------------------------------------------------------------------
def metric(shop: c.Shop, service: str, name: str) -> float | None:
    import urllib.request
    with urllib.request.urlopen(shop.url(service) + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if not line.startswith("#") and f'name="{name}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(check, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.02)


async def add_books(shop: c.Shop, books: list[dict], token: str) -> None:
    import aiohttp
    sem = asyncio.Semaphore(8)

    async def one(session, b):
        body = {"isbn": b["isbn"], "title": f"Book {b['isbn'][-4:]}", "authors": ["Bench Author"],
                "category": b["category"], "price_cents": 1000, "currency": "EUR",
                "published_year": b["published_year"]}
        async with sem:
            async with session.post(shop.url("catalog") + "/api/v1/books", json=body,
                                    headers={"Authorization": f"Bearer {token}"}) as r:
                if r.status != 201:
                    raise RuntimeError(f"POST /books: {r.status} {await r.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, b) for b in books))


def event_docs(purchases: list[tuple[int, str]], first_seq: int) -> list[dict]:
    """The timeline as the orders service's relay writes confirmations into its event log."""
    now = datetime.datetime.now(datetime.timezone.utc)
    docs = []
    for n, (s, isbn) in enumerate(purchases):
        user = f"shopper-{s}"
        data = {"id": order_id(n), "user_id": user, "status": "CONFIRMED", "total_cents": 1000, "currency": "EUR",
                "items": 1, "created_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "lines": [{"isbn": isbn, "quantity": 1}]}
        docs.append({"seq": first_seq + n, "source": uuid.uuid4().hex, "event": "order.status_changed",
                     "data": data, "at": now, "user_id": user})
    return docs


def service_part(args, books, purchases, model) -> dict:
    import pymongo
    out: dict = {}
    with c.Bench("recommendations") as bench:
        uri = bench.database()
        bare = bench.bare_server()
        shop = c.Shop(bench, uri, demo_data=False, profile=args.profile).start(*SERVICES)
        asyncio.run(add_books(shop, books, shop.staff_token()))
        wait_for(lambda: (metric(shop, "recommendations", "recommendations_rebuilds") or 0) >= 1, 60,
                 "the recommendations service's first build")
        client = pymongo.MongoClient(uri)
        events = client[shop.db_name("orders")]["events"]
        head = (events.find_one({}, sort=[("seq", -1)]) or {}).get("seq", 0)
        docs = event_docs(purchases, head + 1)
        last = docs[-1]["seq"]
        pids = {"recommendations": shop.pid("recommendations"), "orders": shop.pid("orders"), "db": bench.db_pid}
        time.sleep(1.0)
        idle_before = c.cpu_snapshot(pids)
        time.sleep(2.0)
        idle_rate = {k: v / 2.0 for k, v in c.cpu_used(idle_before, c.cpu_snapshot(pids)).items()}
        cpu_before, started = c.cpu_snapshot(pids), time.monotonic()
        for i in range(0, len(docs), 1000):
            events.insert_many(docs[i:i + 1000], ordered=True)
        done = wait_for(lambda: (metric(shop, "recommendations", "orders_seq_applied") or 0) >= last, 300,
                        "applying the events")
        seconds = done - started
        cpu = {k: max(0.0, v - idle_rate.get(k, 0.0) * seconds)
               for k, v in c.cpu_used(cpu_before, c.cpu_snapshot(pids)).items()}
        out["service_apply"] = {"events": len(docs), "seconds": round(seconds, 2),
                                "events_per_s": round(len(docs) / seconds, 1),
                                "cpu_us_per_event": {k: round(v * 1e6 / len(docs), 1) for k, v in cpu.items()}}

        # what the service learned is what the same code learned in-process
        sample = [b["isbn"] for b in books[:50]]
        agree = 0
        for isbn in sample:
            body = c.expect(c.call("GET", shop.url("recommendations") + f"/api/v1/recommendations?isbn={isbn}"), 200)
            served = [i["isbn"] for i in body["items"] if i["reason"] == "bought_together"]
            agree += served == rec.ranked_partners([model.partners.get(isbn, {})], {isbn})[:TOP]
        out["service_agrees_with_in_process"] = f"{agree}/{len(sample)}"

        script = bench.path("reads.lua")
        with open(script, "w") as fh:
            fh.write(LUA % {"paths": ", ".join(c.lua_string(f"/api/v1/recommendations?isbn={i}") for i in sample)})
        pids = {"bare": bare.proc.pid, "db": bench.db_pid,
                **{name: shop.pid(name) for name in ("catalog", "recommendations")}}
        targets = [("bare /json (before)", bare.url + "/json", None),
                   ("recommendations ?isbn=", shop.url("recommendations") + "/api/v1/recommendations", script),
                   ("bare /json (after)", bare.url + "/json", None)]
        reads = {}
        for name, url, lua in targets:
            if args.warmup > 0:
                c.run_wrk(url, args.warmup, args.threads, args.readers, script=lua)
            cpu_before = c.cpu_snapshot(pids)
            result = c.run_wrk(url, args.duration, args.threads, args.readers, script=lua)
            used = c.cpu_used(cpu_before, c.cpu_snapshot(pids))
            reads[name] = {**result.figures(), "cpu_us_per_request": {
                k: round(v * 1e6 / max(1, result.requests), 1) for k, v in used.items() if v > 0.02 * result.seconds}}
        out["reads"] = reads
        client.close()
        shop.print_profiles(args.profile)
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rng = random.Random(SEED)
    books, groups = make_world(rng)
    shoppers = make_shoppers(rng, books, groups)
    purchases = timeline(rng, shoppers)
    model, apply_us = learn(purchases)
    hit = quality(books, shoppers, model)
    ratio = c.ratio(hit["bought_together"], hit["same_category"])
    c.table(f"hit-rate@{TOP} of the held-out purchase ({SHOPPERS} shoppers, {len(purchases)} purchases learned, "
            f"seed {SEED})", ["list", "hit rate", "vs same_category"],
            [[name, f"{value:.3f}", c.ratio(value, hit["same_category"])] for name, value in hit.items()])
    c.note(f"goal: bought_together >= {GOAL:g}x same_category: {'met' if ratio and ratio >= GOAL else 'NOT met'}")
    c.note(f"in-process apply: {apply_us:.1f} µs per event (CoPurchases.learn, {rec.PARTNERS_KEPT} partners kept)")
    figures = {"hit_rate_at_5": hit, "bought_together_vs_same_category": ratio, "goal": GOAL,
               "goal_met": bool(ratio and ratio >= GOAL), "in_process_us_per_event": round(apply_us, 1)}
    if not args.quality_only:
        service = service_part(args, books, purchases, model)
        applied = service["service_apply"]
        c.table("applying events in the service (the orders service streams them, the database stores them)",
                ["events", "seconds", "events/s", "CPU µs/event"],
                [[applied["events"], applied["seconds"], applied["events_per_s"],
                  ", ".join(f"{k} {v}" for k, v in applied["cpu_us_per_event"].items())]])
        c.note(f"bought-together lists served = in-process lists for {service['service_agrees_with_in_process']}"
               " books")
        reads = service["reads"]
        base = (reads["bare /json (before)"]["rps"] + reads["bare /json (after)"]["rps"]) / 2
        c.table(f"reads at {args.readers} concurrent readers (wrk -t{args.threads} -c{args.readers} "
                f"-d{args.duration:g}s)", ["target", "req/s", "vs bare", "p50 ms", "p99 ms", "CPU µs/req"],
                [[name, r["rps"], c.ratio(r["rps"], base), r["p50_ms"], r["p99_ms"],
                  ", ".join(f"{k} {v}" for k, v in r["cpu_us_per_request"].items())] for name, r in reads.items()])
        figures.update(service)
        figures["reads_vs_bare"] = c.ratio(reads["recommendations ?isbn="]["rps"], base)
    c.emit(figures)
    return 0 if figures["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(c.run_main(main))
