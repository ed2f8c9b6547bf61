"""The hub with a fake service log and fake connections: ordering, resume, snapshots, slow clients, filters."""
from __future__ import annotations

import asyncio
import functools
import json
import types

import aiohttp
import harness
import pytest

from bookshop.clients.stream import EventStreamClient
from bookshop.services.errors import Unavailable
from bookshop.ws import hub as hub_module
from bookshop.ws.channels import Filter
from bookshop.ws.follower import StreamFollower
from bookshop.ws.hub import CATCH_UP_CHUNK, QUEUE_LIMIT, Hub, Stream, event_frame, text_frame

ANN, BOB = Filter(user_id="u-ann"), Filter(user_id="u-bob")


def event(seq: int, user_id: str | None = None, isbn: str = "9780000000002") -> dict:
    ev = {"seq": seq, "event": "stock.changed", "at": f"2030-01-01T00:00:{seq % 60:02d}.000Z",
          "data": {"isbn": isbn, "on_hand": seq, "reserved": 0, "available": seq}}
    if user_id is not None:
        ev.update(event="order.created", data={"id": f"o{seq}", "user_id": user_id, "status": "PENDING"},
                  user_id=user_id)
    return ev


class ServiceLog:
    """What a service's ``/internal/events`` answers, with an optional gate to hold reads back."""

    def __init__(self, oldest: int = 1, epoch: str = "e1"):
        self.events: list[dict] = []
        self.oldest = oldest
        self.epoch = epoch
        self.reads: list[tuple[int, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False

    async def read(self, after: int, limit: int = 500) -> dict:
        self.reads.append((after, limit))
        await self.gate.wait()
        if self.down:
            raise Unavailable("inventory is down", retry_after=2)
        items = [e for e in self.events if e["seq"] > after][:limit]
        kept = [e["seq"] for e in self.events]
        return {"items": items, "seq": max(kept, default=0), "oldest": min(kept, default=0), "epoch": self.epoch}

    def recreate(self, epoch: str, events: list[dict]) -> None:
        """The service's database is dropped and made again: another history, numbered from 1 again."""
        self.epoch = epoch
        self.events = list(events)


def frames_in(data: bytes) -> list[dict]:
    """The JSON of the WebSocket text frames in ``data`` (whole, unmasked server frames, as a client reads them)."""
    out, view = [], memoryview(data)
    while view:
        assert view[0] == 0x81 and view[1] & 0x80 == 0, "a final, unmasked text frame"
        length, start = view[1], 2
        if length == 126:
            length, start = int.from_bytes(view[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(view[2:10], "big"), 10
        out.append(json.loads(bytes(view[start:start + length])))
        view = view[start + length:]
    return out


class Conn:
    """A client connection; ``stuck`` ones never finish a write (the peer stopped reading), ``busy`` ones
    take every write into their buffer and flush it on the next turn of the loop, like a socket whose kernel
    buffer is full for a moment."""

    def __init__(self, stuck: bool = False, busy: bool = False):
        self.frames: list[dict] = []
        self.writes: list[bytes] = []
        self.slow_closes = 0
        self.busy = busy
        self.open = asyncio.Event()
        if not stuck:
            self.open.set()

    def write_frame(self, data: bytes):
        self.writes.append(data)
        if self.open.is_set() and not self.busy:
            self.frames.extend(frames_in(data))
            return None
        return asyncio.ensure_future(self._flush(data))

    async def _flush(self, data: bytes) -> None:
        await self.open.wait()
        self.frames.extend(frames_in(data))

    def close_slow(self) -> None:
        self.slow_closes += 1

    def events(self) -> list[int]:
        return [f["seq"] for f in self.frames if f["type"] == "event"]

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]


class Shop:
    """A hub over three streams; ``commit`` appends to a service log and the follower publishes it."""

    def __init__(self, buffer: int = 5000, max_per_address: int = 0, followed: bool = True):
        self.logs = {name: ServiceLog() for name in ("catalog", "inventory", "orders")}
        self.streams = {name: Stream(name, log, buffer) for name, log in self.logs.items()}
        self.snapshots: list[str] = []
        self.snapshot_epochs = True
        self.hub = Hub(self.streams, self.snapshot, max_per_address=max_per_address)
        if followed:  # the followers' hellos, at an empty log (else: a gateway that just started)
            for name in self.streams:
                self.hub.start(name, 0, "e1", 0)

    async def snapshot(self, channel, sub, principal):
        self.snapshots.append(channel)
        log = self.logs["inventory" if channel == "inventory" else "orders" if "orders" in channel else "catalog"]
        head = await log.read(2**62, 1)
        data = {"items": [{"isbn": "9780000000002", "available": head["seq"]}]}
        if self.snapshot_epochs:
            return head["seq"], data, head["epoch"]
        return head["seq"], data  # a service that does not say which history its seq is in

    def commit(self, stream: str, *events: dict, publish: bool = True) -> None:
        self.logs[stream].events.extend(events)
        if publish:
            for ev in events:
                self.hub.publish(stream, ev)

    async def client(self, channel: str, after: int | None = None, filter_: Filter = Filter(),
                     conn: Conn | None = None, epoch: str | None = None):
        conn = conn or Conn()
        client = self.hub.join(conn)
        await self.hub.subscribe(client, channel, filter_, after, epoch)
        return conn, client


#: let the clients' writers run until ``predicate()`` holds (no pause between looks: nothing here waits on time)
until = functools.partial(harness.until, timeout=2.0, every=0)


@pytest.mark.gen_test
async def test_a_fresh_subscription_gets_a_snapshot_then_live_events_in_order():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 11)))
    conn, _ = await shop.client("inventory")
    shop.commit("inventory", event(11), event(12))
    await until(lambda: len(conn.frames) == 4)
    subscribed, snapshot, first, second = conn.frames
    assert subscribed == {"type": "subscribed", "channel": "inventory", "seq": 10, "epoch": "e1"}
    assert snapshot["type"] == "snapshot" and snapshot["seq"] == 10 and snapshot["epoch"] == "e1"
    assert snapshot["data"]["items"]
    assert first == {"type": "event", "channel": "inventory", "seq": 11, "event": "stock.changed",
                     "data": event(11)["data"], "at": event(11)["at"]}
    assert second["seq"] == 12
    assert shop.snapshots == ["inventory"]


