"""What the benchmarks share: child processes that never outlive the run, the embedded database and the
shop's services, the bare baseline server, wrk, HTTP set-up calls, database op counters, statistics and
the report.

The machine is small and shared, so a figure alone means little: every script measures a baseline in the
same run and reports ratios against it.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import io
import json
import math
import os
import pstats
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Awaitable, Callable, Iterable

from pymongo import monitoring

from bookshop import SERVICES
from bookshop import procs
from bookshop.procs import die_with_parent, free_port  # noqa: F401 - free_port: for the benches

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RUN_PY = os.path.join(ROOT, "run.py")
BARE_SERVER = os.path.join(BENCH, "bare_server.py")
TRACED = os.path.join(BENCH, "_traced.py")
HOST = "127.0.0.1"
ADMIN_EMAIL = "staff@bench.test"
ADMIN_PASSWORD = "bench-staff-password"
TEST_CARD = {"card_number": "4242424242424242", "exp_month": 12, "exp_year": time.gmtime().tm_year + 3,
             "cvc": "123"}
ADDRESS = {"name": "Bench Customer", "line1": "1 Load Street", "city": "Berlin", "postal_code": "10115",
           "country": "DE"}


# -- child processes ------------------------------------------------------------------------------------
_children: list[tuple[subprocess.Popen, bool]] = []  # (process, stop it last)


def spawn(cmd: list[str], env: dict | None = None, log_path: str | None = None, last: bool = False,
          stdin=subprocess.DEVNULL, stdout=None, text: bool = False) -> subprocess.Popen:
    """Start a child in its own session (a Ctrl-C reaches us, and we stop it in order) that the kernel
    ends if we die without cleaning up (``PR_SET_PDEATHSIG``)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=stdin, stdout=out if stdout is None else stdout,
                                stderr=out, start_new_session=True, preexec_fn=die_with_parent(), text=text)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()
    adopt(proc, last)
    return proc


def adopt(proc: subprocess.Popen, last: bool = False) -> None:
    """Stop ``proc`` with the others when the run ends (``last``: after them, e.g. the database)."""
    _children.append((proc, last))


def stop_process(proc: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM) -> float | None:
    """Signal ``proc`` and wait for it (SIGKILL after ``timeout``). Returns the seconds it took to exit,
    or None if it had to be killed or had exited already."""
    if proc.poll() is not None:
        return None
    started = time.monotonic()
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
        return time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def stop_all(timeout: float = 15.0) -> None:
    """SIGTERM every child still running (the database last), SIGKILL what does not stop in time."""
    for wave in (False, True):
        procs = [p for p, last in _children if last is wave and p.poll() is None]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    _children.clear()


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run_main(main) -> int:
    """Run a script's ``main()``; Ctrl-C or SIGTERM ends it with 130 (Bench has cleaned up by then)."""
    try:
        return main()
    except KeyboardInterrupt:
        return 130


class Bench:
    """One benchmark run: a temporary directory (logs, profiles, data) and every child process it starts,
    all cleaned up when the ``with`` block ends, however it ends (Ctrl-C and SIGTERM included). The
    directory is kept when the run failed, for its logs."""

    def __init__(self, name: str):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"bookshop-bench-{name}-")
        self.db_pid: int | None = None

    def __enter__(self) -> "Bench":
        signal.signal(signal.SIGTERM, _sigterm)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (&)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        try:
            stop_all()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, _sigterm)
        if exc_type is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            print(f"\n[{self.name}] stopped ({exc_type.__name__}); logs kept in {self.dir}", file=sys.stderr)
        return False

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def database(self) -> str:
        """Start an embedded SecantusDB (in memory); returns its URI."""
        from bookshop.embedded_db import EmbeddedDatabase
        db = EmbeddedDatabase(":memory:", log_path=self.path("db.log"))
        db.launch()
        adopt(db.proc, last=True)
        self.db_pid = db.proc.pid
        return db.wait_ready()

    def bare_server(self, ping_interval: float = 0.0) -> "BareServer":
        return BareServer(self, ping_interval).start()


