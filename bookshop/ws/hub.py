"""The hub: follows the services' event streams and fans events out to subscribed clients.

Each stream keeps a bounded buffer of recent events; a client resuming from an older ``seq`` is served from
the owning service's event log (kept 48 h), and one resuming from before that gets a fresh snapshot. A
subscription catches up first and only then goes live; both happen on the event loop without an ``await``
between "caught up?" and "live", so no event can slip between them. Each client has a bounded queue: a
client too slow to drain it is closed with 4008 and resumes with ``after``.

Nothing a client sends makes the hub keep more than its live subscriptions: a channel's set of readers goes
when its last reader does, sockets are counted per client address only while they are open, and subscribes
that need the same snapshot (or the same head of a stream) at the same time share one read of the service.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
from typing import Any, Awaitable, Callable, Protocol

from bookshop.services.errors import DomainError
from bookshop.ws.channels import CHANNELS, Filter

log = logging.getLogger(__name__)

SLOW_CLIENT = 4008
QUEUE_LIMIT = 500
BUFFER = 5000
# a catch-up sends this many events at a time, each batch once the client's queue is this short again, so a
# client far behind is paced instead of being taken for a slow one (live events still have room)
CATCH_UP_CHUNK = QUEUE_LIMIT // 4


class Connection(Protocol):
    def write_frame(self, frame: str) -> Awaitable[None]: ...  # starts the write at once
    def close_slow(self) -> None: ...


class Stream:
    """One service's stream as the gateway has seen it."""

    def __init__(self, name: str, source, buffer: int = BUFFER):
        self.name = name
        self.source = source  # reads the service's log: async read(after, limit) -> {items, seq, oldest}
        self.seq = 0          # the last seq this gateway has seen
        self.buffer: collections.deque[dict] = collections.deque(maxlen=buffer)
        self.connected = False

    def since(self, after: int) -> list[dict] | None:
        """Buffered events after ``after``; None when the buffer does not reach back that far."""
        if after >= self.seq:
            return []
        if not self.buffer or self.buffer[0]["seq"] > after + 1:
            return None
        return [e for e in self.buffer if e["seq"] > after]


class Subscription:
    __slots__ = ("channel", "filter", "last", "live")

    def __init__(self, channel: str, filter_: Filter):
        self.channel = channel
        self.filter = filter_
        self.last = 0
        self.live = False


class Client:
    """A connected WebSocket client: its subscriptions and its bounded outgoing queue."""

    __slots__ = ("conn", "address", "subs", "queue", "writing", "closed", "principal", "room", "__weakref__")

    def __init__(self, conn: Connection, address: str | None = None):
        self.conn = conn
        self.address = address  # the client address its socket is counted under (None: not counted)
        self.subs: dict[str, Subscription] = {}
        # a list, not a deque: an idle client's empty list costs 56 bytes, a deque 760 (a thousand idle
        # clients are the normal case); the queue never holds more than QUEUE_LIMIT frames
        self.queue: list[str] = []
        self.writing = False
        self.closed = False
        self.principal = None
        self.room: asyncio.Event | None = None  # made only while a catch-up waits for the queue to shorten

    def _make_room(self) -> None:
        if self.room is not None:
            self.room.set()

    async def wait_room(self) -> None:
        """Wait until the queue is short enough for another catch-up chunk (or the client is gone)."""
        while len(self.queue) >= CATCH_UP_CHUNK and not self.closed:
            if self.room is None:
                self.room = asyncio.Event()
            self.room.clear()
            await self.room.wait()
        self.room = None

    def send(self, frame: str) -> None:
        if self.closed:
            return
        if len(self.queue) >= QUEUE_LIMIT:
            self.closed = True
            self.queue.clear()
            self._make_room()
            self.conn.close_slow()
            return
        if self.writing:
            self.queue.append(frame)
        else:
            self._write([frame])

    def _write(self, frames: list[str]) -> None:
        """Hand frames to the socket now (tornado puts the bytes out at once when the socket has room) and
        the next batch when these are flushed: no task of ours per client per event, and a client whose
        socket is blocked keeps its frames in our bounded queue, not in the socket's buffer."""
        self.writing = True
        try:
            if len(frames) == 1:  # the usual case: no gathering future to pay for
                pending = asyncio.ensure_future(self.conn.write_frame(frames[0]))
            else:
                pending = asyncio.gather(*(asyncio.ensure_future(self.conn.write_frame(f)) for f in frames))
        except Exception:  # noqa: BLE001 - the socket is closed: this client is over
            self._fail()
            return
        pending.add_done_callback(self._written)

    def _written(self, pending: asyncio.Future) -> None:
        self.writing = False
        if pending.cancelled() or pending.exception() is not None:
            self._fail()
            return
        if self.queue and not self.closed:
            frames, self.queue = self.queue, []
            self._write(frames)
        self._make_room()

    def _fail(self) -> None:
        self.writing = False
        self.closed = True
        self.queue.clear()
        self._make_room()