@pytest.mark.gen_test
async def test_resuming_within_the_buffer_never_asks_the_service():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 21)))
    reads_before = len(shop.logs["inventory"].reads)
    conn, _ = await shop.client("inventory", after=15)
    shop.commit("inventory", event(21))
    await until(lambda: 21 in conn.events())
    assert conn.types()[0] == "subscribed" and "snapshot" not in conn.types()
    assert conn.events() == [16, 17, 18, 19, 20, 21]
    assert len(shop.logs["inventory"].reads) == reads_before


@pytest.mark.gen_test
async def test_resuming_from_before_the_buffer_reads_the_log_then_goes_live():
    shop = Shop(buffer=5)
    shop.commit("inventory", *(event(s) for s in range(1, 21)))
    conn, _ = await shop.client("inventory", after=3)
    shop.commit("inventory", event(21), event(22))
    await until(lambda: 22 in conn.events())
    assert conn.events() == list(range(4, 23))
    assert shop.logs["inventory"].reads and shop.snapshots == []


@pytest.mark.gen_test
async def test_events_published_while_a_client_catches_up_are_neither_lost_nor_doubled():
    shop = Shop(buffer=5)
    log = shop.logs["inventory"]
    shop.commit("inventory", *(event(s) for s in range(1, 21)))
    log.gate.clear()  # the service is slow to answer the catch-up read
    conn = Conn()
    subscribing = asyncio.ensure_future(shop.client("inventory", after=2, conn=conn))
    await until(lambda: log.reads)
    shop.commit("inventory", *(event(s) for s in range(21, 31)))  # go live meanwhile
    log.gate.set()
    await subscribing
    shop.commit("inventory", event(31))
    await until(lambda: 31 in conn.events())
    assert conn.events() == list(range(3, 32))


@pytest.mark.gen_test
async def test_a_resume_older_than_the_log_keeps_gets_a_fresh_snapshot():
    shop = Shop(buffer=5)
    shop.commit("inventory", *(event(s) for s in range(50, 61)))  # 1..49 have expired
    conn, _ = await shop.client("inventory", after=10)
    shop.commit("inventory", event(61))
    await until(lambda: 61 in conn.events())
    assert conn.types()[:2] == ["subscribed", "snapshot"]
    assert conn.frames[1]["seq"] == 60
    assert conn.events() == [61]


@pytest.mark.gen_test
async def test_a_seq_from_the_future_gets_a_fresh_snapshot():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 6)))
    conn, _ = await shop.client("inventory", after=999)
    shop.commit("inventory", event(6))
    await until(lambda: 6 in conn.events())
    assert conn.types() == ["subscribed", "snapshot", "event"]
    assert conn.frames[1]["seq"] == 5


@pytest.mark.gen_test
async def test_duplicate_and_overlapping_publishes_are_delivered_once():
    shop = Shop()
    conn, _ = await shop.client("inventory")
    for seq in (1, 2, 3, 2, 3, 4, 1, 5, 5):  # a follower that resumed with overlap
        shop.hub.publish("inventory", event(seq))
    await until(lambda: 5 in conn.events())
    assert conn.events() == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in shop.streams["inventory"].buffer] == [1, 2, 3, 4, 5]


