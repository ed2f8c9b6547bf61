"""Stock levels, the holds of orders on them, and the record of decided holds.

A level document per ISBN holds ``on_hand``, ``reserved``, ``available`` (kept equal to on_hand - reserved),
the ``holds`` entries of the orders that reserved it, ``expires`` (the earliest expiry of its held entries, for
the sweeper's index) and its ``pending`` stock.changed events. Every change is ONE conditional
single-document update (an aggregation-pipeline update) that also appends the event carrying the new levels:
a bestseller's stock never goes through a multi-document transaction, can never go below zero (the filter
checks ``available``) and one order never holds a unit twice (the filter checks ``holds.order``).

A hold entry is ``{order, qty, state, n, until}``: ``state`` is ``held`` (counted in ``reserved``, until
``until``) or a decision (``committed``, ``released``, ``expired``, ``rejected``, ``returned``); ``n`` is how
many ISBNs the order reserved (left out when 1), so a partial reservation is recognisable. A decision also
gives the entry an ``id`` (new at each change of state) and ``at``.
The relay moves decided entries out of the hot document, together with its events (``pending_events``): they
go to ``reservation_lines`` (``HoldArchive``), one line per (order, ISBN, entry id), kept for good.
``returned`` entries stay in the document for ``RETURN_FENCE`` first: while there, they make a repeated
put-back of the same order a no-op.
"""
from __future__ import annotations

import asyncio
import collections
import datetime

import pymongo
from bson import ObjectId

from bookshop.services.inventory import ReservationState as S, levels_view
from bookshop.storage.outbox import utcnow

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
RETURN_FENCE = datetime.timedelta(hours=24)
# A relay pass reads only the level documents this process wrote an event to since their last read, and once
# a second all that carry events (another instance's, a crashed one's): reading every document with leftovers
# on each pass cost the embedded server ~10 ms a pass under load (100 books), for a few new events.
FULL_READ_SECONDS = 1.0
LEFTOVER_SECONDS = 5.0  # numbered events and archived entries may stay in their document this long ...
LEFTOVER_MAX = 64  # ... or until this many: the document's next write of ours takes them out on its way
_HIDDEN = {"pending": 0, "holds": 0, "expires": 0}

# how the levels change when an order's entry moves from one state to another (sign of qty per field)
_DELTAS = {
    (S.HELD, S.COMMITTED): {"on_hand": -1, "reserved": -1},
    (S.COMMITTED, S.RETURNED): {"on_hand": 1, "available": 1},
    **{(S.HELD, to): {"reserved": -1, "available": 1} for to in (S.RELEASED, S.EXPIRED, S.REJECTED, S.RETURNED)},
}


def _lit(value):
    return {"$literal": value}


def _append_event(now: datetime.datetime) -> dict:
    """Pipeline stage appending a stock.changed event with the levels as they are after the update."""
    event = {"_id": ObjectId(), "event": _lit("stock.changed"), "at": now,
             "data": {"isbn": "$_id", "on_hand": "$on_hand", "reserved": "$reserved", "available": "$available"}}
    return {"$set": {"pending": {"$concatArrays": [{"$ifNull": ["$pending", []]}, [event]]}}}


# the earliest expiry of the document's held entries (null when none), for the sweeper's index
_EXPIRES = {"$set": {"expires": {"$min": {"$map": {
    "input": {"$filter": {"input": "$holds", "cond": {"$eq": ["$$this.state", S.HELD.value]}}},
    "in": "$$this.until"}}}}}


def _entry_of(order_id: str) -> dict:
    return {"$arrayElemAt": [{"$filter": {"input": "$holds", "cond": {"$eq": ["$$this.order", _lit(order_id)]}}}, 0]}


def _without(order_id: str) -> dict:
    return {"$filter": {"input": "$holds", "cond": {"$ne": ["$$this.order", _lit(order_id)]}}}


def _change(field: str, sign: int, qty) -> dict:
    return {"$add": [f"${field}", {"$multiply": [sign, qty]}]}


