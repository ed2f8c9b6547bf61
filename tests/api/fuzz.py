"""The API fuzzer: a shop of its own, then schemathesis against the description the gateway serves.

    python tests/api/fuzz.py [--max-time SECONDS]      (tox -e api)

Starts ``python run.py`` (embedded database, demo catalogue, a staff account) on free ports in a temporary
data directory, then runs schemathesis against ``GET /api/v1/openapi.json`` twice, as staff and as a
customer, with every phase (examples, coverage, fuzzing, stateful) and the checks ``not_a_server_error``,
``status_code_conformance``, ``content_type_conformance`` and ``response_schema_conformance``. Exits non-zero
if either run found a failure, or if the shop did not start or stop cleanly.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAFF = ("fuzz-staff@example.com", "fuzz-staff-password")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def free_port_base(span: int = 7) -> int:
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + span >= 65535:
            continue
        ok = True
        for port in range(base, base + span):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free range of ports")


def call(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(base: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for port in range(base, base + 7):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the shop exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} not ready in {timeout}s")
            time.sleep(0.1)


def token_for(api: str, email: str, password: str, register: bool = False) -> str:
    if register:
        status, body = call("POST", f"{api}/users", {"email": email, "password": password, "name": "Fuzz customer"})
        assert status == 201, (status, body)
    status, body = call("POST", f"{api}/tokens", {"email": email, "password": password})
    assert status == 200, (status, body)
    return body["access_token"]


def fuzz(api: str, token: str, who: str, max_time: int, report_dir: str) -> int:
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{api}/openapi.json",
               "--url", api.rsplit("/api/v1", 1)[0], "-H", f"Authorization: Bearer {token}",
               "--checks", CHECKS, "--phases", "examples,coverage,fuzzing,stateful",
               "--max-time", str(max_time), "--workers", "1", "--seed", "42",
               "--suppress-health-check", "all",
               "--report", "junit", "--report-dir", os.path.join(report_dir, who)]
    print(f"\n=== schemathesis as {who} (up to {max_time} s) ===", flush=True)
    return subprocess.run(command, cwd=report_dir).returncode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-time", type=int, default=75, help="seconds per run (two runs; default 75)")
    args = parser.parse_args(argv)
    data = tempfile.mkdtemp(prefix="bookshop-fuzz-")
    base = free_port_base()
    env = {**os.environ, "BOOKSHOP_DATA_DIR": data, "BOOKSHOP_PORT_BASE": str(base),
           "BOOKSHOP_ADMIN_EMAIL": STAFF[0], "BOOKSHOP_ADMIN_PASSWORD": STAFF[1],
           # the fuzzer registers and logs in a lot from one address
           "BOOKSHOP_REGISTRATION_LIMIT": "0", "BOOKSHOP_LOG_LEVEL": "WARNING"}
    env.pop("MONGODB_URI", None)
    log = open(os.path.join(data, "shop.log"), "wb")
    shop = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py")], env=env, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, cwd=data)
    codes = []
    try:
        wait_ready(base, shop)
        api = f"http://127.0.0.1:{base}/api/v1"
        staff = token_for(api, *STAFF)
        customer = token_for(api, f"fuzz-{uuid.uuid4().hex[:8]}@example.com", "fuzz-customer-password",
                             register=True)
        codes.append(fuzz(api, staff, "staff", args.max_time, data))
        codes.append(fuzz(api, customer, "customer", args.max_time, data))
    finally:
        shop.send_signal(signal.SIGTERM)
        try:
            stopped = shop.wait(20)
        except subprocess.TimeoutExpired:
            shop.kill()
            stopped = None
        log.close()
        if any(codes) or stopped != 0:
            with open(os.path.join(data, "shop.log"), "rb") as fh:
                tail = fh.read()[-4000:].decode(errors="replace")
            print(f"\nshop log (last lines):\n{tail}")
        shutil.rmtree(data, ignore_errors=True)
    if stopped != 0:
        print(f"the shop did not stop cleanly (exit {stopped})")
        return 1
    return max(codes) if codes else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
