"""Stock reservations per second and database round trips per reservation.

    python bench/reservations.py [--duration 4] [--connections 32] [--profile inventory]

The inventory service's POST /internal/reservations (with a ``service`` token from POST {users}/oauth/token,
client_credentials as ``orders``) is driven by wrk with a Lua script: ``--connections`` concurrent callers,
each request a fresh order id reserving 1 unit. Cases, in this order:

* hot: every reservation on the SAME ISBN (restocked with plenty first), in two consecutive phases after a
  short warm-up, so a slowdown as the level document fills with holds shows as a ratio of phase 2 to 1;
* spread: reservations round-robin over 100 other ISBNs.

Baseline, same run and wrk settings: the bare Tornado JSON handler. Database round trips per reservation
come from the server's ``serverStatus.opcounters`` (SecantusDB keeps them), minus the background rate of
the services measured while idle; and, exactly, from an in-process count: the same ``Reservations`` code
with the storage repositories on a motor client with a pymongo ``CommandListener`` (commands by name).
The CPU each process spent per reservation is read from /proc. Last, in-process too, what one hold costs
on a level document already carrying 0, 500 or 2,000 holds, or 500 pending (not yet relayed) events
(interleaved batches, ratio to the empty document): the hot-document cost, free of the machine's noise.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import collections
import concurrent.futures
import datetime
import sys
import time
import uuid

from bench import _common as c

SERVICES = ("users", "catalog", "inventory")
PLENTY = 1_000_000  # the most one restock may add

LUA = """
local isbns = {%(isbns)s}
local path = "/internal/reservations"
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(token)s"}
local threads = {}
local counter = 0
held, other, bad = 0, 0, 0

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function request()
  counter = counter + 1
  local isbn = isbns[(counter %% #isbns) + 1]
  local body = '{"order_id":"%(run)st' .. tid .. 'n' .. counter .. '","items":[{"isbn":"' .. isbn ..
               '","quantity":1}]}'
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, body)
  if status ~= 200 then
    bad = bad + 1
  elseif body:find('"state":"held"', 1, true) then
    held = held + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local h, o, b = 0, 0, 0
  for _, t in ipairs(threads) do
    h = h + t:get("held"); o = o + t:get("other"); b = b + t:get("bad")
  end
  io.write(string.format("@held %%d\\n@other %%d\\n@bad %%d\\n", h, o, b))
end
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run (default 4)")
    parser.add_argument("--baseline-duration", type=float, default=3.0, help="seconds of bare wrk (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent callers (default 32)")
    parser.add_argument("--spread", type=int, default=100, help="ISBNs of the spread case (default 100)")
    parser.add_argument("--inprocess", type=int, default=100, help="reservations counted in-process (100)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured hot load (default 1)")
    parser.add_argument("--holds", default="0,500,2000", help="hold counts of the hot-document test")
    parser.add_argument("--pending", default="500", help="pending event counts of the hot-document test")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds to measure background db ops (2)")
    parser.add_argument("--profile", action="append", default=[], choices=list(SERVICES),
                        help="run this service under cProfile and print its hottest functions")
    return parser.parse_args(argv)


def write_script(bench: c.Bench, name: str, isbns: list[str], token: str) -> str:
    """A wrk script for one run: its order ids are new (a repeated id would be an idempotent replay)."""
    path = bench.path(f"{name}.lua")
    with open(path, "w") as fh:
        fh.write(LUA % {"isbns": ", ".join(c.lua_string(i) for i in isbns), "token": token,
                        "run": uuid.uuid4().hex[:10]})
    return path


def level_doc(meter: c.Meter, shop: c.Shop, isbn: str) -> dict:
    """Size of the level document as stored: its holds and pending events."""
    import bson
    doc = meter.ops.client[shop.db_name("inventory")]["levels"].find_one({"_id": isbn})
    return {"holds": len(doc.get("holds", [])), "pending": len(doc.get("pending", [])),
            "bson_kib": round(len(bson.encode(doc)) / 1024, 1)}


def settle(meter: c.Meter, shop: c.Shop, timeout: float = 30.0) -> None:
    """Wait until no level document carries events any more: the relay takes numbered events out of a document
    with its next write, or pulls them itself a few seconds later; those pulls belong to the case that made
    them, not to the next one or to the idle background."""
    levels = meter.ops.client[shop.db_name("inventory")]["levels"]
    deadline = time.monotonic() + timeout
    while levels.count_documents({"pending.0": {"$exists": True}}, limit=1):
        if time.monotonic() > deadline:
            raise RuntimeError(f"level documents still carry events after {timeout:.0f}s")
        time.sleep(0.1)


def run_case(bench: c.Bench, meter: c.Meter, shop: c.Shop, url: str, name: str, isbns: list[str], token: str,
             args) -> dict:
    script = write_script(bench, name, isbns, token)
    meter.start()
    result = c.run_wrk(url, args.duration, args.threads, args.connections, script=script)
    doc = level_doc(meter, shop, isbns[0]) if len(isbns) == 1 else None  # as the load left it
    settle(meter, shop)
    ops, cpu, seconds = meter.stop()
    n = max(1, result.requests)
    return {**result.figures(), **({"hot_doc_after": doc} if doc else {}),
            "held": result.extra.get("held"), "not_held": result.extra.get("other"),
            "errors": result.extra.get("bad"),
            "db_ops_per_reservation": {k: round(v / n, 2) for k, v in ops.items()},
            "cpu_us_per_reservation": {k: round(v * 1e6 / n) for k, v in cpu.items() if v > 0.02 * seconds}}


async def count_in_process(uri: str, isbn: str, count: int) -> dict:
    """Commands per reservation, exactly: the service's own Reservations code on a listening client."""
    from motor.motor_asyncio import AsyncIOMotorClient

    from bookshop.services.inventory import Reservations
    from bookshop.storage.inventory import LevelRepo
    from bookshop.storage.outbox import utcnow

    listener = c.CommandCounter()
    client = AsyncIOMotorClient(uri, event_listeners=[listener], retryWrites=False, tz_aware=True)
    try:
        database = client["bench_inproc_" + uuid.uuid4().hex[:8]]
        levels = LevelRepo(database)
        await levels.create_indexes()
        reservations = Reservations(levels, levels.archive, 900, utcnow)
        await levels.restock(isbn, PLENTY)
        await reservations.reserve("warm-up", [(isbn, 1)])
        listener.counts.clear()
        results = collections.Counter()
        for i in range(count):
            results[(await reservations.reserve(f"order-{i}", [(isbn, 1)]))["state"]] += 1
        per = {name: round(n / count, 2) for name, n in sorted(listener.counts.items())}
        total = round(sum(listener.counts.values()) / count, 2)
        listener.counts.clear()
        for i in range(count):  # and the commit that follows it in a checkout (naming its ISBNs, as orders does)
            results[(await reservations.commit(f"order-{i}", [isbn]))["state"]] += 1
        per_commit = {name: round(n / count, 2) for name, n in sorted(listener.counts.items())}
        await client.drop_database(database.name)
        return {"reservations": count, "states": dict(results), "commands_per_reservation": per,
                "total_per_reservation": total, "commands_per_commit": per_commit,
                "total_per_commit": round(sum(listener.counts.values()) / count, 2)}
    finally:
        client.close()


async def hold_cost(uri: str, shapes: list[tuple[int, int]], batches: int = 3, per_batch: int = 10) -> dict:
    """Milliseconds per ``LevelRepo.hold`` on level documents that already carry (holds, pending events)
    as in ``shapes``; each batch starts from that shape again."""
    from motor.motor_asyncio import AsyncIOMotorClient

    from bookshop.storage.inventory import LevelRepo
    from bookshop.storage.outbox import new_event, utcnow

    client = AsyncIOMotorClient(uri, retryWrites=False, tz_aware=True)
    try:
        database = client["bench_holds_" + uuid.uuid4().hex[:8]]
        await LevelRepo(database).create_indexes()  # the multikey index on pending.at, as in the service
        levels = LevelRepo(database)
        pending = {n: [new_event("stock.changed", {"isbn": "x", "on_hand": i, "reserved": 0, "available": i})
                       for i in range(n)] for _, n in shapes}
        per_hold: dict[tuple, list[float]] = {shape: [] for shape in shapes}
        order = 0
        for _ in range(batches):
            for shape in shapes:  # interleaved, so a noisy moment hits every shape alike
                holds, events = shape
                isbn = f"level-{holds}-{events}"
                until = utcnow() + datetime.timedelta(seconds=900)
                await database["levels"].replace_one({"_id": isbn}, {
                    "on_hand": PLENTY, "reserved": holds, "available": PLENTY - holds, "pending": pending[events],
                    "holds": [{"order": f"seed-{i}", "qty": 1, "state": "held", "id": i, "n": 1, "until": until}
                              for i in range(holds)], "expires": until}, upsert=True)
                started = time.perf_counter()
                for _ in range(per_batch):
                    order += 1
                    await levels.hold(isbn, f"order-{order}", 1, 1, until)
                per_hold[shape].append((time.perf_counter() - started) * 1000 / per_batch)
        await client.drop_database(database.name)
        best = {shape: min(v) for shape, v in per_hold.items()}
        first = best[shapes[0]]
        return {f"holds={h},pending={p}": {"best_ms": round(best[(h, p)], 2), "ratio": c.ratio(best[(h, p)], first)}
                for h, p in shapes}
    finally:
        client.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with c.Bench("reservations") as bench:
        uri = bench.database()
        bare = bench.bare_server()
        shop = c.Shop(bench, uri, profile=args.profile).start(*SERVICES)
        staff, service = shop.staff_token(), shop.service_token("orders")
        isbns = shop.isbns(args.spread + 1)
        hot, spread = isbns[0], isbns[1:]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda isbn: shop.restock(isbn, PLENTY, staff), isbns))
        meter = c.Meter(uri, {"db": bench.db_pid, **{name: shop.pid(name) for name in SERVICES}})
        url = shop.url("inventory") + "/internal/reservations"
        print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s; hot ISBN {hot}, "
              f"spread over {len(spread)} ISBNs")

        base = c.run_wrk(bare.url + "/json", args.baseline_duration, args.threads, args.connections)
        settle(meter, shop)
        meter.measure_idle(args.idle)
        if args.warmup > 0:
            c.run_wrk(url, args.warmup, args.threads, args.connections,
                      script=write_script(bench, "warmup", [hot], service))
            time.sleep(0.5)  # the warm-up's last requests finish
        reserved_before = shop.levels(hot)["reserved"]
        cases = {}
        for phase in ("hot, phase 1", "hot, phase 2"):
            cases[phase] = run_case(bench, meter, shop, url, phase, [hot], service, args)
        time.sleep(0.5)
        reserved_delta = shop.levels(hot)["reserved"] - reserved_before
        cases["spread"] = run_case(bench, meter, shop, url, "spread", spread, service, args)
        meter.close()
        exact = asyncio.run(count_in_process(uri, hot, args.inprocess))
        shapes = [(int(n), 0) for n in args.holds.split(",")] + [(0, int(n)) for n in args.pending.split(",")]
        holds = asyncio.run(hold_cost(uri, shapes))

        rows = []
        for name, r in cases.items():
            doc = r.get("hot_doc_after", {})
            by_cost = sorted(r["cpu_us_per_reservation"].items(), key=lambda kv: -kv[1])
            rows.append([name, f"{r['rps']:.0f}", c.ratio(r["rps"], base.rps), f"{r['p50_ms']:.1f}",
                         f"{r['p99_ms']:.1f}", f"{r['held']}/{r['not_held']}/{r['errors']}",
                         r["db_ops_per_reservation"]["all"], r["db_ops_per_reservation"]["writes"],
                         " ".join(f"{k}={v}" for k, v in by_cost),
                         "/".join(str(doc.get(k, "")) for k in ("holds", "pending", "bson_kib"))])
        c.table(f"Reservations/s at {args.connections} callers (baseline: bare handler {base.rps:.0f} req/s)",
                ["case", "res/s", "x bare", "p50 ms", "p99 ms", "held/other/err", "db ops/res", "writes/res",
                 "CPU us/reservation", "hot doc holds/pending/KiB"], rows)
        hot1, hot2 = cases["hot, phase 1"], cases["hot, phase 2"]
        c.note(f"hot phase 2 vs phase 1: {c.ratio(hot2['rps'], hot1['rps'])} of the rate; "
               f"spread vs hot phase 1: {c.ratio(cases['spread']['rps'], hot1['rps'])}")
        held = hot1["held"] + hot2["held"]
        slack = args.connections * (3 if args.warmup > 0 else 2)  # requests in flight when a wrk run stopped
        consistent = held <= reserved_delta <= held + slack
        c.note(f"check: the hot level's reserved grew by {reserved_delta} for {held} 'held' answers "
               f"({'consistent' if consistent else 'INCONSISTENT'}: it may exceed them only by requests in "
               f"flight when a wrk run stopped, at most {slack})")
        c.note(f"idle background (subtracted above): {meter.idle_text()}")
        c.note(f"in-process, exact: {exact['total_per_reservation']} commands per reservation "
               f"{exact['commands_per_reservation']}, {exact['total_per_commit']} per commit "
               f"{exact['commands_per_commit']} (states {exact['states']})")
        c.note("one hold on a level document already carrying holds/pending events, in-process: "
               + ", ".join(f"{shape}: {v['best_ms']} ms (x{v['ratio']})" for shape, v in holds.items()))
        shop.print_profiles(args.profile)
        c.emit({"bench": "reservations", "connections": args.connections, "duration_s": args.duration,
                "baseline_rps": round(base.rps, 1), "cases": cases,
                "ratios": {name: c.ratio(r["rps"], base.rps) for name, r in cases.items()},
                "hot_phase2_over_phase1": c.ratio(hot2["rps"], hot1["rps"]), "hot_reserved_delta": reserved_delta,
                "hot_reserved_consistent": consistent,
                "idle": meter.idle_figures(), "in_process": exact, "hold_cost": holds, "profiled": args.profile})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))
