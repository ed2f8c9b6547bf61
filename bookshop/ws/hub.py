"""The hub: follows the services' event streams and fans events out to subscribed clients.

Each stream keeps a bounded buffer of recent events; a client resuming from an older ``seq`` is served from
the owning service's event log (kept 48 h), and one resuming from before that gets a fresh snapshot. A
subscription catches up first and only then goes live; both happen on the event loop without an ``await``
between "caught up?" and "live", so no event can slip between them. Each client has a bounded queue: a
client too slow to drain it is closed with 4008 and resumes with ``after``.

A stream's ``epoch`` names one history of it (a new or recreated database, or a restored backup, starts
another, where the same ``seq`` means something else). Every subscription knows the epoch its ``seq`` is in:
a client resuming in another epoch, or from a ``seq`` beyond the head or before the retention, gets a fresh
snapshot, and so does every live subscriber when the follower finds the service on another history.

Fan-out is the hot path: an event on a channel is the same bytes for every reader, so it is made into one
WebSocket frame once and those bytes are written to every socket (``Connection.write_frame``); what queues
while a socket's write is in flight goes out as one write when it is flushed.

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
import struct
from typing import Any, Awaitable, Callable, Protocol

from bookshop.services.errors import DomainError
from bookshop.ws.channels import CHANNELS, Filter, private

log = logging.getLogger(__name__)

SLOW_CLIENT = 4008
QUEUE_LIMIT = 500
BUFFER = 5000
# a catch-up sends this many events at a time, each batch once the client's queue is this short again, so a
# client far behind is paced instead of being taken for a slow one (live events still have room)
CATCH_UP_CHUNK = QUEUE_LIMIT // 4


def text_frame(payload: bytes) -> bytes:
    """One whole WebSocket text frame (RFC 6455 section 5.2: FIN, opcode 1, the length, the payload), as a
    server sends it: unmasked, and uncompressed (the gateway negotiates no compression)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Connection(Protocol):
    def write_frame(self, data: bytes) -> asyncio.Future | None:
        """Put whole frames on the wire now: None when the socket took them all, else a future that is done
        when they are flushed. Raises ``OSError`` when the socket is closed (or closing)."""

    def close_slow(self) -> None: ...


def history_gap(page: dict, after: int) -> bool:
    """Does ``page`` (a read of a service's log after ``after``: ``{items, seq, oldest}``) show events after
    ``after`` that the log no longer keeps? ``seq`` is read after the items and ``oldest`` after ``seq``."""
    items = page["items"]
    if items:
        return items[0]["seq"] > after + 1
    oldest = page.get("oldest", 0)
    return page["seq"] > after and (oldest == 0 or oldest > after + 1)


def resumable(page: dict, after: int, epoch: str | None) -> bool:
    """May a reader at ``after`` in ``epoch`` (None: taken to be the current one) go on with ``page`` (a read
    of the service's log after ``after``)? Not in another epoch, nor beyond the head, nor before the oldest
    event kept: its ``after`` means nothing in this history, and it must start again from the state."""
    return (epoch is None or epoch == page.get("epoch")) and after <= page["seq"] and not history_gap(page, after)


class Stream:
    """One service's stream as the gateway has seen it."""

    def __init__(self, name: str, source, buffer: int = BUFFER):
        self.name = name
        self.source = source  # reads the service's log: async read(after, limit) -> {items, seq, oldest, epoch}
        self.seq = 0          # the last seq this gateway has seen
        self.epoch: str | None = None  # the history that seq is in (None until the follower first heard)
        self.followed = False  # the follower has had a hello from the service
        self.buffer: collections.deque[dict] = collections.deque(maxlen=buffer)
        self.connected = False
        self.channels = [channel for channel, source_ in CHANNELS.items() if source_ == name]
        # set by the follower: look at the service again (a read showed another epoch than the one followed)
        self.recheck: Callable[[], None] | None = None

    def since(self, after: int) -> list[dict] | None:
        """Buffered events after ``after``; None when the buffer does not reach back that far."""
        if after >= self.seq:
            return []
        if not self.buffer or self.buffer[0]["seq"] > after + 1:
            return None
        return [e for e in self.buffer if e["seq"] > after]


class Subscription:
    __slots__ = ("channel", "filter", "last", "live", "epoch")

    def __init__(self, channel: str, filter_: Filter):
        self.channel = channel
        self.filter = filter_
        self.last = 0
        self.live = False
        self.epoch: str | None = None  # the history ``last`` is in


