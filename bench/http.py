"""HTTP throughput and latency of the read paths, against a bare Tornado handler serving the same document, in one run.

    python bench/http.py [--duration 4] [--rounds 3] [--connections 32] [--profile gateway]

The services run as shipped: access log lines (INFO), metrics, a trace id per request, span export off. A
second gateway beside the first, on the same upstreams, exports its spans (OTLP over HTTP) to a stand-in
collector in this process (a tiny HTTP/1.1 server that accepts OTLP posts, keeps the connection alive as a
real collector does, and counts their spans).

wrk (-t2 -c32 by default) runs, ``--rounds`` times, a round of: the bare handler answering the warm book page's
bytes (``bench/bare_server.py --document``; the baseline), GET /api/v1/books/{isbn} through the gateway (the
warm aggregated book page: book + stock + recommendations from its cache), and the same through the exporting
gateway; every other round in reverse order, so that a machine getting busier or quieter weighs on each alike.
Then once each: the gateway's /healthz, GET /api/v1/inventory/{isbn} through the gateway (a database read
behind a proxy hop) and GET /api/v1/books/{isbn} straight at the catalog (a database read).

Besides req/s and latency it reports the CPU each process spent per request (from /proc), which is steadier
than req/s on a shared machine, and how many upstream calls the book page made (0 while it is served from the
gateway's cache). Ratios are per round (the median is reported) and pooled over the rounds. Goals: the warm
book page at >= 0.85 of the bare handler's req/s; with export on, >= 0.90 of export off.
"""
import _bootstrap  # noqa: F401  (must come first: bench/http.py would shadow the stdlib http package)

import argparse
import http.server
import statistics
import sys
import threading
import urllib.request

from bench import _common as c
from bookshop import SERVICES

GOAL_PAGE = 0.85    # the warm book page (export off) against the bare handler serving the same bytes
GOAL_EXPORT = 0.90  # the warm book page with span export on, against export off
BOOK_ROUTES = {"catalog": "/api/v1/books/([^/]{1,64})", "inventory": "/api/v1/inventory/([^/]{1,64})",
               "recommendations": "/api/v1/recommendations"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured wrk run (default 4)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured wrk before each (1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bare / page / page exporting (default 3)")
    parser.add_argument("--export-sampling", type=float, default=1.0, metavar="RATIO",
                        help="the exporting gateway records this share of new traces (parentbased_traceidratio; "
                             "default 1: every request)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--profile", action="append", default=[], choices=list(SERVICES),
                        help="run this service under cProfile and print its hottest functions "
                             "(slows it down: its figures are then not comparable)")
    return parser.parse_args(argv)


class Collector:
    """A stand-in OpenTelemetry collector: answers every OTLP/HTTP post 200 and counts the spans in it."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        collector = self
        self.posts = self.spans = self.bytes = 0
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real collector

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                count = sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
                with collector._lock:
                    collector.posts += 1
                    collector.spans += count
                    collector.bytes += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((c.HOST, 0), Handler)
        self.url = f"http://{c.HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def upstream_calls(shop: c.Shop) -> dict[str, int]:
    """Requests the book page's upstreams have served so far (the catalog's include the recommendation
    service's own lookups)."""
    return {service: c.metrics_count(shop.url(service), route) for service, route in BOOK_ROUTES.items()}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=15) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}")
        return resp.read()


def start_bare(bench: c.Bench, document: bytes) -> tuple[str, int]:
    path = bench.path("document.json")
    with open(path, "wb") as fh:
        fh.write(document)
    port = c.free_port()
    proc = c.spawn([sys.executable, c.BARE_SERVER, "--port", str(port), "--document", path],
                   log_path=bench.path("bare_server.log"))
    url = f"http://{c.HOST}:{port}"
    c.wait_http(url + "/doc", proc=proc, what="bare server")
    return url, proc.pid


