"""Follows one service's event stream over a WebSocket and feeds the hub, resuming from the last seq."""
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
        first = True
        while not stop.is_set():
            try:
                token = await self.tokens.token()
                params = {} if first and stream.seq == 0 else {"after": str(stream.seq)}
                async with self.http.session.ws_connect(
                        self.url, params=params, headers={"Authorization": f"Bearer {token}"},
                        heartbeat=15, timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        frame = json.loads(msg.data)
                        if frame.get("type") == "hello":
                            if first and stream.seq == 0:
                                self.hub.start(self.stream_name, frame["seq"])
                            first = False
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
            if stream.connected:
                log.warning("lost the %s event stream; resuming after seq %d", self.stream_name, stream.seq)
            self._set_connected(False)
            try:
                await asyncio.wait_for(stop.wait(), backoff * (0.5 + random.random()))
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, 5.0)