class Client:
    """A connected WebSocket client: its subscriptions and its bounded outgoing queue of whole frames."""

    __slots__ = ("conn", "address", "subs", "queue", "writing", "closed", "principal", "room", "__weakref__")

    def __init__(self, conn: Connection, address: str | None = None):
        self.conn = conn
        self.address = address  # the client address its socket is counted under (None: not counted)
        self.subs: dict[str, Subscription] = {}
        # a list, not a deque: an idle client's empty list costs 56 bytes, a deque 760 (a thousand idle
        # clients are the normal case); the queue never holds more than QUEUE_LIMIT frames
        self.queue: list[bytes] = []
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

    def send_text(self, text: str) -> None:
        self.send(text_frame(text.encode()))

    def send(self, frame: bytes) -> None:
        """Send one whole frame: now if the socket is not busy, else once what it is writing is flushed."""
        if self.closed:
            return
        if self.writing:
            if len(self.queue) >= QUEUE_LIMIT:
                self.closed = True
                self.queue.clear()
                self._make_room()
                self.conn.close_slow()
                return
            self.queue.append(frame)
            return
        self._write(frame)

    def _write(self, data: bytes) -> None:
        # no task and no future of ours per client per event: most writes go straight into the kernel's
        # buffer; a socket that cannot take them all says when it has flushed, and meanwhile our bounded
        # queue (not the socket's buffer) holds what comes next
        try:
            pending = self.conn.write_frame(data)
        except OSError:  # the socket is closed: this client is over
            self._fail()
            return
        if pending is not None:
            self.writing = True
            pending.add_done_callback(self._written)

    def _written(self, pending: asyncio.Future) -> None:
        self.writing = False
        if pending.cancelled() or pending.exception() is not None:
            self._fail()
            return
        if self.queue and not self.closed:
            queued, self.queue = self.queue, []
            self._write(queued[0] if len(queued) == 1 else b"".join(queued))  # one write for all that queued
        self._make_room()

    def _fail(self) -> None:
        self.writing = False
        self.closed = True
        self.queue.clear()
        self._make_room()


def event_frame(channel: str, event: dict) -> str:
    return json.dumps({"type": "event", "channel": channel, "seq": event["seq"], "event": event["event"],
                       "data": event["data"], "at": event["at"]}, separators=(",", ":"))


