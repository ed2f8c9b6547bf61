"""Transactional outbox, the relay that numbers events, and the event log consumers read.

Design (why it looks like this):

* A change and the event describing it are committed together. Ordinary changes insert the event into the
  ``outbox`` collection inside the same multi-document transaction. Hot documents (a bestseller's stock level)
  instead embed the pending event in the very single-document update that changes them (``pending`` array),
  because transactions on one hot document collapse under write conflicts on the embedded server.
* Nothing in the business path allocates a sequence number. One relay per service (holder of a lease in the
  ``meta`` collection) moves pending events into ``events`` and numbers them ``last_seq + 1, + 2, ...`` in the
  order it moves them, with an ordered insert. A consumer reads ``seq > after`` from ``events``; because only
  the lease holder inserts, and always at ``last + 1`` after its previous insert committed, a reader can never
  see seq N+1 before N exists: no holes that later fill. The unique index on ``seq`` fences a relay that lost
  its lease without noticing (its insert fails and it re-reads the tail); the unique index on ``source`` makes
  a move that crashed between "insert" and "remove pending" harmless to repeat.
* ``events`` is kept 48 hours (TTL index on ``at``); consumers resume by ``seq``. Change streams on
  ``events`` are only a wake-up for followers in other instances, never the source of truth.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
from typing import Any, Awaitable, Callable

import pymongo
import pymongo.errors
from bson import ObjectId

log = logging.getLogger(__name__)

RETENTION = datetime.timedelta(hours=48)
LEASE_SECONDS = 5.0


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_event(event: str, data: dict, user_id: str | None = None) -> dict:
    """A pending event, ready to be inserted into the outbox or embedded in a document."""
    doc = {"_id": ObjectId(), "event": event, "data": data, "at": utcnow()}
    if user_id is not None:
        doc["user_id"] = user_id
    return doc


def public_event(doc: dict) -> dict:
    """An event as consumers see it."""
    out = {"seq": doc["seq"], "event": doc["event"], "data": doc["data"],
           "at": doc["at"].isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    if doc.get("user_id") is not None:
        out["user_id"] = doc["user_id"]
    return out


# An embedded source returns pending events found in hot documents, each with an ``ack`` coroutine factory
# that removes them from their document once they are numbered.
EmbeddedSource = Callable[[int], Awaitable[list[tuple[dict, Callable[[], Awaitable[Any]]]]]]


class EventLog:
    """The ``events`` collection of one service: numbered, retained, readable by ``seq``."""

    def __init__(self, database):
        self._db = database
        self.events = database["events"]
        self.outbox = database["outbox"]
        self.meta = database["meta"]
        self._changed = asyncio.Condition()
        self.last_seen = 0

    async def create_indexes(self) -> None:
        await self.events.create_index("seq", unique=True)
        await self.events.create_index("source", unique=True)
        await self.events.create_index("at", expireAfterSeconds=int(RETENTION.total_seconds()))
        await self.events.create_index([("user_id", 1), ("seq", 1)])

    async def record(self, event: dict, session=None) -> None:
        """Insert a pending event into the outbox (inside the caller's transaction)."""
        await self.outbox.insert_one(event, session=session)

    async def read(self, after: int, limit: int = 500, user_id: str | None = None) -> list[dict]:
        query: dict = {"seq": {"$gt": after}}
        if user_id is not None:
            query["user_id"] = user_id
        cursor = self.events.find(query, {"_id": 0, "source": 0}).sort("seq", 1).limit(limit)
        return [public_event(d) for d in await cursor.to_list(limit)]

    async def latest_seq(self) -> int:
        doc = await self.events.find_one({}, {"seq": 1}, sort=[("seq", -1)])
        meta = await self.meta.find_one({"_id": "relay"}, {"last_seq": 1})
        return max(doc["seq"] if doc else 0, (meta or {}).get("last_seq", 0))

    async def oldest_seq(self) -> int:
        doc = await self.events.find_one({}, {"seq": 1}, sort=[("seq", 1)])
        return doc["seq"] if doc else 0

    # -- wake-ups -------------------------------------------------------------------------------------
    async def notify(self, seq: int) -> None:
        if seq > self.last_seen:
            self.last_seen = seq
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, after: int, timeout: float) -> None:
        """Return when an event past ``after`` may exist (or after ``timeout``)."""
        if self.last_seen > after:
            return
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def watch(self, stop: asyncio.Event) -> None:
        """Wake local waiters when another instance's relay numbers events (change stream + poll)."""
        while not stop.is_set():
            try:
                async with self.events.watch([{"$match": {"operationType": "insert"}}],
                                             max_await_time_ms=500) as stream:
                    while not stop.is_set():
                        change = await stream.try_next()
                        if change is not None:
                            await self.notify(change["fullDocument"]["seq"])
            except asyncio.CancelledError:
                raise
            except pymongo.errors.PyMongoError as exc:
                log.debug("event watch interrupted: %s", exc)
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
                try:
                    await self.notify(await self.latest_seq())
                except pymongo.errors.PyMongoError:
                    pass


