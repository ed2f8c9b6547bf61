"""The gateway's ``/ws`` endpoint: the client protocol of the contract on top of the hub."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid

import tornado.websocket

from bookshop.auth import bearer
from bookshop.handlers.base import REQUEST_ID
from bookshop.services import errors
from bookshop.ws.channels import ChannelError, authorize, parse_message, private
from bookshop.ws.hub import SLOW_CLIENT

log = logging.getLogger(__name__)

SEND_BUFFER = 32 * 1024  # bytes of socket send buffer per client (the kernel doubles it)


class LiveSocket(tornado.websocket.WebSocketHandler):
    """One browser (or other) client. Anonymous until it sends ``{"op": "auth"}``."""

    def initialize(self, ctx=None, route="/ws", **_):
        self.ctx = ctx
        self.route = route
        self.hub = ctx.deps["hub"]
        self.client = None
        self._expiry = None

    def set_default_headers(self) -> None:
        given = self.request.headers.get("X-Request-ID", "")
        self.set_header("X-Request-ID", given if REQUEST_ID.match(given) else uuid.uuid4().hex)

    def check_origin(self, origin: str) -> bool:
        return origin.rstrip("/") in self.ctx.settings.gateway_origins

    def prepare(self):
        # Tornado (6.6) lets a handshake through without asking check_origin when the Origin names the Host
        # it was sent to, or when the browser says Sec-Fetch-Site: same-origin; a DNS-rebound page passes
        # both. Only the configured origins may connect (clients that send no Origin are not browsers).
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.check_origin(origin):
            self.set_status(403)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": {"code": "origin_not_allowed",
                                              "message": f"WebSocket origin {origin!r} is not allowed"}}))

    def get_compression_options(self):
        return None

    def open(self):
        # Bound what the kernel holds for one client (Linux grows it to 4 MiB, some 20,000 events): a client
        # that stops reading then fills its hub queue, and hears 4008, within seconds rather than minutes.
        sock = getattr(getattr(self.ws_connection, "stream", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.client = self.hub.join(self)
        self.ctx.deps["sockets"].add(self)

    # Connection protocol used by the hub
    def write_frame(self, frame: str):
        # tornado writes to the socket inside write_message; the future says when it is flushed
        return self.write_message(frame)

    def close_slow(self) -> None:
        self.ctx.metrics.count("websocket_slow_clients")
        self.close(SLOW_CLIENT, "too slow: resume with after")

    def error(self, code: str, message: str, channel: str | None = None) -> None:
        frame = {"type": "error", "code": code, "message": message}
        if channel is not None:
            frame["channel"] = channel  # which subscription failed, so a client can retry just that one
        self.client.send(json.dumps(frame))

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
        previous = self.client.principal
        if previous is not None and (previous.sub, previous.role) != (principal.sub, principal.role):
            # someone else now: the private subscriptions were cut for the previous user
            for channel in [c for c in self.client.subs if private(c)]:
                self.hub.unsubscribe(self.client, channel)
                self.client.send(json.dumps({"type": "unsubscribed", "channel": channel}))
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
            self.error(exc.code, exc.message, channel)
            return
        try:
            await self.hub.subscribe(self.client, channel, filter_, after)
        except errors.DomainError as exc:
            self.hub.unsubscribe(self.client, channel)
            self.error("unavailable", f"{channel} is unavailable now ({exc.message}); retry shortly", channel)

    def on_close(self):
        if self._expiry is not None:
            self._expiry.cancel()
        if self.client is not None:
            self.hub.leave(self.client)
        self.ctx.deps["sockets"].discard(self)
