"""Accounts and tokens: registration, login, lockout, refresh rotation, the JWKS, roles, and forged tokens
refused by the gateway and by every service on its own."""
from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import statistics
import time
import uuid

import aiohttp
import jwt
import pymongo
import pytest
from cryptography.hazmat.primitives import serialization

from bookshop.services import accounts
from client import Api, fresh_isbn, new_session
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, until


# -- helpers --------------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def unverified(token: str) -> tuple[dict, dict]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def signing_key(shop) -> dict:
    """The users service's active private key, read from its database (to mint validly signed tokens with
    wrong claims: what a token minted for another API would look like)."""
    client = pymongo.MongoClient(shop.mongodb_uri, serverSelectionTimeoutMS=3000)
    try:
        doc = client[f"{shop.prefix}_users"]["signing_keys"].find_one({"active": True}, sort=[("created_at", -1)])
    finally:
        client.close()
    return doc


def used_long_ago(shop, refresh_token: str) -> None:
    """Move a used refresh token's first use 11 s into the past: out of the grace a client's own retry gets."""
    client = pymongo.MongoClient(shop.mongodb_uri, serverSelectionTimeoutMS=3000)
    try:
        when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=11)
        done = client[f"{shop.prefix}_users"]["refresh_tokens"].update_one(
            {"_id": accounts.hash_refresh_token(refresh_token), "used_at": {"$ne": None}}, {"$set": {"used_at": when}})
        assert done.modified_count == 1
    finally:
        client.close()


async def service_token(session: aiohttp.ClientSession, shop, client_id: str = "orders",
                        secret: str | None = None) -> tuple[int, dict]:
    form = {"grant_type": "client_credentials", "client_id": client_id,
            "client_secret": shop.env["BOOKSHOP_SERVICE_SECRET"] if secret is None else secret}
    async with session.post(shop.url("users") + "/oauth/token", data=form) as r:
        return r.status, await r.json()


def forgeries(shop, customer_token: str, jwks: dict) -> dict[str, str]:
    """Tokens claiming the staff role that no service may accept."""
    header, claims = unverified(customer_token)
    kid = header["kid"]
    staff_claims = {**claims, "role": "staff"}
    public = next(k for k in jwks["keys"] if k["kid"] == kid)
    pem = jwt.PyJWK(public, algorithm="RS256").key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    foreign = accounts.new_signing_key()
    real = signing_key(shop)
    now = int(time.time())
    good = {"iss": "bookshop-users", "aud": "bookshop", "sub": claims["sub"], "role": "staff", "iat": now,
            "exp": now + 600}

    def real_signed(body: dict) -> str:
        return jwt.encode(body, real["private_pem"], algorithm="RS256", headers={"kid": real["kid"]})

    def hs256(alg_header: str) -> str:
        signing_input = f"{segment({'alg': alg_header, 'typ': 'JWT', 'kid': kid})}.{segment(staff_claims)}"
        return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"

    h, _, sig = customer_token.split(".")
    return {
        "alg none": f"{segment({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{segment(staff_claims)}.",
        "RS256 header, no signature": f"{h}.{segment(staff_claims)}.",
        "HS256 keyed with the public key": hs256("HS256"),
        "HMAC under an RS256 header": hs256("RS256"),
        "edited claims": f"{h}.{segment(staff_claims)}.{sig}",
        "foreign key with the real kid": jwt.encode(staff_claims, foreign["private_pem"], algorithm="RS256",
                                                    headers={"kid": kid}),
        "foreign key and its own kid": jwt.encode(staff_claims, foreign["private_pem"], algorithm="RS256",
                                                  headers={"kid": foreign["kid"]}),
        "expired": real_signed({**good, "iat": now - 1200, "exp": now - 600}),
        "wrong aud": real_signed({**good, "aud": "another-api"}),
        "wrong iss": real_signed({**good, "iss": "evil"}),
        "no exp": real_signed({k: v for k, v in good.items() if k != "exp"}),
        "no aud": real_signed({k: v for k, v in good.items() if k != "aud"}),
        "unknown role": real_signed({**good, "role": "admin"}),
        "garbage": "this-is-not-a-jwt",
        "three dots": "a.b.c",
    }