class Relay:
    """Moves pending events into the numbered log; one lease holder per service at a time."""

    def __init__(self, log_: EventLog, embedded: list[EmbeddedSource] | None = None, batch: int = 500):
        self.log = log_
        self.embedded = embedded or []
        self.batch = batch
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{ObjectId()}"
        self._kick = asyncio.Event()
        self._next_seq: int | None = None
        self._lease_until: datetime.datetime | None = None
        self.moved = 0

    def kick(self) -> None:
        """Called after a local write that recorded an event, so it is moved at once."""
        self._kick.set()

    def forget_lease(self) -> None:
        """Re-check the lease in the database on the next pass (instead of trusting our copy)."""
        self._lease_until = None

    async def _hold_lease(self) -> bool:
        """Hold the relay lease, renewing it (one write) only once half of it has passed. The renewal also
        records the last seq handed out, so numbering survives even after every event has expired."""
        now = utcnow()
        if self._lease_until is not None and now < self._lease_until - datetime.timedelta(seconds=LEASE_SECONDS / 2):
            return True
        update: dict = {"$set": {"owner": self.owner, "lease_until": now + datetime.timedelta(seconds=LEASE_SECONDS)}}
        if self._next_seq is not None and self._next_seq > 1:
            update["$max"] = {"last_seq": self._next_seq - 1}
        try:
            doc = await self.log.meta.find_one_and_update(
                {"_id": "relay", "$or": [{"lease_until": {"$lt": now}}, {"owner": self.owner}]}, update,
                upsert=True, return_document=pymongo.ReturnDocument.AFTER)
        except pymongo.errors.DuplicateKeyError:
            doc = None
        if doc is None:
            # another relay holds it (the embedded server may answer null instead of a duplicate key)
            self._next_seq = None
            self._lease_until = None
            return False
        self._lease_until = doc["lease_until"]
        if self._next_seq is None:
            self._next_seq = max(await self.log.latest_seq(), doc.get("last_seq", 0)) + 1
        return True

    async def run_once(self) -> int:
        """Move one batch; returns how many events were numbered."""
        if not await self._hold_lease():
            return 0
        pending = await self.log.outbox.find({}).sort("_id", 1).limit(self.batch).to_list(self.batch)
        items: list[tuple[dict, Callable[[], Awaitable[Any]] | None]] = [(p, None) for p in pending]
        for source in self.embedded:
            items.extend(await source(self.batch))
        if not items:
            return 0
        sources = [str(ev["_id"]) for ev, _ in items]
        done = {d["source"] for d in await self.log.events.find(
            {"source": {"$in": sources}}, {"source": 1}).to_list(None)}
        docs = []
        seq = self._next_seq
        for ev, _ in items:
            if str(ev["_id"]) in done:
                continue
            doc = {"seq": seq, "source": str(ev["_id"]), "event": ev["event"], "data": ev["data"],
                   "at": ev["at"]}
            if ev.get("user_id") is not None:
                doc["user_id"] = ev["user_id"]
            docs.append(doc)
            seq += 1
        if docs:
            try:
                await self.log.events.insert_many(docs, ordered=True)
            except pymongo.errors.BulkWriteError as exc:
                inserted = exc.details.get("nInserted", 0)
                log.warning("relay fenced after %d events; re-reading the log tail", inserted)
                self._next_seq = None
                self._lease_until = None
                if inserted:
                    await self.log.notify(docs[inserted - 1]["seq"])
                return inserted
            self._next_seq = seq
        # the events are numbered: now remove them from where they waited
        if pending:
            await self.log.outbox.delete_many({"_id": {"$in": [p["_id"] for p in pending]}})
        acks = [ack for _, ack in items if ack is not None]
        for ack in acks:
            await ack()
        if docs:
            self.moved += len(docs)
            await self.log.notify(docs[-1]["seq"])
        return len(docs)

    async def run(self, stop: asyncio.Event, idle: float = 0.25) -> None:
        while not stop.is_set():
            try:
                moved = await self.run_once()
            except asyncio.CancelledError:
                raise
            except pymongo.errors.PyMongoError as exc:
                log.warning("relay pass failed: %s", exc)
                self._next_seq = None
                self._lease_until = None
                moved = 0
                await asyncio.sleep(1.0)
            if moved:
                continue
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), idle)
            except asyncio.TimeoutError:
                pass