#: ``(channel, subscription, principal) -> (seq, data)`` or ``(seq, data, epoch)``: a channel's state now
Snapshotter = Callable[[str, Subscription, Any], Awaitable[tuple]]


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
        # channel -> its readers and their subscriptions; a channel is here only while someone reads it
        self._by_channel: dict[str, dict[Client, Subscription]] = {}
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
            readers.pop(client, None)
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

    async def _head(self, stream: Stream) -> dict:
        """The service's log as it is now: ``{seq, oldest, epoch}`` (and no more than one item)."""
        return await self._shared_read(("head", stream.name), lambda: stream.source.read(2**62, 1))

    async def _read_snapshot(self, sub: Subscription, principal, epoch: str | None) -> tuple[int, Any, str | None]:
        """The channel's state: ``(seq, data, epoch)``. ``epoch`` is the freshest epoch known of the stream,
        for a snapshot whose service does not say which history its ``seq`` is in."""
        # the snapshot depends on the channel and the filter alone (orders:mine: the user's own orders); a
        # subscriber joining a read started earlier is still exact, as it catches up from the snapshot's seq
        got = await self._shared_read(("snapshot", sub.channel, sub.filter),
                                      lambda: self.snapshot(sub.channel, sub, principal))
        seq, data = got[0], got[1]
        own = got[2] if len(got) > 2 else None
        if own is None and epoch is None:
            epoch = (await self._head(self.streams[CHANNELS[sub.channel]])).get("epoch")
        return seq, data, own if own is not None else epoch

    async def subscribe(self, client: Client, channel: str, filter_: Filter, after: int | None,
                        epoch: str | None = None) -> None:
        """``after`` (None: a snapshot first) is a seq in ``epoch`` (None: in the current one)."""
        stream = self.streams[CHANNELS[channel]]
        self.unsubscribe(client, channel)
        sub = Subscription(channel, filter_)
        client.subs[channel] = sub
        self._by_channel.setdefault(channel, {})[client] = sub
        # "subscribed" only once the service behind the channel answered (an error frame instead, if it is
        # down); the subscription is not live meanwhile, and the catch-up covers what happens in between
        head, current = stream.seq, stream.epoch
        if after is not None:
            other = epoch is not None and epoch != current
            if not stream.followed or after > head or (other and not stream.connected):
                # what this gateway saw does not settle it (not following yet, a seq it has not seen, or
                # another epoch while the follower is away): the service does
                page = await self._head(stream)
                head, current = page["seq"], page.get("epoch")
            if after > head or (epoch is not None and epoch != current):
                after = None  # a seq of another history (a reset database, another shop): start afresh
        sub.epoch = current
        snapshot = None if after is not None else await self._read_snapshot(sub, client.principal, current)
        if client.subs.get(channel) is not sub:
            return  # unsubscribed (or the token expired) meanwhile
        if snapshot is not None:
            sub.epoch = snapshot[2]
            if sub.epoch != current:
                head = snapshot[0]
        client.send_text(json.dumps({"type": "subscribed", "channel": channel, "seq": head, "epoch": sub.epoch}))
        if snapshot is not None:
            after = self._snapshot_frame(client, sub, *snapshot)
        await self._catch_up(client, sub, stream, after)

    async def _send_snapshot(self, client: Client, sub: Subscription, epoch: str | None) -> int | None:
        """A fresh snapshot for a subscription already made; None when it ended while it was read."""
        snapshot = await self._read_snapshot(sub, client.principal, epoch)
        if client.closed or client.subs.get(sub.channel) is not sub:
            return None
        return self._snapshot_frame(client, sub, *snapshot)

    def _snapshot_frame(self, client: Client, sub: Subscription, seq: int, data, epoch: str | None) -> int:
        sub.epoch = epoch
        client.send_text(json.dumps({"type": "snapshot", "channel": sub.channel, "seq": seq, "epoch": epoch,
                                     "data": data}, separators=(",", ":"), default=str))
        return seq

    def _deliver(self, client: Client, sub: Subscription, events: list[dict], after: int) -> int:
        for event in events:
            if event["seq"] > after:
                if sub.filter.matches(event):
                    client.send_text(event_frame(sub.channel, event))
                after = event["seq"]
        return after

    async def _catch_up(self, client: Client, sub: Subscription, stream: Stream, after: int) -> None:
        """Send what happened after ``after``, then go live.

        At most ``CATCH_UP_CHUNK`` events at a time, each chunk once the client's queue has room again."""
        while True:
            await client.wait_room()
            if client.closed or client.subs.get(sub.channel) is not sub:
                return
            buffered = stream.since(after) if sub.epoch == stream.epoch else None
            if buffered is not None and len(buffered) <= CATCH_UP_CHUNK:
                # the rest is in our buffer: send it and go live, with no await in between
                sub.last = self._deliver(client, sub, buffered, after)
                sub.live = True
                return
            if buffered is not None:
                after = self._deliver(client, sub, buffered[:CATCH_UP_CHUNK], after)
                continue
            page = await stream.source.read(after, CATCH_UP_CHUNK)
            if page.get("epoch") != sub.epoch or history_gap(page, after):
                # another history, or older than the service keeps: start afresh
                after = await self._send_snapshot(client, sub, page.get("epoch"))
                if after is None:
                    return
                continue
            if not page["items"]:
                sub.last = after
                sub.live = True
                if sub.epoch != stream.epoch and stream.followed and stream.recheck is not None:
                    # the follower is on another history than the service's now: until it looks again
                    # (which brings this subscription up to date), publish() passes this one by
                    stream.recheck()
                return
            after = self._deliver(client, sub, page["items"], after)

    # -- events from the services ---------------------------------------------------------------------
    def start(self, stream_name: str, seq: int, epoch: str | None = None, oldest: int = 0) -> bool:
        """The follower heard from the service (its hello): the log is at ``seq`` in ``epoch`` and keeps the
        events from ``oldest`` on (0: none). True when that is another history than the one followed so far
        (another epoch, a head behind ours, the events after ours gone): the hub then starts afresh from
        ``seq`` in ``epoch``, every live subscriber gets a fresh snapshot, and the follower must follow from
        ``seq`` (what it asked for meant something else).

        On the first hello, live subscriptions behind ``seq`` catch up from the service's log: those made
        before it (a restarted gateway's clients come back at once) went live at the seq they asked for, and
        the events between that and ``seq`` never pass through ``publish``. Any hello gives a fresh snapshot
        to live subscriptions on another epoch than the stream's.
        """
        stream = self.streams[stream_name]
        first = not stream.followed
        reset = not first and (epoch != stream.epoch or seq < stream.seq
                               or history_gap({"items": [], "seq": seq, "oldest": oldest}, stream.seq))
        stream.followed = True
        if reset:
            log.warning("the %s stream is another history now (epoch %s at seq %d; was %s at %d): fresh snapshots",
                        stream_name, epoch, seq, stream.epoch, stream.seq)
            stream.buffer.clear()
            stream.seq = seq
        elif first and seq > stream.seq:
            stream.seq = seq
        stream.epoch = epoch
        for channel in stream.channels:
            for client, sub in list(self._by_channel.get(channel, {}).items()):
                if not sub.live:
                    continue  # still catching up: its own loop compares epochs and seqs
                if reset or sub.epoch != epoch:
                    sub.live = False
                    self._spawn(self._resume(client, sub, stream, fresh=True))
                elif first and sub.last < seq:
                    sub.live = False
                    self._spawn(self._resume(client, sub, stream))
        return reset

    def _spawn(self, work: Awaitable) -> None:
        task = asyncio.ensure_future(work)
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)

    async def _resume(self, client: Client, sub: Subscription, stream: Stream, fresh: bool = False) -> None:
        try:
            after = await self._send_snapshot(client, sub, stream.epoch) if fresh else sub.last
            if after is not None:
                await self._catch_up(client, sub, stream, after)
        except DomainError as exc:
            if client.subs.get(sub.channel) is sub:
                self.unsubscribe(client, sub.channel)
                client.send_text(json.dumps({"type": "error", "code": "unavailable", "channel": sub.channel,
                                             "message": f"{sub.channel} is unavailable now ({exc.message}); "
                                                        "subscribe again shortly with after"}))

    def publish(self, stream_name: str, event: dict) -> None:
        stream = self.streams[stream_name]
        seq = event["seq"]
        if seq <= stream.seq:
            return  # already seen (a follower resumed with overlap)
        stream.seq = seq
        stream.buffer.append(event)
        for listener in self.listeners:
            listener(stream_name, event)
        epoch = stream.epoch
        owner = event.get("user_id")
        for channel in stream.channels:
            readers = self._by_channel.get(channel)
            if not readers:
                continue
            frame = None
            # a copy: nothing here should change the readers, but a socket closing under us must not end
            # the fan-out for everyone after it
            for client, sub in list(readers.items()):
                if not sub.live or seq <= sub.last or sub.epoch != epoch:
                    continue
                sub.last = seq
                wanted = sub.filter.user_id
                if wanted is not None and wanted != owner:
                    continue
                if frame is None:  # framed once, the same bytes for every reader of the channel
                    frame = text_frame(event_frame(channel, event).encode())
                client.send(frame)

    def end_private(self, client: Client) -> None:
        for channel in [c for c in client.subs if private(c)]:
            self.unsubscribe(client, channel)


