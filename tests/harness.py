"""Test harness: a real database and real service processes on free ports.

One SecantusDB (``:memory:``) per test session, or the server at ``MONGODB_URI`` when that is set. A ``Shop``
starts the seven services exactly as run.py does (``run.py --service NAME --port N``), each its own OS
process, with a database prefix of its own so shops in one session never share data. The services die with
the test process, however it ends (a parent-death signal, as the supervisor gives its children).
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

from bookshop import SERVICES
from bookshop.procs import die_with_parent, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "run.py")
ADMIN_EMAIL = "staff@bookshop.test"
ADMIN_PASSWORD = "staff-password-1"


def run(coro):
    """Run ``coro`` to its end on a private loop, closed here (``asyncio.run`` would also reset the global
    loop under pytest-tornado's feet, and its dropped loop would leak a socket into the next test)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class ProbeContext:
    """Just enough of a ``ServiceContext`` for in-process handler tests (``make_app(ProbeContext(), routes)``)."""
    name = "probe"
    verifier = None
    event_log = None

    def __init__(self):
        from bookshop.metrics import Metrics
        self.metrics = Metrics("probe")
        self.inflight = set()

    async def readiness(self):
        return []


async def fetch(http_client, base_url: str, path: str, **kw):
    """pytest-tornado's client, answering errors with their response instead of raising."""
    import tornado.httpclient
    try:
        return await http_client.fetch(base_url + path, **kw)
    except tornado.httpclient.HTTPClientError as exc:
        return exc.response


def found(value) -> bool:
    """``until``'s test for checks that answer None for "not yet" (and may answer a falsy value, like [])."""
    return value is not None


async def until(check, timeout: float = 20.0, every: float = 0.05, describe=lambda: "", done=bool):
    """Poll ``check()`` (a plain or an async function) until ``done(value)`` (by default: a truthy value), and
    return that value. After ``timeout`` seconds the test fails, saying ``describe()``: a condition not reached
    is never answered with a falsy "not yet". ``every``: seconds between looks (0: just let the loop run)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if done(value):
            return value
        assert loop.time() < deadline, f"not within {timeout:g}s: {describe()}"
        await asyncio.sleep(every)


# Linux sends the parent-death signal when the thread that started the child ends, and tests start services
# from short-lived threads too (run_in_executor): every service is started from this one thread, which lives
# as long as the test process.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-spawner")


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen``, for a child that gets SIGTERM when the test process dies (even by kill -9)."""
    return _SPAWNER.submit(subprocess.Popen, args, preexec_fn=die_with_parent(), **kwargs).result()


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Shop:
    """The seven services as processes. ``env`` overrides settings for this shop only."""

    def __init__(self, mongodb_uri: str, env: dict | None = None, log_dir: str | None = None):
        self.mongodb_uri = mongodb_uri
        self.prefix = "t" + uuid.uuid4().hex[:10]
        self.ports = {name: free_port() for name in SERVICES}
        self.log_dir = log_dir
        self.env = dict(os.environ)
        self.env.update({
            "MONGODB_URI": mongodb_uri,
            "BOOKSHOP_DB_PREFIX": self.prefix,
            "BOOKSHOP_SERVICE_SECRET": "test-secret-" + self.prefix,
            "BOOKSHOP_ADMIN_EMAIL": ADMIN_EMAIL,
            "BOOKSHOP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "BOOKSHOP_DEMO_DATA": "0",
            # every test registers from 127.0.0.1: the limit per address is tested by the tests that set it
            "BOOKSHOP_REGISTRATION_LIMIT": "0",
            "BOOKSHOP_HOST": "127.0.0.1",
            "BOOKSHOP_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        })
        for name, port in self.ports.items():
            self.env[f"BOOKSHOP_{name.upper()}_URL"] = f"http://127.0.0.1:{port}"
        self.env["BOOKSHOP_ALLOWED_ORIGINS"] = f"http://127.0.0.1:{self.ports['gateway']}"
        self.env.update(env or {})
        self.procs: dict[str, subprocess.Popen] = {}

    def url(self, service: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def api(self) -> str:
        return self.url("gateway") + "/api/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports['gateway']}/ws"

    @property
    def origin(self) -> str:
        return self.url("gateway")

    def start(self, *services: str, wait: bool = True) -> "Shop":
        for name in services or SERVICES:
            out = subprocess.DEVNULL
            if self.log_dir:
                out = open(os.path.join(self.log_dir, f"{self.prefix}-{name}.log"), "ab")
            self.procs[name] = spawn(
                [sys.executable, RUN_PY, "--service", name, "--port", str(self.ports[name])],
                env=self.env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=ROOT)
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own copy
        if wait:
            self.wait_ready(*(services or SERVICES))
        return self

    def wait_ready(self, *services: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in services or SERVICES:
            while True:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"service {name} exited with {proc.returncode}")
                try:
                    status, _ = http_get(self.url(name) + "/readyz", 0.5)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"service {name} not ready in {timeout}s")
                time.sleep(0.05)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(20)

    def restart(self, name: str) -> None:
        if self.procs.get(name) is not None and self.procs[name].poll() is None:
            self.kill(name, signal.SIGTERM)
        self.start(name)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def free_base() -> int:
    for _ in range(200):
        base = random.randrange(20000, 40000)
        try:
            socks = []
            for offset in SERVICES.values():
                sock = socket.socket()
                socks.append(sock)  # closed below, also when its bind fails
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


class AllInOne:
    """``python run.py`` (the all-in-one mode: supervisor, embedded database, seven services) on ports from
    ``base``, with its data in ``data_dir``."""

    def __init__(self, data_dir: str, base: int, **env):
        self.data_dir = data_dir
        self.base = base
        self.env = {"BOOKSHOP_DATA_DIR": data_dir, "BOOKSHOP_PORT_BASE": str(base), "BOOKSHOP_HOST": "127.0.0.1",
                    "BOOKSHOP_ADMIN_EMAIL": ADMIN_EMAIL, "BOOKSHOP_ADMIN_PASSWORD": ADMIN_PASSWORD,
                    "BOOKSHOP_LOG_LEVEL": "WARNING", **env}
        self.proc = None

    def start(self):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BOOKSHOP_", "MONGODB_"))}
        full_env.update(self.env)
        self.log = open(os.path.join(self.data_dir, "run.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, RUN_PY], env=full_env, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, cwd=ROOT)
        self.log.close()
        return self

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.base + SERVICES[service]}"

    def wait_ready(self, timeout: float = 60.0) -> float:
        started = time.monotonic()
        for name in SERVICES:
            while True:
                assert self.proc.poll() is None, self.logs()
                try:
                    if http_get(self.url(name) + "/readyz", 0.5)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() - started < timeout, self.logs()
                time.sleep(0.05)
        return time.monotonic() - started

    def pid_of(self, name: str) -> int:
        return json.loads(http_get(self.url(name) + "/healthz")[1])["pid"]

    def logs(self) -> str:
        with open(os.path.join(self.data_dir, "run.log"), errors="replace") as fh:
            return fh.read()[-4000:]

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)