class HoldArchive:
    """``reservation_lines``: decided hold entries moved out of the level documents, one line per
    (order, ISBN, entry id) — ``_id`` is ``order|isbn|id``. An order's lines are found by the ``order`` index:
    the embedded server's ``_id`` index answers equality and ``$in`` only, and an ``_id`` range read every line
    (measured: 130 lines read, 3 ms of server CPU, per checkout after 300 orders)."""

    def __init__(self, database):
        self.lines = database["reservation_lines"]

    async def create_indexes(self) -> None:
        await self.lines.create_index("order")

    async def add(self, lines: list[dict]) -> None:
        """Insert lines; ones already there (a repeated move) are skipped."""
        if not lines:
            return
        try:
            await self.lines.insert_many(lines, ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            if any(e.get("code") != 11000 for e in exc.details.get("writeErrors", [])):
                raise

    async def of_order(self, order_id: str) -> list[dict]:
        return await self.lines.find({"order": order_id}).to_list(None)

    @staticmethod
    def line(isbn: str, entry: dict) -> dict:
        out = {"_id": f"{entry['order']}|{isbn}|{entry['id']}", "order": entry["order"], "isbn": isbn,
               "qty": entry["qty"], "state": entry["state"], "n": entry.get("n", 1), "at": entry.get("at"),
               "until": entry.get("until")}
        if entry.get("short"):
            out["short"] = entry["short"]
        return out


class LevelRepo:
    def __init__(self, database, events=None, leftover_seconds: float = LEFTOVER_SECONDS):
        """``events``: the service's EventLog; its relay reads this repository's pending events (and moves
        decided holds to the archive with them), and is woken in-process after every write that embedded one."""
        self.leftover_seconds = leftover_seconds
        self.levels = database["levels"]
        self.archive = HoldArchive(database)
        self._announce = (lambda: events.announce(outbox=False)) if events is not None else (lambda: None)
        if events is not None:
            events.add_source(self.pending_events)
        # Leftovers: what the relay has numbered (events) or archived (decided entries) but not yet taken out of
        # its document. Our next write to that document takes them out in the same update, so most documents
        # never need a write of the relay's own; what is left after ``leftover_seconds``, the relay pulls.
        self._leftovers: dict[str, tuple[set, dict]] = {}  # isbn -> (event ids, {entry id: order})
        self._due: dict[str, float] = {}  # isbn -> loop time its leftovers are pulled by the relay
        self._writes: collections.Counter = collections.Counter()  # isbn -> our writes that added an event
        self._seen: dict[str, int] = {}  # isbn -> our writes before the last relay read that found no new event
        self._timer: asyncio.TimerHandle | None = None
        self._full_read_at = 0.0  # loop time of the next pass that reads every document with events

    async def create_indexes(self) -> None:
        await self.archive.create_indexes()
        await self.levels.create_index("pending.at")
        await self.levels.create_index("expires")
        # no index on holds.order: the embedded server rewrites a multikey index's keys for every entry of the
        # array on each update, which doubled the cost of a hold on a bestseller's document; callers say which
        # ISBNs to look at instead (entries(order, isbns))
        try:
            await self.levels.drop_index("holds.order_1")
        except pymongo.errors.OperationFailure:
            pass

    def _take_leftovers(self, isbn: str, order_id: str | None) -> tuple[list, set, set]:
        """A first pipeline stage taking the document's leftovers out (not the entry of ``order_id``: the
        update works on it), and what it takes."""
        events, entries = self._leftovers.get(isbn, (set(), {}))
        events, entries = set(events), {e for e, order in entries.items() if order != order_id}
        if not events and not entries:
            return [], events, entries
        return [{"$set": {
            "pending": {"$filter": {"input": {"$ifNull": ["$pending", []]},
                                    "cond": {"$not": [{"$in": ["$$this._id", _lit(sorted(events))]}]}}},
            "holds": {"$filter": {"input": {"$ifNull": ["$holds", []]},
                                  "cond": {"$not": [{"$in": ["$$this.id", _lit(sorted(entries))]}]}}}}}], \
            events, entries

    def _wrote(self, isbn: str, events: set, entries: set) -> None:
        """Our write to ``isbn`` took ``events`` and ``entries`` out and added an event of its own."""
        self._writes[isbn] += 1
        left = self._leftovers.get(isbn)
        if left is not None:
            left[0].difference_update(events)
            for entry_id in entries:
                left[1].pop(entry_id, None)
            if not left[0] and not left[1]:
                self._leftovers.pop(isbn, None)
                self._due.pop(isbn, None)
        self._announce()

    async def _update(self, isbn: str, query: dict, pipeline: list, order_id: str | None = None) -> bool:
        first, events, entries = self._take_leftovers(isbn, order_id)
        result = await self.levels.update_one(query, first + pipeline)
        if result.matched_count:
            self._wrote(isbn, events, entries)
        return bool(result.matched_count)

    # -- levels ---------------------------------------------------------------------------------------------
    async def get(self, isbn: str) -> dict | None:
        return await self.levels.find_one({"_id": isbn}, _HIDDEN)

    async def get_many(self, isbns: list[str]) -> dict[str, dict]:
        return {d["_id"]: d for d in await self.levels.find({"_id": {"$in": isbns}}, _HIDDEN).to_list(None)}

    async def list(self, after: str | None, limit: int) -> list[dict]:
        query = {"_id": {"$gt": after}} if after else {}
        cursor = self.levels.find(query, _HIDDEN).sort("_id", 1).hint("_id_").limit(limit)
        return await cursor.to_list(limit)

    async def restock(self, isbn: str, quantity: int) -> dict:
        now = utcnow()
        first, events, entries = self._take_leftovers(isbn, None)
        doc = await self.levels.find_one_and_update(
            {"_id": isbn},
            first + [{"$set": {"on_hand": {"$add": [{"$ifNull": ["$on_hand", 0]}, quantity]},
                               "reserved": {"$ifNull": ["$reserved", 0]},
                               "available": {"$add": [{"$ifNull": ["$available", 0]}, quantity]},
                               "holds": {"$ifNull": ["$holds", []]}}},
                     _append_event(now)],
            upsert=True, projection=_HIDDEN, return_document=pymongo.ReturnDocument.AFTER)
        self._wrote(isbn, events, entries)
        return levels_view(isbn, doc)

    # -- an order's entries -----------------------------------------------------------------------------------
    async def hold(self, isbn: str, order_id: str, qty: int, n: int,
                   until: datetime.datetime) -> tuple[str, dict | None]:
        """Hold ``qty`` units for an order: ("held", the new entry), ("already", the order's entry here) or
        ("short", None)."""
        now = utcnow()
        entry = {"order": order_id, "qty": qty, "state": S.HELD.value, "until": until}  # small: hot documents
        if n > 1:
            entry["n"] = n
        held = await self._update(
            isbn, {"_id": isbn, "available": {"$gte": qty}, "holds.order": {"$ne": order_id}},
            [{"$set": {"reserved": {"$add": ["$reserved", qty]}, "available": {"$subtract": ["$available", qty]},
                       "holds": {"$concatArrays": ["$holds", [_lit(entry)]]}}},
             {"$set": {"expires": {"$min": ["$expires", until]}}}, _append_event(now)])
        if held:
            return "held", entry
        existing = await self.entry(isbn, order_id)
        return ("already", existing) if existing is not None else ("short", None)

    async def entry(self, isbn: str, order_id: str) -> dict | None:
        doc = await self.levels.find_one({"_id": isbn, "holds.order": order_id},
                                         {"holds": {"$elemMatch": {"order": order_id}}})
        return doc["holds"][0] if doc else None

    async def entries(self, order_id: str, isbns: list[str] | None = None) -> dict[str, dict]:
        """The order's entry in each level document that has one, by ISBN: among ``isbns`` (by ``_id``), or
        without them in every level document (a scan: for the rare calls that do not know the ISBNs)."""
        query: dict = {"holds.order": order_id}
        if isbns is not None:
            query["_id"] = {"$in": isbns}
        docs = await self.levels.find(query, {"holds": {"$elemMatch": {"order": order_id}}}).to_list(None)
        return {d["_id"]: d["holds"][0] for d in docs}

    async def move(self, isbn: str, order_id: str, frm: S, to: S, *, until_before: datetime.datetime | None = None,
                   **extra) -> bool:
        """Move the order's entry from ``frm`` to ``to`` with the levels' change that means (sell, give back,
        put back). False if the entry is not in ``frm`` (or, with ``until_before``, not expired by then)."""
        now = utcnow()
        match: dict = {"order": order_id, "state": frm.value}
        if until_before is not None:
            match["until"] = {"$lt": until_before}
        new = {"state": _lit(to.value), "id": ObjectId(), "at": now, **{k: _lit(v) for k, v in extra.items()}}
        return await self._update(
            isbn, {"_id": isbn, "holds": {"$elemMatch": match}},
            [{"$set": {"_e": _entry_of(order_id)}},
             {"$set": {**{f: _change(f, sign, "$_e.qty") for f, sign in _DELTAS[(frm, to)].items()},
                       "holds": {"$concatArrays": [_without(order_id), [{"$mergeObjects": ["$_e", new]}]]}}},
             {"$unset": "_e"}, _EXPIRES, _append_event(now)], order_id)

    async def drop(self, isbn: str, order_id: str) -> bool:
        """Remove the order's held entry when it should not exist (a late duplicate of a reservation decided and
        archived long ago), giving its units back."""
        now = utcnow()
        return await self._update(
            isbn, {"_id": isbn, "holds": {"$elemMatch": {"order": order_id, "state": S.HELD.value}}},
            [{"$set": {"_e": _entry_of(order_id)}},
             {"$set": {"reserved": _change("reserved", -1, "$_e.qty"), "available": _change("available", 1, "$_e.qty"),
                       "holds": _without(order_id)}},
             {"$unset": "_e"}, _EXPIRES, _append_event(now)])

    async def put_back_archived(self, isbn: str, order_id: str, qty: int, n: int) -> bool:
        """Return sold units whose sale entry has left the document already; the ``returned`` entry it leaves
        (kept ``RETURN_FENCE``) makes a repeat a no-op. False if the document has an entry of the order."""
        now = utcnow()
        entry = {"order": order_id, "qty": qty, "state": S.RETURNED.value, "id": ObjectId(), "n": n, "at": now}
        return await self._update(
            isbn, {"_id": isbn, "holds.order": {"$ne": order_id}},
            [{"$set": {"on_hand": {"$add": ["$on_hand", qty]}, "available": {"$add": ["$available", qty]},
                       "holds": {"$concatArrays": [{"$ifNull": ["$holds", []]}, [_lit(entry)]]}}},
             _append_event(now)])

    async def expired(self, now: datetime.datetime, limit: int = 200) -> list[tuple[str, dict]]:
        """(ISBN, entry) of held entries whose time ran out before ``now``."""
        docs = await self.levels.find({"expires": {"$lt": now}}, {"holds": 1}).limit(limit).to_list(limit)
        return [(d["_id"], h) for d in docs for h in d.get("holds", [])
                if h.get("state") == S.HELD.value and h["until"] < now]

    # -- the relay's embedded source ---------------------------------------------------------------------------
    async def pending_events(self, limit: int):
        """Pending events of level documents, each document's last one with its acknowledgement.

        The acknowledgement moves the document's decided entries to the archive (the first one writes the whole
        batch's lines) and leaves the numbered events and archived entries in the document as leftovers: our
        next write to it takes them out, or this source pulls them once they have waited ``leftover_seconds``.
        Documents whose every event is numbered and that we have not written to since are not read again."""
        await self._pull_due()
        fence = utcnow() - RETURN_FENCE
        movable = {"$or": [{"$in": ["$$this.state", [s.value for s in S.moved_out_at_once()]]},
                           {"$and": [{"$eq": ["$$this.state", S.RETURNED.value]}, {"$lt": ["$$this.at", fence]}]}]}
        writes = dict(self._writes)  # before the read: every write counted here is in what it finds
        match: dict = {"pending.at": {"$gte": _EPOCH}}
        loop = asyncio.get_running_loop()
        if loop.time() >= self._full_read_at:  # every document with events (another instance's, a crash's)
            self._full_read_at = loop.time() + FULL_READ_SECONDS
            quiet = sorted(isbn for isbn in self._leftovers if self._seen.get(isbn) == writes.get(isbn, 0))
            if quiet:
                match["_id"] = {"$nin": quiet}
        else:  # only the documents we wrote an event to since they were last read
            written = sorted(isbn for isbn, n in writes.items() if n > self._seen.get(isbn, 0))
            if not written:
                return []
            match = {"_id": {"$in": written}}  # by _id alone: the planner would rather walk pending.at
        docs = await self.levels.aggregate([
            {"$match": match}, {"$limit": limit},
            {"$project": {"pending": 1, "decided": {"$filter": {"input": {"$ifNull": ["$holds", []]},
                                                                "cond": movable}}}}]).to_list(limit)
        fresh = []
        for doc in docs:
            events, entries = self._leftovers.get(doc["_id"], (set(), {}))
            pending = [p for p in doc.get("pending") or [] if p["_id"] not in events]
            decided = [e for e in doc.get("decided", []) if e["id"] not in entries]
            if pending:
                fresh.append((doc["_id"], pending, decided))
            else:  # only leftovers: nothing new here as of ``writes``
                self._seen[doc["_id"]] = writes.get(doc["_id"], 0)
        lines = [HoldArchive.line(isbn, e) for isbn, _, decided in fresh for e in decided]
        archived = []

        async def archive_once():
            if not archived:
                await self.archive.add(lines)
                archived.append(True)

        out = []
        for isbn, pending, decided in fresh:
            async def ack(isbn=isbn, events=[p["_id"] for p in pending], decided=decided):
                await archive_once()
                self._leave(isbn, events, {e["id"]: e["order"] for e in decided}, writes.get(isbn, 0))
            for i, event in enumerate(pending):
                out.append((event, ack if i == len(pending) - 1 else None))
        return out

    def _leave(self, isbn: str, events: list, entries: dict, writes: int) -> None:
        """The relay numbered ``events`` (and archived ``entries``) of ``isbn``: leftovers now."""
        left = self._leftovers.setdefault(isbn, (set(), {}))
        left[0].update(events)
        left[1].update(entries)
        self._seen[isbn] = max(self._seen.get(isbn, 0), writes)
        loop = asyncio.get_running_loop()
        if len(left[0]) + len(left[1]) >= LEFTOVER_MAX:
            self._due[isbn] = 0.0
            self._announce()
        else:
            self._due.setdefault(isbn, loop.time() + self.leftover_seconds)
        if self._timer is None:
            self._timer = loop.call_later(self.leftover_seconds + 0.05, self._due_now)

    def _due_now(self) -> None:
        self._timer = None
        if self._due:
            self._announce()  # the relay's pass pulls what is due (pending_events)
            if self._timer is None:
                loop = asyncio.get_running_loop()
                next_due = max(0.05, min(self._due.values()) - loop.time() + 0.05)
                self._timer = loop.call_later(next_due, self._due_now)

    async def _pull_due(self) -> None:
        """Pull the leftovers that waited long enough (one update per document)."""
        now = asyncio.get_running_loop().time()
        for isbn in [i for i, due in self._due.items() if due <= now]:
            events, entries = self._leftovers.pop(isbn, (set(), {}))
            self._due.pop(isbn, None)
            pull: dict = {}
            if events:
                pull["pending"] = {"_id": {"$in": sorted(events)}}
            if entries:
                pull["holds"] = {"id": {"$in": sorted(entries)}}
            if not pull:
                continue
            try:
                await self.levels.update_one({"_id": isbn}, {"$pull": pull})
            except BaseException:
                left = self._leftovers.setdefault(isbn, (set(), {}))  # try again at the next pass
                left[0].update(events)
                left[1].update(entries)
                self._due[isbn] = now
                raise

    async def seed(self, stock: dict[str, int]) -> int:
        if await self.levels.estimated_document_count() > 0:
            return 0
        now = utcnow()
        docs = []
        for isbn, qty in stock.items():
            data = {"isbn": isbn, "on_hand": qty, "reserved": 0, "available": qty}
            docs.append({"_id": isbn, "on_hand": qty, "reserved": 0, "available": qty, "holds": [],
                         "pending": [{"_id": ObjectId(), "event": "stock.changed", "at": now, "data": data}]})
        try:
            await self.levels.insert_many(docs, ordered=False)
        except pymongo.errors.BulkWriteError:
            pass
        self._announce()
        return len(docs)

    # -- data written by the code before holds expired on their own ---------------------------------------------
    async def legacy_holds(self, order_id: str | None = None) -> dict[str, dict]:
        """Old-shape holds (``{order, qty}``, no state), by ISBN: of one order, or any (ISBN -> first one)."""
        match = {"state": {"$exists": False}, **({"order": order_id} if order_id else {})}
        docs = await self.levels.find({"holds": {"$elemMatch": match}},
                                      {"holds": {"$elemMatch": match}}).limit(1000).to_list(1000)
        return {d["_id"]: d["holds"][0] for d in docs}

    async def adopt_legacy(self, isbn: str, order_id: str, to: S, n: int,
                           until: datetime.datetime | None = None) -> bool:
        """Give an old-shape hold its new shape: still ``held`` (with ``until``), or decided as ``to`` with the
        levels' change that means."""
        now = utcnow()
        new = {"state": _lit(to.value), "id": ObjectId(), "n": n, "at": now}
        if until is not None:
            new["until"] = until
        pipeline: list = [{"$set": {"_e": _entry_of(order_id)}}]
        changes = {} if to is S.HELD else {f: _change(f, sign, "$_e.qty") for f, sign in _DELTAS[(S.HELD, to)].items()}
        holds = {"$concatArrays": [_without(order_id), [{"$mergeObjects": ["$_e", new]}]]}
        pipeline += [{"$set": {**changes, "holds": holds}}, {"$unset": "_e"}, _EXPIRES]
        if changes:
            pipeline.append(_append_event(now))
        return await self._update(
            isbn, {"_id": isbn, "holds": {"$elemMatch": {"order": order_id, "state": {"$exists": False}}}}, pipeline,
            order_id)


class LegacyReservationRepo:
    """``reservations``: the reservation headers of the code before holds expired on their own — read once at
    start-up, converted, and deleted."""

    def __init__(self, database):
        self.reservations = database["reservations"]

    async def batch(self, limit: int = 200) -> list[dict]:
        return await self.reservations.find({}).sort("_id", 1).limit(limit).to_list(limit)

    async def delete(self, order_id: str) -> None:
        await self.reservations.delete_one({"_id": order_id})