# -- registration ---------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_register_returns_the_user_without_secrets_and_emails_compare_case_insensitively(shop):
    async with new_session() as session:
        api = Api(shop, session)
        local = f"Mixed.Case-{uuid.uuid4().hex[:8]}"
        r = await api.post("/users", {"email": f"  {local}@Example.COM ", "password": "correct-horse",
                                      "name": " Ann Reader "})
        assert r.status == 201, r
        assert set(r.body) == {"id", "email", "name", "role"}
        assert r.body["email"] == f"{local.lower()}@example.com"
        assert r.body["name"] == "Ann Reader" and r.body["role"] == "customer"
        assert "correct-horse" not in json.dumps(r.body) and "argon" not in json.dumps(r.body)

        again = await api.post("/users", {"email": f"{local.upper()}@example.com", "password": "other-pass-1",
                                          "name": "Imposter"})
        assert again.status == 409 and again.body["error"]["code"] == "email_taken"

        pair = await api.login(f"{local.upper()}@EXAMPLE.com", "correct-horse")
        me = await api.as_(pair["access_token"]).get("/users/me")
        assert me.status == 200 and me.body == r.body


@pytest.mark.gen_test
async def test_concurrent_registrations_of_one_email_create_one_account(shop):
    async with new_session() as session:
        api = Api(shop, session)
        local = f"race-{uuid.uuid4().hex[:8]}"
        spellings = [f"{local}@example.com", f"{local.upper()}@EXAMPLE.com", f" {local}@Example.Com"]
        replies = await asyncio.gather(*(api.post("/users", {"email": spellings[i % 3], "password": f"password-{i}",
                                                             "name": f"Racer {i}"}) for i in range(12)))
        statuses = sorted(r.status for r in replies)
        assert statuses == [201] + [409] * 11, statuses
        winner = next(i for i, r in enumerate(replies) if r.status == 201)
        assert (await api.post("/tokens", {"email": spellings[0], "password": f"password-{winner}"})).status == 200


@pytest.mark.gen_test
async def test_register_rejects_bad_input_naming_the_field(shop):
    async with new_session() as session:
        api = Api(shop, session)
        email = f"ok-{uuid.uuid4().hex[:8]}@example.com"
        cases = [
            ({"email": email, "password": "1234567", "name": "A"}, "password"),
            ({"email": email, "password": "x" * 1025, "name": "A"}, "password"),
            ({"email": email, "password": 12345678, "name": "A"}, "password"),
            ({"email": email, "password": "long-enough", "name": ""}, "name"),
            ({"email": email, "password": "long-enough", "name": "   "}, "name"),
            ({"email": email, "password": "long-enough"}, "name"),
            ({"email": email, "password": "long-enough", "name": "A", "role": "staff"}, "role"),
            ({"email": {"$gt": ""}, "password": "long-enough", "name": "A"}, "email"),
            ({"email": email, "password": {"$ne": None}, "name": "A"}, "password"),
            ({"email": email, "password": "long-enough", "name": ["A"]}, "name"),
        ] + [({"email": bad, "password": "long-enough", "name": "A"}, "email") for bad in [
            "", "no-at-sign", "a@b", "a@@b.co", "a b@c.co", "@b.co", "a@-b.co", "a@b..co",
            "a\x00@b.co", ("x" * 65) + "@b.co", "a@" + ("b" * 250) + ".co", 42]]
        for body, field in cases:
            r = await api.post("/users", body)
            assert r.status == 400, (body, r)
            assert r.body["error"]["message"].startswith(field), (body, r)
        # nothing was created by any of them
        r = await api.post("/tokens", {"email": email, "password": "long-enough"})
        assert r.status == 401
        assert (await api.post("/users", {"email": email, "password": "12345678", "name": "A"})).status == 201


