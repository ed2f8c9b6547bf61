"""The application factory and the life cycle of one service process."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import Any, Awaitable, Callable

import tornado.httpserver
import tornado.web

from bookshop import tracing
from bookshop.auth import TokenVerifier
from bookshop.clients.base import Http, ServiceTokens, UpstreamStates
from bookshop.handlers.base import Application, BaseHandler, NotFoundHandler
from bookshop.handlers import common
from bookshop.metrics import Metrics
from bookshop.settings import Settings
from bookshop.storage.mongo import Database
from bookshop.storage.outbox import EventLog, Relay

log = logging.getLogger(__name__)

# in-flight requests get this long; with sagas (3 s) it stays inside the supervisor's 11 s per service
SHUTDOWN_GRACE = 7.0


class ServiceContext:
    """Everything a service's handlers depend on, passed to them through ``initialize()``."""

    def __init__(self, name: str, settings: Settings, *, with_db: bool = True):
        self.name = name
        self.settings = settings
        self.metrics = Metrics(name)
        self.http = Http()
        self.metrics.registry.register(UpstreamStates(name, self.http))
        self.metrics.registry.register(UpstreamStates(name, self.http))
        self.db: Database | None = None
        if with_db:
            uri = settings.mongodb_uri or "mongodb://127.0.0.1:27017"
            self.db = Database(uri, settings.db_name(name))
        self.tokens = ServiceTokens(self.http, settings.url("users"), name, settings.service_secret,
                                    timeout=settings.upstream_timeout)
        self.verifier: TokenVerifier | None = None
        self.event_log: EventLog | None = None
        self.relay: Relay | None = None
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.extra_ready: list[Callable[[], Awaitable[str | None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self.inflight: set = set()
        self.before_drain: list[Callable[[], Awaitable[None]]] = [self._close_stream_sockets]
        self.stream_sockets: set = set()

    def use_remote_keys(self) -> None:
        from bookshop.clients.services import UsersClient
        # one client for every load, so its circuit breaker sees the users service's failures and opens
        users = UsersClient(self.http, self.settings.url("users"), None, self.settings.upstream_timeout)
        self.verifier = TokenVerifier(users.jwks)

    def use_event_log(self, embedded=None) -> None:
        self.event_log = EventLog(self.db)
        self.relay = Relay(self.event_log, embedded)

    async def _close_stream_sockets(self) -> None:
        for sock in list(self.stream_sockets):
            sock.close(1001, "service going away")  # followers resume elsewhere or after the restart

    def spawn(self, coro: Awaitable, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.name}:{name}")

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s died", name, exc_info=t.exception())
        task.add_done_callback(done)
        self.tasks.append(task)

    async def readiness(self) -> list[str]:
        problems = []
        if self.db is not None and not await self.db.ping():
            problems.append("database")
        for check in self.extra_ready:
            problem = await check()
            if problem:
                problems.append(problem)
        self.metrics.gauge("ready", 0 if problems else 1)
        return problems

    async def start_background(self) -> None:
        if self.event_log is not None:
            self.spawn(self.relay.run(self.stop), "relay")
            self.spawn(self.event_log.watch(self.stop), "event-watch")

    async def close(self) -> None:
        self.stop.set()
        for hook in self.on_shutdown:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("shutdown hook failed")
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.relay is not None:
            try:
                await asyncio.wait_for(self.relay.release(), 2.0)  # our successor numbers at once
            except Exception:  # noqa: BLE001 - the lease then simply runs out
                log.warning("could not release the relay lease", exc_info=True)
        await self.http.close()
        if self.db is not None:
            self.db.close()


access_log = logging.getLogger("bookshop.access")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Tornado's log_function: metrics by route pattern and status, and one JSON access line."""
    ctx = getattr(handler, "ctx", None)
    status = handler.get_status()
    seconds = handler.request.request_time()
    route = getattr(handler, "route", "?")
    if ctx is not None:
        ctx.metrics.observe(handler.request.method, route, status, seconds)
    level = logging.WARNING if status >= 500 else logging.DEBUG if route in ("/healthz", "/metrics") \
        else logging.INFO
    access_log.log(level, "%s %s %d %.1fms", handler.request.method, route, status, seconds * 1000.0)


def make_app(ctx: ServiceContext, routes: list[tuple], deps: Any = None, **settings) -> tornado.web.Application:
    """A Tornado application: the service's own routes, the common ones, a JSON 404 for the rest.

    Tornado tries the patterns in order, each a regular expression match, for every request: the service's
    routes come first (and each service lists its busiest first); the common ones overlap none of them.
    Every handler gets ``ctx`` and the service's ``deps`` (``bookshop/deps.py``) through ``initialize()``."""
    specs = list(routes) + [
        ("/healthz", common.HealthHandler),
        ("/readyz", common.ReadyHandler),
        ("/metrics", common.MetricsHandler),
    ]
    if ctx.event_log is not None:
        specs += [("/internal/events", common.EventsHandler),
                  ("/internal/events/ws", common.EventStreamSocket)]
    rules = []
    for spec in specs:
        pattern, handler = spec[0], spec[1]
        kwargs = dict(spec[2]) if len(spec) > 2 else {}
        kwargs.setdefault("ctx", ctx)
        kwargs.setdefault("deps", deps)
        kwargs.setdefault("route", pattern.replace("\\", ""))
        rules.append(tornado.web.url(pattern, handler, kwargs))
    return Application(
        rules, default_handler_class=NotFoundHandler, default_handler_args={"ctx": ctx, "route": "unknown"},
        log_function=log_request, compress_response=False, xsrf_cookies=False, **settings)


async def build(name: str, settings: Settings) -> tuple[ServiceContext, tornado.web.Application]:
    from bookshop import wiring
    return await wiring.build(name, settings)


async def serve(name: str, settings: Settings, port: int, ready: Callable[[], None] | None = None) -> None:
    """Run one service until SIGTERM/SIGINT, then shut down gracefully."""
    started = time.monotonic()
    tracing.setup(name, settings.traces_exporters)
    tracing.setup(name, settings.traces_exporters)
    ctx, app = await build(name, settings)
    server = tornado.httpserver.HTTPServer(app, xheaders=False, max_body_size=64 * 1024 * 1024,
                                           idle_connection_timeout=60)
    server.listen(port, address=settings.host if settings.host != "*" else "")
    if ctx.relay is not None:
        # one instance is one host:port: a restart of it takes the relay lease back without waiting it out
        ctx.relay.owner = f"{socket.gethostname()}:{port}"
    await ctx.start_background()
    log.info("%s listening on %s:%d (%.0f ms)", name, settings.host, port, (time.monotonic() - started) * 1000)
    if ready:
        ready()

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("%s shutting down", name)
    server.stop()  # stop accepting
    for hook in ctx.before_drain:  # e.g. the gateway closes its WebSockets with 1001
        await hook()
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while ctx.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if ctx.inflight:
        log.warning("%s: %d requests still running after %.0fs", name, len(ctx.inflight), SHUTDOWN_GRACE)
    try:
        await asyncio.wait_for(server.close_all_connections(), 2.0)
    except asyncio.TimeoutError:
        pass
    await ctx.close()
    tracing.shutdown()
    log.info("%s stopped", name)


__all__ = ["ServiceContext", "make_app", "serve", "BaseHandler"]
