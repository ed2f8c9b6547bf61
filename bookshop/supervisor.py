"""All-in-one mode: the embedded database and one OS process per service, supervised.

A service that dies is logged and restarted with backoff. SIGTERM/SIGINT stops the services (each drains
its in-flight requests), then the database, within 15 s. Children die with the supervisor even when it is
killed with -9 (``PR_SET_PDEATHSIG``), and the data-dir lock is an ``flock`` the kernel drops with the
process, so the next start always works.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bookshop import SERVICES
from bookshop.embedded_db import EmbeddedDatabase, EmbeddedDatabaseError
from bookshop.procs import SUPERVISOR_TITLE, die_with_parent, service_title, set_title
from bookshop.settings import Settings

log = logging.getLogger("bookshop.supervisor")

STOP_SERVICES_WITHIN = 11.0


class AlreadyRunning(RuntimeError):
    pass


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/run.lock``: one run.py per data dir."""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "run.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode().strip() or "?"
            finally:
                os.close(fd)
            raise AlreadyRunning(f"another bookshop (pid {holder}) is already running on {os.path.dirname(self.path)}")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Child:
    """One service process, forked from the supervisor once the code is imported.

    Forking a process that has already imported every module saves each service the ~0.8 s of imports
    (seven of them on two cores), which is what gets the whole shop ready within a few seconds. The
    supervisor never starts an event loop or a thread, so forking it is safe.
    """

    def __init__(self, name: str, port: int, env: dict):
        self.name = name
        self.port = port
        self.env = env
        self.pid: int | None = None
        self.returncode: int | None = None
        self.started_at = 0.0
        self.backoff = 0.5
        self.restart_at: float | None = None

    def start(self) -> None:
        watch_parent = die_with_parent()  # made here: it checks the child's parent is this process
        pid = os.fork()
        if pid == 0:  # the service process
            code = 1
            try:
                code = _serve_forked(self.name, self.port, self.env, watch_parent)
            finally:
                _flush_logs()  # os._exit runs no atexit hook: the access lines of the last loop turn
                os._exit(code)
        self.pid = pid
        self.returncode = None
        self.started_at = time.monotonic()
        self.restart_at = None

    def poll(self) -> int | None:
        if self.pid is not None and self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = self.pid, 0
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.name, timeout)
            time.sleep(0.02)
        return self.returncode


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting regardless
            pass


def _serve_forked(name: str, port: int, env: dict, watch_parent) -> int:
    import asyncio

    from bookshop.app import serve
    from bookshop.logs import setup_logging
    os.setsid()
    watch_parent()
    set_title(service_title(name, port))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    settings = Settings.from_env()
    setup_logging(name, settings.log_level)
    try:
        asyncio.run(serve(name, settings, port))
    except OSError as exc:
        log.error("cannot serve %s on port %d: %s", name, port, exc)
        return 1
    return 0


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings.with_secret()
        self.lock = DataDirLock(settings.data_dir)
        self.db: EmbeddedDatabase | None = None
        self.children: list[Child] = []
        self._stopping = False

    def _child_env(self, mongodb_uri: str) -> dict:
        env = dict(os.environ)
        env["MONGODB_URI"] = mongodb_uri
        env["BOOKSHOP_SERVICE_SECRET"] = self.settings.service_secret
        env["PYTHONUNBUFFERED"] = "1"
        for name in SERVICES:
            env.setdefault(f"BOOKSHOP_{name.upper()}_URL", self.settings.url(name))
        return env

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True

    def run(self) -> int:
        self.lock.acquire()
        set_title(SUPERVISOR_TITLE)
        started = time.monotonic()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            uri = self.settings.mongodb_uri
            if uri is None:
                path = os.path.abspath(os.path.join(self.settings.data_dir, "db"))
                self.db = EmbeddedDatabase(path, log_path=os.path.join(self.settings.data_dir, "db.log"))
                self.db.launch()
            from bookshop import wiring
            wiring.preload()  # import once here, while the database boots; the services are forked
            if self.db is not None:
                uri = self.db.wait_ready()
                log.info("embedded database ready on port %d (data in %s)", self.db.port, path)
            env = self._child_env(uri)
            # users first: the others fetch its keys; they retry anyway, so start all at once
            for name in SERVICES:
                child = Child(name, self.settings.port(name), env)
                child.start()
                self.children.append(child)
            self._announce_when_ready(started)
            self._watch()
        except EmbeddedDatabaseError as exc:
            print(f"bookshop: error: {exc}", file=sys.stderr)
            self._shutdown()
            return 2
        finally:
            self.lock.release()
        return 0

    def _announce_when_ready(self, started: float, timeout: float = 60.0) -> None:
        pending = {c.name: c for c in self.children}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline and not self._stopping:
            for name, child in list(pending.items()):
                url = f"http://{self._probe_host()}:{child.port}/readyz"
                try:
                    with urllib.request.urlopen(url, timeout=0.5) as resp:
                        if resp.status == 200:
                            del pending[name]
                except (urllib.error.URLError, OSError):
                    pass
            if pending:
                time.sleep(0.05)
            self._reap()
        if not pending:
            log.info("bookshop ready in %.2fs: dashboard and API at http://%s:%d/",
                     time.monotonic() - started, self.settings.host, self.settings.port("gateway"))

    def _probe_host(self) -> str:
        return "127.0.0.1" if self.settings.host in ("0.0.0.0", "", "*") else self.settings.host

    def _reap(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.pid is not None and child.poll() is not None and child.restart_at is None:
                code = child.returncode
                if now - child.started_at > 30:
                    child.backoff = 0.5
                child.restart_at = now + child.backoff
                log.error("service %s exited with code %s; restarting in %.1fs", child.name, code, child.backoff)
                child.backoff = min(child.backoff * 2, 10.0)
            elif child.restart_at is not None and now >= child.restart_at and not self._stopping:
                log.info("restarting service %s", child.name)
                child.start()

    def _watch(self) -> None:
        while not self._stopping:
            self._reap()
            time.sleep(0.1)
        self._shutdown()

    def _shutdown(self) -> None:
        log.info("stopping services")
        for child in self.children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SERVICES_WITHIN
        for child in self.children:
            if child.pid is None:
                continue
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service %s did not stop in time; killing it", child.name)
                child.send_signal(signal.SIGKILL)
                child.wait(5)
        if self.db is not None:
            log.info("stopping the embedded database")
            self.db.stop(timeout=3.0)
        log.info("bookshop stopped")