# -- login ----------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_login_returns_a_bearer_pair_of_an_rs256_token_the_jwks_can_verify(shop):
    async with new_session() as session:
        api = Api(shop, session)
        email, password = await api.register()
        r = await api.post("/tokens", {"email": email, "password": password})
        assert r.status == 200, r
        assert set(r.body) == {"access_token", "token_type", "expires_in", "refresh_token"}
        assert r.body["token_type"] == "Bearer" and r.body["expires_in"] == 900
        header, claims = unverified(r.body["access_token"])
        assert header["alg"] == "RS256" and header["kid"]
        jwks = (await api.get(shop.url("users") + "/.well-known/jwks.json")).body
        key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
        verified = jwt.decode(r.body["access_token"], jwt.PyJWK(key).key, algorithms=["RS256"],
                              audience="bookshop", issuer="bookshop-users")
        assert verified["role"] == "customer"
        assert verified["exp"] - verified["iat"] == 900 <= 3600
        me = await api.as_(r.body["access_token"]).get("/users/me")
        assert me.body["id"] == verified["sub"] and me.body["email"] == email


@pytest.mark.gen_test
async def test_wrong_password_and_unknown_email_are_the_same_401(shop):
    async with new_session() as session:
        api = Api(shop, session)
        email, _ = await api.register()
        wrong = await api.post("/tokens", {"email": email, "password": "not-the-password"})
        unknown = await api.post("/tokens", {"email": f"nobody-{uuid.uuid4().hex}@example.com",
                                             "password": "not-the-password"})
        for r in (wrong, unknown):
            assert r.status == 401
            assert r.body["error"]["code"] == "invalid_credentials"
        assert wrong.body["error"]["message"] == unknown.body["error"]["message"]
        r = await api.post("/tokens", {"email": {"$gt": ""}, "password": {"$gt": ""}})
        assert r.status == 400
        r = await api.post("/tokens", {"email": email})
        assert r.status == 400 and r.body["error"]["message"].startswith("password")


@pytest.mark.gen_test
async def test_an_unknown_email_costs_about_as_much_as_a_wrong_password(shop):
    """No cheap way to learn which emails have accounts: the unknown email pays for a hash check too."""
    async with new_session() as session:
        api = Api(shop, session, base=shop.url("users") + "/api/v1")
        email, _ = await api.register()

        async def timed(login_email):
            started = time.perf_counter()
            r = await api.post("/tokens", {"email": login_email, "password": "wrong-password"})
            assert r.status == 401
            return time.perf_counter() - started
        known, unknown = [], []
        for _ in range(3):
            known.append(await timed(email))
            unknown.append(await timed(f"nobody-{uuid.uuid4().hex}@example.com"))
        k, u = statistics.median(known), statistics.median(unknown)
        # loose on purpose (a busy machine); tests/unit/test_accounts.py proves the hash check itself
        assert u > k / 5 and k > u / 5, (known, unknown)


@pytest.mark.gen_test(timeout=60)
async def test_ten_failures_lock_the_email_even_against_the_right_password_and_survive_a_restart(make_shop):
    shop = make_shop(services=["users"])
    async with new_session() as session:
        api = Api(shop, session, base=shop.url("users") + "/api/v1")
        victim, password = await api.register()
        bystander, other_password = await api.register()
        for attempt in range(10):
            r = await api.post("/tokens", {"email": victim, "password": f"guess-{attempt}"})
            assert r.status == 401, (attempt, r)
        r = await api.post("/tokens", {"email": victim, "password": password})
        assert r.status == 429, r
        assert r.body["error"]["code"] == "too_many_attempts"
        assert 0 < int(r.headers["Retry-After"]) <= 60
        # per email: another account from the same address still logs in
        assert (await api.post("/tokens", {"email": bystander, "password": other_password})).status == 200
        # the email compares case-insensitively here too
        r = await api.post("/tokens", {"email": victim.upper(), "password": password})
        assert r.status == 429

        shop.restart("users")
        r = await api.post("/tokens", {"email": victim, "password": password})
        assert r.status == 429, r
        assert int(r.headers["Retry-After"]) > 0


