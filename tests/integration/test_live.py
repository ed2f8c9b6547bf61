"""The live stream as a client sees it: the gateway's ``/ws`` and the ``GET /api/v1/events`` long-poll, with
real services behind them, including restarts, slow clients, expiring tokens and a second gateway."""
from __future__ import annotations

import asyncio
import base64
import collections
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys

import aiohttp
import pytest

from bookshop.procs import free_port
from bookshop.ws.hub import QUEUE_LIMIT
from client import Api, fresh_isbn, next_frame, read_until
from client import connect_ws as connect
from harness import RUN_PY, Shop, found, until


# -- helpers ------------------------------------------------------------------------------------------------

def early_isbn() -> str:
    """A valid ISBN-13 that sorts near the start (979000...), so its level is in the inventory snapshot, which
    lists the first 1,000 levels by ISBN, even when the session's shop holds many more books."""
    return fresh_isbn("979000")


async def subscribe(ws, channel: str, after: int | None = None) -> list[dict]:
    """Subscribes; returns the frames up to the snapshot (no ``after``) or the ``subscribed`` reply."""
    msg = {"op": "subscribe", "channel": channel}
    if after is not None:
        msg["after"] = after
    await ws.send_json(msg)
    wanted = "snapshot" if after is None else "subscribed"
    frames = await read_until(ws, lambda f: f.get("channel") == channel and f["type"] in (wanted, "error"))
    assert frames[-1]["type"] == wanted, frames[-1]
    return frames


async def auth(ws, token: str) -> dict:
    await ws.send_json({"op": "auth", "token": token})
    frames = await read_until(ws, lambda f: f["type"] in ("authenticated", "error"))
    return frames[-1]


def stock_events(frames: list[dict], isbn: str) -> list[dict]:
    return [f for f in frames if f["type"] == "event" and f["event"] == "stock.changed" and f["data"]["isbn"] == isbn]


async def read_stock(ws, isbns: str | list[str], count: int, timeout: float = 15.0) -> list[dict]:
    """Frames up to the ``count``-th stock event of ``isbns``."""
    wanted = {isbns} if isinstance(isbns, str) else set(isbns)
    seen = 0

    def enough(frame):
        nonlocal seen
        seen += frame["type"] == "event" and frame["event"] == "stock.changed" and frame["data"]["isbn"] in wanted
        return seen == count
    return await read_until(ws, enough, timeout)


def order_ids(frames: list[dict]) -> set[str]:
    return {f["data"]["id"] for f in frames if f["type"] == "event"}


def confirmed(order_id: str):
    return lambda f: f["type"] == "event" and f["data"]["id"] == order_id and f["data"]["status"] == "CONFIRMED"


def assert_rising(frames: list[dict]) -> None:
    seqs = [f["seq"] for f in frames if f["type"] == "event"]
    assert seqs == sorted(set(seqs)), f"seqs not strictly rising: {seqs}"


async def restock(api: Api, isbn: str, quantity: int = 1) -> dict:
    r = await api.post(f"/inventory/{isbn}/restock", {"quantity": quantity})
    assert r.status == 200, r
    return r.body


async def latest(api: Api, channel: str) -> int:
    """The channel's current seq: a long-poll from the far future is told to start again from it."""
    r = await api.get("/events", params={"channel": channel, "after": str(2**62)})
    assert r.status == 200 and r.body["items"] == [] and r.body["reset"] is True, r
    return r.body["seq"]


async def early_book(staff: Api, stock: int) -> str:
    """A book whose ISBN sorts near the start, so it is in the inventory snapshot (the first 1,000 levels by
    ISBN) even when the session's shop holds many more."""
    isbn = early_isbn()
    r = await staff.post("/books", {"isbn": isbn, "title": f"Early {isbn}", "authors": ["A. Author"],
                                    "category": "testing", "price_cents": 500, "currency": "EUR"})
    assert r.status == 201, r
    await restock(staff, isbn, stock)
    return isbn


def direct(api: Api, service: str) -> Api:
    """The same caller, talking to a service itself rather than through the gateway."""
    return Api(api.shop, api.session, api.token, base=api.shop.url(service) + "/api/v1")


async def metric(session: aiohttp.ClientSession, shop, name: str) -> float:
    async with session.get(shop.url("gateway") + "/metrics") as r:
        body = await r.text()
    found = re.search(r'bookshop_domain_events_total\{name="%s",service="gateway"\} ([0-9.e+]+)' % name, body)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def own_shop(mongodb_uri, log_dir):
    """A shop for the tests that restart its processes, so the shared one is left alone."""
    s = Shop(mongodb_uri, log_dir=log_dir).start()
    yield s
    s.stop()


