"""Account security against real services: role and password changes end old logins, sign-out, password
change, the refresh reuse grace, the registration limit per client address and the bound on password hashes."""
from __future__ import annotations

import asyncio
import uuid

import jwt
import pytest

from client import Api, new_session
from harness import Shop


@pytest.fixture(scope="module")
def shop(mongodb_uri, log_dir):
    """The users service and the gateway (all these tests need), shared by the module's tests."""
    s = Shop(mongodb_uri, log_dir=log_dir).start("users", "gateway")
    yield s
    s.stop()


def users_api(shop, session) -> Api:
    return Api(shop, session, base=shop.url("users") + "/api/v1")


def role_of(access_token: str) -> str:
    return jwt.decode(access_token, options={"verify_signature": False})["role"]


async def refresh(api: Api, token: str):
    return await api.post("/tokens/refresh", {"refresh_token": token})


async def service_token(session, shop) -> str:
    form = {"grant_type": "client_credentials", "client_id": "gateway",
            "client_secret": shop.env["BOOKSHOP_SERVICE_SECRET"]}
    async with session.post(shop.url("users") + "/oauth/token", data=form) as r:
        assert r.status == 200
        return (await r.json())["access_token"]


# -- a change of role or password ends every login ------------------------------------------------------
@pytest.mark.gen_test(timeout=90)
async def test_an_account_made_staff_at_start_up_cannot_refresh_its_old_customer_login(make_shop):
    """The escalation: register the future admin email as a customer, keep its refresh token, wait for the
    operator to configure that email as BOOKSHOP_ADMIN_EMAIL, then refresh into a staff token."""
    shop = make_shop(services=["users"])
    boss = f"boss-{uuid.uuid4().hex[:8]}@example.com"
    async with new_session() as session:
        api = users_api(shop, session)
        assert (await api.post("/users", {"email": boss, "password": "attacker-pass", "name": "Boss"})).status == 201
        squatted = await api.login(boss, "attacker-pass")
        kept = (await refresh(api, squatted["refresh_token"])).body  # a refreshed descendant counts too
        assert role_of(kept["access_token"]) == "customer"

        shop.env.update(BOOKSHOP_ADMIN_EMAIL=boss, BOOKSHOP_ADMIN_PASSWORD="operator-password-1")
        shop.restart("users")
        r = await refresh(api, kept["refresh_token"])
        assert r.status == 401, f"the pre-registered login refreshed into a {role_of(r.body['access_token'])} token"
        assert r.body["error"]["code"] == "invalid_refresh_token"
        assert (await api.post("/tokens", {"email": boss, "password": "attacker-pass"})).status == 401

        staff = await api.login(boss, "operator-password-1")
        assert role_of(staff["access_token"]) == "staff"
        # a restart that changes nothing keeps the staff login
        shop.restart("users")
        renewed = await refresh(api, staff["refresh_token"])
        assert renewed.status == 200 and role_of(renewed.body["access_token"]) == "staff"

        # a new admin password at start-up is a password change: the staff login ends too
        shop.env["BOOKSHOP_ADMIN_PASSWORD"] = "operator-password-2"
        shop.restart("users")
        assert (await refresh(api, renewed.body["refresh_token"])).status == 401
        assert (await api.post("/tokens", {"email": boss, "password": "operator-password-1"})).status == 401
        assert (await api.post("/tokens", {"email": boss, "password": "operator-password-2"})).status == 200


# -- sign-out -------------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_revoke_signs_one_login_out_and_unknown_tokens_are_also_204(shop):
    async with new_session() as session:
        api = Api(shop, session)
        email, password = await api.register()
        phone = await api.login(email, password)
        laptop = await api.login(email, password)
        newer = (await refresh(api, phone["refresh_token"])).body

        # revoking the original (already rotated) token ends the newest one of that login too
        r = await api.post("/tokens/revoke", {"refresh_token": phone["refresh_token"]})
        assert r.status == 204 and r.body is None
        assert (await refresh(api, newer["refresh_token"])).status == 401
        # the other login goes on; its access tokens were never refresh tokens to begin with
        assert (await refresh(api, laptop["refresh_token"])).status == 200
        assert (await api.as_(newer["access_token"]).get("/users/me")).status == 200  # valid until it expires

        for unknown in ("never-issued", "", newer["refresh_token"], newer["access_token"]):
            r = await api.post("/tokens/revoke", {"refresh_token": unknown})
            assert r.status == 204, (unknown, r)
        for bad in ({}, {"refresh_token": {"$ne": None}}, {"refresh_token": 7}, {"refresh_token": "x", "all": True}):
            r = await api.post("/tokens/revoke", bad)
            assert r.status == 400, (bad, r)


