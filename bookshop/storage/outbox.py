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
* ``events`` is kept 48 hours (TTL index on ``at``); consumers resume by ``seq`` within an epoch: a random id in
  ``meta`` (``_id: "epoch"``) naming this history of the log, made when the log is first set up (so a new or
  recreated database starts another) and replaced by ``python run.py new-epoch SERVICE`` after a restore, when
  the same seqs may stand for other events.
* Wake-ups are in-process, so an idle shop is quiet. Whatever writes an event wakes its own process's relay
  through ``EventLog.announce`` (``record`` does it, after the commit when inside ``Database.transaction``;
  repositories that embed events call it after their write): nobody kicks the relay by hand. The relay polls
  only slowly (``FALLBACK_SECONDS``), for what other processes left behind (a crashed instance, or events
  written by an instance whose relay does not hold the lease). Local readers waiting for events are woken by
  the local relay. A change stream on ``events`` is opened only while this process has readers waiting and
  another process has been seen numbering (several instances of one service): on the embedded server every
  write wakes every change stream, so one left open would cost CPU on every write of the shop.
* The lease is taken when there is work and renewed (one write) at half-life only while work keeps coming: an
  idle relay writes nothing. Its owner can be stable across restarts of one instance (host:port, see
  ``app.serve``), so a restarted process resumes numbering at once instead of waiting out its predecessor's
  lease; a process that stops releases it.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
import socket
from typing import Any, Awaitable, Callable

import pymongo
import pymongo.errors
from bson import ObjectId

from bookshop.services.periodic import pause_until
from bookshop.services.views import iso_z

log = logging.getLogger(__name__)

RETENTION = datetime.timedelta(hours=48)
EPOCH = "epoch"  # the meta document naming the log's history
LEASE_SECONDS = 10.0
FALLBACK_SECONDS = 30.0  # the relay's slow poll, for other processes' leftovers only
# Under load a relay spends at most a third of its time in passes: after a pass that moved events, the next one
# starts no sooner than twice that pass's own duration after it ended, and never waits more than PACE_SECONDS.
# A pass reads every document that still carries events, whatever the batch's size: under 32 customers the
# inventory's relay read its level documents about 12 times a second (9 ms of the embedded server's CPU each, 2
# orders a pass) when passes followed each other at once. A quick pass (a quiet database: ~6 ms) delays the next
# event by at most ~12 ms, so the live stream stays prompt; a slow one (a busy database) spaces passes out, and
# the events of that time share them. The first event after a quiet moment moves at once.
PACE_SECONDS = 0.2
BUSY_SHARE = 1 / 3
FOREIGN_WATCH_SECONDS = 600.0  # how long a change stream stays open after another process was seen numbering


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_event(event: str, data: dict, user_id: str | None = None) -> dict:
    """A pending event, ready to be inserted into the outbox or embedded in a document."""
    doc = {"_id": ObjectId(), "event": event, "data": data, "at": utcnow()}
    if user_id is not None:
        doc["user_id"] = user_id
    return doc


def new_epoch_id() -> str:
    return secrets.token_hex(8)