@pytest.mark.gen_test
async def test_my_orders_carry_only_my_events_while_staff_see_every_order():
    shop = Shop()
    ann, _ = await shop.client("orders:mine", filter_=ANN)
    bob, _ = await shop.client("orders:mine", filter_=BOB)
    staff, _ = await shop.client("orders")
    shop.commit("orders", event(1, "u-ann"), event(2, "u-bob"), event(3, "u-ann"), event(4, "u-bob"))
    late_ann, _ = await shop.client("orders:mine", after=0, filter_=ANN)  # catches up from the buffer
    await until(lambda: 4 in staff.events() and 4 in bob.events() and 3 in ann.events()
                and 3 in late_ann.events())
    assert staff.events() == [1, 2, 3, 4]
    assert ann.events() == [1, 3] and late_ann.events() == [1, 3]
    assert bob.events() == [2, 4]
    for frame in ann.frames + late_ann.frames:
        assert frame["channel"] == "orders:mine"
        assert "u-bob" not in json.dumps(frame)
    assert {f["channel"] for f in staff.frames} == {"orders"}


@pytest.mark.gen_test
async def test_my_orders_catch_up_from_the_log_is_filtered_too():
    shop = Shop(buffer=2)
    shop.commit("orders", *(event(s, "u-ann" if s % 3 == 0 else "u-bob") for s in range(1, 31)))
    ann, _ = await shop.client("orders:mine", after=0, filter_=ANN)
    shop.commit("orders", event(31, "u-bob"), event(32, "u-ann"))
    await until(lambda: 32 in ann.events())
    assert ann.events() == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32]


@pytest.mark.gen_test
async def test_a_client_that_stops_reading_is_closed_with_4008_and_its_queue_stays_bounded():
    shop = Shop()
    stuck, slow = await shop.client("inventory", conn=Conn(stuck=True))
    healthy, _ = await shop.client("inventory")
    for seq in range(1, 3 * QUEUE_LIMIT):
        shop.commit("inventory", event(seq))
        if seq % 50 == 0:
            await asyncio.sleep(0)  # a real follower yields between reads; healthy clients drain then
        assert len(slow.queue) <= QUEUE_LIMIT
    assert stuck.slow_closes == 1
    assert slow.closed and len(slow.queue) == 0
    await until(lambda: len(healthy.events()) == 3 * QUEUE_LIMIT - 1)
    assert healthy.slow_closes == 0
    assert healthy.events() == list(range(1, 3 * QUEUE_LIMIT))
    assert hub_module.SLOW_CLIENT == 4008
    stuck.open.set()
    await until(lambda: not slow.writing)


@pytest.mark.gen_test
async def test_a_client_far_behind_catches_up_without_being_taken_for_a_slow_one():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 4 * QUEUE_LIMIT + 1)))
    conn, client = await shop.client("inventory", after=1)  # all of it is still in the gateway's buffer
    await until(lambda: 4 * QUEUE_LIMIT in conn.events())
    assert conn.slow_closes == 0 and not client.closed
    assert conn.events() == list(range(2, 4 * QUEUE_LIMIT + 1))


@pytest.mark.gen_test
async def test_a_client_far_behind_the_buffer_catches_up_from_the_log_without_being_closed():
    shop = Shop(buffer=10)
    shop.commit("inventory", *(event(s) for s in range(1, 3 * QUEUE_LIMIT + 1)))
    conn, client = await shop.client("inventory", after=0)
    await until(lambda: 3 * QUEUE_LIMIT in conn.events())
    assert conn.slow_closes == 0 and not client.closed
    assert conn.events() == list(range(1, 3 * QUEUE_LIMIT + 1))


@pytest.mark.gen_test
async def test_subscriptions_made_before_the_follower_knew_the_stream_miss_nothing():
    # A restarted gateway: its clients resume with `after` before the follower's first hello tells
    # the hub where the service's log is; events committed while the gateway was away must still come.
    shop = Shop(followed=False)
    shop.commit("inventory", *(event(s) for s in range(1, 11)), publish=False)
    early, _ = await shop.client("inventory", after=4)
    fresh, _ = await shop.client("inventory")  # snapshot at 10
    shop.commit("inventory", event(11), event(12), publish=False)  # committed before the hello
    shop.hub.start("inventory", 12, "e1", 1)  # the follower's hello
    shop.commit("inventory", event(13))
    await until(lambda: 13 in early.events() and 13 in fresh.events())
    assert early.events() == list(range(5, 14))
    assert fresh.events() == [11, 12, 13]
    assert shop.streams["inventory"].seq == 13


@pytest.mark.gen_test
async def test_a_client_that_stops_reading_during_its_catch_up_is_paced_and_let_go_when_it_leaves():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 3 * QUEUE_LIMIT + 1)))
    conn = Conn(stuck=True)
    client = shop.hub.join(conn)
    catching_up = asyncio.ensure_future(shop.hub.subscribe(client, "inventory", Filter(), 0))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not catching_up.done()  # waiting for room, not piling frames up
    assert len(client.queue) <= 2 * CATCH_UP_CHUNK and conn.slow_closes == 0
    shop.hub.leave(client)
    await asyncio.wait_for(catching_up, 1)
    assert client.closed and client not in shop.hub.clients
    conn.open.set()  # the socket goes away: its writer ends
    await until(lambda: not client.writing)


