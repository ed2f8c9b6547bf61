"""The hub: follows the services' event streams and fans events out to subscribed clients.

Each stream keeps a bounded buffer of recent events; a client resuming from an older ``seq`` is served from
the owning service's event log (kept 48 h), and one resuming from before that gets a fresh snapshot. A
subscription catches up first and only then goes live; both happen on the event loop without an ``await``
between "caught up?" and "live", so no event can slip between them. Each client has a bounded queue: a
client too slow to drain it is closed with 4008 and resumes with ``after``.
"""
from __future__ import annotations

import asyncio
import collections
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

    __slots__ = ("conn", "subs", "queue", "writing", "closed", "principal", "room", "__weakref__")

    def __init__(self, conn: Connection):
        self.conn = conn
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
    def __init__(self, streams: dict[str, Stream], snapshot: Snapshotter, metrics=None):
        self.streams = streams
        self.snapshot = snapshot
        self.clients: set[Client] = set()
        self.listeners: list[Callable[[str, dict], None]] = []
        self.metrics = metrics
        # channel -> clients subscribed to it
        self._by_channel: dict[str, set[Client]] = collections.defaultdict(set)
        self._resuming: set[asyncio.Future] = set()

    # -- clients ------------------------------------------------------------------------------------
    def join(self, conn: Connection) -> Client:
        client = Client(conn)
        self.clients.add(client)
        self._gauge()
        return client

    def leave(self, client: Client) -> None:
        client.closed = True
        client._make_room()  # wakes a catch-up waiting for this client, which then ends
        for channel in client.subs:
            self._by_channel[channel].discard(client)
        client.subs.clear()
        self.clients.discard(client)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.gauge("websocket_clients", len(self.clients))

    def unsubscribe(self, client: Client, channel: str) -> None:
        client.subs.pop(channel, None)
        self._by_channel[channel].discard(client)

    async def subscribe(self, client: Client, channel: str, filter_: Filter, after: int | None) -> None:
        stream = self.streams[CHANNELS[channel]]
        self.unsubscribe(client, channel)
        sub = Subscription(channel, filter_)
        client.subs[channel] = sub
        self._by_channel[channel].add(client)
        # "subscribed" only once the service behind the channel answered (an error frame instead, if it is
        # down); the subscription is not live meanwhile, and the catch-up covers what happens in between
        if after is not None and after > stream.seq and after > (await stream.source.read(after, 1))["seq"]:
            after = None  # a seq from the future (another shop, a reset database): start afresh
        snapshot = None if after is not None else await self.snapshot(channel, sub, client.principal)
        if client.subs.get(channel) is not sub:
            return  # unsubscribed (or the token expired) meanwhile
        client.send(json.dumps({"type": "subscribed", "channel": channel, "seq": stream.seq}))
        if snapshot is not None:
            after = self._snapshot_frame(client, sub, *snapshot)
        await self._catch_up(client, sub, stream, after)

    async def _send_snapshot(self, client: Client, sub: Subscription) -> int:
        return self._snapshot_frame(client, sub, *await self.snapshot(sub.channel, sub, client.principal))

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
