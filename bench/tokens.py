"""What authentication costs: token verification per request, password hashing, login throughput.

    python bench/tokens.py [--iterations 3000] [--duration 5] [--concurrency 8]

1. In-process: ``bookshop.auth.TokenVerifier.verify`` on a real RS256 token (keys cached, as on every request
   after the first), in microseconds per call, against ``json.loads`` of the token's own claims (a small JSON
   document) measured in the same run; plus where verify's time goes (header parse, PyJWT decode, the bare
   RSA signature check). Each figure is the best of ``--repeats`` timed batches (the machine is shared:
   the best batch is the one least disturbed).
2. In-process: the Argon2id hash and verify of one password at the parameters of
   ``bookshop.services.accounts.HASHER`` (ms per call).
3. Login throughput: POST /api/v1/tokens through the gateway (users + gateway services against an embedded
   database), ``--concurrency`` callers for ``--duration`` seconds, compared with the in-process verify time:
   logins/s x verify seconds = how many cores were busy hashing (the machine has os.cpu_count()).
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time

from bench import _common as c


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000, help="calls per timed batch (default 3000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per figure (default 5)")
    parser.add_argument("--hashes", type=int, default=8, help="Argon2 hashes and verifies to time (default 8)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of logins (default 5)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent logins (default 8)")
    return parser.parse_args(argv)


def best_us(fn, iterations: int, repeats: int) -> tuple[float, float]:
    """(best, median) microseconds per call of ``fn()`` over ``repeats`` batches of ``iterations``."""
    per_call = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        per_call.append((time.perf_counter() - started) * 1e6 / iterations)
    return min(per_call), statistics.median(per_call)


def best_async_us(make_coro, iterations: int, repeats: int) -> tuple[float, float]:
    async def batch() -> float:
        started = time.perf_counter()
        for _ in range(iterations):
            await make_coro()
        return (time.perf_counter() - started) * 1e6 / iterations

    async def all_batches() -> list[float]:
        await make_coro()  # the first call fetches the keys
        return [await batch() for _ in range(repeats)]

    per_call = asyncio.run(all_batches())
    return min(per_call), statistics.median(per_call)


def verification(args) -> dict:
    import jwt
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from bookshop import auth
    from bookshop.services import accounts

    key = accounts.new_signing_key()
    signer = accounts.TokenSigner(key["kid"], key["private_pem"])
    token = signer.sign("6566f0c2a1b2c3d4e5f60718", "customer", 900)
    claims_json = base64.urlsafe_b64decode(token.split(".")[1] + "==")

    async def load_jwks():
        return {"keys": [key["public_jwk"]]}

    verifier = auth.TokenVerifier(load_jwks)
    public = jwt.PyJWK(key["public_jwk"], algorithm=auth.ALGORITHM).key
    signing_input, _, signature = token.rpartition(".")
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))

    def decode():
        jwt.decode(token, public, algorithms=[auth.ALGORITHM], audience=auth.AUDIENCE, issuer=auth.ISSUER,
                   options={"require": ["exp", "iss", "aud", "sub"]}, leeway=0)

    def rsa_only():
        public.verify(raw_signature, signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())

    n, r = args.iterations, args.repeats
    figures = {
        "json_loads_claims": best_us(lambda: json.loads(claims_json), n, r),
        "verify": best_async_us(lambda: verifier.verify(token), n, r),
        "get_unverified_header": best_us(lambda: jwt.get_unverified_header(token), n, r),
        "pyjwt_decode": best_us(decode, n, r),
        "rsa_verify_only": best_us(rsa_only, n, r),
    }
    return {"token_bytes": len(token), "claims_bytes": len(claims_json),
            **{name: {"best_us": round(b, 2), "median_us": round(m, 2)} for name, (b, m) in figures.items()}}


def hashing(args) -> dict:
    from bookshop.services import accounts
    hasher = accounts.HASHER
    password = "a password of some length"
    hash_ms, verify_ms = [], []
    stored = hasher.hash(password)
    for _ in range(args.hashes):
        started = time.perf_counter()
        stored = hasher.hash(password)
        hash_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        hasher.verify(stored, password)
        verify_ms.append((time.perf_counter() - started) * 1000)
    return {"params": {"time_cost": hasher.time_cost, "memory_kib": hasher.memory_cost,
                       "parallelism": hasher.parallelism},
            "hash_ms": {"best": round(min(hash_ms), 2), "median": round(statistics.median(hash_ms), 2)},
            "verify_ms": {"best": round(min(verify_ms), 2), "median": round(statistics.median(verify_ms), 2)}}


async def logins(shop: c.Shop, args) -> dict:
    import aiohttp
    customers = await c.register_customers(shop, args.concurrency)
    users_pid = shop.pid("users")
    gateway_pid = shop.pid("gateway")
    async with aiohttp.ClientSession() as session:
        async def login(worker: int, n: int) -> int:
            async with session.post(f"{shop.api}/tokens",
                                    json={"email": customers[worker]["email"],
                                          "password": customers[worker]["password"]}) as r:
                await r.read()
                return r.status

        await login(0, 0)  # warm the gateway's service token and connections
        cpu_before = c.cpu_snapshot({"users": users_pid, "gateway": gateway_pid})
        result = await c.closed_loop(login, args.concurrency, args.duration)
        cpu = c.cpu_used(cpu_before, c.cpu_snapshot({"users": users_pid, "gateway": gateway_pid}))
    return {"logins_per_s": round(result.rate, 2), "completed": result.completed, "statuses": result.statuses,
            "latency_ms": c.spread(result.latencies_ms),
            "cpu_ms_per_login": {k: round(v * 1000 / max(1, result.completed), 2) for k, v in cpu.items()}}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with c.Bench("tokens") as bench:
        verify = verification(args)
        hashed = hashing(args)
        uri = bench.database()
        shop = c.Shop(bench, uri, demo_data=False).start("users", "gateway")
        login = asyncio.run(logins(shop, args))

        base = verify["json_loads_claims"]["best_us"]
        rows = [[name, verify[name]["best_us"], verify[name]["median_us"], c.ratio(verify[name]["best_us"], base)]
                for name in ("json_loads_claims", "verify", "get_unverified_header", "pyjwt_decode",
                             "rsa_verify_only")]
        c.table(f"Token verification, in-process ({args.iterations} calls x {args.repeats} batches; "
                f"token {verify['token_bytes']} B)", ["what", "best us", "median us", "x json.loads"], rows)
        overhead = verify["verify"]["best_us"] - verify["rsa_verify_only"]["best_us"]
        c.note(f"verify beyond the RSA check itself: {overhead:.1f} us per call "
               f"({c.ratio(overhead, verify['verify']['best_us'])} of verify)")

        cores = os.cpu_count() or 1
        verify_s = hashed["verify_ms"]["median"] / 1000
        busy = login["logins_per_s"] * verify_s
        c.table(f"Argon2id at HASHER's parameters {hashed['params']}", ["call", "best ms", "median ms"],
                [["hash", hashed["hash_ms"]["best"], hashed["hash_ms"]["median"]],
                 ["verify", hashed["verify_ms"]["best"], hashed["verify_ms"]["median"]]])
        c.table(f"Logins through the gateway ({args.concurrency} concurrent, {args.duration:g} s)",
                ["logins/s", "p50 ms", "p99 ms", "statuses", "cores busy hashing", "x one-core hash rate",
                 "CPU ms/login"],
                [[login["logins_per_s"], login["latency_ms"]["p50"], login["latency_ms"]["p99"],
                  json.dumps(login["statuses"]), f"{busy:.2f} of {cores}",
                  c.ratio(login["logins_per_s"], 1 / verify_s),
                  " ".join(f"{k}={v}" for k, v in login["cpu_ms_per_login"].items())]])
        c.emit({"bench": "tokens", "verification_us": verify, "argon2": hashed,
                "verify_ratio_to_json_loads": c.ratio(verify["verify"]["best_us"], base),
                "login": {**login, "cores": cores, "cores_busy_hashing": round(busy, 2),
                          "ratio_to_one_core_hash_rate": c.ratio(login["logins_per_s"], 1 / verify_s)}})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))
