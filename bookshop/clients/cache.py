"""The gateway's cache for ``GET /api/v1/books/{isbn}``, kept correct by the services' event streams.

Entries of a stream are used only while the gateway follows that stream (a follower that lost its stream
may have missed an invalidation). Stock entries are dropped by each ``stock.changed`` event, book entries
(never a 404) by each ``book.*`` event, recommendations on any book event, on an order event naming the
book in its ``lines`` (a confirmation or cancellation moves its bought-together counts) and after
``RECS_SECONDS``; the next read fetches them again. The recommendations service may apply an order event a
moment after the gateway sees it, so what is fetched right after one is kept only briefly: a confirmation
shows on the book page within the contract's 5 s. A fetch that raced an event is not stored (a per-stream
generation counter tells).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from bookshop.services import errors
from bookshop.services.isbn import normalize_isbn

log = logging.getLogger(__name__)

NULL = b"null"
MAX_ENTRIES = 20_000
RECS_SECONDS = 3.0


def dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class BookPageCache:
    def __init__(self, hub, catalog, inventory, recommendations, part_timeout: float = 1.0):
        self.hub = hub
        self.catalog = catalog
        self.inventory = inventory
        self.recs_client = recommendations
        self.part_timeout = part_timeout
        self.books: dict[str, bytes] = {}
        self.levels: dict[str, bytes] = {}
        self.recs: dict[str, tuple[float, bytes]] = {}
        self.generation = {"catalog": 0, "inventory": 0}
        self._inflight: dict[tuple, asyncio.Future] = {}
        hub.listeners.append(self.on_event)

    def _live(self, stream: str) -> bool:
        return self.hub.streams[stream].connected

    def on_event(self, stream: str, event: dict) -> None:
        if stream == "inventory" and event["event"] == "stock.changed":
            self.generation["inventory"] += 1
            # dropped, not overwritten: the event may be older than what a read after a write through this
            # gateway (forget_path) already fetched, and a page must never show stock going back in time
            self.levels.pop(event["data"]["isbn"], None)
        elif stream == "orders":
            for line in event["data"].get("lines") or ():
                self.recs.pop(line.get("isbn"), None)
        elif stream == "catalog":
            self.generation["catalog"] += 1
            self.books.pop(event["data"].get("isbn"), None)
            self.recs.clear()
            self._inflight.clear()  # a reader from now on must not get a fetch that began before this

    def on_stream_state(self, stream: str, connected: bool) -> None:
        if not connected:  # we may miss invalidations from now on
            if stream == "catalog":
                self.books.clear()
                self.recs.clear()
            elif stream == "inventory":
                self.levels.clear()

    def forget_path(self, path: str) -> None:
        """A write through this gateway: drop what it changed now, before its event arrives."""
        parts = path.split("/")
        if len(parts) >= 5 and parts[3] in ("books", "inventory"):
            try:
                isbn = normalize_isbn(parts[4])
            except errors.InvalidInput:
                return
            self.books.pop(isbn, None)
            self.levels.pop(isbn, None)
            self.recs.clear()
            self._inflight.clear()

    @staticmethod
    def _bounded(table: dict) -> None:
        if len(table) >= MAX_ENTRIES:
            table.clear()

    def peek(self, isbn: str) -> tuple[bytes | None, bytes, bytes] | None:
        """All three parts from the cache, or None if any is missing (or its stream is not followed)."""
        if isbn not in self.books or isbn not in self.levels or isbn not in self.recs:
            return None
        if not (self._live("catalog") and self._live("inventory")):
            return None
        at, recs = self.recs[isbn]
        if time.monotonic() - at >= RECS_SECONDS:
            return None
        return self.books[isbn], self.levels[isbn], recs

    async def book(self, isbn: str) -> bytes | None:
        if isbn in self.books and self._live("catalog"):
            return self.books[isbn]
        gen = self.generation["catalog"]
        book = await self.catalog.book(isbn)
        value = dumps(book) if book is not None else None
        # a miss is not cached: POST /books has no ISBN in its path for forget_path, and a page opened
        # right after the create must not stay 404 until the book.created event arrives
        if value is not None and self._live("catalog") and gen == self.generation["catalog"]:
            self._bounded(self.books)
            self.books[isbn] = value
        return value

    async def stock(self, isbn: str) -> bytes:
        if isbn in self.levels and self._live("inventory"):
            return self.levels[isbn]
        return await self._fetch("inventory", self.levels, isbn, self.inventory.levels,
                                 lambda levels: {"available": levels["available"]}, "stock")

    async def recommendations(self, isbn: str, token: str | None = None) -> bytes:
        """Anonymous recommendations are shared and cached; a customer's own (``token``) are not."""
        if token is not None:
            try:
                items = await self.recs_client.for_book(isbn, token=token)
            except errors.DomainError:
                return NULL
            return dumps(items) if items is not None else NULL
        hit = self.recs.get(isbn)
        if hit and time.monotonic() - hit[0] < RECS_SECONDS and self._live("catalog"):
            return hit[1]
        return await self._once(("recs", isbn), self._fetch("catalog", self.recs, isbn, self.recs_client.for_book,
                                                            lambda items: items, "recommendations", timed=True))

    async def _fetch(self, stream: str, table: dict, isbn: str, fetch, view, what: str, timed: bool = False) -> bytes:
        """A part from its service (NULL when the service cannot say), kept in ``table`` if ``stream`` is
        followed and no event of it came while the call was out (``timed``: with the time it was fetched)."""
        gen = self.generation[stream]
        try:
            got = await fetch(isbn)
        except errors.DomainError as exc:
            log.info("%s of %s unavailable: %s", what, isbn, exc.code)
            return NULL
        if got is None:
            return NULL
        value = dumps(view(got))
        if self._live(stream) and gen == self.generation[stream]:
            self._bounded(table)
            table[isbn] = (time.monotonic(), value) if timed else value
        return value

    async def _once(self, key: tuple, fetch) -> bytes:
        """Single flight: concurrent misses of one entry share one upstream call (no stampede when a
        popular entry expires or is invalidated)."""
        pending = self._inflight.get(key)
        if pending is not None:
            fetch.close()
            return await asyncio.shield(pending)
        task = asyncio.ensure_future(fetch)
        self._inflight[key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if self._inflight.get(key) is task:
                del self._inflight[key]
