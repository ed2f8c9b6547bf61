"""Reading one service's event stream (``/internal/events/ws``) for a follower that keeps its own position.

The gateway's ``ws.follower.StreamFollower`` feeds its hub and keeps the position in the hub's memory; the
recommendations service keeps its position in its database; both must see the stream's ``hello`` (head,
oldest retained event, epoch) to decide whether they can resume. This client only connects, with the service
token, and hands every frame over in order; the caller decides what they mean. The caller's ``sink`` is
awaited for each frame, so a slow caller slows the reading down instead of piling frames up in memory.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

import aiohttp

from bookshop.clients.base import Http, ServiceTokens
from bookshop.services.errors import Unavailable

log = logging.getLogger(__name__)


class EventStreamClient:
    def __init__(self, http: Http, base_url: str, tokens: ServiceTokens, heartbeat: float = 15.0):
        self.http = http
        self.url = base_url.rstrip("/").replace("http", "ws", 1) + "/internal/events/ws"
        self.tokens = tokens
        self.heartbeat = heartbeat
        self.socket: aiohttp.ClientWebSocketResponse | None = None  # while following

    def close(self) -> asyncio.Future | None:
        """End the stream being followed (``follow`` returns); the future of the closing, None if none was open."""
        if self.socket is not None and not self.socket.closed:
            return asyncio.ensure_future(self.socket.close())
        return None

    async def follow(self, after: int | None, epoch: str | None, sink: Callable[[dict], Awaitable[None]]) -> None:
        """Frames after ``after`` (None: from the head on), each given to ``sink``; returns when the stream
        ends. ``epoch`` is passed along for a server that checks it. Transport failures raise ``Unavailable``."""
        params = {}
        if after is not None:
            params["after"] = str(after)
        if epoch is not None:
            params["epoch"] = epoch
        try:
            token = await self.tokens.token()
            async with self.http.session.ws_connect(
                    self.url, params=params, headers={"Authorization": f"Bearer {token}"},
                    heartbeat=self.heartbeat, timeout=aiohttp.ClientWSTimeout(ws_close=2)) as ws:
                self.socket = ws
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    frame = json.loads(msg.data)
                    if isinstance(frame, dict):
                        await sink(frame)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise Unavailable(f"event stream at {self.url}: {exc.__class__.__name__}", retry_after=2) from None
        finally:
            self.socket = None
