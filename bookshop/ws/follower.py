"""Follows one service's event stream over a WebSocket and feeds the hub, resuming from the last seq.

The first connection follows from the service's head on; later ones resume with ``after`` (the last seq the
hub saw) and ``epoch`` (the history it is in). The service's first frame, ``{"type": "hello", "seq",
"oldest", "epoch"}``, tells the hub where the log stands: another history than the one followed (a recreated
database, ``run.py new-epoch``, a head behind ours, events after ours gone) makes the hub start afresh, and the
follower then reconnects to follow the new history from its head."""
from __future__ import annotations

import asyncio
import json
import logging
import random

import aiohttp

from bookshop.services.errors import Unavailable

log = logging.getLogger(__name__)


class StreamFollower:
    def __init__(self, hub, stream_name: str, base_url: str, http, tokens, on_state=None):
        self.hub = hub
        self.stream_name = stream_name
        self.url = base_url.rstrip("/").replace("http", "ws", 1) + "/internal/events/ws"
        self.http = http
        self.tokens = tokens
        self.on_state = on_state
        self.connected = asyncio.Event()
        self._socket = None  # the service's stream while connected
        self._closing: asyncio.Future | None = None
        hub.streams[stream_name].recheck = self.recheck

    def recheck(self) -> None:
        """The hub read another epoch from the service than the one followed: reconnect and hear the hello."""
        if self._socket is not None and not self._socket.closed:
            self._closing = asyncio.ensure_future(self._socket.close())  # held: a task nobody holds may vanish

    def _set_connected(self, value: bool) -> None:
        stream = self.hub.streams[self.stream_name]
        stream.connected = value
        if value:
            self.connected.set()
        else:
            self.connected.clear()
        if self.on_state:
            self.on_state(self.stream_name, value)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        stream = self.hub.streams[self.stream_name]
        again = False
        while not stop.is_set():
            # reconnect at once after a new history was found (but not twice running: a service that
            # answers every hello with another history gets the usual back-off)
            hurry, again = again, False
            try:
                token = await self.tokens.token()
                params = {}
                if stream.followed:
                    params["after"] = str(stream.seq)
                    if stream.epoch is not None:
                        params["epoch"] = stream.epoch
                async with self.http.session.ws_connect(
                        self.url, params=params, headers={"Authorization": f"Bearer {token}"},
                        heartbeat=15, timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
                    self._socket = ws
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        frame = json.loads(msg.data)
                        if frame.get("type") == "hello":
                            if self.hub.start(self.stream_name, frame["seq"], frame.get("epoch"),
                                              frame.get("oldest", 0)):
                                again = True  # what this connection replays continues another history
                                break
                            backoff = 0.2
                            self._set_connected(True)
                        elif frame.get("type") == "event":
                            frame.pop("type")
                            self.hub.publish(self.stream_name, frame)
                            # aiohttp hands over a burst of buffered frames without yielding: let the
                            # clients' writers run, or a burst longer than their queues closes them all
                            await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, Unavailable, ValueError, OSError) as exc:
                log.debug("stream %s: %s", self.stream_name, exc)
            finally:
                self._socket = None
            if stream.connected and not again:
                log.warning("lost the %s event stream; resuming after seq %d", self.stream_name, stream.seq)
            self._set_connected(False)  # the page cache forgets what the stream kept correct
            if again and not hurry:
                continue
            try:
                await asyncio.wait_for(stop.wait(), backoff * (0.5 + random.random()))
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, 5.0)