class Waiters:
    """Wakes long-poll requests when the hub sees an event of their stream."""

    def __init__(self):
        self._events: dict[str, asyncio.Event] = {}

    def on_event(self, stream: str, event: dict) -> None:
        waiter = self._events.pop(stream, None)
        if waiter is not None:
            waiter.set()

    async def wait(self, stream: str, timeout: float) -> None:
        waiter = self._events.setdefault(stream, asyncio.Event())
        try:
            await asyncio.wait_for(waiter.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass


async def long_poll(hub: Hub, waiters: Waiters, channel: str, filter_: Filter, after: int, epoch: str | None,
                    wait: float, limit: int) -> dict:
    """``GET /api/v1/events``: the events of ``channel`` after ``after`` that ``filter_`` lets through, waiting
    up to ``wait`` seconds for one when there are none yet. ``reset`` when ``after`` is not a position in the
    stream's current history (another epoch, beyond the head, older than the log keeps)."""
    name = CHANNELS[channel]
    stream = hub.streams[name]
    page = await stream.source.read(after, limit)
    if resumable(page, after, epoch) and not page["items"] and wait:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while loop.time() < deadline and stream.seq <= after:
            await waiters.wait(name, deadline - loop.time())
        page = await stream.source.read(after, limit)
    if not resumable(page, after, epoch):
        return {"items": [], "seq": page["seq"], "epoch": page.get("epoch"), "reset": True}
    items = [{"type": "event", "channel": channel, "seq": e["seq"], "event": e["event"], "data": e["data"],
              "at": e["at"]} for e in page["items"] if filter_.matches(e)]
    # an empty page resumes from ``after``: the log's latest seq is read after its items, so it may already
    # count an event the page missed
    last = page["items"][-1]["seq"] if page["items"] else after
    return {"items": items, "seq": last, "epoch": page.get("epoch"), "reset": False}
