"""Stock rules: quantities, reservation requests and their outcomes.

How a reservation is kept, without a header document or a transaction: each ISBN of the order is held by an
entry in that ISBN's level document (one conditional single-document update), carrying the hold's expiry and
how many ISBNs the order has (``n``). The entry of the order's first ISBN (the smallest: items are held in
ISBN order) is the *primary*: every decision — commit, release, expire, reject — is taken on it first, by a
conditional move of that one entry, so two deciders can never both win. The other entries then follow the
primary (anyone who looks finishes a decision a crash left half-done). What an order's reservation is, is
computed from its entries (and from the archive lines the relay moves decided entries to): a replayed request
or a status read is answered from there, so nothing else needs writing.

A held entry whose ISBN already has an archived line for the order is a late duplicate of a reservation
decided long ago (a retried request that arrived after everything else): it is dropped, never sold.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum

from bookshop.services.errors import InvalidInput, Unavailable

MAX_QUANTITY = 1_000_000
MAX_LINES = 100


class ReservationState(str, enum.Enum):
    RESERVING = "reserving"   # some ISBNs held, the others not yet (being made, or its maker died)
    HELD = "held"             # every item held; expires unless committed or released
    REJECTED = "rejected"     # some item was short; nothing is held
    COMMITTED = "committed"   # the stock left on_hand (sold)
    RELEASED = "released"     # given back before commit
    EXPIRED = "expired"       # given back by the sweeper
    RETURNED = "returned"     # sold stock put back on the shelf (a cancelled confirmed order)

    @property
    def final(self) -> bool:
        return self is not ReservationState.RESERVING

    @classmethod
    def moved_out_at_once(cls) -> tuple["ReservationState", ...]:
        """Decided entry states the relay moves from the level document to the archive at its next pass
        (``returned`` ones stay a while: they fence a repeated put-back)."""
        return cls.COMMITTED, cls.RELEASED, cls.EXPIRED, cls.REJECTED


S = ReservationState
# of two records of one (order, ISBN), the later state: a sale can be returned, nothing else follows a decision
_RANK = {S.HELD: 0, S.REJECTED: 1, S.RELEASED: 1, S.EXPIRED: 1, S.COMMITTED: 1, S.RETURNED: 2}


def check_quantity(quantity: int, field: str = "quantity") -> int:
    if not 0 < quantity <= MAX_QUANTITY:
        raise InvalidInput(f"{field}: must be an integer from 1 to {MAX_QUANTITY}", code="invalid_field",
                           details={"field": field})
    return quantity


def merge_lines(items: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """One line per ISBN (quantities added), sorted so concurrent reservations touch items in one order."""
    if not 1 <= len(items) <= MAX_LINES:
        raise InvalidInput(f"items: give 1 to {MAX_LINES} lines", code="invalid_field",
                           details={"field": "items"})
    merged: dict[str, int] = {}
    for isbn, qty in items:
        merged[isbn] = merged.get(isbn, 0) + qty
    return sorted(merged.items())


def levels_view(isbn: str, doc: dict | None) -> dict:
    doc = doc or {}
    on_hand, reserved = doc.get("on_hand", 0), doc.get("reserved", 0)
    return {"isbn": isbn, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved}


@dataclasses.dataclass
class Line:
    """What is known of one ISBN of an order's reservation."""
    state: ReservationState
    qty: int
    n: int
    until: datetime.datetime | None = None
    short: list | None = None
    in_document: bool = True  # False: only its archived line is left


@dataclasses.dataclass
class Reservation:
    order_id: str
    lines: dict[str, Line]

    @property
    def primary(self) -> str:
        return min(self.lines)

    @property
    def state(self) -> ReservationState:
        first = self.lines[self.primary]
        if first.state is S.HELD and (len(self.lines) < first.n
                                      or any(line.state is not S.HELD for line in self.lines.values())):
            return S.RESERVING
        return first.state

    def followers(self) -> list[tuple[str, Line]]:
        return [(isbn, line) for isbn, line in sorted(self.lines.items()) if isbn != self.primary]

    def view(self, state: ReservationState | None = None) -> dict:
        first = self.lines[self.primary]
        out = {"order_id": self.order_id, "state": (state or self.state).value,
               "items": [{"isbn": isbn, "quantity": line.qty} for isbn, line in sorted(self.lines.items())]}
        if first.short:
            out["short"] = first.short
        if first.until is not None and first.state is not S.REJECTED:
            out["expires_at"] = first.until.isoformat(timespec="seconds")
        return out