# -- ports, HTTP --------------------------------------------------------------------------------------------
def free_port_block(count: int, host: str = HOST, low: int = 20000, high: int = 32000) -> int:
    """The first of ``count`` consecutive free ports (below the kernel's ephemeral range)."""
    for _ in range(500):
        base = random.randint(low, high - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def port_open(port: int, host: str = HOST) -> bool:
    return procs.port_open(host, port)


def call(method: str, url: str, body: Any = None, token: str | None = None, headers: dict | None = None,
         form: dict | None = None, timeout: float = 15.0) -> tuple[int, Any]:
    """One blocking HTTP call for set-up work; returns (status, parsed JSON or None)."""
    sent = dict(headers or {})
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    if token:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def expect(status_body: tuple[int, Any], *ok: int) -> Any:
    status, body = status_body
    if status not in ok:
        raise RuntimeError(f"unexpected answer {status}: {json.dumps(body)[:300]}")
    return body


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None, what: str = "") -> float:
    """Poll ``url`` until it answers 200; returns when it did (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return time.monotonic()
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what or url} not ready within {timeout:.0f}s")
        time.sleep(0.02)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def cpu_seconds_fine(pid: int) -> float:
    """CPU time of a process's live threads, to the nanosecond (``/proc/PID/task/*/schedstat``): for short
    stretches where 10 ms ticks are too coarse. Threads that ended are not counted: compare with
    ``cpu_seconds`` over the same stretch."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def cpu_snapshot_fine(pids: dict[str, int]) -> dict[str, tuple[float, float]]:
    """(ticks, fine) CPU seconds so far of each named process."""
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = (cpu_seconds(pid), cpu_seconds_fine(pid))
        except (OSError, IndexError):
            pass
    return out