# -- password change ------------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_a_password_change_ends_every_login_of_the_account(shop):
    async with new_session() as session:
        api = Api(shop, session)
        email, password = await api.register()
        bystander_email, bystander_password = await api.register()
        bystander = await api.login(bystander_email, bystander_password)
        one = await api.login(email, password)
        two = await api.login(email, password)
        me = api.as_(one["access_token"])

        r = await me.post("/users/me/password", {"current_password": password, "new_password": "brand-new-pass"})
        assert r.status == 204, r
        for pair in (one, two):
            assert (await refresh(api, pair["refresh_token"])).status == 401
        assert (await api.post("/tokens", {"email": email, "password": password})).status == 401
        fresh = await api.login(email, "brand-new-pass")
        assert (await refresh(api, fresh["refresh_token"])).status == 200
        assert (await refresh(api, bystander["refresh_token"])).status == 200  # other accounts untouched


@pytest.mark.gen_test(timeout=60)
async def test_password_change_refuses_bad_input_anonymous_callers_and_wrong_current_passwords(shop):
    async with new_session() as session:
        api = Api(shop, session)
        email, password = await api.register()
        me = api.as_((await api.login(email, password))["access_token"])
        for body, field in [
            ({"current_password": password, "new_password": "short"}, "new_password"),
            ({"current_password": password, "new_password": "x" * 1025}, "new_password"),
            ({"current_password": password}, "new_password"),
            ({"new_password": "long-enough-1"}, "current_password"),
            ({"current_password": {"$ne": ""}, "new_password": "long-enough-1"}, "current_password"),
            ({"current_password": password, "new_password": "long-enough-1", "email": "x@y.co"}, "email"),
        ]:
            r = await me.post("/users/me/password", body)
            assert r.status == 400, (body, r)
            assert r.body["error"]["message"].startswith(field), (body, r)
        r = await api.post("/users/me/password", {"current_password": password, "new_password": "long-enough-1"})
        assert r.status == 401 and r.body["error"]["code"] == "unauthenticated"
        r = await api.as_(await service_token(session, shop)).post(
            "/users/me/password", {"current_password": password, "new_password": "long-enough-1"})
        assert r.status == 403
        r = await me.post("/users/me/password", {"current_password": "not-my-password",
                                                 "new_password": "long-enough-1"})
        assert r.status == 401 and r.body["error"]["code"] == "invalid_credentials"
        # nothing changed
        assert (await api.post("/tokens", {"email": email, "password": password})).status == 200


@pytest.mark.gen_test(timeout=60)
async def test_wrong_current_passwords_count_like_failed_logins(make_shop):
    shop = make_shop({"BOOKSHOP_LOGIN_MAX_FAILURES": "3"}, services=["users"])
    async with new_session() as session:
        api = users_api(shop, session)
        email, password = await api.register()
        me = api.as_((await api.login(email, password))["access_token"])
        assert (await api.post("/tokens", {"email": email, "password": "wrong-login-1"})).status == 401
        for attempt in range(2):
            r = await me.post("/users/me/password", {"current_password": f"guess-{attempt}",
                                                     "new_password": "long-enough-1"})
            assert r.status == 401, (attempt, r)
        # three failures between the two routes: both are locked now, even with the right password
        r = await me.post("/users/me/password", {"current_password": password, "new_password": "long-enough-1"})
        assert r.status == 429 and r.body["error"]["code"] == "too_many_attempts", r
        assert int(r.headers["Retry-After"]) > 0
        r = await api.post("/tokens", {"email": email, "password": password})
        assert r.status == 429, r

        # concurrent guesses through the password route get no more than the limit either
        other, other_password = await api.register()
        mine = api.as_((await api.login(other, other_password))["access_token"])
        replies = await asyncio.gather(*(mine.post("/users/me/password", {"current_password": f"burst-{i}",
                                                                          "new_password": "long-enough-1"})
                                         for i in range(15)))
        statuses = sorted(r.status for r in replies)
        assert set(statuses) <= {401, 429} and 1 <= statuses.count(401) <= 3, statuses