@pytest.mark.gen_test(timeout=60)
async def test_a_success_resets_the_count_and_concurrent_guesses_cannot_overtake_the_limit(make_shop):
    shop = make_shop({"BOOKSHOP_LOGIN_MAX_FAILURES": "3"}, services=["users"])
    async with new_session() as session:
        api = Api(shop, session, base=shop.url("users") + "/api/v1")
        email, password = await api.register()
        for _ in range(2):
            for attempt in range(2):
                assert (await api.post("/tokens", {"email": email, "password": f"guess-{attempt}"})).status == 401
            assert (await api.post("/tokens", {"email": email, "password": password})).status == 200

        replies = await asyncio.gather(*(api.post("/tokens", {"email": email, "password": f"burst-{i}"})
                                         for i in range(30)))
        statuses = sorted(r.status for r in replies)
        assert set(statuses) <= {401, 429}
        assert 1 <= statuses.count(401) <= 3, statuses
        assert all("Retry-After" in r.headers for r in replies if r.status == 429)
        assert (await api.post("/tokens", {"email": email, "password": password})).status == 429


# -- refresh --------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_refresh_rotates_and_a_reused_token_ends_the_whole_login(shop):
    async with new_session() as session:
        api = Api(shop, session)
        email, password = await api.register()
        first = await api.login(email, password)
        other_login = await api.login(email, password)

        r = await api.post("/tokens/refresh", {"refresh_token": first["refresh_token"]})
        assert r.status == 200, r
        second = r.body
        assert set(second) == {"access_token", "token_type", "expires_in", "refresh_token"}
        assert second["refresh_token"] != first["refresh_token"]
        assert second["access_token"] != first["access_token"]
        assert (await api.as_(second["access_token"]).get("/users/me")).body["email"] == email

        r = await api.post("/tokens/refresh", {"refresh_token": second["refresh_token"]})
        assert r.status == 200
        third = r.body

        # the used one comes back within 10 s of its first use: refused, and nothing else (a client's retry)
        r = await api.post("/tokens/refresh", {"refresh_token": first["refresh_token"]})
        assert r.status == 401 and r.body["error"]["code"] == "invalid_refresh_token"
        r = await api.post("/tokens/refresh", {"refresh_token": third["refresh_token"]})
        assert r.status == 200
        third = r.body
        # later: someone holds a copy, so the whole family ends
        used_long_ago(shop, first["refresh_token"])
        r = await api.post("/tokens/refresh", {"refresh_token": first["refresh_token"]})
        assert r.status == 401
        r = await api.post("/tokens/refresh", {"refresh_token": third["refresh_token"]})
        assert r.status == 401, "the newest token of a reused family must stop working"
        # another login of the same user is another family
        r = await api.post("/tokens/refresh", {"refresh_token": other_login["refresh_token"]})
        assert r.status == 200

        for bad in ("", "not-a-token", first["access_token"]):
            r = await api.post("/tokens/refresh", {"refresh_token": bad})
            assert r.status == 401 and r.body["error"]["code"] == "invalid_refresh_token"
        r = await api.post("/tokens/refresh", {"refresh_token": {"$ne": None}})
        assert r.status == 400
        r = await api.post("/tokens/refresh", {})
        assert r.status == 400


@pytest.mark.gen_test
async def test_concurrent_refreshes_of_one_token_yield_one_pair(shop):
    async with new_session() as session:
        api = Api(shop, session)
        pair = await api.login(*await api.register())
        replies = await asyncio.gather(*(api.post("/tokens/refresh", {"refresh_token": pair["refresh_token"]})
                                         for _ in range(20)))
        assert sorted(r.status for r in replies) == [200] + [401] * 19