def cpu_used_fine(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """CPU seconds between two fine snapshots: the live threads' count, unless the ticks show more (time of
    threads that ended meanwhile), less the ticks' 10 ms resolution."""
    out = {}
    for name in before:
        if name in after:
            ticks, fine = after[name][0] - before[name][0], after[name][1] - before[name][1]
            out[name] = max(fine, ticks - 1.0 / os.sysconf("SC_CLK_TCK"))
    return out


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process (those that have gone are left out)."""
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = cpu_seconds(pid)
        except (OSError, IndexError):
            pass
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before if name in after}


# -- the baseline server and the shop ---------------------------------------------------------------------
class BareServer:
    """``bench/bare_server.py`` as a child process: the bare Tornado JSON handler (and WebSocket fan-out)."""

    def __init__(self, bench: Bench, ping_interval: float = 0.0):
        self.bench = bench
        self.port = free_port()
        self.ping_interval = ping_interval
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "BareServer":
        self.proc = spawn([sys.executable, BARE_SERVER, "--port", str(self.port),
                           "--ping-interval", str(self.ping_interval)], log_path=self.bench.path("bare_server.log"))
        wait_http(self.url + "/json", proc=self.proc, what="bare server")
        return self


class Shop:
    """Bookshop's services as separate processes (``run.py --service NAME --port N``), as tests/harness.py
    starts them, against the given database. ``profile``: services to run under cProfile (their stats are
    written when they stop; see ``profile_report``). ``trace``: services to run with tracemalloc (see
    ``memory_snapshot``)."""

    def __init__(self, bench: Bench, mongodb_uri: str, demo_data: bool = True, env: dict | None = None,
                 profile: Iterable[str] = (), trace: Iterable[str] = ()):
        self.bench = bench
        self.mongodb_uri = mongodb_uri
        self.prefix = "b" + uuid.uuid4().hex[:10]
        self.ports = {name: free_port() for name in SERVICES}
        self.secret = "bench-secret-" + self.prefix
        self.profile = set(profile)
        self.trace = set(trace)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BOOKSHOP_") and k != "MONGODB_URI"}
        self.env.update({
            "MONGODB_URI": mongodb_uri,
            "BOOKSHOP_DB_PREFIX": self.prefix,
            "BOOKSHOP_SERVICE_SECRET": self.secret,
            "BOOKSHOP_ADMIN_EMAIL": ADMIN_EMAIL,
            "BOOKSHOP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "BOOKSHOP_DEMO_DATA": "1" if demo_data else "0",
            "BOOKSHOP_HOST": HOST,
            "BOOKSHOP_LOG_LEVEL": "WARNING",
            "BOOKSHOP_ALLOWED_ORIGINS": self.origin,
            "PYTHONUNBUFFERED": "1",
        })
        for name, port in self.ports.items():
            self.env[f"BOOKSHOP_{name.upper()}_URL"] = f"http://{HOST}:{port}"
        self.env.update(env or {})

    def url(self, service: str = "gateway") -> str:
        return f"http://{HOST}:{self.ports[service]}"

    @property
    def api(self) -> str:
        return self.url("gateway") + "/api/v1"

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.ports['gateway']}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.ports['gateway']}/ws"

    def db_name(self, service: str) -> str:
        return f"{self.prefix}_{service}"

    def profile_path(self, service: str) -> str:
        return self.bench.path(f"{service}.prof")

    def print_profiles(self, services: Iterable[str]) -> None:
        """Stop the services run under cProfile (their stats are written on the way out) and print the hottest
        functions of each."""
        services = list(services)
        if not services:
            return
        self.stop(*services)
        for name in services:
            print(f"\ncProfile of {name}:")
            print(profile_report(self.profile_path(name)))

    def start(self, *services: str) -> "Shop":
        for name in services:
            cmd = [sys.executable, RUN_PY, "--service", name, "--port", str(self.ports[name])]
            env = self.env
            if name in self.profile:
                cmd[1:1] = ["-m", "cProfile", "-o", self.profile_path(name)]
            if name in self.trace:
                cmd[1:1] = [TRACED]
                env = {**env, "BENCH_TRACEMALLOC_DIR": self.trace_dir(name)}
                os.makedirs(self.trace_dir(name), exist_ok=True)
            self.procs[name] = spawn(cmd, env=env, log_path=self.bench.path(f"{name}.log"))
        for name in services:
            wait_http(self.url(name) + "/readyz", timeout=60, proc=self.procs[name], what=f"service {name}")
        return self

    def trace_dir(self, service: str) -> str:
        return self.bench.path(f"{service}-tracemalloc")

    def memory_snapshot(self, service: str, timeout: float = 60.0):
        """A tracemalloc snapshot of a service started with ``trace`` (it writes one on SIGUSR1)."""
        import tracemalloc
        taken = len([f for f in os.listdir(self.trace_dir(service)) if f.endswith(".snap")]) + 1
        path = os.path.join(self.trace_dir(service), f"{taken}.snap")
        self.procs[service].send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no tracemalloc snapshot from {service}")
            time.sleep(0.1)
        return tracemalloc.Snapshot.load(path)

    def pid(self, service: str) -> int:
        return expect(call("GET", self.url(service) + "/healthz"), 200)["pid"]

    def processes(self) -> dict[str, int]:
        """Every process of the shop by name: its services and its database(s)."""
        out = {name: self.pid(name) for name in self.procs}
        out.update({db.name: db.pid for db in self.databases()})
        return out

    def databases(self) -> list["DatabaseServer"]:
        """The database server(s) the shop writes to: here the one the bench started for it."""
        return [DatabaseServer("db", self.mongodb_uri, self.bench.db_pid)]

    def kill(self, service: str) -> int:
        """SIGKILL a service; returns the pid it had."""
        pid = self.pid(service)
        self.procs[service].kill()
        self.procs[service].wait()
        return pid

    def restart_killed(self, service: str, old_pid: int, timeout: float = 60.0) -> float:
        """Start a killed service again; returns when it answered /readyz (time.monotonic())."""
        self.start(service)
        return time.monotonic()

    def stop(self, *services: str) -> None:
        """SIGTERM the services (all by default) and wait for them: profiles are written on the way out."""
        names = services or list(self.procs)
        for name in names:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        for name in names:
            try:
                self.procs[name].wait(20)
            except subprocess.TimeoutExpired:
                self.procs[name].kill()
                self.procs[name].wait()

    # -- set-up calls, straight at the owning service ---------------------------------------------------
    def staff_token(self) -> str:
        body = expect(call("POST", self.url("users") + "/api/v1/tokens",
                           {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}), 200)
        return body["access_token"]

    def service_token(self, client_id: str = "orders") -> str:
        body = expect(call("POST", self.url("users") + "/oauth/token",
                           form={"grant_type": "client_credentials", "client_id": client_id,
                                 "client_secret": self.secret}), 200)
        return body["access_token"]

    def isbns(self, count: int = 100) -> list[str]:
        """ISBNs of (demo) books in the catalogue, in catalogue order."""
        out: list[str] = []
        cursor = None
        while len(out) < count:
            query = "limit=100" + (f"&cursor={urllib.parse.quote(cursor)}" if cursor else "")
            page = expect(call("GET", self.url("catalog") + "/api/v1/books?" + query), 200)
            out += [b["isbn"] for b in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        return out[:count]

    def restock(self, isbn: str, quantity: int, staff_token: str) -> dict:
        return expect(call("POST", self.url("inventory") + f"/api/v1/inventory/{isbn}/restock",
                           {"quantity": quantity}, token=staff_token), 200)

    def levels(self, isbn: str) -> dict:
        return expect(call("GET", self.url("inventory") + f"/api/v1/inventory/{isbn}"), 200)


class RunPy(Shop):
    """The all-in-one mode, as a user starts it: ``python run.py`` in a data directory of the run's own, on
    seven consecutive free ports from BOOKSHOP_PORT_BASE. run.py starts the embedded database(s) and forks the
    services; the bench finds the database servers among run.py's descendants (``find_databases``), however
    many there are, and reads the services' pids from their /healthz."""

    def __init__(self, bench: Bench, demo_data: bool = True, env: dict | None = None):
        super().__init__(bench, "", demo_data=demo_data)
        base = free_port_block(len(SERVICES))
        self.ports = {name: base + offset for name, offset in SERVICES.items()}
        for name in SERVICES:
            self.env.pop(f"BOOKSHOP_{name.upper()}_URL", None)  # run.py derives them from the port base
        self.env.pop("MONGODB_URI")
        self.env.update({"BOOKSHOP_PORT_BASE": str(base), "BOOKSHOP_DATA_DIR": bench.path("data"),
                         "BOOKSHOP_ALLOWED_ORIGINS": self.origin})
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self._databases: list[DatabaseServer] | None = None

    def start(self, *services: str) -> "RunPy":
        if services and set(services) != set(SERVICES):
            raise ValueError("run.py starts every service")
        self.proc = spawn([sys.executable, RUN_PY], env=self.env, log_path=self.bench.path("run.log"))
        for name in SERVICES:
            wait_http(self.url(name) + "/readyz", timeout=90, proc=self.proc, what=f"run.py's {name}")
        return self

    def processes(self) -> dict[str, int]:
        out = {"run.py": self.proc.pid, **{name: self.pid(name) for name in SERVICES}}
        out.update({db.name: db.pid for db in self.databases()})
        return out

    def databases(self) -> list["DatabaseServer"]:
        if self._databases is None:
            services = {self.pid(name) for name in SERVICES}
            self._databases = find_databases(self.proc.pid, exclude=services)
            if not self._databases:
                raise RuntimeError(f"no database server among run.py's processes (see {self.bench.path('run.log')})")
        return self._databases

    def kill(self, service: str) -> int:
        pid = self.pid(service)
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_killed(self, service: str, old_pid: int, timeout: float = 60.0) -> float:
        """run.py restarts a service that died: wait until a new process of it answers /readyz."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"run.py exited with code {self.proc.returncode}")
            try:
                status, body = call("GET", self.url(service) + "/healthz", timeout=0.5)
                if status == 200 and body["pid"] != old_pid \
                        and call("GET", self.url(service) + "/readyz", timeout=0.5)[0] == 200:
                    return time.monotonic()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"run.py did not bring {service} back within {timeout:.0f}s")
            time.sleep(0.02)

    def stop(self, *services: str) -> None:
        if services and set(services) != set(SERVICES):
            raise ValueError("run.py stops every service")
        if self.proc is not None:
            stop_process(self.proc, timeout=20.0)


@dataclasses.dataclass(frozen=True)
class DatabaseServer:
    name: str  # "db", or "db:PORT" when there are several
    uri: str
    pid: int


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[parent].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def listening_ports(pid: int) -> list[int]:
    """The TCP ports a process listens on (from its socket fds and /proc/net/tcp*)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def find_databases(root_pid: int, exclude: Iterable[int] = ()) -> list[DatabaseServer]:
    """The MongoDB wire-protocol servers among ``root_pid``'s descendants: each process (not in ``exclude``)
    listening on a port whose ``serverStatus`` names that very process."""
    import pymongo
    found = []
    skip = set(exclude)
    for pid in descendants(root_pid):
        if pid in skip:
            continue
        for port in listening_ports(pid):
            uri = f"mongodb://{HOST}:{port}/?directConnection=true"
            client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)
            try:
                if int(client.admin.command("serverStatus").get("pid", -1)) == pid:
                    found.append((pid, port, uri))
            except Exception:  # noqa: BLE001 - not a database: some other listener
                pass
            finally:
                client.close()
    several = len(found) > 1
    return [DatabaseServer(f"db:{port}" if several else "db", uri, pid) for pid, port, uri in found]