# -- the stream ---------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_inventory_subscription_starts_with_a_snapshot_then_streams_stock_changes(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await early_book(staff, stock=3)
        ws = await connect(session, shop)
        subscribed, snapshot = await subscribe(ws, "inventory")
        assert subscribed["type"] == "subscribed" and isinstance(subscribed["seq"], int)
        assert snapshot["channel"] == "inventory" and snapshot["seq"] >= subscribed["seq"] - 1
        levels = {item["isbn"]: item for item in snapshot["data"]["items"]}
        assert levels[isbn] == {"isbn": isbn, "on_hand": 3, "reserved": 0, "available": 3}
        assert len(levels) <= 1000

        assert await restock(staff, isbn, 4) == {"isbn": isbn, "on_hand": 7, "reserved": 0, "available": 7}
        frames = await read_until(ws, lambda f: stock_events([f], isbn) and f["data"]["on_hand"] == 7)
        event = frames[-1]
        # the snapshot reads its seq before the levels: the event of a change it already shows may follow it
        assert [e["data"]["on_hand"] for e in stock_events(frames, isbn)] in ([7], [3, 7])
        assert set(event) == {"type", "channel", "seq", "event", "data", "at"}
        assert event["channel"] == "inventory" and event["event"] == "stock.changed"
        assert event["seq"] > snapshot["seq"]
        assert event["data"] == {"isbn": isbn, "on_hand": 7, "reserved": 0, "available": 7}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", event["at"])
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_reconnecting_with_after_delivers_exactly_the_missed_events_in_order(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        ws = await connect(session, shop)
        await subscribe(ws, "inventory")
        await restock(staff, isbn, 1)
        last = (await read_until(ws, lambda f: stock_events([f], isbn)))[-1]["seq"]
        await ws.close()

        for _ in range(5):
            await restock(staff, isbn, 1)
        ws = await connect(session, shop)
        frames = await subscribe(ws, "inventory", after=last)
        frames += await read_stock(ws, isbn, 5)
        await restock(staff, isbn, 10)  # a sentinel: anything doubled would arrive before it
        frames += await read_until(ws, lambda f: stock_events([f], isbn) and f["data"]["on_hand"] == 16)
        assert "snapshot" not in [f["type"] for f in frames]
        assert frames[0]["type"] == "subscribed"
        assert [e["data"]["on_hand"] for e in stock_events(frames, isbn)] == [2, 3, 4, 5, 6, 16]
        assert all(f["seq"] > last for f in frames if f["type"] == "event")
        assert_rising(frames)
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_anonymous_clients_may_not_read_orders_and_stay_connected(shop):
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, shop)
        for channel in ("orders", "orders:mine"):
            await ws.send_json({"op": "subscribe", "channel": channel})
            error = await next_frame(ws)
            assert error["type"] == "error" and error["code"] == "forbidden" and error["message"]
        customer = await Api(shop, session).customer()
        assert (await auth(ws, customer.token))["role"] == "customer"
        await ws.send_json({"op": "subscribe", "channel": "orders"})
        assert (await next_frame(ws))["code"] == "forbidden"  # every order is for staff
        await subscribe(ws, "inventory")  # still open, still usable
        assert not ws.closed
        await ws.close()


