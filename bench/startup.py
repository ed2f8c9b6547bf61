"""Start-up and shutdown time of the all-in-one mode (``python run.py``), against a bare Tornado process.

    python bench/startup.py [--runs 3]

Each start runs ``python run.py`` (embedded database in a temporary BOOKSHOP_DATA_DIR, seven consecutive
free ports from BOOKSHOP_PORT_BASE) and times it until every service's /readyz answers 200; then it sends
SIGTERM and times the exit, and checks that nothing of the run is left (processes, listening ports). The
first start is cold (an empty data dir, so the demo catalogue and stock are seeded); ``--runs`` warm
restarts follow on the same data dir. run.py logs at INFO so its own log lines give the phases (database
answering, services listening, services stopped, database stopped). Baseline, in the same run: starting
bench/bare_server.py until it answers, and stopping it. Goal: ready within 3 s.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.request
import uuid

from bench import _common as c
from bookshop import SERVICES

GOAL_S = 3.0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="warm restarts after the cold start (default 3)")
    parser.add_argument("--baseline-runs", type=int, default=3, help="bare server starts (default 3)")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up on a start after this many s")
    return parser.parse_args(argv)


def ours(marker: str) -> list[int]:
    """Pids of live processes carrying this run's marker in their environment (run.py, its forked
    services and the database all inherit it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def phases(log_path: str, started_wall: float) -> dict:
    """Milestones from run.py's own log (seconds after the start): the database answering, each service
    listening, and on the way down services stopped and the database stopped."""
    at: dict[str, float] = {}
    with open(log_path, errors="replace") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            when = datetime.datetime.fromisoformat(entry["at"]).timestamp() - started_wall
            msg = entry.get("msg", "")
            listening = re.match(r"(\w+) listening on", msg)
            if "embedded database ready" in msg:
                at["db_ready"] = when
            elif listening:
                at[f"{listening.group(1)}_listening"] = when
            elif msg == "stopping services":
                at["stop_requested"] = when
            elif msg == "stopping the embedded database":
                at["services_stopped"] = when
            elif msg == "bookshop stopped":
                at["db_stopped"] = when
    out = {"db_ready_s": at.get("db_ready")}
    services = [v for k, v in at.items() if k.endswith("_listening")]
    if services:
        out["first_service_listening_s"], out["last_service_listening_s"] = min(services), max(services)
    if "stop_requested" in at and "services_stopped" in at:
        out["services_stop_s"] = at["services_stopped"] - at["stop_requested"]
    if "services_stopped" in at and "db_stopped" in at:
        out["db_stop_s"] = at["db_stopped"] - at["services_stopped"]
    return {k: c.rnd(v) for k, v in out.items()}


def listening(base: int) -> list[int]:
    return [port for port in range(base, base + len(SERVICES)) if c.port_open(port)]


def start_once(bench: c.Bench, data_dir: str, timeout: float, label: str) -> dict:
    base = c.free_port_block(len(SERVICES))
    marker = "bench-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOKSHOP_") and k != "MONGODB_URI"}
    env.update({"BOOKSHOP_HOST": c.HOST, "BOOKSHOP_PORT_BASE": str(base), "BOOKSHOP_DATA_DIR": data_dir,
                "BOOKSHOP_ADMIN_EMAIL": c.ADMIN_EMAIL, "BOOKSHOP_ADMIN_PASSWORD": c.ADMIN_PASSWORD,
                "BOOKSHOP_LOG_LEVEL": "INFO", "BOOKSHOP_DEMO_DATA": "1", "BOOKSHOP_BENCH_RUN": marker})
    pending = {name: f"http://{c.HOST}:{base + offset}/readyz" for name, offset in SERVICES.items()}
    ready: dict[str, float] = {}
    log_path = bench.path(f"run-{label}.log")
    started, started_wall = time.monotonic(), time.time()
    proc = c.spawn([sys.executable, c.RUN_PY], env=env, log_path=log_path)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"run.py exited with {proc.returncode} (see {log_path})")
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not ready within {timeout:.0f}s: {', '.join(pending)}")
        for name, url in list(pending.items()):
            try:
                with urllib.request.urlopen(url, timeout=0.5) as resp:
                    if resp.status == 200:
                        ready[name] = time.monotonic() - started
                        del pending[name]
            except (urllib.error.URLError, OSError):
                pass
        if pending:
            time.sleep(0.02)
    stop_s = c.stop_process(proc, timeout=30.0)
    time.sleep(0.2)  # let the kernel finish reaping before we look for leftovers
    left = ours(marker)
    return {"ready_s": round(max(ready.values()), 3), "per_service_s": {k: round(v, 3) for k, v in ready.items()},
            "stop_s": None if stop_s is None else round(stop_s, 3), "exit_code": proc.returncode,
            "leftover_pids": left, "ports_still_listening": listening(base),
            "phases": phases(log_path, started_wall)}