CUSTOMER_PASSWORD = "customer-password"


async def register_customers(shop: Shop, count: int, concurrency: int = 4) -> list[dict]:
    """Register ``count`` customers and log each in: ``[{"email", "password", "token"}, ...]``."""
    import aiohttp
    sem = asyncio.Semaphore(concurrency)
    run = uuid.uuid4().hex[:8]

    async def one(session, i: int) -> dict:
        creds = {"email": f"customer{i}-{run}@bench.test", "password": CUSTOMER_PASSWORD}
        async with sem:
            async with session.post(shop.url("users") + "/api/v1/users", json={**creds, "name": f"C{i}"}) as r:
                if r.status != 201:
                    raise RuntimeError(f"register: {r.status} {await r.text()}")
            async with session.post(shop.url("users") + "/api/v1/tokens", json=creds) as r:
                if r.status != 200:
                    raise RuntimeError(f"login: {r.status} {await r.text()}")
                return {**creds, "token": (await r.json())["access_token"]}

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(one(session, i) for i in range(count))))


def staff_token(shop: Shop) -> str:
    """An access token of the shop's staff account (``ADMIN_EMAIL``)."""
    login = {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    return expect(call("POST", shop.api + "/tokens", login), 200)["access_token"]


# -- the dashboard in headless Chromium -----------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


def chromium_missing() -> bool:
    """True, said on stderr, when the dashboard benches have no Chromium to drive."""
    if os.path.exists(CHROMIUM):
        return False
    print(f"no Chromium at {CHROMIUM} (apt-get install chromium)", file=sys.stderr)
    return True


def sign_in_to_dashboard(page, shop: Shop) -> None:
    """Open the dashboard, wait for its live stream and sign in as staff."""
    from playwright.sync_api import expect as expect_page
    page.goto(shop.url("gateway") + "/")
    expect_page(page.locator("#conn-state")).to_have_text("live", timeout=30000)
    page.fill("#signin-email", ADMIN_EMAIL)
    page.fill("#signin-password", ADMIN_PASSWORD)
    page.click("#signin-button")


def metrics_count(base_url: str, route: str, method: str = "GET") -> int:
    """Requests a service has served on ``route`` (its Prometheus counter, all statuses)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("bookshop_http_requests_total{") and f'route="{route}"' in line \
                and f'method="{method}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# -- wrk -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WrkResult:
    url: str
    rps: float
    requests: int
    seconds: float
    avg_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    extra: dict  # "@key value" lines printed by a Lua done()

    def figures(self) -> dict:
        return {"rps": round(self.rps, 1), "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "requests": self.requests, "non2xx": self.non2xx, "socket_errors": self.socket_errors}


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def run_wrk(url: str, duration: float, threads: int = 2, connections: int = 32, headers: dict | None = None,
            script: str | None = None, timeout: float = 10.0) -> WrkResult:
    cmd = ["wrk", f"-t{threads}", f"-c{max(connections, threads)}", f"-d{max(1, round(duration))}s", "--latency",
           f"--timeout={int(timeout)}s"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if script:
        cmd += ["-s", script]
    cmd.append(url)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 30)
    out = done.stdout
    if done.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed ({done.returncode}): {out}\n{done.stderr}")
    count = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    avg = re.search(r"^\s+Latency\s+([\d.]+)(\w+)", out, re.M)
    dist = {int(p): _ms(v, u) for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(\w+)\s*$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    extra = {}
    for key, value in re.findall(r"^@(\w+)\s+(.*)$", out, re.M):
        try:
            extra[key] = json.loads(value)
        except ValueError:
            extra[key] = value
    return WrkResult(
        url=url, rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        requests=int(count.group(1)), seconds=_ms(count.group(2), count.group(3)) / 1000.0,
        avg_ms=_ms(*avg.groups()) if avg else math.nan,
        p50_ms=dist.get(50, math.nan), p90_ms=dist.get(90, math.nan), p99_ms=dist.get(99, math.nan),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0, extra=extra)


def lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid Lua string literal for the ASCII we put in


# -- database op counters ------------------------------------------------------------------------------------
OPS = ("insert", "query", "update", "delete", "getmore", "command")


class OpCounter:
    """The server's ``serverStatus.opcounters`` (SecantusDB keeps them like mongod does). They count every
    client, the services' background loops included, so ``idle_rate`` measures those to subtract."""

    def __init__(self, uri: str):
        import pymongo
        self.client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)

    def read(self) -> dict[str, int]:
        counters = self.client.admin.command("serverStatus")["opcounters"]
        return {op: int(counters.get(op, 0)) for op in OPS}

    def idle_rate(self, seconds: float) -> dict[str, float]:
        before = self.read()
        time.sleep(seconds)
        after = self.read()
        return {op: (after[op] - before[op] - (1 if op == "command" else 0)) / seconds for op in OPS}

    def close(self) -> None:
        self.client.close()