def public_event(doc: dict) -> dict:
    """An event as consumers see it."""
    out = {"seq": doc["seq"], "event": doc["event"], "data": doc["data"],
           "at": iso_z(doc["at"])}
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
        self.sources: list[EmbeddedSource] = []
        self.written = asyncio.Event()  # set by announce(): an event waits to be numbered
        # what the relay's next woken pass must read (its fallback passes read everything)
        self.outbox_written = True
        self.sources_written = True
        self._waiters = 0
        self._last_waiting = 0.0  # loop time a reader last waited
        self._watch_check = asyncio.Event()
        self._foreign_until = 0.0  # loop time until which a change stream is worth its cost

    def add_source(self, source: EmbeddedSource) -> None:
        """Let the relay read events embedded in a repository's documents."""
        if source not in self.sources:
            self.sources.append(source)

    def announce(self, outbox: bool = True, embedded: bool = True) -> None:
        """An event was written in this process (durably): the relay moves it now. No I/O. A repository that
        only embeds events says ``outbox=False`` (the woken pass then skips reading the outbox)."""
        self.outbox_written = self.outbox_written or outbox
        self.sources_written = self.sources_written or embedded
        self.written.set()

    def _announce_outbox(self) -> None:
        self.announce(embedded=False)

    def _announce_after(self, session) -> None:
        if session is None:
            self._announce_outbox()
            return
        after_commit = getattr(self._db, "after_commit", None)
        if after_commit is None:  # not a bookshop Database: announce now; the fallback pass covers an early look
            self._announce_outbox()
        else:
            after_commit(session, self._announce_outbox)

    async def create_indexes(self) -> None:
        await self.events.create_index("seq", unique=True)
        await self.events.create_index("source", unique=True)
        await self.events.create_index("at", expireAfterSeconds=int(RETENTION.total_seconds()))
        await self.events.create_index([("user_id", 1), ("seq", 1)])
        await self.epoch()  # a new database starts a history of its own

    # -- the epoch: which history of the log the seqs belong to -----------------------------------------
    async def epoch(self) -> str:
        """This log's epoch, made if the database has none yet (it is new, or was dropped and made again)."""
        doc = await self.meta.find_one({"_id": EPOCH}, {"value": 1})
        if doc is None:
            try:  # instances starting together agree: the first insert wins
                await self.meta.update_one({"_id": EPOCH}, {"$setOnInsert": {"value": new_epoch_id(), "at": utcnow()}},
                                           upsert=True)
            except pymongo.errors.DuplicateKeyError:
                pass
            doc = await self.meta.find_one({"_id": EPOCH}, {"value": 1})
        return doc["value"]

    async def new_epoch(self) -> str:
        """Start another history (after a backup was restored): every follower starts again from the state."""
        value = new_epoch_id()
        await self.meta.update_one({"_id": EPOCH}, {"$set": {"value": value, "at": utcnow()}}, upsert=True)
        return value

    async def position(self) -> dict:
        """Where the log stands: ``{seq, oldest, epoch}`` (the latest seq, the oldest kept, the epoch)."""
        seq = await self.latest_seq()
        return {"seq": seq, "oldest": await self.oldest_seq(), "epoch": await self.epoch()}

    async def record(self, event: dict, session=None) -> None:
        """Insert a pending event into the outbox (inside the caller's transaction, if any) and wake the relay
        once it is committed."""
        await self.outbox.insert_one(event, session=session)
        self._announce_after(session)

    async def record_many(self, events: list[dict], session=None) -> None:
        await self.outbox.insert_many(events, session=session)
        self._announce_after(session)

    async def read(self, after: int, limit: int = 500, user_id: str | None = None) -> list[dict]:
        query: dict = {"seq": {"$gt": after}}
        if user_id is not None:
            query["user_id"] = user_id
        cursor = self.events.find(query, {"_id": 0, "source": 0}).sort("seq", 1).limit(limit)
        return [public_event(d) for d in await cursor.to_list(limit)]

    async def latest_seq(self) -> int:
        meta = await self.meta.find_one({"_id": "relay"}, {"last_seq": 1})
        known = max((meta or {}).get("last_seq", 0), self.last_seen)  # seqs handed out: the tail is at least that
        return await self.tail_seq(known)

    async def tail_seq(self, after: int = 0) -> int:
        """The highest seq in ``events`` above ``after`` (``after`` when there is none). A range on the seq index:
        the embedded server answers an empty filter sorted by seq by reading and sorting every event (15 ms
        with a thousand, each fallback pass of an idle shop), a range after a known seq with the few above it."""
        docs = await self.events.find({"seq": {"$gt": after}}, {"seq": 1}).sort("seq", -1).limit(1).to_list(1)
        return docs[0]["seq"] if docs else after

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
        self._waiters += 1
        if self._waiters == 1:
            self._watch_check.set()
        try:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._waiters -= 1
            self._last_waiting = asyncio.get_running_loop().time()

    def saw_foreign_numbering(self) -> None:
        """Another process numbers events of this log: local readers need the change stream for a while."""
        self._foreign_until = asyncio.get_running_loop().time() + FOREIGN_WATCH_SECONDS
        self._watch_check.set()

    def watch_wanted(self) -> bool:
        """Readers wait here (or did a moment ago: a reader between two reads) while another process numbers."""
        now = asyncio.get_running_loop().time()
        return now < self._foreign_until and (self._waiters > 0 or now - self._last_waiting < 10.0)

    async def watch(self, stop: asyncio.Event, max_await_ms: int = 2000) -> None:
        """Wake local waiters when another process's relay numbers events: a change stream, open only while
        it is wanted (``watch_wanted``)."""
        while not stop.is_set():
            self._watch_check.clear()
            if not self.watch_wanted():
                await pause_until(stop, self._watch_check, None)
                continue
            try:
                async with self.events.watch([{"$match": {"operationType": "insert"}}],
                                             max_await_time_ms=max_await_ms) as stream:
                    while not stop.is_set() and self.watch_wanted():
                        change = await stream.try_next()
                        if change is not None:
                            seq = change["fullDocument"]["seq"]
                            if seq > self.last_seen:  # not ours (our relay notifies before the stream tells)
                                self.saw_foreign_numbering()
                            await self.notify(seq)
            except asyncio.CancelledError:
                raise
            except pymongo.errors.PyMongoError as exc:
                log.debug("event watch interrupted: %s", exc)
                await pause_until(stop, None, 1.0)
                try:
                    await self.notify(await self.latest_seq())
                except pymongo.errors.PyMongoError:
                    pass


