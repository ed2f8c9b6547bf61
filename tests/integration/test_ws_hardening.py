"""The live stream against a client that misbehaves, with real services behind it: junk that must leave no
state in the gateway, a flood of frames, too many sockets from one address, frames nested too deep, and an
``auth`` that fails (a bad token, or the users service down)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid

import aiohttp
import pytest

from client import Api, next_frame, read_until
from client import connect_ws as connect

XFF = "X-Forwarded-For"


# -- helpers ------------------------------------------------------------------------------------------------

async def auth(ws, token: str) -> list[dict]:
    """The frames an ``auth`` brings, up to its answer (``authenticated`` or an error)."""
    await ws.send_json({"op": "auth", "token": token})
    return await read_until(ws, lambda f: f["type"] in ("authenticated", "error"))


async def subscribe(ws, channel: str) -> list[dict]:
    """Frames up to the snapshot of ``channel``, or the error refusing it."""
    await ws.send_json({"op": "subscribe", "channel": channel})
    return await read_until(ws, lambda f: f.get("channel") == channel and f["type"] in ("snapshot", "error"))


def gateway_rss(shop) -> int:
    """Resident memory of the gateway process, in bytes."""
    with open(f"/proc/{shop.procs['gateway'].pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for the gateway")


async def refused(session: aiohttp.ClientSession, shop, headers: dict | None = None) -> aiohttp.WSServerHandshakeError:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(session, shop, headers=headers)
    return info.value


async def upgrade_answer(session: aiohttp.ClientSession, shop, headers: dict | None = None):
    """A handshake sent as a plain request, to read the body of a refusal (a WebSocket client does not)."""
    async with session.get(shop.url("gateway") + "/ws", headers={
            "Origin": shop.origin, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), **(headers or {})}) as r:
        return r.status, r.headers, await r.json()


async def until_admitted(session: aiohttp.ClientSession, shop, headers: dict | None = None, timeout: float = 10):
    """A socket, once the gateway has counted a closed one out (its close completes just after ours)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await connect(session, shop, headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 429 and loop.time() < deadline, "a closed socket was still counted"
            await asyncio.sleep(0.02)


# -- state a client can make the gateway keep -----------------------------------------------------------------

async def junk_wave(session: aiohttp.ClientSession, shop, sockets: int, per_socket: int) -> list[dict]:
    """``sockets`` clients at once, each unsubscribing from ``per_socket`` names no channel has (a burst the
    rate limit allows); returns the answers."""
    async def one() -> list[dict]:
        ws = await connect(session, shop)
        for _ in range(per_socket):
            await ws.send_str(json.dumps({"op": "unsubscribe", "channel": f"junk-{uuid.uuid4().hex}"}))
        answers = [await next_frame(ws, 30) for _ in range(per_socket)]
        await ws.close()
        return answers
    return [a for answers in await asyncio.gather(*(one() for _ in range(sockets))) for a in answers]


@pytest.mark.gen_test(timeout=300)
async def test_sixty_thousand_unsubscribes_of_made_up_channels_leave_the_gateway_no_bigger(shop):
    async with aiohttp.ClientSession() as session:
        await junk_wave(session, shop, 30, 200)  # warm up: the gateway's allocator has seen 30 such sockets
        before = gateway_rss(shop)
        answers = []
        for _ in range(10):  # 300 sockets, 30 at a time: what grows is what they leave behind, not themselves
            answers += await junk_wave(session, shop, 30, 200)
        grown = gateway_rss(shop) - before
        assert len(answers) == 60_000
        assert grown < 8 * 2**20, f"the gateway grew {grown / 2**20:.1f} MiB"
        first = answers[0]
        assert first["type"] == "error" and first["code"] == "unknown_channel"
        assert first["channel"].startswith("junk-") and first["channel"] in first["message"]
        assert {(a["type"], a["code"]) for a in answers} == {("error", "unknown_channel")}

        # a known channel the client never joined is acknowledged, as before
        ws = await connect(session, shop)
        await ws.send_json({"op": "unsubscribe", "channel": "orders"})
        assert await next_frame(ws) == {"type": "unsubscribed", "channel": "orders"}
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_socket_sending_past_its_budget_is_closed_with_1008_and_a_burst_within_it_is_not(shop):
    async with aiohttp.ClientSession() as session:
        # a burst of 200 is allowed: every frame answered, the socket still usable
        calm = await connect(session, shop)
        for _ in range(200):
            await calm.send_json({"op": "unsubscribe", "channel": "books"})
        frames = [await next_frame(calm) for _ in range(200)]
        assert frames == [{"type": "unsubscribed", "channel": "books"}] * 200

        flood = await connect(session, shop)
        for _ in range(400):  # in a few milliseconds: far beyond 20 a second
            try:
                await flood.send_json({"op": "unsubscribe", "channel": "books"})
            except ConnectionError:
                break  # the gateway already gave up on it
        acks = 0
        while True:
            msg = await flood.receive(10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            assert json.loads(msg.data) == {"type": "unsubscribed", "channel": "books"}
            acks += 1
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
        assert "per second" in msg.extra
        assert 200 <= acks < 400

        assert (await subscribe(calm, "books"))[-1]["type"] == "snapshot"  # the calm one is unaffected
        await calm.close()


@pytest.mark.gen_test(timeout=90)
async def test_sockets_beyond_the_limit_per_address_are_refused_at_the_upgrade_with_429(make_shop):
    shop = await asyncio.to_thread(make_shop, {"BOOKSHOP_WS_MAX_PER_ADDRESS": "3"}, ["gateway"])
    async with aiohttp.ClientSession() as session:
        # handshakes racing each other get no further: of twenty at once, three are let in
        racing = await asyncio.gather(*(connect(session, shop) for _ in range(20)), return_exceptions=True)
        open_ = [ws for ws in racing if not isinstance(ws, Exception)]
        assert len(open_) == 3
        assert {ws.status for ws in racing if isinstance(ws, Exception)} == {429}
        refusal = await refused(session, shop)
        assert refusal.status == 429 and int(refusal.headers["Retry-After"]) > 0
        status, headers, body = await upgrade_answer(session, shop)
        assert status == 429 and headers["Retry-After"] and headers["Content-Type"].startswith("application/json")
        assert body["error"]["code"] == "too_many_connections" and "3" in body["error"]["message"]
        assert body["error"]["request_id"] == headers["X-Request-ID"]
        # the peer is not a trusted proxy: what it says in X-Forwarded-For changes nothing
        assert (await refused(session, shop, {XFF: "203.0.113.7"})).status == 429

        # a socket that closes frees its place, however it closed
        await open_.pop().close()
        open_.append(await until_admitted(session, shop))
        assert (await refused(session, shop)).status == 429
        flooding = open_.pop()
        for _ in range(300):
            try:
                await flooding.send_json({"op": "unsubscribe", "channel": "books"})
            except ConnectionError:
                break
        while (await flooding.receive(10)).type == aiohttp.WSMsgType.TEXT:
            pass  # until its 1008
        open_.append(await until_admitted(session, shop))
        assert (await refused(session, shop)).status == 429

        # the sockets it kept work as ever
        await open_[0].send_json({"op": "unsubscribe", "channel": "inventory"})
        assert await next_frame(open_[0]) == {"type": "unsubscribed", "channel": "inventory"}
        for ws in open_:
            await ws.close()
        await until_admitted(session, shop)


@pytest.mark.gen_test(timeout=90)
async def test_x_forwarded_for_names_the_client_only_when_the_peer_is_a_trusted_proxy(make_shop):
    env = {"BOOKSHOP_WS_MAX_PER_ADDRESS": "2", "BOOKSHOP_TRUSTED_PROXIES": "127.0.0.1"}
    shop = await asyncio.to_thread(make_shop, env, ["gateway"])
    async with aiohttp.ClientSession() as session:
        ann = [await connect(session, shop, headers={XFF: "203.0.113.7"}) for _ in range(2)]
        assert (await refused(session, shop, {XFF: "203.0.113.7"})).status == 429
        # the proxy's right-most entry is the client; what the client wrote to its left proves nothing
        assert (await refused(session, shop, {XFF: "198.51.100.1, 203.0.113.7"})).status == 429
        bob = await connect(session, shop, headers={XFF: "203.0.113.8"})       # another client behind the proxy
        direct = await connect(session, shop)                          # the proxy's own address
        await ann.pop().close()
        ann.append(await until_admitted(session, shop, {XFF: "203.0.113.7"}))
        for ws in [*ann, bob, direct]:
            await ws.close()


# -- frames -------------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_frames_nested_too_deep_are_bad_messages_and_the_socket_stays_open(shop):
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, shop)
        for frame in ("[" * 30_000 + "]" * 30_000,
                      '{"op": "subscribe", "channel": "books", "after": ' + "[" * 32 + "]" * 32 + "}",
                      '{"op": "auth", "token": ' + '{"t":' * 5_000 + "1" + "}" * 5_000 + "}"):
            await ws.send_str(frame)
            answer = await next_frame(ws)
            assert answer["type"] == "error" and answer["code"] == "bad_message", answer
            assert "32 levels" in answer["message"]
        assert (await subscribe(ws, "books"))[-1]["type"] == "snapshot"
        assert not ws.closed
        await ws.close()


# -- a failed auth ------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_failed_auth_leaves_the_socket_anonymous_and_ends_its_private_subscriptions(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        customer, staff = await api.customer(), await api.staff()
        ws = await connect(session, shop)
        assert (await auth(ws, customer.token))[-1]["role"] == "customer"
        assert (await subscribe(ws, "orders:mine"))[-1]["type"] == "snapshot"
        await subscribe(ws, "inventory")
        frames = await auth(ws, "garbage")
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "invalid_token"
        assert {"type": "unsubscribed", "channel": "orders:mine"} in frames
        assert {"type": "unsubscribed", "channel": "inventory"} not in frames  # public ones go on
        refusal = (await subscribe(ws, "orders:mine"))[-1]
        assert refusal["type"] == "error" and refusal["code"] == "forbidden"

        # staff too: a tampered token after a good one leaves no identity at all
        assert (await auth(ws, staff.token))[-1]["role"] == "staff"
        await subscribe(ws, "orders")
        frames = await auth(ws, customer.token[:-4] + "AAAA")  # a tampered signature
        assert frames[-1]["code"] == "invalid_token"
        assert {"type": "unsubscribed", "channel": "orders"} in frames
        assert (await subscribe(ws, "orders"))[-1]["code"] == "forbidden"
        await ws.close()


@pytest.mark.gen_test(timeout=90)
async def test_a_failed_auth_cancels_the_expiry_of_the_token_it_replaced(make_shop):
    shop = await asyncio.to_thread(make_shop, {"BOOKSHOP_ACCESS_TOKEN_TTL": "2"}, ["users", "gateway"])
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        login = await api.login(*await api.register())
        ws = await connect(session, shop)
        assert (await auth(ws, login["access_token"]))[-1]["type"] == "authenticated"
        assert (await auth(ws, "garbage"))[-1]["code"] == "invalid_token"
        expires = time.time() + login["expires_in"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while time.time() < expires + 0.5:  # past the moment the first token's timer would have fired
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
        await ws.send_json({"op": "unsubscribe", "channel": "books"})  # frames are answered in order
        frames = await read_until(ws, lambda f: f["type"] == "unsubscribed")
        assert frames == [{"type": "unsubscribed", "channel": "books"}], "an anonymous socket heard its token expired"
        await ws.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_valid_token_while_the_users_service_is_down_is_unavailable_not_invalid(make_shop):
    shop = await asyncio.to_thread(make_shop, None, ["users", "gateway"])
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        email, password = await api.register()
        token = (await api.login(email, password))["access_token"]
        # a gateway that has no keys yet (restarted while the users service is down) cannot check any token
        await asyncio.to_thread(shop.kill, "users")
        await asyncio.to_thread(shop.restart, "gateway")
        ws = await connect(session, shop)
        frames = await auth(ws, token)
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "unavailable", frames
        assert frames[-1]["message"] and token not in frames[-1]["message"]
        assert (await subscribe(ws, "orders:mine"))[-1]["code"] == "forbidden"  # anonymous meanwhile
        frames = await auth(ws, "garbage")  # what is not a token at all is still said to be invalid
        assert frames[-1]["code"] == "invalid_token"

        # the same token once the keys can be loaded again (a client retries "shortly", as told)
        await asyncio.to_thread(shop.start, "users")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (answer := (await auth(ws, token))[-1])["type"] == "error":
            assert answer["code"] == "unavailable" and loop.time() < deadline, answer
            await asyncio.sleep(0.2)
        assert answer["type"] == "authenticated"
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_handshake_the_gateway_cannot_take_is_answered_in_json_like_every_other_error(shop):
    url = shop.url("gateway") + "/ws"
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key}
    async with aiohttp.ClientSession() as session:
        for headers, status, code in (
                ({}, 400, "bad_request"),                                     # a plain GET
                ({"Upgrade": "websocket"}, 400, "bad_request"),               # no Connection: Upgrade
                ({"Upgrade": "h2c", "Connection": "Upgrade"}, 400, "bad_request"),
                ({**upgrade, "Sec-WebSocket-Key": ""}, 400, "bad_request"),
                ({**upgrade, "Sec-WebSocket-Version": "99"}, 426, "upgrade_required")):
            async with session.get(url, headers=headers) as r:
                body = await r.json(content_type=None)
                assert r.status == status, (headers, r.status, body)
                assert r.headers["Content-Type"].startswith("application/json"), (headers, r.headers)
                assert body["error"]["code"] == code and body["error"]["request_id"] == r.headers["X-Request-ID"]
                if status == 400:
                    assert body["error"]["message"] == "GET /ws needs a WebSocket upgrade"
                else:
                    assert r.headers["Sec-WebSocket-Version"] == "13"
        ws = await connect(session, shop)  # and a proper handshake still opens
        await ws.send_json({"op": "unsubscribe", "channel": "books"})
        assert await next_frame(ws) == {"type": "unsubscribed", "channel": "books"}
        await ws.close()