def event_frame(channel: str, event: dict) -> str:
    return json.dumps({"type": "event", "channel": channel, "seq": event["seq"], "event": event["event"],
                       "data": event["data"], "at": event["at"]}, separators=(",", ":"))


Snapshotter = Callable[[str, Subscription, Any], Awaitable[tuple[int, Any]]]


class Hub:
    """The clients, what each reads, and the streams they read from.

    ``max_per_address`` bounds the open sockets of one client address (0: no bound)."""

    def __init__(self, streams: dict[str, Stream], snapshot: Snapshotter, metrics=None, max_per_address: int = 0):
        self.streams = streams
        self.snapshot = snapshot
        self.clients: set[Client] = set()
        self.listeners: list[Callable[[str, dict], None]] = []
        self.metrics = metrics
        self.max_per_address = max_per_address
        # channel -> clients subscribed to it; a channel is here only while someone reads it
        self._by_channel: dict[str, set[Client]] = {}
        # client address -> its open sockets; an address is here only while it has some
        self._per_address: dict[str, int] = {}
        # reads of a service in flight (a snapshot, a stream's head), shared by whoever needs the same one
        self._reads: dict[tuple, asyncio.Future] = {}
        self._resuming: set[asyncio.Future] = set()

    # -- clients ------------------------------------------------------------------------------------
    def admits(self, address: str) -> bool:
        """May one more socket open from ``address``?"""
        return not self.max_per_address or self._per_address.get(address, 0) < self.max_per_address

    def sockets_from(self, address: str) -> int:
        return self._per_address.get(address, 0)

    def join(self, conn: Connection, address: str | None = None) -> Client:
        client = Client(conn, address)
        self.clients.add(client)
        if address is not None:
            self._per_address[address] = self._per_address.get(address, 0) + 1
        self._gauge()
        return client

    def leave(self, client: Client) -> None:
        """The client is gone (or being sent away). Safe to call more than once."""
        client.closed = True
        client._make_room()  # wakes a catch-up waiting for this client, which then ends
        for channel in client.subs:
            self._stop_reading(client, channel)
        client.subs.clear()
        if client not in self.clients:
            return
        self.clients.discard(client)
        if client.address is not None:
            left = self._per_address.pop(client.address, 1) - 1
            if left > 0:
                self._per_address[client.address] = left
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.gauge("websocket_clients", len(self.clients))

    def _stop_reading(self, client: Client, channel: str) -> None:
        readers = self._by_channel.get(channel)
        if readers is not None:
            readers.discard(client)
            if not readers:
                del self._by_channel[channel]

    def unsubscribe(self, client: Client, channel: str) -> None:
        """Ends the client's subscription to ``channel``, if it has one (any name: nothing is kept for it)."""
        if client.subs.pop(channel, None) is not None:
            self._stop_reading(client, channel)

    async def _shared_read(self, key: tuple, read: Callable[[], Awaitable]):
        """``await read()``, or the same read already in flight for ``key``: a flood of subscribes costs the
        service one read, and one subscriber going away does not cancel it for the others."""
        flight = self._reads.get(key)
        if flight is None:
            flight = self._reads[key] = asyncio.ensure_future(read())
            flight.add_done_callback(functools.partial(self._landed, key))
        return await asyncio.shield(flight)

    def _landed(self, key: tuple, flight: asyncio.Future) -> None:
        if self._reads.get(key) is flight:
            del self._reads[key]  # the next subscribe reads afresh: nothing is cached
        if not flight.cancelled():
            flight.exception()  # seen: when every waiter went away, a failure is not "never retrieved"

    async def _head(self, stream: Stream) -> int:
        """The last seq the service's log holds."""
        return (await self._shared_read(("head", stream.name), lambda: stream.source.read(2**62, 1)))["seq"]

    async def _read_snapshot(self, sub: Subscription, principal) -> tuple[int, Any]:
        # the snapshot depends on the channel and the filter alone (orders:mine: the user's own orders); a
        # subscriber joining a read started earlier is still exact, as it catches up from the snapshot's seq
        return await self._shared_read(("snapshot", sub.channel, sub.filter),
                                       lambda: self.snapshot(sub.channel, sub, principal))

    async def subscribe(self, client: Client, channel: str, filter_: Filter, after: int | None) -> None:
        stream = self.streams[CHANNELS[channel]]
        self.unsubscribe(client, channel)
        sub = Subscription(channel, filter_)
        client.subs[channel] = sub
        self._by_channel.setdefault(channel, set()).add(client)
        # "subscribed" only once the service behind the channel answered (an error frame instead, if it is
        # down); the subscription is not live meanwhile, and the catch-up covers what happens in between
        if after is not None and after > stream.seq and after > await self._head(stream):
            after = None  # a seq from the future (another shop, a reset database): start afresh
        snapshot = None if after is not None else await self._read_snapshot(sub, client.principal)
        if client.subs.get(channel) is not sub:
            return  # unsubscribed (or the token expired) meanwhile
        client.send(json.dumps({"type": "subscribed", "channel": channel, "seq": stream.seq}))
        if snapshot is not None:
            after = self._snapshot_frame(client, sub, *snapshot)
        await self._catch_up(client, sub, stream, after)

    async def _send_snapshot(self, client: Client, sub: Subscription) -> int:
        return self._snapshot_frame(client, sub, *await self._read_snapshot(sub, client.principal))

    def _snapshot_frame(self, client: Client, sub: Subscription, seq: int, data) -> int:
        client.send(json.dumps({"type": "snapshot", "channel": sub.channel, "seq": seq, "data": data},
                               separators=(",", ":"), default=str))
        return seq

    def _deliver(self, client: Client, sub: Subscription, events: list[dict], after: int) -> int:
        for event in events:
            if event["seq"] > after:
                if sub.filter.matches(event):
                    client.send(event_frame(sub.channel, event))
                after = event["seq"]
        return after

    async def _catch_up(self, client: Client, sub: Subscription, stream: Stream, after: int) -> None:
        """Send what happened after ``after``, then go live.

        At most ``CATCH_UP_CHUNK`` events at a time, each chunk once the client's queue has room again."""
        while True:
            await client.wait_room()
            if client.closed or client.subs.get(sub.channel) is not sub:
                return
            buffered = stream.since(after)
            if buffered is not None and len(buffered) <= CATCH_UP_CHUNK:
                # the rest is in our buffer: send it and go live, with no await in between
                sub.last = self._deliver(client, sub, buffered, after)
                sub.live = True
                return
            if buffered is not None:
                after = self._deliver(client, sub, buffered[:CATCH_UP_CHUNK], after)
                continue
            page = await stream.source.read(after, CATCH_UP_CHUNK)
            items = page["items"]
            first = items[0]["seq"] if items else None
            if (first is not None and first > after + 1) or (first is None and page.get("oldest", 0) > after + 1):
                after = await self._send_snapshot(client, sub)  # older than the service keeps: start afresh
                continue
            if not items:
                sub.last = after
                sub.live = True
                return
            after = self._deliver(client, sub, items, after)

    # -- events from the services ---------------------------------------------------------------------
    def start(self, stream_name: str, seq: int) -> None:
        """The follower's first contact with a service: its log is at ``seq``.

        Clients that subscribed before (a restarted gateway's clients come back at once) went live at the
        seq they asked for; the events between that and ``seq`` never pass through ``publish``, so those
        subscriptions catch up from the service's log again.
        """
        stream = self.streams[stream_name]
        if seq <= stream.seq:
            return
        stream.seq = seq
        for channel, source in CHANNELS.items():
            if source != stream_name:
                continue
            for client in list(self._by_channel.get(channel, ())):
                sub = client.subs.get(channel)
                if sub is not None and sub.live and sub.last < seq:
                    sub.live = False
                    task = asyncio.ensure_future(self._resume(client, sub, stream))
                    self._resuming.add(task)
                    task.add_done_callback(self._resuming.discard)

    async def _resume(self, client: Client, sub: Subscription, stream: Stream) -> None:
        try:
            await self._catch_up(client, sub, stream, sub.last)
        except DomainError as exc:
            if client.subs.get(sub.channel) is sub:
                self.unsubscribe(client, sub.channel)
                client.send(json.dumps({"type": "error", "code": "unavailable", "channel": sub.channel,
                                        "message": f"{sub.channel} is unavailable now ({exc.message}); "
                                                   "subscribe again shortly with after"}))

    def publish(self, stream_name: str, event: dict) -> None:
        stream = self.streams[stream_name]
        if event["seq"] <= stream.seq:
            return  # already seen (a follower resumed with overlap)
        stream.seq = event["seq"]
        stream.buffer.append(event)
        for listener in self.listeners:
            listener(stream_name, event)
        for channel, source in CHANNELS.items():
            if source != stream_name:
                continue
            frame = None
            for client in self._by_channel.get(channel, ()):
                sub = client.subs.get(channel)
                if sub is None or not sub.live or event["seq"] <= sub.last:
                    continue
                sub.last = event["seq"]
                if sub.filter.matches(event):
                    frame = frame or event_frame(channel, event)
                    client.send(frame)

    def end_private(self, client: Client) -> None:
        for channel in [c for c in client.subs if c in ("orders", "orders:mine")]:
            self.unsubscribe(client, channel)