# -- roles, the JWKS, service credentials ---------------------------------------------------------------
@pytest.mark.gen_test
async def test_users_me_and_staff_only_routes(shop):
    async with new_session() as session:
        api = Api(shop, session)
        customer = await api.customer()
        staff = await api.staff()
        me = await staff.get("/users/me")
        assert me.status == 200 and me.body["email"] == ADMIN_EMAIL and me.body["role"] == "staff"
        assert set(me.body) == {"id", "email", "name", "role"}
        assert (await api.get("/users/me")).status == 401

        isbn = await api.new_book(staff)
        order_id = "0" * 24
        book = {"isbn": fresh_isbn(), "title": "T", "authors": ["A"], "category": "c", "price_cents": 100,
                "currency": "EUR"}
        for method, path, body in [
            ("POST", "/books", book),
            ("PATCH", f"/books/{isbn}", {"title": "Mine now"}),
            ("DELETE", f"/books/{isbn}", None),
            ("POST", f"/inventory/{isbn}/restock", {"quantity": 5}),
            ("POST", f"/orders/{order_id}/ship", None),
            ("GET", f"/orders/{order_id}/payments", None),
        ]:
            r = await customer.call(method, path, body)
            assert r.status == 403, (method, path, r)
            assert r.body["error"]["code"] == "forbidden"
        assert (await api.get(f"/books/{isbn}")).body["title"] == f"Book {isbn}"

        status, body = await service_token(session, shop)
        assert status == 200
        r = await api.as_(body["access_token"]).get("/users/me")
        assert r.status == 403


@pytest.mark.gen_test
async def test_the_jwks_publishes_only_public_rsa_keys(shop):
    async with new_session() as session:
        async with session.get(shop.url("users") + "/.well-known/jwks.json") as r:
            assert r.status == 200
            jwks = await r.json()
        assert jwks["keys"]
        for key in jwks["keys"]:
            assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig" and key["kid"]
            assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key), "a private part is published"
            assert jwt.PyJWK(key).key.key_size >= 2048
        assert "private" not in json.dumps(jwks).lower()


@pytest.mark.gen_test
async def test_service_credentials(shop):
    async with new_session() as session:
        status, body = await service_token(session, shop, "orders")
        assert status == 200 and body["token_type"] == "Bearer"
        _, claims = unverified(body["access_token"])
        assert claims["role"] == "service" and claims["exp"] - claims["iat"] <= 3600
        for client_id, secret in [("orders", "wrong"), ("orders", ""), ("mallory", None)]:
            status, body = await service_token(session, shop, client_id, secret)
            assert status == 401 and body["error"]["code"] == "invalid_client", (client_id, body)
        async with session.post(shop.url("users") + "/oauth/token",
                                data={"grant_type": "password", "client_id": "orders",
                                      "client_secret": shop.env["BOOKSHOP_SERVICE_SECRET"]}) as r:
            assert r.status == 400
        # JSON works too; and the endpoint is not exposed by the gateway
        async with session.post(shop.url("users") + "/oauth/token", json={
                "grant_type": "client_credentials", "client_id": "gateway",
                "client_secret": shop.env["BOOKSHOP_SERVICE_SECRET"]}) as r:
            assert r.status == 200
        async with session.post(shop.url("gateway") + "/oauth/token", data={"grant_type": "client_credentials"}) as r:
            assert r.status == 404


@pytest.mark.gen_test
async def test_internal_routes_take_service_tokens_only(shop):
    async with new_session() as session:
        api = Api(shop, session)
        customer = await api.customer()
        staff = await api.staff()
        _, body = await service_token(session, shop)
        service = api.as_(body["access_token"])
        routes = [
            ("catalog", "/internal/books?isbns=9780306406157", 200),
            ("catalog", "/internal/events", 200),
            ("inventory", "/internal/levels", 200),
            ("inventory", "/internal/events", 200),
            ("orders", "/internal/orders/recent", 200),
            ("orders", "/internal/users/u1/purchased", 200),
            ("orders", "/internal/events", 200),
            ("payments", "/internal/charges/no-such-charge", 404),
        ]
        for svc, path, expected in routes:
            url = shop.url(svc) + path
            for who in (customer, staff):
                r = await who.get(url)
                assert r.status == 403, (svc, path, r)
            r = await service.get(url)
            assert r.status == expected, (svc, path, r)
            r = await api.get(url)
            assert r.status == 401
            # the gateway does not route the internal API
            assert (await service.get(shop.url("gateway") + path)).status == 404