class Reservations:
    """Reserve an order's items all-or-nothing, commit, release, put back and expire — idempotent per order.

    ``levels`` is the LevelRepo (one conditional update per change of one ISBN), ``archive`` the HoldArchive
    (decided entries the relay moved out of the level documents), ``clock`` the time.
    """

    WAIT_FOR_RESERVING = 5.0  # a commit of a reservation still being made waits this long, then 503

    def __init__(self, levels, archive, ttl_seconds: float, clock):
        self.levels = levels
        self.archive = archive
        self.ttl = ttl_seconds
        self.clock = clock

    # -- reading ------------------------------------------------------------------------------------------
    async def look(self, order_id: str, isbns: list[str] | None = None) -> Reservation | None:
        """The order's reservation as its entries and archived lines tell, without changing anything.

        ``isbns``: the order's ISBNs, as its caller knows them (the orders service sends those it reserved):
        only their level documents are read. Without them, or when they turn out not to be all (fewer entries
        and lines than the order has ISBNs), every level document is looked through. Reads the level
        documents first, then the archive: a late duplicate's entry seen in the first read has its archived
        line visible in the second."""
        reservation, _ = await self._look(order_id, isbns)
        return reservation

    async def _look(self, order_id: str, isbns: list[str] | None) -> tuple[Reservation | None, list]:
        if isbns:
            entries = await self.levels.entries(order_id, isbns)
            archived = await self._archived(order_id)
            known = set(entries) | set(archived)
            if not known or len(known) >= _ordered(entries, archived):
                return self._combine(order_id, entries, archived)
        # not told where to look, or not all found there: the archive says where, else look everywhere
        archived = await self._archived(order_id)
        where = sorted(archived) if archived and len(archived) >= _ordered({}, archived) else None
        entries = await self.levels.entries(order_id, where)
        if any(entry.get("state") == S.HELD.value for entry in entries.values()):
            archived = await self._archived(order_id)  # after the entries: a late duplicate's line shows
        return self._combine(order_id, entries, archived)

    async def _archived(self, order_id: str) -> dict[str, dict]:
        """The order's archived lines, the latest per ISBN."""
        archived: dict[str, dict] = {}
        for line in await self.archive.of_order(order_id):
            best = archived.get(line["isbn"])
            if best is None or _RANK[S(line["state"])] > _RANK[S(best["state"])]:
                archived[line["isbn"]] = line
        return archived

    @staticmethod
    def _combine(order_id: str, entries: dict[str, dict],
                 archived: dict[str, dict]) -> tuple[Reservation | None, list[tuple[str, dict]]]:
        lines = {isbn: _line(doc, in_document=False) for isbn, doc in archived.items()}
        strays = []
        for isbn, entry in entries.items():
            if entry.get("state") is None:
                continue  # an old-shape hold (converted at start-up)
            state = S(entry["state"])
            if isbn in archived:
                if state is S.HELD:
                    strays.append((isbn, entry))
                    continue
                if _RANK[state] < _RANK[S(archived[isbn]["state"])]:
                    continue
            lines[isbn] = _line(entry, in_document=True)
        return (Reservation(order_id, lines) if lines else None), strays

    async def _settle(self, order_id: str, isbns: list[str] | None = None) -> Reservation | None:
        """Look, drop late duplicates, and make the followers of a decided primary follow it."""
        reservation, strays = await self._look(order_id, isbns)
        for isbn, _ in strays:
            await self.levels.drop(isbn, order_id)
        if reservation is not None and reservation.lines[reservation.primary].state is not S.HELD:
            await self._follow(reservation, reservation.lines[reservation.primary].state)
        return reservation

    async def _follow(self, reservation: Reservation, decision: ReservationState) -> None:
        """Bring the order's other ISBNs to the primary's decision."""
        order_id = reservation.order_id
        for isbn, line in reservation.followers():
            if line.state is S.HELD and line.in_document:
                await self.levels.move(isbn, order_id, S.HELD, decision)
            elif line.state is S.COMMITTED and decision is S.RETURNED:
                if line.in_document:
                    await self.levels.move(isbn, order_id, S.COMMITTED, S.RETURNED)
                else:
                    await self.levels.put_back_archived(isbn, order_id, line.qty, line.n)
            else:
                continue
            line.state = decision

    # -- reserving ----------------------------------------------------------------------------------------
    async def reserve(self, order_id: str, items: list[tuple[str, int]]) -> dict:
        items = merge_lines(items)
        n = len(items)
        until = self.clock() + datetime.timedelta(seconds=self.ttl)
        fresh = 0
        for k, (isbn, qty) in enumerate(items):
            result, entry = await self.levels.hold(isbn, order_id, qty, n, until)
            if result == "held":
                fresh += 1
            elif result == "already":
                if entry.get("state") != S.HELD.value:
                    return await self._answer(order_id, [i for i, _ in items])  # decided before: a replay
                if k == 0:
                    until = entry["until"]  # a duplicate: hold the rest as the first one did
            else:
                return await self._reject(order_id, items, k)
        if fresh == n == 1 and not await self.archive.of_order(order_id):
            # the common case, answered without reading the level back
            return Reservation(order_id, {items[0][0]: Line(S.HELD, items[0][1], 1, until)}).view()
        # several ISBNs (a release may have decided the first while we held the rest), a duplicate's work,
        # or a late duplicate of a reservation decided long ago: the entries tell
        return await self._answer(order_id, [isbn for isbn, _ in items])

    async def _answer(self, order_id: str, isbns: list[str]) -> dict:
        reservation = await self._settle(order_id, isbns)
        if reservation is None:
            raise NotFoundError(order_id)
        return reservation.view()

    async def _reject(self, order_id: str, items: list[tuple[str, int]], k: int) -> dict:
        """Item ``k`` is short: give back what the order holds (the first ISBN first: that is the decision)."""
        isbn_k = items[k][0]
        found = await self.levels.get_many([isbn for isbn, _ in items])
        short = []
        for isbn, qty in items:
            available = levels_view(isbn, found.get(isbn))["available"]
            if available < qty or isbn == isbn_k:
                short.append({"isbn": isbn, "requested": qty, "available": max(0, available)})
        answer = {"order_id": order_id, "state": S.REJECTED.value,
                  "items": [{"isbn": isbn, "quantity": qty} for isbn, qty in items], "short": short}
        if k == 0:
            return answer  # nothing was held, so nothing is recorded
        if not await self.levels.move(items[0][0], order_id, S.HELD, S.REJECTED, short=short):
            # decided meanwhile (a duplicate, a release): that stands
            return await self._answer(order_id, [isbn for isbn, _ in items])
        for isbn, _ in items[1:k]:
            await self.levels.move(isbn, order_id, S.HELD, S.REJECTED)
        return answer

    # -- deciding -----------------------------------------------------------------------------------------
    async def _decide(self, reservation: Reservation, frm: ReservationState, to: ReservationState) -> dict | None:
        """Move the primary from ``frm`` to ``to``, then the followers; None if someone else decided first."""
        if not await self.levels.move(reservation.primary, reservation.order_id, frm, to):
            return None
        reservation.lines[reservation.primary].state = to
        await self._follow(reservation, to)
        return reservation.view(to)

    async def commit(self, order_id: str, isbns: list[str] | None = None) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.WAIT_FOR_RESERVING
        while True:
            reservation = await self._settle(order_id, isbns)
            if reservation is None:
                raise NotFoundError(order_id)
            state = reservation.state
            if state is S.RESERVING:
                if loop.time() > deadline:
                    raise Unavailable("the reservation is still being made", retry_after=1)
                await asyncio.sleep(0.05)
                continue
            if state is not S.HELD:
                return reservation.view()
            done = await self._decide(reservation, S.HELD, S.COMMITTED)
            if done is not None:
                return done

    async def release(self, order_id: str, isbns: list[str] | None = None) -> dict:
        while True:
            reservation = await self._settle(order_id, isbns)
            if reservation is None:
                raise NotFoundError(order_id)
            state = reservation.state
            if state is S.REJECTED:
                return reservation.view(S.RELEASED)  # nothing is held: nothing to write
            if state not in (S.HELD, S.RESERVING):
                return reservation.view()
            done = await self._decide(reservation, S.HELD, S.RELEASED)
            if done is not None:
                return done

    async def put_back(self, order_id: str, isbns: list[str] | None = None) -> dict:
        """Return a committed order's stock to the shelf, once per ISBN (each ISBN's put-back is a conditional
        update of its own level document)."""
        reservation = await self._settle(order_id, isbns)
        if reservation is None:
            raise NotFoundError(order_id)
        if reservation.state is not S.COMMITTED:
            return reservation.view()
        for isbn, line in sorted(reservation.lines.items()):
            if line.in_document:
                await self.levels.move(isbn, order_id, S.COMMITTED, S.RETURNED)
            else:
                await self.levels.put_back_archived(isbn, order_id, line.qty, line.n)
            line.state = S.RETURNED
        return reservation.view(S.RETURNED)

    # -- expiring -----------------------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Expire held reservations past their time (and finish any decision a crash left half-done on the
        way); returns how many expired here."""
        now = self.clock()
        count = 0
        found: dict[str, list[str]] = {}
        for isbn, entry in await self.levels.expired(now):
            found.setdefault(entry["order"], []).append(isbn)
        for order_id, isbns in sorted(found.items()):
            reservation = await self._settle(order_id, isbns)  # (all its ISBNs, unless a decision is half-done)
            if reservation is None or reservation.state not in (S.HELD, S.RESERVING):
                continue
            # expires only if the primary's time is up (a commit may win the race: then it stands)
            if await self.levels.move(reservation.primary, order_id, S.HELD, S.EXPIRED, until_before=now):
                reservation.lines[reservation.primary].state = S.EXPIRED
                await self._follow(reservation, S.EXPIRED)
                count += 1
        return count

    # -- data written by the code before holds expired on their own ---------------------------------------------
    async def convert_legacy(self, headers) -> int:
        """Finish or convert the reservation headers of the earlier code (``headers``: LegacyReservationRepo),
        then give back old-shape holds that no header explains. Safe to repeat after a crash half-way; run
        before this instance serves, with no instance of the earlier code still running."""
        converted = 0
        while True:
            batch = await headers.batch()
            if not batch:
                break
            for header in batch:
                await self._convert(header)
                await headers.delete(header["_id"])
                converted += 1
        while True:
            orphans = await self.levels.legacy_holds()
            if not orphans:
                break
            for isbn, entry in orphans.items():
                await self.levels.adopt_legacy(isbn, entry["order"], S.RELEASED, n=1)
        return converted

    _LEGACY = {"reserving": S.REJECTED, "committing": S.COMMITTED, "returning": S.RETURNED}

    async def _convert(self, header: dict) -> None:
        order_id = header["_id"]
        items = [(i["isbn"], i["quantity"]) for i in header["items"]]
        state = self._LEGACY.get(header["state"]) or S(header["state"])
        until = header.get("expires_at")
        holds = await self.levels.legacy_holds(order_id)
        lines = []
        for isbn, qty in items:
            if isbn in holds:
                # still held in the old shape: held on (HELD), or what the header decided, finished now
                await self.levels.adopt_legacy(isbn, order_id, state, len(items),
                                               until=until if state is S.HELD else None)
            elif state is not S.HELD:
                # the earlier code had already applied this ISBN's part of the decision to the levels
                entry = {"order": order_id, "qty": qty, "state": state.value, "id": "legacy", "n": len(items),
                         "at": header.get("created_at"), "until": until, "short": header.get("short")}
                lines.append(self.archive.line(isbn, entry))
        await self.archive.add(lines)


def _ordered(entries: dict[str, dict], archived: dict[str, dict]) -> int:
    """How many ISBNs the order has, as its entries and lines say."""
    return max([e.get("n", 1) for e in entries.values()] + [line.get("n", 1) for line in archived.values()],
               default=0)


def _line(doc: dict, in_document: bool) -> Line:
    return Line(S(doc["state"]), doc["qty"], doc.get("n", 1), doc.get("until"), doc.get("short") or None,
                in_document)


class NotFoundError(LookupError):
    """No reservation for that order."""