@pytest.mark.gen_test
async def test_a_late_catch_up_against_a_service_that_is_down_ends_the_subscription_with_an_error():
    shop = Shop(followed=False)
    shop.commit("inventory", *(event(s) for s in range(1, 6)), publish=False)
    conn, client = await shop.client("inventory", after=2)  # before the follower's hello: read from the log
    await until(lambda: 5 in conn.events())
    shop.commit("inventory", event(6), event(7), publish=False)  # committed before the hello
    shop.logs["inventory"].down = True
    shop.hub.start("inventory", 7, "e1", 1)
    await until(lambda: conn.types()[-1:] == ["error"])
    assert conn.frames[-1]["code"] == "unavailable" and conn.frames[-1]["channel"] == "inventory"
    assert "inventory" not in client.subs
    shop.hub.start("inventory", 7, "e1", 1)  # a repeated hello changes nothing
    shop.logs["inventory"].down = False
    await shop.hub.subscribe(client, "inventory", Filter(), 5, "e1")  # the client comes back with after
    await until(lambda: 7 in conn.events())
    assert conn.events() == [3, 4, 5, 6, 7]


@pytest.mark.gen_test
async def test_a_subscription_the_service_cannot_serve_now_is_refused_without_a_subscribed_frame():
    shop = Shop(followed=False)
    shop.commit("inventory", *(event(s) for s in range(1, 4)), publish=False)  # the follower is not back yet
    shop.logs["inventory"].down = True
    for after in (None, 2):
        conn = Conn()
        with pytest.raises(Unavailable):
            await shop.client("inventory", after=after, conn=conn)
        for _ in range(5):
            await asyncio.sleep(0)
        assert conn.frames == []  # the socket answers with an error frame; never "subscribed"
    shop.logs["inventory"].down = False
    conn, _ = await shop.client("inventory", after=2)
    shop.hub.start("inventory", 3, "e1", 1)  # the follower is back
    await until(lambda: 3 in conn.events())
    assert conn.types() == ["subscribed", "event"]


@pytest.mark.gen_test
async def test_unsubscribe_leave_and_token_expiry_stop_delivery():
    shop = Shop()
    conn, client = await shop.client("orders", after=0)
    await shop.hub.subscribe(client, "inventory", Filter(), 0)
    await shop.hub.subscribe(client, "orders:mine", ANN, 0)
    shop.hub.end_private(client)
    assert set(client.subs) == {"inventory"}
    shop.commit("orders", event(1, "u-ann"))
    shop.commit("inventory", event(1))
    await until(lambda: 1 in conn.events())
    assert [(f["channel"], f["seq"]) for f in conn.frames if f["type"] == "event"] == [("inventory", 1)]
    shop.hub.unsubscribe(client, "inventory")
    shop.commit("inventory", event(2))
    other, _ = await shop.client("inventory")
    gone = Conn()
    gone_client = shop.hub.join(gone)
    await shop.hub.subscribe(gone_client, "inventory", Filter(), None)
    shop.hub.leave(gone_client)
    assert gone_client not in shop.hub.clients
    shop.commit("inventory", event(3))
    await until(lambda: 3 in other.events())
    assert conn.events() == [1]
    assert 3 not in gone.events()


# -- what a client may cost -----------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_unsubscribing_what_was_never_joined_leaves_nothing_behind():
    shop = Shop()
    conn, client = await shop.client("inventory")
    await until(lambda: conn.types() == ["subscribed", "snapshot"])
    for i in range(1000):
        shop.hub.unsubscribe(client, f"junk-{i}")  # a name no channel has
    shop.hub.unsubscribe(client, "books")          # a channel this client never joined
    assert set(shop.hub._by_channel) == {"inventory"}
    assert set(client.subs) == {"inventory"}
    shop.hub.unsubscribe(client, "inventory")
    assert shop.hub._by_channel == {} and client.subs == {}
    shop.commit("inventory", event(1))
    await asyncio.sleep(0)
    assert conn.types() == ["subscribed", "snapshot"]


@pytest.mark.gen_test
async def test_a_channel_nobody_reads_any_more_leaves_no_entry_whichever_way_its_last_reader_went():
    shop = Shop()
    left, leaving = await shop.client("books")
    stayed, staying = await shop.client("books")
    await shop.hub.subscribe(staying, "orders", Filter(), None)
    await shop.hub.subscribe(staying, "orders:mine", ANN, None)
    await until(lambda: len(left.frames) == 2 and len(stayed.frames) == 6)
    shop.hub.leave(leaving)
    assert set(shop.hub._by_channel) == {"books", "orders", "orders:mine"}
    shop.hub.end_private(staying)  # the token expired
    assert set(shop.hub._by_channel) == {"books"}
    shop.hub.leave(staying)
    shop.hub.leave(staying)  # twice (a socket closed for its rate, then its on_close): harmless
    assert shop.hub._by_channel == {} and shop.hub.clients == set()


