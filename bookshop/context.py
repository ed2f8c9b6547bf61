"""One service's parts at run time: its context (settings, metrics, database, tokens, event log, background
tasks, shutdown hooks) and the Tornado application factory. ``bookshop/wiring.py`` builds both;
``bookshop/app.py`` runs them."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any, Awaitable, Callable

import tornado.web

from bookshop.auth import TokenVerifier
from bookshop.clients.base import Http, ServiceTokens, UpstreamStates
from bookshop.handlers import common
from bookshop.handlers.base import Application, NotFoundHandler
from bookshop.logs import AccessLog
from bookshop.metrics import Metrics
from bookshop.settings import Settings
from bookshop.storage.mongo import Database
from bookshop.storage.outbox import EventLog, Relay

log = logging.getLogger(__name__)


class ServiceContext:
    """Everything a service's handlers depend on, passed to them through ``initialize()``."""

    def __init__(self, name: str, settings: Settings, *, with_db: bool = True, instance: str | None = None):
        self.name = name
        self.settings = settings
        #: who this process is, as the owner of a lease (the relay's, the recommendations follower's): the
        #: served ``host:port`` is stable across restarts of one instance, so a restarted process takes its
        #: leases back at once instead of waiting out its killed predecessor's; unique per process otherwise
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics = Metrics(name)
        self.http = Http()
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
        self.relay.owner = self.instance

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


access_log = AccessLog(logging.getLogger("bookshop.access"))


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
    access_log.log(level, f"{handler.request.method} {route} {status} {seconds * 1000.0:.1f}ms")


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