class Meter:
    """Database ops (all clients) and CPU seconds of each named process over a stretch of work, beyond what
    the services do on their own while idle (``measure_idle`` first)."""

    def __init__(self, uri: str, pids: dict[str, int]):
        self.ops = OpCounter(uri)
        self.pids = pids
        self.idle_ops: dict[str, float] = {}
        self.idle_cpu: dict[str, float] = {}  # CPU seconds per second
        self._started: tuple[dict, dict, float] | None = None

    def measure_idle(self, seconds: float) -> None:
        cpu_before = cpu_snapshot(self.pids)
        self.idle_ops = self.ops.idle_rate(seconds)
        self.idle_cpu = {k: v / seconds for k, v in cpu_used(cpu_before, cpu_snapshot(self.pids)).items()}

    def start(self) -> None:
        self._started = (self.ops.read(), cpu_snapshot(self.pids), time.monotonic())

    def stop(self) -> tuple[dict[str, float], dict[str, float], float]:
        """(database ops by kind, CPU seconds by process, seconds) since ``start``, idle background removed."""
        ops_before, cpu_before, started = self._started
        seconds = time.monotonic() - started
        ops = op_delta(ops_before, self.ops.read(), self.idle_ops, seconds)
        cpu = {k: max(0.0, v - self.idle_cpu.get(k, 0.0) * seconds)
               for k, v in cpu_used(cpu_before, cpu_snapshot(self.pids)).items()}
        return ops, cpu, seconds

    def idle_text(self) -> str:
        return ("db ops " + ", ".join(f"{k} {v:.1f}/s" for k, v in self.idle_ops.items() if v)
                + "; CPU ms/s " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in self.idle_cpu.items()))

    def idle_figures(self) -> dict:
        return {"db_ops_per_s": {k: round(v, 2) for k, v in self.idle_ops.items()},
                "cpu_ms_per_s": {k: round(v * 1000, 1) for k, v in self.idle_cpu.items()}}

    def close(self) -> None:
        self.ops.close()