def test_sockets_are_counted_per_client_address_and_the_count_is_freed_when_they_go():
    hub = Shop(max_per_address=2).hub
    ann = [hub.join(Conn(), "203.0.113.7"), hub.join(Conn(), "203.0.113.7")]
    bob = hub.join(Conn(), "203.0.113.8")
    assert not hub.admits("203.0.113.7")
    assert hub.admits("203.0.113.8") and hub.admits("198.51.100.1")
    hub.leave(ann[0])
    hub.leave(ann[0])  # counted once however often it leaves
    assert hub.admits("203.0.113.7") and hub.sockets_from("203.0.113.7") == 1
    hub.leave(ann[1])
    hub.leave(bob)
    assert hub.sockets_from("203.0.113.7") == 0
    assert hub._per_address == {}  # an address without sockets costs nothing


def test_a_limit_of_zero_admits_any_number_of_sockets_from_one_address():
    hub = Shop(max_per_address=0).hub
    for _ in range(5000):
        hub.join(Conn(), "203.0.113.7")
    assert hub.admits("203.0.113.7")


@pytest.mark.gen_test
async def test_concurrent_subscribes_needing_one_snapshot_share_one_read():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 6)))
    log = shop.logs["inventory"]
    log.gate.clear()  # the service is slow: subscribes pile up while the first snapshot is read
    conns = [Conn() for _ in range(300)]
    subscribing = [asyncio.ensure_future(shop.client("inventory", conn=c)) for c in conns]
    await until(lambda: log.reads)
    for _ in range(20):
        await asyncio.sleep(0)
    assert shop.snapshots == ["inventory"] and len(log.reads) == 1
    log.gate.set()
    await asyncio.gather(*subscribing)
    shop.commit("inventory", event(6))
    await until(lambda: all(6 in c.events() for c in conns))
    for conn in conns:
        assert conn.types() == ["subscribed", "snapshot", "event"] and conn.frames[1]["seq"] == 5
    await shop.client("inventory")  # once it landed, a later subscribe reads afresh (no stale snapshot)
    assert shop.snapshots == ["inventory", "inventory"]


@pytest.mark.gen_test
async def test_snapshots_are_shared_only_between_subscribers_of_the_same_view():
    shop = Shop()
    log = shop.logs["orders"]
    log.gate.clear()
    subscribing = [asyncio.ensure_future(shop.client("orders:mine", filter_=f)) for f in (ANN, BOB, ANN, BOB, ANN)]
    subscribing.append(asyncio.ensure_future(shop.client("orders")))
    await until(lambda: len(log.reads) == 3)
    for _ in range(20):
        await asyncio.sleep(0)
    assert sorted(shop.snapshots) == ["orders", "orders:mine", "orders:mine"]  # ann's, bob's and every order
    log.gate.set()
    conns = [conn for conn, _ in await asyncio.gather(*subscribing)]
    await until(lambda: all(c.types() == ["subscribed", "snapshot"] for c in conns))


@pytest.mark.gen_test
async def test_a_resubscribe_while_its_snapshot_is_read_starts_no_second_read():
    shop = Shop()
    log = shop.logs["inventory"]
    log.gate.clear()
    conn = Conn()
    client = shop.hub.join(conn)
    subscribing = [asyncio.ensure_future(shop.hub.subscribe(client, "inventory", Filter(), None)) for _ in range(50)]
    await until(lambda: log.reads)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(log.reads) == 1
    log.gate.set()
    await asyncio.gather(*subscribing)
    await until(lambda: len(conn.frames) >= 2)
    for _ in range(20):
        await asyncio.sleep(0)
    assert conn.types() == ["subscribed", "snapshot"]  # only the last of them is still wanted


@pytest.mark.gen_test
async def test_a_failed_shared_snapshot_fails_every_subscriber_waiting_on_it_and_is_not_kept():
    shop = Shop()
    log = shop.logs["inventory"]
    log.gate.clear()
    log.down = True
    conns = [Conn() for _ in range(20)]
    subscribing = [asyncio.ensure_future(shop.client("inventory", conn=c)) for c in conns]
    await until(lambda: log.reads)
    log.gate.set()
    results = await asyncio.gather(*subscribing, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results) and len(log.reads) == 1
    log.down = False
    conn, _ = await shop.client("inventory")
    await until(lambda: conn.types() == ["subscribed", "snapshot"])
    assert all(c.frames == [] for c in conns)


