"""Secrets: none reaches a log, even at DEBUG; and signing keys rotate without logging anyone out."""
from __future__ import annotations

import asyncio
import glob
import os
import sys
import uuid

import jwt
import pymongo
import pytest

from client import CARD, Api, fresh_isbn, new_session
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, RUN_PY, ROOT, until


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


async def run_py(env: dict, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, RUN_PY, *args, env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.gen_test(timeout=90)
async def test_no_password_token_or_card_number_reaches_a_log(make_shop, log_dir):
    shop = make_shop({"BOOKSHOP_LOG_LEVEL": "DEBUG"})
    password = "Unique-Pa55word-" + uuid.uuid4().hex[:10]
    wrong_password = "Wrong-Pa55word-" + uuid.uuid4().hex[:10]
    bad_card = "4242424242424241"  # Luhn-invalid: refused with 400, and still never logged
    secrets: dict[str, str] = {"password": password, "wrong password": wrong_password,
                               "staff password": ADMIN_PASSWORD, "card": CARD["card_number"],
                               "card's first 12 digits": CARD["card_number"][:12], "bad card": bad_card,
                               "service secret": shop.env["BOOKSHOP_SERVICE_SECRET"]}

    def remember(name: str, pair: dict) -> None:
        # the signature alone identifies a token (its header segment is the same for every token of a key)
        secrets[f"{name} access token"] = pair["access_token"].rsplit(".", 1)[1]
        secrets[f"{name} refresh token"] = pair["refresh_token"]

    async with new_session() as session:
        api = Api(shop, session)
        email, _ = await api.register(password=password)
        assert (await api.post("/tokens", {"email": email, "password": wrong_password})).status == 401
        first = await api.login(email, password)
        remember("first", first)
        r = await api.post("/tokens/refresh", {"refresh_token": first["refresh_token"]})
        assert r.status == 200
        remember("refreshed", r.body)
        customer = api.as_(r.body["access_token"])
        staff_pair = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        remember("staff", staff_pair)
        staff = api.as_(staff_pair["access_token"])
        assert (await customer.get("/users/me")).status == 200

        isbn = await api.new_book(staff, stock=5)
        bad = await customer.order([(isbn, 1)], card={**CARD, "card_number": bad_card})
        assert bad.status == 400
        assert bad_card not in str(bad.body)
        placed = await customer.order([(isbn, 1)])
        assert placed.status in (201, 202), placed
        order_id = placed.body["id"]
        assert placed.body["payment"]["last4"] == "4242"
        assert CARD["card_number"] not in str(placed.body)

        async def confirmed():
            r = await customer.get(f"/orders/{order_id}")
            return r.status == 200 and r.body["status"] == "CONFIRMED"
        await until(confirmed, 20)

    files = sorted(glob.glob(os.path.join(log_dir, f"{shop.prefix}-*.log")))
    assert len(files) == 7, files
    logs = {}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            logs[os.path.basename(path)] = fh.read()
    everything = "\n".join(logs.values())
    # the logs were really written at DEBUG, and saw the requests that carried the secrets
    assert '"level": "debug"' in everything
    assert "/api/v1/tokens/refresh" in everything and "/api/v1/orders" in everything
    leaks = [(what, name) for what, value in secrets.items() for name, text in logs.items() if value in text]
    assert not leaks, f"secrets found in service logs: {leaks}"


@pytest.mark.gen_test
async def test_no_signing_key_or_password_hash_reaches_a_log(make_shop, log_dir):
    shop = make_shop({"BOOKSHOP_LOG_LEVEL": "DEBUG"}, services=["users"])
    async with new_session() as session:
        await Api(shop, session, base=shop.url("users") + "/api/v1").login(ADMIN_EMAIL, ADMIN_PASSWORD)
    client = pymongo.MongoClient(shop.mongodb_uri, serverSelectionTimeoutMS=3000)
    try:
        db = client[f"{shop.prefix}_users"]
        key = db["signing_keys"].find_one({"active": True})
        staff = db["users"].find_one({"email": ADMIN_EMAIL})
    finally:
        client.close()
    with open(os.path.join(log_dir, f"{shop.prefix}-users.log"), encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    assert '"level": "debug"' in text
    # pieces without newlines, quotes or backslashes read the same inside the JSON log lines
    pem_line = key["private_pem"].splitlines()[2][:40]  # line 1 starts alike in every RSA-2048 key
    hash_tail = staff["password_hash"].rsplit("$", 1)[1][:30]
    assert pem_line not in text, "the private signing key is in the users log"
    assert hash_tail not in text, "a password hash is in the users log"


@pytest.mark.gen_test(timeout=60)
async def test_rotate_keys_keeps_old_tokens_valid_and_signs_new_ones_with_the_new_key(make_shop):
    shop = make_shop(services=["users", "catalog", "gateway"])
    async with new_session() as session:
        api = Api(shop, session)
        jwks_url = shop.url("users") + "/.well-known/jwks.json"
        old_pair = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        old = api.as_(old_pair["access_token"])
        old_kid = kid_of(old.token)
        assert [k["kid"] for k in (await api.get(jwks_url)).body["keys"]] == [old_kid]
        assert (await old.get("/users/me")).status == 200

        code, out, err = await run_py(shop.env, "rotate-keys")
        assert code == 0, err
        keys = (await api.get(jwks_url)).body["keys"]
        new_kid = keys[0]["kid"]
        assert new_kid != old_kid and new_kid in out
        assert [k["kid"] for k in keys] == [new_kid, old_kid]  # the active one first

        # tokens signed before the rotation still work, at the gateway and at each service
        assert (await old.get("/users/me")).status == 200
        assert (await old.get(shop.url("users") + "/api/v1/users/me")).status == 200
        book = {"isbn": fresh_isbn(), "title": "Rotated", "authors": ["A"], "category": "c", "price_cents": 100,
                "currency": "EUR"}
        assert (await old.post(shop.url("catalog") + "/api/v1/books", book)).status == 201
        r = await api.post("/tokens/refresh", {"refresh_token": old_pair["refresh_token"]})
        assert r.status == 200

        # new logins get the new key (the users service picks the rotation up within a few seconds)
        async def login_with_new_key():
            pair = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
            return pair if kid_of(pair["access_token"]) == new_kid else None
        new_pair = await until(login_with_new_key, 10, 0.5, describe=lambda: "new logins still use the retired key")
        new = api.as_(new_pair["access_token"])

        # and every verifier learns the new key (a refetch on an unknown kid: at most a few seconds)
        async def accepted():
            return all([(await new.get("/users/me")).status == 200,
                        (await new.get(shop.url("users") + "/api/v1/users/me")).status == 200,
                        (await new.post(shop.url("catalog") + "/api/v1/books",
                                        {**book, "isbn": fresh_isbn()})).status == 201])
        await until(accepted, 5)
        assert (await old.get("/users/me")).status == 200


@pytest.mark.gen_test
async def test_rotate_keys_needs_a_database_uri():
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    code, _, err = await run_py(env, "rotate-keys")
    assert code == 2 and "MONGODB_URI" in err