def op_delta(before: dict, after: dict, idle: dict | None = None, seconds: float = 0.0) -> dict[str, float]:
    """Ops between two readings, minus the idle background rate over ``seconds``."""
    out = {}
    for op in OPS:
        value = after[op] - before[op] - (1 if op == "command" else 0)  # our own serverStatus
        if idle:
            value -= idle[op] * seconds
        out[op] = max(0.0, value)
    out["writes"] = out["insert"] + out["update"] + out["delete"]
    out["all"] = sum(out[op] for op in OPS)
    return out


@dataclasses.dataclass
class Usage:
    """What a stretch of work cost: database ops by kind summed over every database server (``writes`` =
    insert + update + delete statements, as the servers count them: one per command, a batch insert of n
    documents is one), the same per server, write commands by collection (the servers' ``top``: insert,
    update, delete and findAndModify), and CPU seconds by process."""
    seconds: float
    ops: dict[str, float]
    ops_by_server: dict[str, dict[str, float]]
    writes_by_collection: dict[str, int]
    cpu: dict[str, float]

    def cpu_of(self, names: Iterable[str]) -> float:
        return sum(self.cpu.get(name, 0.0) for name in names)


class ShopMeter:
    """Database ops and CPU of every process of a shop, over any number of database servers (gross: the
    services' background work included; measure it alone on an idle shop)."""

    def __init__(self, databases: list[DatabaseServer], pids: dict[str, int]):
        import pymongo
        self.databases = list(databases)
        self.pids = dict(pids)
        self.clients = {db.name: pymongo.MongoClient(db.uri, serverSelectionTimeoutMS=5000)
                        for db in self.databases}

    @property
    def database_names(self) -> list[str]:
        return [db.name for db in self.databases]

    def read(self) -> tuple[float, dict, dict, dict]:
        ops, top = {}, {}
        for name, client in self.clients.items():
            try:
                totals = client.admin.command("top")["totals"]
            except Exception:  # noqa: BLE001 - a server without ``top``: no breakdown by collection
                totals = {}
            for ns, sections in totals.items():
                if isinstance(sections, dict) and "writeLock" in sections:
                    top[ns] = top.get(ns, 0) + int(sections["writeLock"]["count"])
            counters = client.admin.command("serverStatus")["opcounters"]
            ops[name] = {op: int(counters.get(op, 0)) for op in OPS}
        return time.monotonic(), ops, top, cpu_snapshot(self.pids)

    def since(self, reading: tuple[float, dict, dict, dict]) -> Usage:
        started, ops_before, top_before, cpu_before = reading
        now, ops_after, top_after, cpu_after = self.read()
        by_server = {}
        for name in self.clients:
            delta = {op: ops_after[name][op] - ops_before[name][op] for op in OPS}
            delta["command"] = max(0, delta["command"] - 2)  # our own top + serverStatus
            delta["writes"] = delta["insert"] + delta["update"] + delta["delete"]
            delta["all"] = sum(delta[op] for op in OPS)
            by_server[name] = delta
        total = {k: sum(d[k] for d in by_server.values()) for k in (*OPS, "writes", "all")}
        collections_ = {ns: n - top_before.get(ns, 0) for ns, n in top_after.items() if n - top_before.get(ns, 0) > 0}
        return Usage(now - started, total, by_server, collections_, cpu_used(cpu_before, cpu_after))

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


