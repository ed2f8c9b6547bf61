"""Live-stream fan-out: event latency to 1,000 WebSocket clients, and the gateway's memory per idle client.

    python bench/ws_fanout.py [--clients 1000] [--events 50] [--profile gateway]

A separate process (bench/_ws_clients.py, aiohttp) opens ``--clients`` WebSockets to the gateway's /ws with
the gateway's own Origin, subscribes each to ``inventory`` and checks with one warm-up restock that all
are live. The gateway's VmRSS is read before the clients connect and once they are connected, subscribed
and idle: KiB per client. Then the client process restocks one book ``--events`` times (~``--interval``
apart, POST /api/v1/inventory/{isbn}/restock straight at the inventory service, so the answer marks the
commit and does not queue behind the gateway's fan-out) and measures, on its own clock, from each
restock's answer to each client's receipt of the stock.changed event with the new ``on_hand``.
Baseline, same run and same client code: bench/bare_server.py, whose /ws clients get an event of the
same shape sent straight from a set of handlers after each POST /broadcast answers. A last
run with ONE gateway client shows the event pipeline's own latency (outbox relay, the service's event
stream, the hub) apart from the fan-out, and an in-process run of the inventory's own part of it (the
restock's write, one outbox relay pass, the event stream's read; database commands counted with a pymongo
listener) shows how much of that is database round trips.

Goals, against the bare server of the same run (the machine is shared: only same-run ratios mean much):
the gateway's CPU per delivered frame <= 0.5x the bare server's (a handler broadcasting with tornado's own
``write_message``), the gateway's p99 <= the bare p99 + 25 ms, <= 20 KiB per idle client. ``--workers 2``
runs the gateway as two processes sharing its port (``SO_REUSEPORT``, ``BOOKSHOP_GATEWAY_WORKERS``); their
CPU and memory are summed.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

from bench import _common as c

SERVICES = ("users", "catalog", "inventory", "gateway")
GOAL_CPU_RATIO = 0.5      # gateway CPU per delivered frame / the bare server's
GOAL_P99_OVER_BARE_MS = 25.0
GOAL_KIB = 20.0
CLIENTS = os.path.join(c.BENCH, "_ws_clients.py")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="WebSocket clients (default 1000)")
    parser.add_argument("--events", type=int, default=50, help="restocks to time (default 50)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between restocks (0.05)")
    parser.add_argument("--snapshots", action="store_true",
                        help="every client subscribes without 'after' and gets a snapshot (default: only the first)")
    parser.add_argument("--bare-ping-interval", type=float, default=0.0,
                        help="give the baseline's sockets keep-alive pings like the gateway's (20), to see their cost")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds idle before reading memory (1)")
    parser.add_argument("--profile", action="append", default=[], choices=list(SERVICES),
                        help="run this service under cProfile and print its hottest functions")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the gateway with tracemalloc and show which lines hold the per-client memory "
                             "(slows it and adds to its RSS: the other figures are then not comparable)")
    return parser.parse_args(argv)


def read_line(proc: subprocess.Popen, prefix: str) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client process ended (code {proc.wait()}) before {prefix}")
        if line.startswith(prefix + " "):
            return json.loads(line[len(prefix) + 1:])


def fan_out(bench: c.Bench, label: str, pid: int, ws: str, origin: str, change_url: str, token: str,
            isbn: str, args, clients: int, snapshot=None) -> dict:
    """One run against one server: memory per idle client, then the latency of ``args.events`` changes.
    ``snapshot``: takes a tracemalloc snapshot of the server (before the clients and once they are idle)."""
    snapshots = [snapshot()] if snapshot else []
    rss_before = c.rss_kib(pid)
    cmd = [sys.executable, CLIENTS, "--ws", ws, "--origin", origin, "--change-url", change_url,
           "--token", token, "--isbn", isbn, "--clients", str(clients), "--events", str(args.events),
           "--interval", str(args.interval)] + (["--snapshots"] if args.snapshots else [])
    proc = c.spawn(cmd, log_path=bench.path(f"clients-{label}.log"), stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, text=True)
    ready = read_line(proc, "READY")
    time.sleep(args.settle)
    rss_after = c.rss_kib(pid)
    if snapshot:
        snapshots.append(snapshot())
    cpu_before = c.cpu_seconds(pid)
    proc.stdin.write("GO\n")
    proc.stdin.flush()
    result = read_line(proc, "RESULT")
    cpu = c.cpu_seconds(pid) - cpu_before
    proc.wait(30)
    if snapshots:
        print_memory_by_line(snapshots[0], snapshots[1], clients)
    return {**result, "connect_s": ready["connect_s"], "live_after_warmup": ready["live"],
            "rss_before_kib": rss_before, "rss_after_kib": rss_after,
            "kib_per_client": round((rss_after - rss_before) / clients, 2),
            "server_cpu_ms_per_event": round(cpu * 1000 / max(1, result["events"]), 2),
            "server_cpu_us_per_frame": round(cpu * 1e6 / max(1, result["deliveries"]), 2)}


def goals_of(base: dict, run: dict) -> dict:
    """The section-1 goals of issue 13, each met or not, against the bare server of the same run."""
    cpu = c.ratio(run["server_cpu_us_per_frame"], base["server_cpu_us_per_frame"])
    p99, bare_p99 = run["latency_ms"]["p99"], base["latency_ms"]["p99"]
    kib = run["kib_per_client"]
    complete = not run["missing"] and not base["missing"]
    return {
        "cpu per delivered frame": {
            "met": cpu is not None and cpu <= GOAL_CPU_RATIO,
            "text": f"{run['server_cpu_us_per_frame']} us vs bare {base['server_cpu_us_per_frame']} us = {cpu}x "
                    f"(goal <= {GOAL_CPU_RATIO:g}x)"},
        "p99 latency": {
            "met": complete and p99 is not None and bare_p99 is not None and p99 <= bare_p99 + GOAL_P99_OVER_BARE_MS,
            "text": f"{p99} ms vs bare {bare_p99} ms (goal <= bare + {GOAL_P99_OVER_BARE_MS:g} ms, every event "
                    f"delivered: {run['missing']} missing)"},
        "memory per idle client": {
            "met": kib <= GOAL_KIB, "text": f"{kib} KiB (goal <= {GOAL_KIB:g} KiB)"},
    }


def print_memory_by_line(before, after, clients: int, limit: int = 15) -> None:
    """Where the memory the idle clients hold was allocated (tracemalloc, by source line)."""
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"\nMemory held by {clients} idle clients, by allocating line (tracemalloc: {total / clients:.0f} B/client "
          f"in Python objects):")
    for stat in stats[:limit]:
        frame = stat.traceback[0]
        where = os.path.relpath(frame.filename, c.ROOT) if frame.filename.startswith(c.ROOT) else frame.filename
        print(f"  {stat.size_diff / clients:8.0f} B/client  {stat.count_diff / clients:6.1f} blocks/client  "
              f"{where}:{frame.lineno}")
    by_stack = after.compare_to(before, "traceback")
    ours = sum(s.size_diff for s in by_stack
               if any(f.filename.startswith(os.path.join(c.ROOT, "bookshop")) for f in s.traceback))
    print(f"  allocated with Bookshop code on the stack ({len(by_stack[0].traceback) if by_stack else 0} frames "
          f"deep): {ours / clients:.0f} B/client; the rest is Tornado/asyncio's own per-connection state")


async def pipeline_in_process(uri: str, samples: int) -> dict:
    """The inventory's part of the event pipeline, in-process: the real LevelRepo, EventLog and Relay on a
    scratch database. Milliseconds (median) and database commands per restock, by step."""
    from motor.motor_asyncio import AsyncIOMotorClient

    from bookshop.storage.inventory import LevelRepo
    from bookshop.storage.outbox import EventLog, Relay

    listener = c.CommandCounter()
    client = AsyncIOMotorClient(uri, event_listeners=[listener], retryWrites=False, tz_aware=True)
    try:
        database = client["bench_pipeline_" + uuid.uuid4().hex[:8]]
        levels, log_ = LevelRepo(database), EventLog(database)
        await levels.create_indexes()
        await log_.create_indexes()
        relay = Relay(log_, [levels.pending_events])
        await levels.restock("9780000000002", 1)
        await relay.run_once()
        ms, commands = collections.defaultdict(list), collections.defaultdict(list)
        for _ in range(samples):
            seq = log_.last_seen
            steps = [("restock write", lambda: levels.restock("9780000000002", 1)),
                     ("relay pass", relay.run_once),
                     ("event stream read", lambda: log_.read(seq, 500))]
            for name, step in steps:
                before, started = listener.total, time.perf_counter()
                await step()
                ms[name].append((time.perf_counter() - started) * 1000)
                commands[name].append(listener.total - before)
        await client.drop_database(database.name)
        out = {name: {"ms": round(statistics.median(ms[name]), 2), "commands": statistics.median(commands[name])}
               for name in ms}
        out["total"] = {"ms": round(sum(v["ms"] for v in out.values()), 2),
                        "commands": sum(v["commands"] for v in out.values())}
        return out
    finally:
        client.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with c.Bench("ws_fanout") as bench:
        uri = bench.database()
        bare = bench.bare_server(args.bare_ping_interval)
        shop = c.Shop(bench, uri, profile=args.profile, trace=["gateway"] if args.tracemalloc else []).start(*SERVICES)
        isbn = shop.isbns(1)[0]
        staff = shop.staff_token()
        print(f"{args.clients} clients, {args.events} changes ~{args.interval * 1000:.0f} ms apart, book {isbn}")

        bare_ws = f"ws://{c.HOST}:{bare.port}/ws"
        base = fan_out(bench, "bare", bare.proc.pid, bare_ws, bare.url, f"{bare.url}/broadcast?isbn={isbn}", "",
                       isbn, args, args.clients)
        restock = shop.url("inventory") + f"/api/v1/inventory/{isbn}/restock"
        gateway = (shop.pid("gateway"), shop.ws_url, shop.origin, restock, staff, isbn, args)
        snapshot = (lambda: shop.memory_snapshot("gateway")) if args.tracemalloc else None
        shop_run = fan_out(bench, "gateway", *gateway, args.clients, snapshot=snapshot)
        single = fan_out(bench, "gateway1", *gateway, 1)
        pipeline = asyncio.run(pipeline_in_process(uri, 15))

        rows = []
        for label, run in (("bare Tornado (baseline)", base), ("gateway", shop_run),
                           ("gateway, 1 client (pipeline only)", single)):
            lat = run["latency_ms"]
            rows.append([label, lat["p50"], lat["p90"], lat["p99"], lat["max"],
                         c.ratio(lat["p99"] or 0, base["latency_ms"]["p99"] or 0),
                         f"{run['deliveries']}/{run['missing']}", run["kib_per_client"],
                         c.ratio(run["kib_per_client"], base["kib_per_client"]) if run is not single else None,
                         run["server_cpu_ms_per_event"], run["server_cpu_us_per_frame"],
                         c.ratio(run["server_cpu_us_per_frame"], base["server_cpu_us_per_frame"])
                         if run is not single else None, run["client_cpu_ms_per_event"], run["connect_s"]])
        c.table("Commit-to-client latency (ms), server CPU and server memory per idle subscribed client",
                ["server", "p50", "p90", "p99", "max", "p99 x bare", "delivered/missing", "KiB/client",
                 "x bare", "server CPU ms/event", "CPU us/frame", "x bare", "client CPU ms/event", "connect s"],
                rows)
        goals = goals_of(base, shop_run)
        for name, goal in goals.items():
            c.note(f"{'PASS' if goal['met'] else 'FAIL'}  {name}: {goal['text']}")
        c.note(f"RSS {shop_run['rss_before_kib']} -> {shop_run['rss_after_kib']} KiB for {args.clients} clients; "
               f"events that reached a client before the restock's own answer did: {shop_run['early']} "
               f"(counted with their negative latency)")
        c.note("the inventory's part of the pipeline, in-process (median ms / db commands): "
               + ", ".join(f"{k} {v['ms']} ms / {v['commands']}" for k, v in pipeline.items()))
        shop.print_profiles(args.profile)
        c.emit({"bench": "ws_fanout", "clients": args.clients, "events": args.events, "interval_s": args.interval,
                "baseline": base, "gateway": shop_run, "gateway_one_client": single, "pipeline_in_process": pipeline,
                "ratio_p99": c.ratio(shop_run["latency_ms"]["p99"] or 0, base["latency_ms"]["p99"] or 0),
                "ratio_kib_per_client": c.ratio(shop_run["kib_per_client"], base["kib_per_client"]),
                "ratio_cpu_per_frame": c.ratio(shop_run["server_cpu_us_per_frame"], base["server_cpu_us_per_frame"]),
                "goals": {name: goal["met"] for name, goal in goals.items()},
                "profiled": args.profile})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))