def start_exporting_gateway(bench: c.Bench, shop: c.Shop, collector: Collector, sampling: float
                            ) -> tuple[str, int]:
    port = c.free_port()
    env = {**shop.env, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url}
    if sampling < 1:
        env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=str(sampling))
    proc = c.spawn([sys.executable, c.RUN_PY, "--service", "gateway", "--port", str(port)], env=env,
                   log_path=bench.path("gateway-exporting.log"))
    url = f"http://{c.HOST}:{port}"
    c.wait_http(url + "/readyz", timeout=60, proc=proc, what="exporting gateway")
    return url, proc.pid


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with c.Bench("http") as bench:
        uri = bench.database()
        # as shipped: INFO, so every request writes its access log line
        shop = c.Shop(bench, uri, env={"BOOKSHOP_LOG_LEVEL": "INFO"}, profile=args.profile).start(*SERVICES)
        isbn = shop.isbns(1)[0]
        page_path = f"/api/v1/books/{isbn}"
        collector = Collector()
        traced_url, traced_pid = start_exporting_gateway(bench, shop, collector, args.export_sampling)
        for _ in range(3):  # fill both gateways' book page caches
            document = fetch(shop.url("gateway") + page_path)
            fetch(traced_url + page_path)
        bare_url, bare_pid = start_bare(bench, document)
        pids = {"bare": bare_pid, "db": bench.db_pid, "gateway-exporting": traced_pid,
                **{name: shop.pid(name) for name in SERVICES}}

        bare, page, traced = "bare /doc (the page's bytes)", "gateway GET /books/{isbn} (page)", \
            "gateway exporting spans (page)"
        round_targets = [(bare, bare_url + "/doc"), (page, shop.url("gateway") + page_path),
                         (traced, traced_url + page_path)]
        once = [("gateway /healthz", shop.url("gateway") + "/healthz"),
                ("gateway GET /inventory/{isbn}", f"{shop.api}/inventory/{isbn}"),
                ("catalog GET /books/{isbn} (direct)", shop.url("catalog") + page_path)]
        print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s per target "
              f"(+{args.warmup:g}s warm-up), {args.rounds} rounds; book {isbn}, page {len(document)} bytes; "
              f"the exporting gateway samples {args.export_sampling:g} of traces")

        def measure(name: str, url: str) -> dict:
            if args.warmup > 0:
                c.run_wrk(url, args.warmup, args.threads, args.connections)
            calls_before = upstream_calls(shop) if "page" in name else {}
            cpu_before = c.cpu_snapshot(pids)
            result = c.run_wrk(url, args.duration, args.threads, args.connections)
            cpu = c.cpu_used(cpu_before, c.cpu_snapshot(pids))
            per_request = {proc: seconds * 1e6 / max(1, result.requests) for proc, seconds in cpu.items()
                           if seconds > 0.02 * result.seconds}  # processes that did a share of the work
            figures = {**result.figures(), "cpu_us_per_request": {k: round(v, 1) for k, v in per_request.items()},
                       "cpu_us_per_request_total": round(sum(per_request.values()), 1)}
            if "page" in name:
                calls = upstream_calls(shop)
                figures["upstream_calls"] = {k: calls[k] - calls_before[k] for k in calls}
            print(f"  {name:<36} {result.rps:>9.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
                  f"  CPU {figures['cpu_us_per_request_total']:6.0f} us/req"
                  + (f"  non-2xx {result.non2xx}" if result.non2xx else ""))
            return figures

        rounds = []
        for n in range(args.rounds):
            print(f" round {n + 1}")
            order = round_targets if n % 2 == 0 else round_targets[::-1]
            rounds.append({name: measure(name, url) for name, url in order})
        print(" once")
        singles = {name: measure(name, url) for name, url in once}

        def pooled(name: str) -> float:
            return sum(r[name]["requests"] for r in rounds) / sum(r[name]["requests"] / r[name]["rps"] for r in rounds)

        def cpu(name: str) -> float:
            return statistics.median(r[name]["cpu_us_per_request_total"] for r in rounds)
        ratios = {
            "page_vs_bare_rps": [c.ratio(r[page]["rps"], r[bare]["rps"]) for r in rounds],
            "exporting_vs_page_rps": [c.ratio(r[traced]["rps"], r[page]["rps"]) for r in rounds],
            "bare_vs_page_cpu": [c.ratio(r[bare]["cpu_us_per_request_total"], r[page]["cpu_us_per_request_total"])
                                 for r in rounds],
            "page_vs_exporting_cpu": [c.ratio(r[page]["cpu_us_per_request_total"],
                                              r[traced]["cpu_us_per_request_total"]) for r in rounds],
        }
        base_rps = pooled(bare)
        rows = []
        for name in (bare, page, traced):
            rows.append([name, f"{pooled(name):.0f}", c.ratio(pooled(name), base_rps),
                         f"{statistics.median(r[name]['p50_ms'] for r in rounds):.2f}",
                         f"{statistics.median(r[name]['p99_ms'] for r in rounds):.2f}",
                         _cpu_text(rounds, name), c.ratio(cpu(name), cpu(bare)) if name != bare else None])
        for name, r in singles.items():
            rows.append([name, f"{r['rps']:.0f}", c.ratio(r["rps"], base_rps), f"{r['p50_ms']:.2f}",
                         f"{r['p99_ms']:.2f}", " ".join(f"{k}={v:.0f}" for k, v in sorted(
                             r["cpu_us_per_request"].items(), key=lambda kv: -kv[1])),
                         c.ratio(r["cpu_us_per_request_total"], cpu(bare))])
        c.table(f"Results (req/s pooled over {args.rounds} rounds, the rest their medians; baseline: the bare "
                f"handler, {base_rps:.0f} req/s)",
                ["target", "req/s", "x bare", "p50 ms", "p99 ms", "CPU us/request by process", "CPU x bare"], rows)

        page_ratio = c.ratio(pooled(page), base_rps)
        export_ratio = c.ratio(pooled(traced), pooled(page))
        page_met = page_ratio is not None and page_ratio >= GOAL_PAGE
        export_met = export_ratio is not None and export_ratio >= GOAL_EXPORT
        calls = {k: sum(r[page]["upstream_calls"][k] for r in rounds) for k in BOOK_ROUTES}
        c.note(f"book page: {page_ratio} of the bare handler's req/s (per round {ratios['page_vs_bare_rps']}; "
               f"by CPU per request {ratios['bare_vs_page_cpu']}), goal >= {GOAL_PAGE}: "
               f"{'met' if page_met else 'NOT met'}")
        c.note(f"span export on: {export_ratio} of export off's req/s (per round {ratios['exporting_vs_page_rps']}; "
               f"by CPU per request {ratios['page_vs_exporting_cpu']}), goal >= {GOAL_EXPORT}: "
               f"{'met' if export_met else 'NOT met'}")
        traced_requests = sum(r[traced]["requests"] for r in rounds)
        c.note(f"collector: {collector.spans} spans in {collector.posts} posts ({collector.bytes / 1024:.0f} KiB) "
               f"for {traced_requests} measured requests (warm-ups and set-up included; spans are batched, the "
               f"last batch may still be queued)")
        c.note(f"upstream calls during the page's runs: {calls} (0 while every part stays cached)")
        collector.close()
        if args.profile:
            shop.stop(*args.profile)
            for service in args.profile:
                print(f"\ncProfile of {service} (whole run, warm-ups included):")
                print(c.profile_report(shop.profile_path(service)))
        c.emit({"bench": "http", "isbn": isbn, "document_bytes": len(document), "export_sampling": args.export_sampling,
                "wrk": {"threads": args.threads, "connections": args.connections, "duration_s": args.duration,
                        "rounds": args.rounds},
                "baseline_rps": round(base_rps, 1), "rounds": rounds, "once": singles, "ratios": ratios,
                "book_page_ratio": page_ratio, "export_ratio": export_ratio,
                "goals": {"book_page": GOAL_PAGE, "export": GOAL_EXPORT},
                "goals_met": {"book_page": page_met, "export": export_met},
                "collector": {"spans": collector.spans, "posts": collector.posts, "bytes": collector.bytes},
                "profiled": args.profile})
    return 0


def _cpu_text(rounds: list[dict], name: str) -> str:
    procs = {p for r in rounds for p in r[name]["cpu_us_per_request"]}
    medians = {p: statistics.median(r[name]["cpu_us_per_request"].get(p, 0.0) for r in rounds) for p in procs}
    return " ".join(f"{p}={v:.0f}" for p, v in sorted(medians.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    sys.exit(c.run_main(main))
