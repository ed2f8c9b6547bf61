"""Gateway routes: the public API (forwarded to the owning services), the aggregated book page, the
long-poll event fallback, the WebSocket hub and the dashboard."""
from __future__ import annotations

import asyncio
import json
import logging
import os

import tornado.web

from bookshop.deps import GatewayDeps
from bookshop.handlers.base import BaseHandler
from bookshop.handlers.common import given_request_id, int_arg
from bookshop.handlers.live import LiveSocket
from bookshop.net import client_address
from bookshop.services import errors
from bookshop.services.isbn import normalized
from bookshop.ws.channels import ChannelError, authorize, valid_epoch
from bookshop.ws.hub import long_poll

log = logging.getLogger(__name__)

STATIC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "static")
OPENAPI = os.path.join(os.path.dirname(os.path.dirname(__file__)), "openapi.yaml")
FORWARDED_REQUEST_HEADERS = ("Authorization", "Idempotency-Key", "Content-Type", "Accept")
FORWARDED_RESPONSE_HEADERS = ("Retry-After", "Location")


class GatewayBase(BaseHandler):
    """Base of the gateway routes: their collaborators are ``self.deps``."""
    deps: GatewayDeps


class ProxyHandler(GatewayBase):
    """Forwards a public API call to the service that owns it, as it came (token, body, query).

    ``methods`` are the methods the route has upstream: any other is 405 here, before authentication, as
    on every service (not a 401 for a method that does not exist)."""

    def initialize(self, ctx=None, route="?", deps=None, upstream: str = "", public=frozenset(),
                   methods=frozenset(), **_):
        super().initialize(ctx=ctx, route=route, deps=deps)
        self.upstream = upstream
        self.public = public
        self.methods = methods

    async def check(self) -> None:
        if self.request.method not in self.methods:
            raise tornado.web.HTTPError(405)
        await super().check()

    def public_anonymous(self) -> bool:
        # check() above, decided without awaiting (see BaseHandler.public_anonymous)
        if type(self).check is not ProxyHandler.check:
            return False
        return self.request.method in self.methods and self._public_and_anonymous()

    async def forward(self, *_args):
        client = self.deps.upstreams.owner(self.upstream)
        headers = {h: self.request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in self.request.headers}
        # the upstream believes this header only from us (we send a service token): the client's address,
        # behind the proxies BOOKSHOP_TRUSTED_PROXIES names
        headers["X-Forwarded-For"] = client_address(self.request.remote_ip, self.request.headers.get("X-Forwarded-For"),
                                                    self.ctx.settings.trusted_proxies)
        if self.upstream == "users":
            headers["X-Service-Authorization"] = f"Bearer {await self.ctx.tokens.token()}"
        body = self.body if self.request.method in ("POST", "PUT", "PATCH") else None
        reply = await client.raw(self.request.method, self.request.path, self.request.query, headers, body)
        self.set_status(reply.status)
        for name in FORWARDED_RESPONSE_HEADERS:
            if name in reply.headers:
                self.set_header(name, reply.headers[name])
        if self.request.method in ("PATCH", "DELETE", "POST") and reply.status < 300:
            self.deps.cache.forget_path(self.request.path)
        if reply.status == 204:
            self.finish()
        else:
            self.finish(reply.body)

    get = post = put = patch = delete = forward


class BookPageHandler(ProxyHandler):
    """``GET /api/v1/books/{isbn}``: the book with its stock and recommendations, fetched in parallel;
    still 200 with those parts null when their service is down. Warm answers come from a cache kept
    correct by the services' event streams."""

    async def get(self, raw_isbn):
        isbn = normalized(raw_isbn)
        cache = self.deps.cache
        personal = self.principal is not None and self.principal.role == "customer"
        token = self.request.headers["Authorization"].split(" ", 1)[1] if personal else None
        warm = None if personal else cache.peek(isbn)
        if warm is not None:  # the common case: everything cached, no task to schedule
            book, stock, recs = warm
        else:
            book, stock, recs = await asyncio.gather(cache.book(isbn), cache.stock(isbn),
                                                     cache.recommendations(isbn, token))
        if book is None:
            raise errors.NotFound("no such book", code="book_not_found")
        self.finish(b"".join((book[:-1], b',"stock":', stock, b',"recommendations":', recs, b"}")))