@pytest.mark.gen_test
async def test_a_flood_of_subscribes_from_the_future_asks_the_service_for_its_head_once():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 6)))
    log = shop.logs["inventory"]
    log.gate.clear()
    conns = [Conn() for _ in range(100)]
    subscribing = [asyncio.ensure_future(shop.client("inventory", after=999 + i, conn=c)) for i, c in enumerate(conns)]
    await until(lambda: log.reads)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(log.reads) == 1
    log.gate.set()
    await asyncio.gather(*subscribing)
    assert len(log.reads) == 2 and shop.snapshots == ["inventory"]  # the head, then one snapshot for all
    await until(lambda: all(c.types() == ["subscribed", "snapshot"] for c in conns))


class FakeServiceSocket:
    """What ``session.ws_connect`` gives the follower: every frame already buffered, as aiohttp hands over
    a burst it read in one go (``async for`` then never yields to the event loop)."""

    def __init__(self, frames: list[dict], after_last=None):
        self.frames = frames
        self.after_last = after_last

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.frames:
            if self.after_last is not None:
                self.after_last()
            raise StopAsyncIteration  # the service went away: the follower reconnects
        return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, json.dumps(self.frames.pop(0)), None)


class FakeSession:
    def __init__(self, *sockets: FakeServiceSocket):
        self.sockets = list(sockets)
        self.params: list[dict] = []

    def ws_connect(self, url, params=None, **_):
        self.params.append(params)
        return self.sockets.pop(0)


class FakeTokens:
    async def token(self) -> str:
        return "service-token"


@pytest.mark.gen_test
async def test_the_follower_lets_clients_drain_during_a_burst_and_resumes_from_its_last_seq():
    shop = Shop(followed=False)
    conn, client = await shop.client("inventory")
    stop = asyncio.Event()
    burst = 4 * QUEUE_LIMIT
    session = FakeSession(
        FakeServiceSocket([{"type": "hello", "seq": 0, "oldest": 0, "epoch": "e1"}]
                          + [{"type": "event", **event(s)} for s in range(1, burst + 1)]),
        FakeServiceSocket([{"type": "hello", "seq": burst + 1, "oldest": 1, "epoch": "e1"},
                           {"type": "event", **event(burst + 1)}], after_last=stop.set))
    http = types.SimpleNamespace(session=session)
    follower = StreamFollower(shop.hub, "inventory", EventStreamClient(http, "http://inventory.test", FakeTokens()))
    await asyncio.wait_for(follower.run(stop), 10)
    await until(lambda: burst + 1 in conn.events())
    assert conn.slow_closes == 0 and not client.closed
    assert conn.events() == list(range(1, burst + 2))
    # from now on first, then from the last seq seen, in the epoch it is in
    assert session.params == [{}, {"after": str(burst), "epoch": "e1"}]
    assert follower.client.url == "ws://inventory.test/internal/events/ws"


def test_event_frames_carry_exactly_the_contract_fields():
    ev = event(7, "u-ann")
    assert json.loads(event_frame("orders:mine", ev)) == {
        "type": "event", "channel": "orders:mine", "seq": 7, "event": "order.created", "data": ev["data"],
        "at": ev["at"]}


# -- fan-out ----------------------------------------------------------------------------------------------