@pytest.mark.gen_test(timeout=90)
async def test_customers_see_only_their_own_orders_while_staff_see_every_order(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=20)
        ann, bob = await api.customer(), await api.customer()
        sockets = {}
        for name, who, channel in (("ann", ann, "orders:mine"), ("bob", bob, "orders:mine"),
                                   ("staff", staff, "orders")):
            ws = sockets[name] = await connect(session, shop)
            assert (await auth(ws, who.token))["type"] == "authenticated"
            await subscribe(ws, channel)
        since = await latest(api, "inventory")
        since_orders = await latest(staff, "orders")

        placed = {}
        for name, who in (("ann1", ann), ("bob1", bob), ("ann2", ann), ("bob2", bob)):
            r = await who.order([(isbn, 1)])
            assert r.status == 201 and r.body["status"] == "CONFIRMED", r
            placed[name] = r.body["id"]

        # each waits for its own last order: everything before it in the stream has been delivered by then
        seen_ann = await read_until(sockets["ann"], confirmed(placed["ann2"]))
        seen_bob = await read_until(sockets["bob"], confirmed(placed["bob2"]))
        seen_staff = await read_until(sockets["staff"], confirmed(placed["bob2"]))
        assert order_ids(seen_ann) == {placed["ann1"], placed["ann2"]}
        assert order_ids(seen_bob) == {placed["bob1"], placed["bob2"]}
        assert set(placed.values()) <= order_ids(seen_staff)
        assert {f["channel"] for f in seen_ann + seen_bob} == {"orders:mine"}
        assert {f["channel"] for f in seen_staff} == {"orders"}
        for frames in (seen_ann, seen_bob, seen_staff):
            assert_rising(frames)
        mine = [f for f in seen_ann if f["data"]["id"] == placed["ann1"]]
        assert [f["event"] for f in mine][:1] == ["order.created"]
        assert mine[-1]["data"]["status"] == "CONFIRMED"
        staff_events = {(f["seq"], f["data"]["id"], f["data"]["status"]) for f in seen_staff}
        assert {(f["seq"], f["data"]["id"], f["data"]["status"]) for f in seen_ann + seen_bob} <= staff_events

        # the long-poll applies the same rule
        r = await bob.get("/events", params={"channel": "orders:mine", "after": str(since_orders), "limit": "500"})
        assert r.status == 200
        assert {e["data"]["id"] for e in r.body["items"]} == {placed["bob1"], placed["bob2"]}
        r = await api.get("/events", params={"channel": "inventory", "after": str(since), "limit": "500"})
        assert r.status == 200 and stock_events(r.body["items"], isbn)  # the orders reserved stock
        for ws in sockets.values():
            await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_signing_in_as_someone_else_ends_the_previous_users_private_subscriptions(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=5)
        ann, bob = await api.customer(), await api.customer()
        ws = await connect(session, shop)
        await auth(ws, ann.token)
        await subscribe(ws, "orders:mine")
        await ws.send_json({"op": "auth", "token": bob.token})
        frames = await read_until(ws, lambda f: f["type"] == "authenticated")
        assert {"type": "unsubscribed", "channel": "orders:mine"} in frames
        ann_order = (await ann.order([(isbn, 1)])).body["id"]
        await subscribe(ws, "orders:mine")
        bob_order = (await bob.order([(isbn, 1)])).body["id"]
        frames = await read_until(ws, confirmed(bob_order))
        assert ann_order not in order_ids(frames)
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_garbage_frames_get_error_frames_and_the_connection_stays_open(shop):
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, shop)
        bad = [
            ("str", "this is not JSON"),
            ("str", "{\"op\": \"subscribe\", "),
            ("bytes", b'{"op": "subscribe", "channel": "inventory"}'),
            ("bytes", b"\x00\xff\x10"),
            ("json", [1, 2, 3]),
            ("json", {"channel": "inventory"}),
            ("json", {"op": "publish", "channel": "inventory"}),
            ("json", {"op": "subscribe", "channel": "inventory", "after": "5"}),
            ("json", {"op": "subscribe", "channel": "inventory", "after": -3}),
            ("json", {"op": "subscribe", "channel": "inventory", "admin": True}),
            ("json", {"op": "auth"}),
        ]
        for kind, payload in bad:
            await getattr(ws, f"send_{kind}")(payload)
            frame = await next_frame(ws)
            assert frame["type"] == "error" and frame["code"] == "bad_message" and frame["message"], (payload, frame)
        await ws.send_json({"op": "subscribe", "channel": "nope"})
        frame = await next_frame(ws)
        assert frame["type"] == "error" and frame["code"] == "unknown_channel"
        await ws.send_json({"op": "auth", "token": "not.a.jwt"})
        frame = await next_frame(ws)
        assert frame["type"] == "error" and frame["code"] == "invalid_token"
        await subscribe(ws, "inventory")
        await ws.send_json({"op": "unsubscribe", "channel": "inventory"})
        assert await next_frame(ws) == {"type": "unsubscribed", "channel": "inventory"}
        assert not ws.closed
        await ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_foreign_origins_are_refused(shop):
    port = shop.ports["gateway"]
    async with aiohttp.ClientSession() as session:
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}",
                       f"http://127.0.0.1:{port}.evil.example", "null"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(shop.ws_url, headers={"Origin": origin})
            assert info.value.status == 403, origin
        # a DNS-rebound page: its origin names the host it talks to, and the browser calls that same-origin
        for headers in ({"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"},
                        {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(shop.ws_url, headers=headers)
            assert info.value.status == 403, headers
        ws = await connect(session, shop)  # the configured one is fine
        await subscribe(ws, "books")
        await ws.close()


# -- slow clients -------------------------------------------------------------------------------------------

class RawSocket:
    """A WebSocket client on a bare TCP socket with tiny buffers, which reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, shop) -> "RawSocket":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", shop.ports["gateway"]))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{shop.ports['gateway']}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Origin: {shop.origin}\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, message: dict) -> None:
        payload = json.dumps(message).encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        self.writer.write(bytes([0x81, 0x80 | len(payload)]) + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        await self.writer.drain()

    async def heartbeat(self, every: float = 5.0) -> None:
        """Send an unsolicited pong every ``every`` seconds (RFC 6455 allows it as a heartbeat), until cancelled:
        a client that reads slowly is still there, and the gateway's ping timeout (a pong within 20 s of its
        ping, which sits unread behind the stream) must not close it first."""
        while True:
            self.writer.write(bytes([0x8A, 0x80]) + os.urandom(4))  # FIN + pong, masked, empty
            await self.writer.drain()
            await asyncio.sleep(every)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return first & 0x0F, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass  # the server may have reset it


@pytest.mark.gen_test(timeout=120)
async def test_a_client_that_stops_reading_is_closed_with_4008_and_resumes_with_after(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbns = [await api.new_book(staff) for _ in range(10)]
        slow = await RawSocket.open(shop)
        await slow.send({"op": "subscribe", "channel": "inventory"})
        beating = asyncio.ensure_future(slow.heartbeat())
        healthy = await connect(session, shop)
        await subscribe(healthy, "inventory")
        slow_before = await metric(session, shop, "websocket_slow_clients")
        healthy_frames: list[dict] = []

        async def read_healthy():
            while True:
                healthy_frames.append(await next_frame(healthy, 60))
        fired: collections.Counter = collections.Counter()
        stop = asyncio.Event()

        async def restock_until_stopped(worker: int) -> None:
            for i in itertools.count(worker):
                if stop.is_set():
                    return
                await restock(staff, isbns[i % len(isbns)])
                fired[isbns[i % len(isbns)]] += 1
        watching = asyncio.ensure_future(read_healthy())
        try:
            restocking = asyncio.gather(*(restock_until_stopped(w) for w in range(10)))
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while await metric(session, shop, "websocket_slow_clients") == slow_before:
                    assert loop.time() < deadline, "the gateway never gave up on the client that stopped reading"
                    assert not watching.done() and not restocking.done()
                    await asyncio.sleep(0.02)

                # read what had been sent before the gateway gave up (a prefix of the stream), then its 4008; at
                # once, as the gateway waits 5 s for the close handshake
                received = []
                while True:
                    opcode, payload = await asyncio.wait_for(slow.frame(), 4)
                    if opcode == 0x8:
                        break
                    if opcode in (0x9, 0xA):  # a ping (the gateway pings every 20 s) or pong
                        continue
                    received.append(json.loads(payload))
                assert struct.unpack("!H", payload[:2])[0] == 4008
            finally:
                stop.set()
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
                await slow.close()
                await asyncio.gather(restocking, return_exceptions=True)
            await restocking
            total = sum(fired.values())

            # the healthy client, subscribed all along, was not taken for a slow one and got everything
            deadline = loop.time() + 30
            while sum(len(stock_events(healthy_frames, i)) for i in isbns) < total:
                assert loop.time() < deadline and not watching.done(), "the healthy client fell behind"
                await asyncio.sleep(0.05)
            assert not healthy.closed
            assert_rising(healthy_frames)
            assert sum(len(stock_events(healthy_frames, i)) for i in isbns) == total

            # the slow one resumes with after = the last seq it read, and gets the rest exactly once, in order
            last = max(f["seq"] for f in received if "seq" in f)
            again = await connect(session, shop)
            frames = await subscribe(again, "inventory", after=last)
            missed = total - sum(len(stock_events(received, i)) for i in isbns)
            assert missed > QUEUE_LIMIT  # at least what was dropped from its queue
            frames += await read_stock(again, isbns, missed, 60)
            assert not again.closed
            assert "snapshot" not in [f["type"] for f in frames]
            everything = received + frames
            assert_rising(everything)
            for isbn in isbns:
                assert [e["data"]["on_hand"] for e in stock_events(everything, isbn)] == list(range(1, fired[isbn] + 1))
            await again.close()
            await healthy.close()
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)


# -- tokens -------------------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=90)
async def test_an_expired_token_ends_private_subscriptions_until_the_client_signs_in_again(make_shop):
    shop = await asyncio.to_thread(make_shop, {"BOOKSHOP_ACCESS_TOKEN_TTL": "2"})
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        email, password = await api.register()
        token = (await api.login(email, password))["access_token"]
        ws = await connect(session, shop)
        assert (await auth(ws, token))["type"] == "authenticated"
        snapshot = (await subscribe(ws, "orders:mine"))[-1]
        await subscribe(ws, "inventory")
        frames = await read_until(ws, lambda f: f["type"] == "error", timeout=5)
        assert frames[-1]["code"] == "token_expired" and frames[-1]["message"]
        assert not ws.closed

        # meanwhile an order: the gateway has it (the long-poll says so) but the socket is no longer told
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=2)
        customer = api.as_((await api.login(email, password))["access_token"])
        order = (await customer.order([(isbn, 1)])).body["id"]
        r = await customer.get("/events", params={"channel": "orders:mine", "after": str(snapshot["seq"]),
                                                  "wait": "10"})
        assert r.status == 200 and order in {e["data"]["id"] for e in r.body["items"]}
        await ws.send_json({"op": "subscribe", "channel": "orders:mine"})  # anonymous again
        frames = await read_until(ws, lambda f: f["type"] == "error")
        assert frames[-1]["code"] == "forbidden"
        assert not [f for f in frames if f["type"] == "event" and f["channel"] == "orders:mine"]

        # a fresh token (a new login: the one that placed the order may be 2 s old by now, on a loaded
        # machine), and the subscription resumes where it stopped
        fresh = (await api.login(email, password))["access_token"]
        assert (await auth(ws, fresh))["type"] == "authenticated"
        frames = await subscribe(ws, "orders:mine", after=snapshot["seq"])
        frames += await read_until(ws, confirmed(order))
        assert [f["event"] for f in frames if f["type"] == "event" and f["channel"] == "orders:mine"] == [
            "order.created", "order.status_changed"]
        await ws.close()


# -- restarts and a second gateway --------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=120)
async def test_a_gateway_restart_loses_nothing(own_shop):
    shop = own_shop
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        ws = await connect(session, shop)
        await subscribe(ws, "inventory")
        await restock(staff, isbn)
        last = (await read_until(ws, lambda f: stock_events([f], isbn)))[-1]["seq"]

        stopping = asyncio.ensure_future(asyncio.to_thread(shop.kill, "gateway", signal.SIGTERM))
        closing = await ws.receive(10)
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1001)  # going away: come back later
        await stopping
        try:
            for _ in range(3):  # committed while the gateway is away
                await restock(direct(staff, "inventory"), isbn)
        finally:
            shop.start("gateway", wait=False)

        # back as soon as it listens, as a browser retrying would: maybe before it follows the services again
        async def reconnected():
            try:
                return await connect(session, shop)
            except aiohttp.ClientConnectionError:
                return None
        ws = await until(reconnected, 30, 0.01, done=found, describe=lambda: "the gateway did not come back")
        frames = await subscribe(ws, "inventory", after=last)
        await asyncio.to_thread(shop.wait_ready, "gateway")
        frames += await read_stock(ws, isbn, 3)
        await restock(staff, isbn)
        frames += await read_stock(ws, isbn, 1)
        assert "snapshot" not in [f["type"] for f in frames]
        assert [e["data"]["on_hand"] for e in stock_events(frames, isbn)] == [2, 3, 4, 5]
        assert_rising(frames)
        await ws.close()


@pytest.mark.gen_test(timeout=120)
async def test_an_upstream_restart_loses_nothing(own_shop):
    shop = own_shop
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        ws = await connect(session, shop)
        await subscribe(ws, "inventory")
        for _ in range(5):
            await restock(staff, isbn)
        await asyncio.to_thread(shop.kill, "inventory", signal.SIGKILL)  # some events may not even be numbered yet
        await asyncio.to_thread(shop.start, "inventory")
        await restock(staff, isbn)
        frames = await read_until(ws, lambda f: stock_events([f], isbn) and f["data"]["on_hand"] == 6, 30)
        assert [e["data"]["on_hand"] for e in stock_events(frames, isbn)] == [1, 2, 3, 4, 5, 6]
        assert_rising(frames)
        assert not ws.closed
        await ws.close()


@pytest.mark.gen_test(timeout=90)
async def test_two_gateways_deliver_the_same_events_with_the_same_seqs(shop):
    port = free_port()
    second = subprocess.Popen([sys.executable, RUN_PY, "--service", "gateway", "--port", str(port)], env=shop.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert second.poll() is None and loop.time() < deadline, "the second gateway did not start"
                await asyncio.sleep(0.05)
            api = Api(shop, session)
            staff = await api.staff()
            isbn = await api.new_book(staff)
            one = await connect(session, shop)
            two = await connect(session, shop, url=f"ws://127.0.0.1:{port}/ws")
            await subscribe(one, "inventory")
            await subscribe(two, "inventory")
            for _ in range(3):
                await restock(staff, isbn)
            seen = []
            for ws in (one, two):
                frames = await read_until(ws, lambda f: stock_events([f], isbn) and f["data"]["on_hand"] == 3)
                seen.append([(f["seq"], f["data"], f["at"]) for f in stock_events(frames, isbn)])
                await ws.close()
            assert seen[0] == seen[1]
            assert [data["on_hand"] for _, data, _ in seen[0]] == [1, 2, 3]
    finally:
        second.terminate()
        second.wait(15)


# -- the long-poll fallback ---------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_long_poll_validates_its_arguments_and_channel_rules(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        customer = await api.customer()
        for params, status, words in (
                ({"channel": "inventory", "wait": "31"}, 400, "wait"),
                ({"channel": "inventory", "wait": "-1"}, 400, "wait"),
                ({"channel": "inventory", "wait": "soon"}, 400, "wait"),
                ({"channel": "inventory", "after": "-5"}, 400, "after"),
                ({"channel": "inventory", "after": "x"}, 400, "after"),
                ({"channel": "nope"}, 400, "channel"),
                ({}, 400, "channel"),
                ({"channel": "orders"}, 401, None),
                ({"channel": "orders:mine"}, 401, None)):
            r = await api.get("/events", params=params)
            assert r.status == status, (params, r)
            assert r.body["error"]["request_id"]
            if words:
                assert words in r.body["error"]["message"], r
        r = await customer.get("/events", params={"channel": "orders"})
        assert r.status == 403 and r.body["error"]["code"] == "forbidden"
        r = await customer.get("/events", params={"channel": "orders:mine"})
        assert r.status == 200 and r.body["items"] == []
        r = await api.get("/events", params={"channel": "books", "wait": "0"})
        assert r.status == 200 and isinstance(r.body["seq"], int)


@pytest.mark.gen_test(timeout=60)
async def test_long_poll_returns_as_soon_as_an_event_arrives_or_when_wait_is_up(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        now = await latest(api, "inventory")
        loop = asyncio.get_running_loop()

        # with nothing happening the answer comes when wait is up (an unrelated event elsewhere in the shared
        # shop would end a poll early: then look for a quiet second again)
        for _ in range(3):
            started = loop.time()
            r = await api.get("/events", params={"channel": "inventory", "after": str(now), "wait": "1"})
            waited = loop.time() - started
            if not r.body["items"]:
                break
            now = r.body["seq"]
        assert r.status == 200 and r.body == {"items": [], "seq": now, "epoch": r.body["epoch"], "reset": False}
        assert waited >= 0.9, waited  # it did wait (how much longer depends on the machine's load)

        async def poll_for_mine(after: int) -> dict:
            while True:
                r = await api.get("/events", params={"channel": "inventory", "after": str(after), "wait": "30"})
                assert r.status == 200, r
                if stock_events(r.body["items"], isbn):
                    return r.body
                after = r.body["seq"]
        polling = asyncio.ensure_future(poll_for_mine(now))
        await asyncio.sleep(0.2)  # the poll is waiting
        await restock(staff, isbn, 2)
        body = await asyncio.wait_for(polling, 5)  # long before the poll's 30 s are up
        event = stock_events(body["items"], isbn)[0]
        assert event["channel"] == "inventory" and event["seq"] > now
        assert event["data"] == {"isbn": isbn, "on_hand": 2, "reserved": 0, "available": 2}
        assert body["seq"] == body["items"][-1]["seq"]

        # a resume from the returned seq picks up exactly what followed
        await restock(staff, isbn, 3)
        body = await asyncio.wait_for(poll_for_mine(body["seq"]), 10)
        assert [e["data"]["on_hand"] for e in stock_events(body["items"], isbn)] == [5]
