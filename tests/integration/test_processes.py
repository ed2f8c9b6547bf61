"""The shop's processes as an operator sees them: each says what it is in ps, and none outlives the process that
started it (run.py's supervisor, or a test run that is killed)."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from harness import ROOT, AllInOne, free_base, http_get

from bookshop import SERVICES

TESTS = os.path.join(ROOT, "tests")


def cmdline(pid: int) -> str:
    """What ps shows for a process (its argv as the kernel sees it, NULs as spaces)."""
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode().strip()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead for our purposes
    except OSError:
        return False


def test_each_service_says_what_it_is_in_ps(shop):
    for name in SERVICES:
        assert cmdline(shop.procs[name].pid) == f"bookshop {name} :{shop.ports[name]}"


@pytest.mark.skipif(bool(os.environ.get("MONGODB_URI")), reason="exercises the embedded database")
def test_the_all_in_one_mode_names_the_supervisor_the_database_and_each_service(tmp_path):
    data = str(tmp_path / "var")
    os.makedirs(data)
    base = free_base()
    shop = AllInOne(data, base, BOOKSHOP_DEMO_DATA="0").start()
    try:
        shop.wait_ready()
        assert cmdline(shop.proc.pid) == "bookshop supervisor"
        names = sorted(cmdline(pid) for pid in children(shop.proc.pid))
        assert names == sorted(["bookshop database"] + [f"bookshop {name} :{base + offset}"
                                                        for name, offset in SERVICES.items()])
        assert shop.stop() == 0
    finally:
        if shop.proc.poll() is None:
            shop.proc.kill()


# a test run in miniature: it starts a service through the harness from a worker thread that then ends (as
# tests do with run_in_executor), says the service's pid, and waits to be killed
PARENT = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from harness import Shop
shop = Shop(sys.argv[2])
starter = threading.Thread(target=shop.start, args=("gateway",))
starter.start()
starter.join()
print(shop.procs["gateway"].pid, shop.ports["gateway"], flush=True)
sys.stdin.read()
"""


def healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    except OSError:
        return False


def test_services_started_by_the_harness_die_with_a_killed_test_run(mongodb_uri):
    child = None
    with subprocess.Popen([sys.executable, "-c", PARENT, TESTS, mongodb_uri], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=ROOT) as parent:
        try:
            ready, _, _ = select.select([parent.stdout], [], [], 60)
            assert ready, "the harness did not start the gateway"
            child, port = (int(word) for word in parent.stdout.readline().split())
            assert alive(child) and healthy(port), "the service died with the thread that started it"
            parent.kill()
            parent.wait(10)
            deadline = time.monotonic() + 30  # it drains its requests first, as on any SIGTERM
            while alive(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not alive(child), "the service outlived the killed test run"
        finally:
            if parent.poll() is None:
                parent.kill()
            if child is not None and alive(child):
                os.kill(child, signal.SIGKILL)
