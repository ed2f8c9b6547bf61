"""Follows one service's event stream (through ``clients.stream``) and feeds the hub, resuming from the last seq.

The first connection follows from the service's head on; later ones resume with ``after`` (the last seq the
hub saw) and ``epoch`` (the history it is in). The service's first frame, ``{"type": "hello", "seq",
"oldest", "epoch"}``, tells the hub where the log stands: another history than the one followed (a recreated
database, ``run.py new-epoch``, a head behind ours, events after ours gone) makes the hub start afresh, and the
follower then reconnects to follow the new history from its head."""
from __future__ import annotations

import asyncio
import logging

from bookshop.clients.stream import EventStreamClient
from bookshop.services.errors import Unavailable
from bookshop.services.periodic import Backoff, repeat

log = logging.getLogger(__name__)


class _NewHistory(Exception):
    """The hello names another history than the one followed: reconnect to follow it from its head."""


class StreamFollower:
    def __init__(self, hub, stream_name: str, client: EventStreamClient, on_state=None):
        self.hub = hub
        self.stream_name = stream_name
        self.client = client
        self.on_state = on_state
        self.connected = asyncio.Event()
        self._closing: asyncio.Future | None = None  # held: a task nobody holds may vanish
        self._backoff = Backoff(0.2, 5.0)
        self._again = False
        hub.streams[stream_name].recheck = self.recheck

    def recheck(self) -> None:
        """The hub read another epoch from the service than the one followed: reconnect and hear the hello."""
        self._closing = self.client.close()

    def _set_connected(self, value: bool) -> None:
        stream = self.hub.streams[self.stream_name]
        stream.connected = value
        if value:
            self.connected.set()
        else:
            self.connected.clear()
        if self.on_state:
            self.on_state(self.stream_name, value)

    async def _frame(self, frame: dict) -> None:
        if frame.get("type") == "hello":
            if self.hub.start(self.stream_name, frame["seq"], frame.get("epoch"), frame.get("oldest", 0)):
                raise _NewHistory()  # what this connection replays continues another history
            self._backoff.reset()
            self._set_connected(True)
        elif frame.get("type") == "event":
            frame.pop("type")
            self.hub.publish(self.stream_name, frame)
            # aiohttp hands over a burst of buffered frames without yielding: let the clients' writers run,
            # or a burst longer than their queues closes them all
            await asyncio.sleep(0)

    async def _follow_once(self) -> float:
        """One connection, until it ends; the seconds to wait before the next."""
        stream = self.hub.streams[self.stream_name]
        # reconnect at once after a new history was found (but not twice running: a service that answers
        # every hello with another history gets the usual back-off)
        hurry, self._again = self._again, False
        try:
            await self.client.follow(stream.seq if stream.followed else None,
                                     stream.epoch if stream.followed else None, self._frame)
        except _NewHistory:
            self._again = True
        except Unavailable as exc:
            log.debug("stream %s: %s", self.stream_name, exc)
        if stream.connected and not self._again:
            log.warning("lost the %s event stream; resuming after seq %d", self.stream_name, stream.seq)
        self._set_connected(False)  # the page cache forgets what the stream kept correct
        return 0 if self._again and not hurry else self._backoff.wait()

    async def run(self, stop: asyncio.Event) -> None:
        await repeat(stop, self._follow_once, f"following the {self.stream_name} stream", self._backoff.wait)
