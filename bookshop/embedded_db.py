"""The embedded database: SecantusDB (a MongoDB wire-protocol server) run as a child process."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time

from bookshop.procs import die_with_parent, free_port
from bookshop.storage.wire import ping

log = logging.getLogger(__name__)


class EmbeddedDatabaseError(RuntimeError):
    pass


def secantusd_command() -> list[str]:
    """``secantusd-py``'s command line, run by this interpreter under the name ``bookshop database``."""
    if importlib.util.find_spec("secantus") is None:
        raise EmbeddedDatabaseError("SecantusDB is not installed: pip install -e . installs it (secantusdb)")
    return [sys.executable, "-m", "bookshop.database_process"]


def _database_env() -> dict:
    """This environment, with the directory this ``bookshop`` was imported from first on ``PYTHONPATH``, so
    that ``-m bookshop.database_process`` finds it wherever the database is started from."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class EmbeddedDatabase:
    """Starts ``secantusd-py`` on a free loopback port and waits until it answers ``ping``."""

    def __init__(self, storage_path: str, host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | None = None):
        self.storage_path = storage_path
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true&retryWrites=false&journal=true"

    def start(self, timeout: float = 30.0) -> str:
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process (returns at once; ``wait_ready`` waits for it)."""
        if self.storage_path != ":memory:":
            os.makedirs(self.storage_path, exist_ok=True)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        cmd = secantusd_command() + ["--host", self.host, "--port", str(self.port),
                                     "--storage-path", self.storage_path, "--log-level", "WARNING"]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=_database_env(),
                                     preexec_fn=die_with_parent(), start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if time.monotonic() + 1.0 < deadline and self.storage_path != ":memory:":
                    # a previous server on these files may still be shutting down (its run.py was killed
                    # and it got SIGTERM): try again until the files are free
                    time.sleep(0.5)
                    self.launch()
                    continue
                raise EmbeddedDatabaseError(
                    f"the embedded database exited with code {self.proc.returncode}"
                    + (f" (see {self.log_path})" if self.log_path else ""))
            if ping(self.host, self.port, 0.2):
                return self.uri
            time.sleep(0.03)
        self.stop()
        raise EmbeddedDatabaseError(f"the embedded database did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