# -- forged tokens --------------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_forged_tokens_are_refused_by_the_gateway_and_by_each_service(shop):
    async with new_session() as session:
        api = Api(shop, session)
        customer = await api.customer()
        staff = await api.staff()
        isbn = await api.new_book(staff)
        jwks = (await api.get(shop.url("users") + "/.well-known/jwks.json")).body
        targets = [
            ("POST", shop.api + "/books", {"isbn": fresh_isbn(), "title": "Forged", "authors": ["X"],
                                           "category": "c", "price_cents": 1, "currency": "EUR"}),
            ("GET", shop.api + "/users/me", None),
            ("DELETE", f"{shop.api}/books/{isbn}", None),
            ("POST", shop.url("catalog") + "/api/v1/books", {"isbn": fresh_isbn(), "title": "Forged",
                                                             "authors": ["X"], "category": "c",
                                                             "price_cents": 1, "currency": "EUR"}),
            ("PATCH", f"{shop.url('catalog')}/api/v1/books/{isbn}", {"title": "Forged"}),
            ("POST", f"{shop.url('inventory')}/api/v1/inventory/{isbn}/restock", {"quantity": 1000}),
            ("GET", shop.url("orders") + "/api/v1/orders", None),
            ("GET", shop.url("users") + "/api/v1/users/me", None),
        ]
        for name, token in forgeries(shop, customer.token, jwks).items():
            for method, url, body in targets:
                r = await api.call(method, url, body, token=token)
                assert r.status == 401, (name, method, url, r)
                assert r.body["error"]["code"] in ("invalid_token", "token_expired", "unauthenticated"), r
        # the staff-looking forgeries changed nothing, and real staff tokens still work
        book = await api.get(f"/books/{isbn}")
        assert book.status == 200 and book.body["title"] == f"Book {isbn}"
        assert (await api.get(f"/inventory/{isbn}")).body["on_hand"] == 0
        assert (await staff.get("/users/me")).status == 200


@pytest.mark.gen_test(timeout=60)
async def test_an_expired_token_is_refused_everywhere_and_refresh_renews_it(make_shop):
    shop = make_shop({"BOOKSHOP_ACCESS_TOKEN_TTL": "3"}, services=["users", "catalog", "gateway"])
    async with new_session() as session:
        api = Api(shop, session)
        pair = await api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        assert pair["expires_in"] == 3
        staff = api.as_(pair["access_token"])
        assert (await staff.get("/users/me")).status == 200
        urls = [("GET", shop.api + "/users/me"), ("GET", shop.url("users") + "/api/v1/users/me"),
                ("POST", shop.url("catalog") + "/api/v1/books"), ("POST", shop.api + "/books")]

        async def expired():
            return (await staff.get("/users/me")).status == 401
        await until(expired, 10, 0.2)
        for method, url in urls:
            r = await staff.call(method, url, {"isbn": fresh_isbn()})
            assert r.status == 401, (url, r)
            assert r.body["error"]["code"] == "token_expired", (url, r)
        fresh = await api.post("/tokens/refresh", {"refresh_token": pair["refresh_token"]})
        assert fresh.status == 200
        assert (await staff.as_(fresh.body["access_token"]).get("/users/me")).status == 200


@pytest.mark.gen_test
async def test_a_refused_request_keeps_the_connection_alive(shop):
    async with aiohttp.ClientSession() as session:  # one pooled keep-alive connection
        api = Api(shop, session)
        for _ in range(3):
            assert (await api.get("/users/me")).status == 401
            r = await api.post("/users", {"email": f"k-{uuid.uuid4().hex[:8]}@example.com",
                                          "password": "password-1", "name": "K"})
            assert r.status == 201
