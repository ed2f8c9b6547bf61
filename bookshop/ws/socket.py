"""The gateway's ``/ws`` endpoint: the client protocol of the contract on top of the hub."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import tornado.websocket

from bookshop.auth import bearer
from bookshop.services import errors
from bookshop.ws.channels import ChannelError, authorize, parse_message
from bookshop.ws.hub import SLOW_CLIENT

log = logging.getLogger(__name__)


class LiveSocket(tornado.websocket.WebSocketHandler):
    """One browser (or other) client. Anonymous until it sends ``{"op": "auth"}``."""

    def initialize(self, ctx=None, route="/ws", **_):
        self.ctx = ctx
        self.route = route
        self.hub = ctx.deps["hub"]
        self.client = None
        self._expiry = None

    def check_origin(self, origin: str) -> bool:
        return origin.rstrip("/") in self.ctx.settings.gateway_origins

    def get_compression_options(self):
        return None

    def open(self):
        self.client = self.hub.join(self)
        self.ctx.deps["sockets"].add(self)

    # Connection protocol used by the hub
    async def write_frame(self, frame: str) -> None:
        await self.write_message(frame)

    def close_slow(self) -> None:
        self.ctx.metrics.count("websocket_slow_clients")
        self.close(SLOW_CLIENT, "too slow: resume with after")

    def error(self, code: str, message: str) -> None:
        self.client.send(json.dumps({"type": "error", "code": code, "message": message}))

    async def on_message(self, message):
        try:
            msg = parse_message(message)
        except ChannelError as exc:
            self.error(exc.code, exc.message)
            return
        op = msg["op"]
        if op == "auth":
            await self._auth(msg["token"])
        elif op == "subscribe":
            await self._subscribe(msg["channel"], msg.get("after"))
        else:
            self.hub.unsubscribe(self.client, msg["channel"])
            self.client.send(json.dumps({"type": "unsubscribed", "channel": msg["channel"]}))

    async def _auth(self, token: str) -> None:
        try:
            principal = await self.ctx.verifier.verify(bearer("Bearer " + token) or "")
        except errors.DomainError as exc:
            self.error(exc.code if exc.code in ("token_expired", "invalid_token") else "invalid_token",
                       exc.message)
            return
        self.client.principal = principal
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(max(0.0, principal.exp - time.time()), self._expired)
        self.client.send(json.dumps({"type": "authenticated", "user_id": principal.sub, "role": principal.role}))

    def _expired(self) -> None:
        if self.client is None or self.client.closed:
            return
        self.client.principal = None
        self.hub.end_private(self.client)
        self.error("token_expired", "your token expired: send a fresh one with op auth and subscribe again")

    async def _subscribe(self, channel: str, after) -> None:
        try:
            filter_ = authorize(channel, self.client.principal)
        except ChannelError as exc:
            self.error(exc.code, exc.message)
            return
        try:
            await self.hub.subscribe(self.client, channel, filter_, after)
        except errors.DomainError as exc:
            self.hub.unsubscribe(self.client, channel)
            self.error("unavailable", f"{channel} is unavailable now ({exc.message}); retry shortly")

    def on_close(self):
        if self._expiry is not None:
            self._expiry.cancel()
        if self.client is not None:
            self.hub.leave(self.client)
        self.ctx.deps["sockets"].discard(self)