def test_frames_are_whole_unmasked_text_frames_with_the_length_in_the_shortest_form():
    for size, header in ((0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
                         (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f" + (65536).to_bytes(8, "big"))):
        payload = b"x" * size
        assert text_frame(payload) == header + payload
    assert frames_in(text_frame(json.dumps({"type": "event", "data": "é" * 70_000}).encode())) == [
        {"type": "event", "data": "é" * 70_000}]


@pytest.mark.gen_test
async def test_an_event_is_framed_once_and_the_same_bytes_go_to_every_reader():
    shop = Shop()
    readers = [await shop.client("inventory") for _ in range(200)]
    mine = [await shop.client("orders:mine", filter_=ANN) for _ in range(3)]
    staff, _ = await shop.client("orders")
    shop.commit("inventory", event(1))
    shop.commit("orders", event(1, "u-ann"))
    sent = [conn.writes[-1] for conn, _ in readers]
    assert all(data is sent[0] for data in sent)  # one object: framed once, not once per reader
    assert frames_in(sent[0]) == [json.loads(event_frame("inventory", event(1)))]
    assert all(frames_in(conn.writes[-1])[0]["channel"] == "orders:mine" for conn, _ in mine)
    assert frames_in(staff.writes[-1])[0]["channel"] == "orders"  # each channel its own frame


@pytest.mark.gen_test
async def test_what_queues_while_a_write_is_in_flight_goes_out_as_one_write_in_order():
    shop = Shop()
    conn, client = await shop.client("inventory", conn=Conn(busy=True))
    await until(lambda: conn.types() == ["subscribed", "snapshot"] and not client.writing)
    writes = len(conn.writes)
    for seq in range(1, 8):  # the first is written at once; the other six wait for it to be flushed
        shop.commit("inventory", event(seq))
    assert len(conn.writes) == writes + 1 and len(client.queue) == 6
    await until(lambda: 7 in conn.events())
    assert len(conn.writes) == writes + 2  # the six queued frames in one write
    assert conn.events() == [1, 2, 3, 4, 5, 6, 7]
    await until(lambda: not client.writing)
    assert client.queue == []


@pytest.mark.gen_test
async def test_a_socket_that_fails_a_write_ends_that_client_only():
    class Broken(Conn):
        def write_frame(self, data):
            raise ConnectionResetError("the peer went away")
    shop = Shop()
    broken, gone = await shop.client("inventory", conn=Broken())
    healthy, _ = await shop.client("inventory")
    shop.commit("inventory", event(1), event(2))
    assert gone.closed and broken.frames == []
    assert healthy.events() == [1, 2]


# -- epochs -----------------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_subscribed_and_snapshot_frames_name_the_epoch_and_a_resume_in_it_gets_the_events():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 6)))
    first, _ = await shop.client("inventory")
    assert [(f["type"], f["epoch"]) for f in first.frames] == [("subscribed", "e1"), ("snapshot", "e1")]
    again, _ = await shop.client("inventory", after=3, epoch="e1")
    shop.commit("inventory", event(6))
    await until(lambda: 6 in again.events())
    assert again.types() == ["subscribed", "event", "event", "event"]
    assert again.frames[0] == {"type": "subscribed", "channel": "inventory", "seq": 5, "epoch": "e1"}


@pytest.mark.gen_test
async def test_a_resume_in_another_epoch_gets_a_fresh_snapshot_not_this_historys_events():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 21)))
    conn, _ = await shop.client("inventory", after=3, epoch="e0")  # seq 3 of a database since recreated
    shop.commit("inventory", event(21))
    await until(lambda: 21 in conn.events())
    assert conn.types() == ["subscribed", "snapshot", "event"]
    assert conn.frames[1]["seq"] == 20 and conn.frames[1]["epoch"] == "e1"
    assert shop.snapshots == ["inventory"]


@pytest.mark.gen_test
async def test_live_subscribers_get_a_fresh_snapshot_when_the_follower_finds_a_new_epoch():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 51)))
    live = [await shop.client("inventory") for _ in range(20)]
    resumed, _ = await shop.client("inventory", after=45, epoch="e1")
    await until(lambda: 50 in resumed.events())
    # the database is recreated: a new epoch, numbered from 1 again (seq 3 is another event than before)
    shop.logs["inventory"].recreate("e2", [event(1), event(2), event(3)])
    read_before = len(shop.snapshots)
    assert shop.hub.start("inventory", 3, "e2", 1)  # the follower's hello after reconnecting
    for conn, _ in live + [(resumed, None)]:
        await until(lambda: conn.frames[-1]["type"] == "snapshot" and conn.frames[-1]["epoch"] == "e2")
        assert conn.frames[-1]["seq"] == 3
    assert len(shop.snapshots) == read_before + 1  # the 21 fresh snapshots shared one read
    shop.commit("inventory", event(4))
    await until(lambda: all(4 in conn.events() for conn, _ in live) and 4 in resumed.events())
    assert resumed.events() == [46, 47, 48, 49, 50, 4]  # nothing of the new history before its snapshot
    assert shop.streams["inventory"].seq == 4 and shop.streams["inventory"].epoch == "e2"


@pytest.mark.gen_test
async def test_a_hello_behind_what_the_hub_saw_or_past_a_gap_in_the_same_epoch_is_another_history_too():
    shop = Shop()
    shop.commit("inventory", *(event(s) for s in range(1, 11)))
    conn, _ = await shop.client("inventory")
    assert not shop.hub.start("inventory", 12, "e1", 1)  # a reconnect: the replay brings 11 and 12
    shop.logs["inventory"].recreate("e1", [event(s) for s in range(1, 5)])  # a backup restored, no new epoch
    assert shop.hub.start("inventory", 4, "e1", 1)
    snapshots = lambda: [f["seq"] for f in conn.frames if f["type"] == "snapshot"]  # noqa: E731
    await until(lambda: len(snapshots()) == 2)
    assert snapshots() == [10, 4]
    shop.logs["inventory"].recreate("e1", [event(s) for s in range(90, 101)])  # 5..89 expired meanwhile
    assert shop.hub.start("inventory", 100, "e1", 90)
    await until(lambda: len(snapshots()) == 3)
    assert snapshots() == [10, 4, 100]