def rest_before_pass(spent: float, since: float, moved: int, pace: float = PACE_SECONDS) -> float:
    """How long the relay waits before its next pass, ``since`` seconds after a pass of ``spent`` seconds that
    moved ``moved`` events ended: twice that pass's duration (a third of the time in passes), at most
    ``pace``; nothing after a pass that moved nothing (the first event after a quiet moment)."""
    if not moved:
        return 0.0
    return min(pace, spent * (1 / BUSY_SHARE - 1)) - since


class Relay:
    """Moves pending events into the numbered log; one lease holder per service at a time."""

    BLOCKED_RETRY = 0.5  # seconds: our events wait for another process's relay; look again this soon

    def __init__(self, log_: EventLog, embedded: list[EmbeddedSource] | None = None, batch: int = 500,
                 fallback: float = FALLBACK_SECONDS, coalesce: float = 0.002, pace: float = PACE_SECONDS):
        self.log = log_
        for source in embedded or []:
            log_.add_source(source)
        self.batch = batch
        self.fallback = fallback
        self.coalesce = coalesce  # after a wake-up, let the writes of the same moment join the pass
        self.pace = pace
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{ObjectId()}"
        self._next_seq: int | None = None
        self._lease_until: datetime.datetime | None = None
        self.blocked = False  # events are waiting but another process holds the lease
        self._careful = True  # look up which sources are numbered already (after a start, a take-over, a failure)
        self.moved = 0

    def kick(self) -> None:
        """Kept for callers that still wake the relay by hand: the same as ``EventLog.announce``."""
        self.log.announce()

    def forget_lease(self) -> None:
        """Re-check the lease in the database on the next pass (instead of trusting our copy)."""
        self._lease_until = None

    async def _hold_lease(self) -> bool:
        """Hold the relay lease: take it when free (a read, then one write) or renew it (one write) once half
        of it has passed. The write also records the last seq handed out, so numbering survives even after
        every event has expired."""
        now = utcnow()
        half = datetime.timedelta(seconds=LEASE_SECONDS / 2)
        if self._lease_until is not None and now < self._lease_until - half:
            return True
        holding = self._lease_until is not None and now < self._lease_until
        if not holding:
            current = await self.log.meta.find_one({"_id": "relay"}, {"owner": 1, "lease_until": 1})
            if current is not None and current.get("owner") != self.owner and current["lease_until"] > now:
                self._next_seq = None
                self.log.saw_foreign_numbering()
                return False
            self._next_seq = None  # someone may have numbered since we last held it: re-read the tail
            self._careful = True  # ... and may have died between numbering and removing what it numbered
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
            self.log.saw_foreign_numbering()
            return False
        self._lease_until = doc["lease_until"]
        if self._next_seq is None:
            self._next_seq = max(await self.log.latest_seq(), doc.get("last_seq", 0)) + 1
            if self._next_seq - 1 > self.log.last_seen:
                await self.log.notify(self._next_seq - 1)
        return True

    async def release(self) -> None:
        """Give the lease up (a process that stops), so another instance or our successor numbers at once."""
        if self._lease_until is None or utcnow() >= self._lease_until:
            return
        update: dict = {"$set": {"lease_until": utcnow()}}
        if self._next_seq is not None and self._next_seq > 1:
            update["$max"] = {"last_seq": self._next_seq - 1}
        await self.log.meta.update_one({"_id": "relay", "owner": self.owner}, update)
        self._lease_until = None

    async def run_once(self, full: bool = True) -> int:
        """Move one batch; returns how many events were numbered. Looks (reads only) before it takes the
        lease, so a pass with nothing to move writes nothing. ``full=False``: read only what this process
        announced since the last pass (nothing announced: no read at all)."""
        log_ = self.log
        read_outbox, read_sources = full or log_.outbox_written, full or log_.sources_written
        log_.outbox_written = log_.outbox_written and not read_outbox
        log_.sources_written = log_.sources_written and not read_sources
        pending = []
        if read_outbox:
            pending = await log_.outbox.find({}).sort("_id", 1).limit(self.batch).to_list(self.batch)
        items: list[tuple[dict, Callable[[], Awaitable[Any]] | None]] = [(p, None) for p in pending]
        if read_sources:
            for source in log_.sources:
                items.extend(await source(self.batch))
        # a full batch may have left more behind: the next pass reads that kind again
        log_.outbox_written = log_.outbox_written or len(pending) >= self.batch
        log_.sources_written = log_.sources_written or len(items) - len(pending) >= self.batch
        if not items:
            self.blocked = False
            return 0
        if not await self._hold_lease():
            self.blocked = True
            log_.outbox_written = log_.outbox_written or read_outbox
            log_.sources_written = log_.sources_written or read_sources
            return 0
        self.blocked = False
        done: set = set()
        if self._careful:
            sources = [str(ev["_id"]) for ev, _ in items]
            done = {d["source"] for d in await log_.events.find(
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
                await log_.events.insert_many(docs, ordered=True)
            except pymongo.errors.BulkWriteError as exc:
                # another relay numbered these seqs (we lost the lease), or these sources (it died before
                # removing them): re-read the tail, look the sources up, and try again soon
                inserted = exc.details.get("nInserted", 0)
                log.warning("relay fenced after %d events; re-reading the log tail", inserted)
                self._next_seq = None
                self._lease_until = None
                self._careful = True
                self.blocked = True
                log_.outbox_written = log_.outbox_written or read_outbox
                log_.sources_written = log_.sources_written or read_sources
                if inserted:
                    await log_.notify(docs[inserted - 1]["seq"])
                return inserted
            self._next_seq = seq
        # the events are numbered: now remove them from where they waited
        self._careful = True  # until the removal below is done
        if pending:
            await log_.outbox.delete_many({"_id": {"$in": [p["_id"] for p in pending]}})
        acks = [ack for _, ack in items if ack is not None]
        for ack in acks:
            await ack()
        self._careful = False
        if docs:
            self.moved += len(docs)
            await log_.notify(docs[-1]["seq"])
        return len(docs)

    async def look_around(self) -> None:
        """The fallback pass's look at the log's tail: events numbered by another process wake local
        readers, and tell the event log a change stream is worth opening."""
        tail = await self.log.tail_seq(self.log.last_seen)
        if tail > self.log.last_seen:
            self.log.saw_foreign_numbering()
            await self.log.notify(tail)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            self.log.last_seen = max(self.log.last_seen, await self.log.latest_seq())
        except pymongo.errors.PyMongoError as exc:
            log.warning("relay start: %s", exc)
        full = True  # the first pass reads everything: what was left before we started
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            self.log.written.clear()  # before the pass: what is written during it wakes the next one
            began = loop.time()
            try:
                moved = await self.run_once(full=full)
            except asyncio.CancelledError:
                raise
            except pymongo.errors.PyMongoError as exc:
                log.warning("relay pass failed: %s", exc)
                self._next_seq = None
                self._lease_until = None
                self._careful = True
                full = True
                await pause_until(stop, None, 1.0)
                continue
            ended = loop.time()
            full = self.blocked
            if moved >= self.batch:
                continue  # a full batch: more may be waiting
            await pause_until(stop, self.log.written, self.BLOCKED_RETRY if self.blocked else self.fallback)
            if stop.is_set():
                break
            if self.log.written.is_set():
                wait = max(self.coalesce, rest_before_pass(ended - began, loop.time() - ended, moved, self.pace))
                if wait > 0:
                    await asyncio.sleep(wait)
            elif not self.blocked:
                full = True  # the fallback pass
                try:
                    await self.look_around()
                except pymongo.errors.PyMongoError as exc:
                    log.debug("relay look-around failed: %s", exc)