# -- refresh reuse --------------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_concurrent_refreshes_have_one_winner_whose_new_token_keeps_working(shop):
    """A client retrying its own refresh (or racing itself in two tabs) must not sign itself out."""
    async with new_session() as session:
        api = users_api(shop, session)
        pair = await api.login(*await api.register())
        replies = await asyncio.gather(*(refresh(api, pair["refresh_token"]) for _ in range(20)))
        assert sorted(r.status for r in replies) == [200] + [401] * 19
        assert all(r.body["error"]["code"] == "invalid_refresh_token" for r in replies if r.status == 401)
        winner = next(r.body for r in replies if r.status == 200)
        # presented again within 10 s of its first use: refused, nothing else happens
        assert (await refresh(api, pair["refresh_token"])).status == 401
        following = await refresh(api, winner["refresh_token"])
        assert following.status == 200, following
        assert (await refresh(api, following.body["refresh_token"])).status == 200


# -- registration limit per client address --------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_registrations_are_limited_per_client_address(make_shop):
    shop = make_shop({"BOOKSHOP_REGISTRATION_LIMIT": "3"}, services=["users", "gateway"])
    async with new_session() as session:
        gateway = Api(shop, session)
        users = users_api(shop, session)

        def account(i: int) -> dict:
            return {"email": f"r{i}-{uuid.uuid4().hex[:8]}@example.com", "password": "password-1", "name": "R"}
        assert (await gateway.post("/users", {"email": "not-an-email", "password": "password-1", "name": "R"})
                ).status == 400  # refused before it is counted
        for i in range(3):
            assert (await gateway.post("/users", account(i))).status == 201
        r = await gateway.post("/users", account(3), headers={"X-Forwarded-For": "198.51.100.1"})
        assert r.status == 429 and r.body["error"]["code"] == "too_many_attempts", r
        assert 0 < int(r.headers["Retry-After"]) <= 600
        # an X-Forwarded-For from a caller without a service token is not believed, on the users service either
        r = await users.post("/users", account(4), headers={"X-Forwarded-For": "198.51.100.2"})
        assert r.status == 429, r
        # logging in is not registering
        email, password = account(5)["email"], "password-1"
        assert (await users.post("/users", {"email": email, "password": password, "name": "R"},
                                 headers={"X-Forwarded-For": "203.0.113.9",
                                          "X-Service-Authorization": f"Bearer {await service_token(session, shop)}"})
                ).status == 201  # the gateway vouches for another client
        assert (await gateway.post("/tokens", {"email": email, "password": password})).status == 200


@pytest.mark.gen_test(timeout=120)
async def test_a_flood_of_password_hashes_is_shed_with_503_while_the_service_keeps_answering(make_shop):
    shop = make_shop({"BOOKSHOP_REGISTRATION_LIMIT": "0"}, services=["users"])
    async with new_session(limit=0) as session:
        api = users_api(shop, session)
        email, password = await api.register()
        first_503 = asyncio.Event()

        async def flood_one(i: int):
            if i % 20 == 0:
                r = await api.post("/tokens", {"email": f"nobody-{i}@example.com", "password": "wrong-pass"})
            else:
                r = await api.post("/users", {"email": f"f{i}-{uuid.uuid4().hex[:6]}@example.com",
                                              "password": "password-1", "name": "F"})
            if r.status == 503:
                first_503.set()
            return r

        async def meanwhile():
            await asyncio.wait_for(first_503.wait(), 60)
            keys = await api.get(shop.url("users") + "/.well-known/jwks.json")
            login = await api.post("/tokens", {"email": email, "password": password})
            return keys, login

        *flood, (keys, login) = await asyncio.gather(*(flood_one(i) for i in range(240)), meanwhile())
        assert keys.status == 200 and keys.body["keys"]
        assert login.status == 200, login  # registrations may take only part of the queue
        statuses = [r.status for r in flood]
        assert set(statuses) <= {201, 401, 503}, sorted(set(statuses))
        assert statuses.count(201) >= 2 and statuses.count(503) >= 1, statuses
        for r in flood:
            if r.status == 503:
                assert r.body["error"]["code"] == "service_unavailable" and int(r.headers["Retry-After"]) >= 1
        # the shed requests left nothing behind: a registration and a login afterwards simply work
        again_email, again_password = await api.register()
        assert (await api.post("/tokens", {"email": again_email, "password": again_password})).status == 200