@pytest.mark.gen_test
async def test_a_catch_up_that_finds_the_service_on_another_epoch_starts_afresh_and_asks_the_follower_to_look():
    shop = Shop(buffer=5)
    rechecks = []
    shop.streams["inventory"].recheck = lambda: rechecks.append(True)
    shop.commit("inventory", *(event(s) for s in range(1, 11)))
    shop.logs["inventory"].recreate("e2", [event(1), event(2)])  # the follower has not noticed yet
    conn, _ = await shop.client("inventory", after=2, epoch="e1")  # before the buffer: read from the service
    assert conn.types() == ["subscribed", "snapshot"]
    assert conn.frames[1]["epoch"] == "e2" and conn.frames[1]["seq"] == 2
    assert rechecks == [True]
    shop.hub.publish("inventory", event(11))  # the old history's follower: not for this subscriber
    assert conn.events() == []
    shop.logs["inventory"].events.append(event(3))
    assert shop.hub.start("inventory", 3, "e2", 1)  # the follower looked again
    await until(lambda: conn.types().count("snapshot") == 2)
    assert conn.frames[-1]["epoch"] == "e2" and conn.frames[-1]["seq"] == 3
    shop.commit("inventory", event(4))
    await until(lambda: 4 in conn.events())
    assert conn.events() == [4]


@pytest.mark.gen_test
async def test_a_snapshot_whose_service_names_no_epoch_is_in_the_streams():
    shop = Shop()
    shop.snapshot_epochs = False
    conn, _ = await shop.client("inventory")
    assert [f["epoch"] for f in conn.frames] == ["e1", "e1"]


@pytest.mark.gen_test
async def test_the_follower_sees_a_new_epoch_and_follows_the_new_history_from_its_head():
    shop = Shop(followed=False)
    conn, _ = await shop.client("inventory")
    stop = asyncio.Event()
    session = FakeSession(
        FakeServiceSocket([{"type": "hello", "seq": 0, "oldest": 0, "epoch": "e1"}]
                          + [{"type": "event", **event(s)} for s in range(1, 6)]),
        # the service's database was recreated: the replay after 5 would be another history's 6, 7, ...
        FakeServiceSocket([{"type": "hello", "seq": 2, "oldest": 1, "epoch": "e2"},
                           {"type": "event", **event(6)}]),
        FakeServiceSocket([{"type": "hello", "seq": 2, "oldest": 1, "epoch": "e2"},
                           {"type": "event", **event(3)}], after_last=stop.set))
    shop.logs["inventory"].recreate("e2", [event(1), event(2)])
    follower = StreamFollower(shop.hub, "inventory",
                              EventStreamClient(types.SimpleNamespace(session=session), "http://inventory.test",
                                                FakeTokens()))
    await asyncio.wait_for(follower.run(stop), 10)
    await until(lambda: 3 in conn.events())
    assert session.params == [{}, {"after": "5", "epoch": "e1"}, {"after": "2", "epoch": "e2"}]
    assert conn.events() == [1, 2, 3, 4, 5, 3]  # event 6 of the connection that replayed another history: never
    assert [f["epoch"] for f in conn.frames if f["type"] == "snapshot"] == ["e1", "e2"]


class OpenServiceSocket(FakeServiceSocket):
    """A service stream that stays open after its frames, until the follower closes it."""

    def __init__(self, frames: list[dict]):
        super().__init__(frames)
        self.closed = False
        self._closed = asyncio.Event()

    async def close(self) -> None:
        self.closed = True
        self._closed.set()

    async def __anext__(self):
        if not self.frames:
            await self._closed.wait()
            raise StopAsyncIteration
        return await super().__anext__()


@pytest.mark.gen_test
async def test_the_follower_looks_again_when_the_hub_reads_another_epoch_from_the_service():
    shop = Shop(followed=False, buffer=2)
    stop = asyncio.Event()
    first = OpenServiceSocket([{"type": "hello", "seq": 0, "oldest": 0, "epoch": "e1"}]
                              + [{"type": "event", **event(s)} for s in range(1, 6)])
    second = FakeServiceSocket([{"type": "hello", "seq": 2, "oldest": 1, "epoch": "e2"}])
    third = FakeServiceSocket([{"type": "hello", "seq": 2, "oldest": 1, "epoch": "e2"},
                               {"type": "event", **event(3)}], after_last=stop.set)
    session = FakeSession(first, second, third)
    follower = StreamFollower(shop.hub, "inventory",
                              EventStreamClient(types.SimpleNamespace(session=session), "http://inventory.test",
                                                FakeTokens()))
    following = asyncio.ensure_future(follower.run(stop))
    await until(lambda: shop.streams["inventory"].seq == 5)
    shop.logs["inventory"].recreate("e2", [event(1), event(2)])  # the service's new-epoch: not yet told
    conn, _ = await shop.client("inventory", after=1, epoch="e1")  # before the buffer: read from the service
    assert conn.types() == ["subscribed", "snapshot"] and conn.frames[1]["epoch"] == "e2"
    await asyncio.wait_for(following, 10)  # the hub asked the follower to look again: it reconnected
    assert first.closed
    assert session.params == [{}, {"after": "5", "epoch": "e1"}, {"after": "2", "epoch": "e2"}]
    await until(lambda: 3 in conn.events())
    assert conn.events() == [3] and shop.streams["inventory"].epoch == "e2"
