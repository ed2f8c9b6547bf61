"""The gateway's ``/ws`` endpoint: the client protocol of the contract on top of the hub.

What one client may cost is bounded here: sockets per client address (refused at the upgrade with 429),
frames per socket (a client past its budget is closed with 1008), 64 KiB and 32 levels of JSON per frame."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import tornado.iostream
import tornado.websocket

from bookshop.auth import bearer
from bookshop.deps import GatewayDeps
from bookshop.handlers.common import given_request_id
from bookshop.net import client_address
from bookshop.services import errors
from bookshop.ws.channels import ChannelError, MessageBudget, authorize, check_known, parse_message, private
from bookshop.ws.hub import SLOW_CLIENT

log = logging.getLogger(__name__)

SEND_BUFFER = 32 * 1024  # bytes of socket send buffer per client (the kernel doubles it)
POLICY_VIOLATION = 1008
# seconds a client refused for having too many sockets open is asked to wait (its others must close first)
RETRY_AFTER = 10


class LiveSocket(tornado.websocket.WebSocketHandler):
    """One browser (or other) client. Anonymous until it sends ``{"op": "auth"}``."""

    deps: GatewayDeps

    def initialize(self, ctx=None, route="/ws", deps=None, **_):
        self.ctx = ctx
        self.deps = deps
        self.route = route
        self.hub = deps.hub
        self.client = None
        self._expiry = None
        self.address = None
        self.budget = MessageBudget()

    def set_default_headers(self) -> None:
        self.set_header("X-Request-ID", given_request_id(self.request.headers))

    def check_origin(self, origin: str) -> bool:
        return origin.rstrip("/") in self.ctx.settings.gateway_origins

    def prepare(self):
        # Tornado (6.6) lets a handshake through without asking check_origin when the Origin names the Host
        # it was sent to, or when the browser says Sec-Fetch-Site: same-origin; a DNS-rebound page passes
        # both. Only the configured origins may connect (clients that send no Origin are not browsers).
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.check_origin(origin):
            self._refuse(403, "origin_not_allowed", f"WebSocket origin {origin!r} is not allowed")
            return
        settings = self.ctx.settings
        self.address = client_address(self.request.remote_ip, self.request.headers.get("X-Forwarded-For"),
                                      settings.trusted_proxies)
        # Only counted in open(), the moment the hub takes the client on: tornado goes from here to open()
        # without yielding to the loop, so concurrent handshakes from one address cannot all slip through,
        # and one that fails in between (bad headers) leaves no count behind.
        if not self.hub.admits(self.address):
            self.ctx.metrics.count("websocket_refused_per_address")
            self.set_header("Retry-After", str(RETRY_AFTER))
            self._refuse(429, "too_many_connections",
                         f"at most {settings.ws_max_per_address} live sockets per client address; close one")

    def _refuse(self, status: int, code: str, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"code": code, "message": message,
                                          "request_id": self._headers.get("X-Request-ID")}}))

    async def get(self, *args, **kwargs):
        # tornado answers a handshake it cannot take in plain text; every answer of the gateway is JSON
        headers = self.request.headers
        connection = {part.strip().lower() for part in headers.get("Connection", "").split(",")}
        if (headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection
                or not headers.get("Sec-WebSocket-Key")):
            self._refuse(400, "bad_request", "GET /ws needs a WebSocket upgrade")
            return
        if headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):  # what tornado speaks
            self.set_header("Sec-WebSocket-Version", "13")
            self._refuse(426, "upgrade_required", "this server speaks WebSocket version 13")
            return
        await super().get(*args, **kwargs)

    def get_compression_options(self):
        # None: no permessage-deflate, so the hub's frames (framed once for every reader, see write_frame)
        # are exactly what tornado would send
        return None

    def open(self):
        # Bound what the kernel holds for one client (Linux grows it to 4 MiB, some 20,000 events): a client
        # that stops reading then fills its hub queue, and hears 4008, within seconds rather than minutes.
        sock = getattr(getattr(self.ws_connection, "stream", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.client = self.hub.join(self, self.address)
        self.deps.sockets.add(self)

    # Connection protocol used by the hub
    def write_frame(self, data: bytes):
        """Whole frames made by the hub (``hub.text_frame``), bytes as ``write_message`` would put on the wire
        but made once for every reader of an event, and without its task per message. Tornado's own frames
        (pings, pongs, the close) go through the same stream, never in the middle of one of ours: a frame
        of ours is either all in the kernel's buffer or handed to the stream whole."""
        conn = self.ws_connection
        if conn is None or conn.is_closing():
            raise tornado.iostream.StreamClosedError()
        stream = conn.stream
        if not stream.writing() and type(stream) is tornado.iostream.IOStream:
            # nothing is waiting in the stream: give the bytes to the kernel as the stream itself would
            # (IOStream.write_to_fd), without the future and the callback it makes per write
            try:
                sent = stream.socket.send(data)
            except OSError:  # no room now (or the peer is gone): the stream deals with it, as it would
                sent = 0
            if sent == len(data):
                return None
            data = memoryview(data)[sent:]
        return stream.write(data)

    def close_slow(self) -> None:
        self.ctx.metrics.count("websocket_slow_clients")
        self.close(SLOW_CLIENT, "too slow: resume with after")

    def error(self, code: str, message: str, channel: str | None = None) -> None:
        frame = {"type": "error", "code": code, "message": message}
        if channel is not None:
            frame["channel"] = channel  # which subscription failed, so a client can retry just that one
        self.client.send_text(json.dumps(frame))

    async def on_message(self, message):
        if self.client is None or self.client.closed:
            return  # being closed (too fast, too slow): what it still sends is not read
        if not self.budget.take():
            self._flooding()
            return
        try:
            msg = parse_message(message)
        except ChannelError as exc:
            self.error(exc.code, exc.message)
            return
        op = msg["op"]
        if op == "auth":
            await self._auth(msg["token"])
        elif op == "subscribe":
            await self._subscribe(msg["channel"], msg.get("after"), msg.get("epoch"))
        else:
            self._unsubscribe(msg["channel"])

    def _flooding(self) -> None:
        self.ctx.metrics.count("websocket_rate_limited")
        self.hub.leave(self.client)  # its subscriptions end now, not after the close handshake
        self.close(POLICY_VIOLATION, f"more than {MessageBudget.RATE:g} messages per second")

    def _unsubscribe(self, channel: str) -> None:
        try:
            check_known(channel)  # nothing is looked up, let alone kept, for a name that is no channel
        except ChannelError as exc:
            self.error(exc.code, exc.message, channel)
            return
        self.hub.unsubscribe(self.client, channel)
        self.client.send_text(json.dumps({"type": "unsubscribed", "channel": channel}))

    def _end_private(self) -> None:
        """The private subscriptions end, each acknowledged (the client did not ask: it is told)."""
        for channel in [c for c in self.client.subs if private(c)]:
            self.hub.unsubscribe(self.client, channel)
            self.client.send_text(json.dumps({"type": "unsubscribed", "channel": channel}))

    def _sign_out(self) -> None:
        self.client.principal = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._end_private()

    async def _auth(self, token: str) -> None:
        try:
            principal = await self.ctx.verifier.verify(bearer("Bearer " + token) or "")
        except errors.DomainError as exc:
            # whoever it was before, the socket is anonymous now: a failed auth never leaves an identity
            self._sign_out()
            if isinstance(exc, errors.Unavailable):  # the keys could not be loaded: the token may be fine
                self.error("unavailable", f"tokens cannot be checked now ({exc.message}); try again shortly")
            else:
                self.error(exc.code if exc.code in ("token_expired", "invalid_token") else "invalid_token",
                           exc.message)
            return
        previous = self.client.principal
        if previous is not None and (previous.sub, previous.role) != (principal.sub, principal.role):
            self._end_private()  # someone else now: the private subscriptions were cut for the previous user
        self.client.principal = principal
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(max(0.0, principal.exp - time.time()), self._expired)
        self.client.send_text(json.dumps({"type": "authenticated", "user_id": principal.sub, "role": principal.role}))

    def _expired(self) -> None:
        if self.client is None or self.client.closed:
            return
        self.client.principal = None
        self.hub.end_private(self.client)
        self.error("token_expired", "your token expired: send a fresh one with op auth and subscribe again")

    async def _subscribe(self, channel: str, after, epoch) -> None:
        try:
            filter_ = authorize(channel, self.client.principal)
        except ChannelError as exc:
            self.error(exc.code, exc.message, channel)
            return
        try:
            await self.hub.subscribe(self.client, channel, filter_, after, epoch)
        except errors.DomainError as exc:
            self.hub.unsubscribe(self.client, channel)
            self.error("unavailable", f"{channel} is unavailable now ({exc.message}); retry shortly", channel)

    def on_close(self):
        if self._expiry is not None:
            self._expiry.cancel()
        if self.client is not None:
            self.hub.leave(self.client)
        self.deps.sockets.discard(self)