# -- load from Python ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadResult:
    seconds: float  # from the start until the last call ended
    completed: int
    statuses: dict
    latencies_ms: list

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


async def closed_loop(make_call: Callable[[int, int], Awaitable[int]], concurrency: int,
                      duration: float) -> LoadResult:
    """``concurrency`` workers, each awaiting ``make_call(worker, n)`` (which returns an HTTP status) back to
    back, starting new calls for ``duration`` seconds. Every call is counted, and the rate is over the time
    until the last one ended: with slow calls, counting only those done by the deadline would be biased."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + duration
    statuses: dict[str, int] = {}
    latencies: list[float] = []

    async def worker(w: int) -> None:
        n = 0
        while loop.time() < deadline:
            began = loop.time()
            try:
                status = str(await make_call(w, n))
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                status = type(exc).__name__
            n += 1
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append((loop.time() - began) * 1000.0)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return LoadResult(loop.time() - start, len(latencies), statuses, latencies)


# -- statistics and the report ---------------------------------------------------------------------------------
def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def spread(values: list[float]) -> dict:
    return {"n": len(values), "p50": rnd(percentile(values, 50)), "p90": rnd(percentile(values, 90)),
            "p99": rnd(percentile(values, 99)), "max": rnd(max(values) if values else math.nan)}


def rnd(value: float, digits: int = 3) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(value, digits)


def ratio(value: float, baseline: float) -> float | None:
    return rnd(value / baseline) if baseline else None


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def note(text: str) -> None:
    print(f"  {text}")


def emit(figures: dict) -> None:
    """The final line of every script: its figures as one JSON object."""
    print()
    print(json.dumps(figures, separators=(",", ":")))


def profile_report(path: str, limit: int = 25) -> str:
    """The heaviest functions of a cProfile dump, by own time and by cumulative time."""
    if not os.path.exists(path):
        return f"(no profile at {path})"
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


class CommandCounter(monitoring.CommandListener):
    """Counts the commands a motor/pymongo client sends, by name (an in-process view of database round trips)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def started(self, event):
        self.counts[event.command_name] += 1

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass
