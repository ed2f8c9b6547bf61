"""run.py: settings errors, the all-in-one mode, supervision, the data-dir lock and clean shutdown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import ROOT, RUN_PY, AllInOne, free_base, http_get

from bookshop import SERVICES


def run_py(*args, env=None, timeout=20):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BOOKSHOP_", "MONGODB_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, RUN_PY, *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("env,args,needle", [
    ({"BOOKSHOP_PORT_BASE": "eighty"}, [], "BOOKSHOP_PORT_BASE"),
    ({"BOOKSHOP_ACCESS_TOKEN_TTL": "7200"}, [], "BOOKSHOP_ACCESS_TOKEN_TTL"),
    ({"MONGODB_URI": "http://localhost:27017"}, [], "MONGODB_URI"),
    ({}, ["--service", "warehouse"], "unknown service"),
    ({"BOOKSHOP_SERVICE_SECRET": "s"}, ["--service", "orders", "--port", "1"], "MONGODB_URI"),
    ({"MONGODB_URI": "mongodb://127.0.0.1:1", "BOOKSHOP_SERVICE_SECRET": "s"},
     ["--service", "orders", "--port", "x"], "--port"),
])
def test_bad_settings_end_start_up_with_one_line_and_code_2(env, args, needle):
    result = run_py(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(bool(os.environ.get("MONGODB_URI")), reason="exercises the embedded database")
def test_all_in_one_lifecycle(tmp_path):
    data = str(tmp_path / "var")
    os.makedirs(data)
    shop = AllInOne(data, free_base(), BOOKSHOP_DEMO_DATA="1").start()
    try:
        shop.wait_ready()
        status, body = http_get(shop.url("gateway") + "/api/v1/books?limit=100")
        assert status == 200 and len(json.loads(body)["items"]) == 100
        isbn = json.loads(body)["items"][0]["isbn"]
        status, body = http_get(shop.url("gateway") + f"/api/v1/inventory/{isbn}")
        assert status == 200 and json.loads(body)["on_hand"] >= 0

        # a second run.py on the same data dir refuses to start
        second = run_py(env=shop.env)
        assert second.returncode == 2 and "already running" in second.stderr

        # a service that dies is restarted
        old = shop.pid_of("catalog")
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if http_get(shop.url("catalog") + "/readyz", 0.5)[0] == 200 and shop.pid_of("catalog") != old:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert shop.pid_of("catalog") != old

        pids = [shop.pid_of(name) for name in SERVICES]
        started = time.monotonic()
        assert shop.stop() == 0
        assert time.monotonic() - started < 15
        assert wait_gone(pids, 1.0)
        with open(os.path.join(data, "db.log"), "a"):
            pass
    finally:
        if shop.proc.poll() is None:
            shop.proc.kill()


@pytest.mark.skipif(bool(os.environ.get("MONGODB_URI")), reason="exercises the embedded database")
def test_kill_9_of_run_py_leaves_nothing_behind_and_data_survives(tmp_path):
    data = str(tmp_path / "var")
    os.makedirs(data)
    base = free_base()
    shop = AllInOne(data, base, BOOKSHOP_DEMO_DATA="0").start()
    try:
        shop.wait_ready()
        pids = [shop.pid_of(name) for name in SERVICES]
        import urllib.request
        req = urllib.request.Request(shop.url("gateway") + "/api/v1/users", method="POST",
                                     data=json.dumps({"email": "keep@example.com", "password": "password-1",
                                                      "name": "Keeper"}).encode(),
                                     headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(req, timeout=5).status == 201
        shop.stop(signal.SIGKILL)
        assert wait_gone(pids), "services outlived a kill -9 of run.py"
        shop = AllInOne(data, base, BOOKSHOP_DEMO_DATA="0").start()
        shop.wait_ready()
        req = urllib.request.Request(shop.url("gateway") + "/api/v1/tokens", method="POST",
                                     data=json.dumps({"email": "keep@example.com",
                                                      "password": "password-1"}).encode(),
                                     headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(req, timeout=5).status == 200  # the account survived
        assert shop.stop() == 0
    finally:
        if shop.proc.poll() is None:
            shop.proc.kill()
