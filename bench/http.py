"""HTTP throughput and latency of the read paths, against a bare Tornado JSON handler measured in the same run.

    python bench/http.py [--duration 6] [--connections 32] [--profile gateway]

wrk (-t2 -c32 by default) runs, in this order, against: the bare handler (baseline), GET /api/v1/books/{isbn}
through the gateway (the warm aggregated book page: book + stock + recommendations), the gateway's
/healthz, GET /api/v1/inventory/{isbn} through the gateway (a database read behind a proxy hop),
GET /api/v1/books/{isbn} straight at the catalog (a database read), and the bare handler again. The
baseline is the mean of the two bare runs. Besides req/s and latency it reports the CPU each process spent
per request (from /proc), which is steadier than req/s on a shared machine, and how many upstream calls
the book page made (0 when it is served from the gateway's cache). The issue's goal: the warm book page
at >= 0.60 of the bare handler's req/s.
"""
import _bootstrap  # noqa: F401  (must come first: bench/http.py would shadow the stdlib http package)

import argparse
import sys

from bench import _common as c
from bookshop import SERVICES

GOAL = 0.60
BOOK_ROUTES = {"catalog": "/api/v1/books/([^/]{1,64})", "inventory": "/api/v1/inventory/([^/]{1,64})",
               "recommendations": "/api/v1/recommendations"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per measured wrk run (default 6)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured wrk before each (1)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--profile", action="append", default=[], choices=list(SERVICES),
                        help="run this service under cProfile and print its hottest functions "
                             "(slows it down: its figures are then not comparable)")
    return parser.parse_args(argv)


def upstream_calls(shop: c.Shop) -> dict[str, int]:
    """Requests the book page's upstreams have served so far (the catalog's include the recommendation
    service's own lookups)."""
    return {service: c.metrics_count(shop.url(service), route) for service, route in BOOK_ROUTES.items()}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with c.Bench("http") as bench:
        uri = bench.database()
        bare = bench.bare_server()
        shop = c.Shop(bench, uri, profile=args.profile).start(*SERVICES)
        isbn = shop.isbns(1)[0]
        for _ in range(3):  # fill the gateway's book page cache
            c.expect(c.call("GET", f"{shop.api}/books/{isbn}"), 200)
        pids = {"bare": bare.proc.pid, "db": bench.db_pid, **{name: shop.pid(name) for name in SERVICES}}

        # the page comes first after the baseline: its recommendations, cached just now for 30 s, then stay
        # fresh through its run (when they expire under load, every request in flight refetches them)
        targets = [
            ("bare /json (before)", bare.url + "/json"),
            ("gateway GET /books/{isbn} (page)", f"{shop.api}/books/{isbn}"),
            ("gateway /healthz", shop.url("gateway") + "/healthz"),
            ("gateway GET /inventory/{isbn}", f"{shop.api}/inventory/{isbn}"),
            ("catalog GET /books/{isbn} (direct)", shop.url("catalog") + f"/api/v1/books/{isbn}"),
            ("bare /json (after)", bare.url + "/json"),
        ]
        print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s per target "
              f"(+{args.warmup:g}s warm-up); book {isbn}")
        results = {}
        for name, url in targets:
            if args.warmup > 0:
                c.run_wrk(url, args.warmup, args.threads, args.connections)
            calls_before = upstream_calls(shop) if "page" in name else {}
            cpu_before = c.cpu_snapshot(pids)
            result = c.run_wrk(url, args.duration, args.threads, args.connections)
            cpu = c.cpu_used(cpu_before, c.cpu_snapshot(pids))
            per_request = {proc: seconds * 1e6 / max(1, result.requests) for proc, seconds in cpu.items()
                           if seconds > 0.02 * result.seconds}  # processes that did a share of the work
            results[name] = {**result.figures(),
                             "cpu_us_per_request": {k: round(v, 1) for k, v in per_request.items()}}
            if "page" in name:
                calls = upstream_calls(shop)
                results[name]["upstream_calls"] = {k: calls[k] - calls_before[k] for k in calls}
            print(f"  {name:<36} {result.rps:>9.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
                  + (f"  non-2xx {result.non2xx}" if result.non2xx else ""))

        before, after = results[targets[0][0]], results[targets[-1][0]]
        base_rps = (before["rps"] + after["rps"]) / 2
        base_cpu = (before["cpu_us_per_request"].get("bare", 0) + after["cpu_us_per_request"].get("bare", 0)) / 2
        rows = []
        for name, _ in targets:
            r = results[name]
            r["ratio_rps"] = c.ratio(r["rps"], base_rps)
            r["cpu_us_per_request_total"] = round(sum(r["cpu_us_per_request"].values()), 1)
            r["ratio_cpu"] = c.ratio(r["cpu_us_per_request_total"], base_cpu) if "bare" not in name else None
            by_cost = sorted(r["cpu_us_per_request"].items(), key=lambda kv: -kv[1])
            cpu_text = " ".join(f"{k}={v:.0f}" for k, v in by_cost)
            rows.append([name, f"{r['rps']:.0f}", r["ratio_rps"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                         cpu_text, r["ratio_cpu"]])
        c.table(f"Results (baseline: bare handler, mean of before/after = {base_rps:.0f} req/s; "
                f"drift {c.ratio(after['rps'], before['rps'])})",
                ["target", "req/s", "x bare", "p50 ms", "p99 ms", "CPU us/request by process", "CPU x bare"],
                rows)
        page = results[targets[1][0]]
        met = page["ratio_rps"] is not None and page["ratio_rps"] >= GOAL
        c.note(f"book page: {page['ratio_rps']} of the bare handler's req/s (goal >= {GOAL}): "
               f"{'met' if met else 'NOT met'}; upstream calls during its run: {page['upstream_calls']} "
               f"(0 while every part stays cached)")
        if args.profile:
            shop.stop(*args.profile)
            for service in args.profile:
                print(f"\ncProfile of {service} (whole run, warm-ups included):")
                print(c.profile_report(shop.profile_path(service)))
        c.emit({"bench": "http", "isbn": isbn,
                "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration},
                "baseline_rps": round(base_rps, 1), "baseline_cpu_us_per_request": round(base_cpu, 1),
                "targets": results, "book_page_ratio": page["ratio_rps"], "goal": GOAL, "goal_met": met,
                "profiled": args.profile})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))
