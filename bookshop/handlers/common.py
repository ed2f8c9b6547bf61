"""Routes every service has: health, readiness, metrics; and the event stream of services that keep one."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid

import tornado.websocket

from bookshop.handlers.base import REQUEST_ID, BaseHandler
from bookshop.services import errors

log = logging.getLogger(__name__)


class HealthHandler(BaseHandler):
    public = {"GET", "HEAD"}

    def get(self):
        self.write_json({"status": "ok", "service": self.ctx.name, "pid": os.getpid()})


class ReadyHandler(BaseHandler):
    public = {"GET", "HEAD"}

    async def get(self):
        problems = await self.ctx.readiness()
        if problems:
            self.set_header("Retry-After", "2")
            self.write_json({"status": "unavailable", "service": self.ctx.name, "problems": problems}, 503)
        else:
            self.write_json({"status": "ready", "service": self.ctx.name})


class MetricsHandler(BaseHandler):
    public = {"GET"}

    def get(self):
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.ctx.metrics.render())


def given_request_id(headers) -> str:
    """The caller's ``X-Request-ID`` if it is one we may echo, else a new one: for the handlers that are not
    ``BaseHandler``s (the WebSocket, static files), whose requests have no span to take an id from."""
    given = headers.get("X-Request-ID", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


def int_arg(handler: BaseHandler, name: str, default: int, lo: int, hi: int) -> int:
    raw = handler.get_query_argument(name, None)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise errors.InvalidInput(f"{name} must be an integer between {lo} and {hi}", code="invalid_field",
                                  details={"field": name})
    return int(raw)


class EventsHandler(BaseHandler):
    """``GET /internal/events?after=SEQ&limit=N&wait=S``: the service's numbered events (service token)."""

    async def get(self):
        self.require("service")
        after = int_arg(self, "after", 0, 0, 2**62)
        limit = int_arg(self, "limit", 500, 1, 1000)
        wait = int_arg(self, "wait", 0, 0, 30)
        log_ = self.ctx.event_log
        items = await log_.read(after, limit)
        if not items and wait:
            await log_.wait(after, wait)
            items = await log_.read(after, limit)
        # read after the items: a reader can tell a gap (events gone) from events committed meanwhile
        self.write_json({"items": items, **await log_.position()})


class EventStreamSocket(tornado.websocket.WebSocketHandler):
    """``/internal/events/ws?after=SEQ&epoch=E``: replay from the log, then follow live (service token only).

    Frames: ``{"type": "hello", "seq": latest, "oldest": oldest, "epoch": epoch}`` then one ``{"type": "event",
    ...}`` per event in ``seq`` order. The follower resumes with ``after`` = the last seq it saw; whether that
    still means anything (same epoch, not beyond the head, not before ``oldest``) it decides from the hello.
    The epoch is looked at again every ``IDLE_READ`` seconds: when it changed (``run.py new-epoch`` under a
    running service) the socket is closed with 1012, and the follower's next hello names the new one.

    A follower costs the database nothing while nothing happens: the pump reads when the event log says a new
    event may exist (the local relay numbered one, or another process's relay did, seen by the log's change
    stream or its fallback look), and otherwise only every ``IDLE_READ`` seconds, as a safety net.
    """

    IDLE_READ = 60.0

    def initialize(self, ctx=None, route="?", **_):
        self.ctx = ctx
        self.route = route
        self._stop = asyncio.Event()

    async def get(self, *args, **kwargs):
        token = self.request.headers.get("Authorization", "")
        try:
            from bookshop import auth
            principal = await self.ctx.verifier.verify(auth.bearer(token) or "")
        except errors.DomainError:
            principal = None
        if principal is None or not principal.is_service:
            self.set_status(401)
            self.finish(json.dumps({"error": {"code": "unauthenticated", "message": "service token required"}}))
            return
        raw = self.get_query_argument("after", None)
        # no "after": follow from now on
        self._after = int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None
        await super().get(*args, **kwargs)

    def check_origin(self, origin):
        return True  # authenticated by service token, not browsers

    def open(self):
        self.ctx.stream_sockets.add(self)
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self):
        log_ = self.ctx.event_log
        try:
            hello = await log_.position()
            after = hello["seq"] if self._after is None else self._after
            await self.write_message(json.dumps({"type": "hello", **hello}))
            loop = asyncio.get_running_loop()
            looked = loop.time()
            while not self._stop.is_set():
                items = await log_.read(after, 500)
                for item in items:
                    await self.write_message(json.dumps({"type": "event", **item}))
                    after = item["seq"]
                if len(items) < 500:
                    await log_.wait(after, self.IDLE_READ)
                if loop.time() - looked >= self.IDLE_READ:
                    looked = loop.time()
                    if await log_.epoch() != hello["epoch"]:
                        self.close(1012, "the event log has a new epoch: reconnect")
                        return
        except tornado.websocket.WebSocketClosedError:
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - a follower is disconnected and will resume
            log.exception("event stream failed")
            self.close(1011)

    def on_message(self, message):
        pass

    def on_close(self):
        self.ctx.stream_sockets.discard(self)
        self._stop.set()
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