class EventsHandler(GatewayBase):
    """``GET /api/v1/events?channel=&after=&epoch=&wait=&limit=``: the long-poll fallback of the live stream.

    Answers ``{items, seq, epoch, reset}``; the client goes on with ``after`` = ``seq`` and that ``epoch``.
    ``reset: true`` (no items) when ``after`` is not a position in the stream's current history (another
    epoch, beyond the head, or older than the log keeps): the client re-reads the state and goes on from
    ``seq``."""

    public = {"GET"}

    async def get(self):
        channel = self.get_query_argument("channel", "")
        try:
            filter_ = authorize(channel, self.principal)
        except ChannelError as exc:
            if exc.code == "forbidden" and self.principal is None:
                raise errors.Unauthenticated(exc.message) from None
            if exc.code == "forbidden":
                raise errors.Forbidden(exc.message) from None
            raise errors.InvalidInput(f"channel: {exc.message}", code="invalid_field",
                                      details={"field": "channel"}) from None
        after = int_arg(self, "after", 0, 0, 2**62)
        epoch = self.get_query_argument("epoch", None)
        if epoch is not None and not valid_epoch(epoch):
            raise errors.InvalidInput("epoch must be the epoch of an earlier answer", code="invalid_field",
                                      details={"field": "epoch"})
        wait = int_arg(self, "wait", 0, 0, 30)
        limit = int_arg(self, "limit", 100, 1, 500)
        self.write_json(await long_poll(self.deps.hub, self.deps.waiters, channel, filter_, after, epoch, wait,
                                        limit))


class OpenApiHandler(GatewayBase):
    """``GET /api/v1/openapi.json``: the API description, from the one source file (``docs/openapi.yaml``,
    shipped in the package as ``bookshop/openapi.yaml``), read and turned into JSON once per process."""

    public = {"GET"}
    _document: bytes | None = None

    @classmethod
    def document(cls) -> bytes:
        if cls._document is None:
            import yaml
            with open(OPENAPI, encoding="utf-8") as fh:
                cls._document = json.dumps(yaml.safe_load(fh), separators=(",", ":")).encode()
        return cls._document

    def get(self):
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(self.document())


class DashboardHandler(GatewayBase):
    public = {"GET", "HEAD"}

    def get(self):
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        # 'self' covers the page's own ws:/wss: origin (CSP Level 3); frame-ancestors and X-Frame-Options keep
        # the page (its Ship, Cancel and Restock buttons) out of other sites' frames
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; "
                        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
        self.set_header("X-Frame-Options", "DENY")
        with open(os.path.join(STATIC, "index.html"), "rb") as fh:
            self.finish(fh.read())


class StaticHandler(tornado.web.StaticFileHandler):
    """The dashboard's own assets (shipped in the package: no CDN)."""

    def initialize(self, ctx=None, route="?", **_):
        self.ctx = ctx
        self.route = route
        super().initialize(path=STATIC)

    def set_default_headers(self) -> None:
        self.set_header("X-Request-ID", given_request_id(self.request.headers))
        self.set_header("X-Content-Type-Options", "nosniff")


def routes() -> list[tuple]:
    isbn = r"([^/]{1,64})"
    # pattern, owner, the methods the route has, those of them anyone may call
    table = [
        (r"/api/v1/users", "users", {"POST"}, {"POST"}),
        (r"/api/v1/users/me", "users", {"GET"}, set()),
        (r"/api/v1/users/me/password", "users", {"POST"}, set()),
        (r"/api/v1/tokens", "users", {"POST"}, {"POST"}),
        (r"/api/v1/tokens/refresh", "users", {"POST"}, {"POST"}),
        (r"/api/v1/tokens/revoke", "users", {"POST"}, {"POST"}),
        (r"/api/v1/books", "catalog", {"GET", "POST"}, {"GET"}),
        (rf"/api/v1/inventory/{isbn}", "inventory", {"GET"}, {"GET"}),
        (rf"/api/v1/inventory/{isbn}/restock", "inventory", {"POST"}, set()),
        (r"/api/v1/cart", "orders", {"GET"}, set()),
        (rf"/api/v1/cart/items/{isbn}", "orders", {"PUT"}, set()),
        (r"/api/v1/orders", "orders", {"GET", "POST"}, set()),
        (r"/api/v1/orders/([^/]+)", "orders", {"GET"}, set()),
        (r"/api/v1/orders/([^/]+)/(cancel|ship)", "orders", {"POST"}, set()),
        (r"/api/v1/orders/([^/]+)/payments", "orders", {"GET"}, set()),
        (r"/api/v1/recommendations", "recommendations", {"GET"}, {"GET"}),
    ]
    # the book page first: Tornado tries the patterns in order for each request, and it is the busiest route
    out = [(rf"/api/v1/books/{isbn}", BookPageHandler,
            {"upstream": "catalog", "methods": frozenset({"GET", "PATCH", "DELETE"}), "public": frozenset({"GET"})})]
    out += [(pattern, ProxyHandler, {"upstream": upstream, "methods": frozenset(methods), "public": frozenset(public)})
            for pattern, upstream, methods, public in table]
    out += [
        (r"/api/v1/events", EventsHandler),
        (r"/api/v1/openapi.json", OpenApiHandler),
        (r"/ws", LiveSocket),
        (r"/", DashboardHandler),
        (r"/static/(.*)", StaticHandler),
    ]
    return out