def bare_once(bench: c.Bench) -> tuple[float, float]:
    port = c.free_port()
    started = time.monotonic()
    proc = c.spawn([sys.executable, c.BARE_SERVER, "--port", str(port)], log_path=bench.path("bare.log"))
    ready = c.wait_http(f"http://{c.HOST}:{port}/json", proc=proc) - started
    return ready, c.stop_process(proc) or float("nan")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with c.Bench("startup") as bench:
        bare = [bare_once(bench) for _ in range(args.baseline_runs)]
        base_start = statistics.median(b[0] for b in bare)
        base_stop = statistics.median(b[1] for b in bare)
        data_dir = bench.path("data")
        cold = start_once(bench, data_dir, args.timeout, "cold")
        warm = [start_once(bench, data_dir, args.timeout, f"warm{i}") for i in range(args.runs)]

        rows = [["bare server (baseline, median)", f"{base_start:.3f}", 1.0, f"{base_stop:.3f}", 1.0, "", ""]]
        for label, run in [("cold start (seeds demo data)", cold)] + [(f"warm restart {i + 1}", w)
                                                                      for i, w in enumerate(warm)]:
            slowest = max(run["per_service_s"], key=run["per_service_s"].get)
            rows.append([label, f"{run['ready_s']:.3f}", c.ratio(run["ready_s"], base_start),
                         run["stop_s"], c.ratio(run["stop_s"] or 0, base_stop), slowest,
                         len(run["leftover_pids"]) + len(run["ports_still_listening"])])
        c.table("Start until every /readyz is 200, and SIGTERM until exit (seconds)",
                ["run", "ready s", "x bare", "stop s", "x bare", "last ready", "leftovers"], rows)
        warm_ready = statistics.median(w["ready_s"] for w in warm) if warm else None
        order = sorted(cold["per_service_s"].items(), key=lambda kv: kv[1])
        c.note("cold, per service: " + ", ".join(f"{k} {v:.2f}" for k, v in order))
        for label, run in [("cold", cold)] + [(f"warm {i + 1}", w) for i, w in enumerate(warm)]:
            c.note(f"{label}, from run.py's log: " + ", ".join(f"{k} {v}" for k, v in run["phases"].items()))
        met = cold["ready_s"] <= GOAL_S and (warm_ready is None or warm_ready <= GOAL_S)
        c.note(f"goal ready <= {GOAL_S:g} s: {'met' if met else 'NOT met'} (cold {cold['ready_s']:.2f} s, "
               f"warm median {warm_ready if warm_ready is None else round(warm_ready, 2)} s)")
        c.emit({"bench": "startup", "baseline": {"bare_ready_s": round(base_start, 3),
                                                 "bare_stop_s": round(base_stop, 3)},
                "cold": {**cold, "ratio_ready": c.ratio(cold["ready_s"], base_start)},
                "warm": warm, "warm_ready_median_s": c.rnd(warm_ready),
                "warm_ratio_ready": c.ratio(warm_ready, base_start) if warm_ready else None,
                "goal_s": GOAL_S, "goal_met": met})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))
