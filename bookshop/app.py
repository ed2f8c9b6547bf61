"""The life cycle of one service process: build it (``bookshop/wiring.py``), serve it, stop it gracefully."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import Callable

import tornado.httpserver
import tornado.web

from bookshop import tracing, wiring
from bookshop.context import ServiceContext, make_app
from bookshop.handlers.base import BaseHandler
from bookshop.settings import Settings

log = logging.getLogger(__name__)

# in-flight requests get this long; with sagas (3 s) it stays inside the supervisor's 11 s per service
SHUTDOWN_GRACE = 7.0


async def build(name: str, settings: Settings, instance: str | None = None
                ) -> tuple[ServiceContext, tornado.web.Application]:
    return await wiring.build(name, settings, instance)


async def serve(name: str, settings: Settings, port: int, ready: Callable[[], None] | None = None) -> None:
    """Run one service until SIGTERM/SIGINT, then shut down gracefully."""
    started = time.monotonic()
    tracing.setup(name, settings.traces_exporters)
    # one instance is one host:port: a restart of it takes its leases (relay, follower) back without waiting
    # them out
    ctx, app = await build(name, settings, f"{socket.gethostname()}:{port}")
    server = tornado.httpserver.HTTPServer(app, xheaders=False, max_body_size=64 * 1024 * 1024,
                                           idle_connection_timeout=60)
    server.listen(port, address=settings.host if settings.host != "*" else "")
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
