"""Stock rules: quantities, reservation requests and their outcomes."""
from __future__ import annotations

import enum

from bookshop.services.errors import InvalidInput

MAX_QUANTITY = 1_000_000
MAX_LINES = 100


class ReservationState(str, enum.Enum):
    RESERVING = "reserving"   # being applied item by item
    HELD = "held"             # every item held; expires unless committed or released
    REJECTED = "rejected"     # some item was short; nothing is held
    COMMITTING = "committing"
    COMMITTED = "committed"   # the stock left on_hand (sold)
    RELEASED = "released"     # given back before commit
    EXPIRED = "expired"       # given back by the sweeper
    RETURNING = "returning"
    RETURNED = "returned"     # sold stock put back on the shelf (a cancelled confirmed order)

    @property
    def final(self) -> bool:
        return self in (ReservationState.HELD, ReservationState.REJECTED, ReservationState.COMMITTED,
                        ReservationState.RELEASED, ReservationState.EXPIRED, ReservationState.RETURNED)


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


class Reservations:
    """Reserve an order's items all-or-nothing, commit, release, put back and expire — idempotent per order.

    ``levels`` and ``headers`` are the storage repositories; ``transaction`` runs a function in a database
    transaction (only used by the rare put-back of sold stock).
    """

    LOCK_SECONDS = 10.0

    def __init__(self, levels, headers, ttl_seconds: float, transaction, clock):
        self.levels = levels
        self.headers = headers
        self.ttl = ttl_seconds
        self.transaction = transaction
        self.clock = clock

    async def reserve(self, order_id: str, items: list[tuple[str, int]]) -> dict:
        items = merge_lines(items)
        header = await self.headers.begin(order_id, items, self.LOCK_SECONDS)
        if header is None:
            return await self._outcome(order_id)
        return await self._apply(order_id, items)

    async def _apply(self, order_id: str, items: list[tuple[str, int]]) -> dict:
        import datetime
        held: list[tuple[str, int]] = []
        for isbn, qty in items:
            result = await self.levels.hold(isbn, order_id, qty)
            if result == "short":
                for h_isbn, h_qty in held:
                    await self.levels.unhold(h_isbn, order_id, h_qty, sold=False)
                short = []
                for s_isbn, s_qty in items:
                    level = levels_view(s_isbn, await self.levels.get(s_isbn))
                    if level["available"] < s_qty or s_isbn == isbn:
                        short.append({"isbn": s_isbn, "requested": s_qty, "available": max(0, level["available"])})
                doc = await self.headers.move(order_id, [ReservationState.RESERVING], ReservationState.REJECTED,
                                              busy=False, short=short)
                return self.view(doc) if doc is not None else await self._decided_elsewhere(order_id, items)
            held.append((isbn, qty))
        expires = self.clock() + datetime.timedelta(seconds=self.ttl)
        doc = await self.headers.move(order_id, [ReservationState.RESERVING], ReservationState.HELD,
                                      busy=False, expires_at=expires)
        return self.view(doc) if doc is not None else await self._decided_elsewhere(order_id, items)

    async def _decided_elsewhere(self, order_id: str, items: list[tuple[str, int]]) -> dict:
        """We were slower than our lock and another caller or the sweeper decided this reservation.
        If it gave the stock back, a unit we held after that must go back too (unhold is idempotent)."""
        doc = await self.headers.get(order_id)
        if doc["state"] in (ReservationState.REJECTED.value, ReservationState.RELEASED.value,
                            ReservationState.EXPIRED.value):
            for isbn, qty in items:
                await self.levels.unhold(isbn, order_id, qty, sold=False)
        return self.view(doc)

    async def _outcome(self, order_id: str, wait: float = 5.0) -> dict:
        """The result of a reservation another caller started (waiting for it, or finishing its work)."""
        import asyncio
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            doc = await self.headers.get(order_id)
            if doc is None:
                raise NotFoundError(order_id)
            if not doc.get("busy"):
                return self.view(doc)
            taken = await self.headers.take_over(order_id, self.LOCK_SECONDS)
            if taken is not None:
                await self._finish(taken)
                continue
            if loop.time() > deadline:
                from bookshop.services.errors import Unavailable
                raise Unavailable("the reservation is still being processed", retry_after=1)
            await asyncio.sleep(0.02)

    async def _finish(self, doc: dict) -> None:
        """Complete the level changes of a busy header (its worker died or is being resumed)."""
        order_id = doc["_id"]
        items = [(i["isbn"], i["quantity"]) for i in doc["items"]]
        state = ReservationState(doc["state"])
        if state is ReservationState.RESERVING:
            await self._apply(order_id, items)
            return
        for isbn, qty in items:
            await self.levels.unhold(isbn, order_id, qty, sold=state is ReservationState.COMMITTED)
        await self.headers.done(order_id, state)

    async def _end(self, order_id: str, from_states, to: ReservationState, sold: bool) -> dict:
        doc = await self.headers.move(order_id, from_states, to, busy=True, lock_seconds=self.LOCK_SECONDS)
        if doc is None:
            return await self._outcome(order_id)
        await self._finish(doc)
        return self.view({**doc, "busy": False})

    async def commit(self, order_id: str) -> dict:
        return await self._end(order_id, [ReservationState.HELD], ReservationState.COMMITTED, sold=True)

    async def release(self, order_id: str) -> dict:
        return await self._end(order_id, [ReservationState.HELD, ReservationState.REJECTED],
                               ReservationState.RELEASED, sold=False)

    async def put_back(self, order_id: str) -> dict:
        """Return a committed order's stock to the shelf, once (one transaction over the header and levels)."""
        async def work(session):
            doc = await self.headers.move(order_id, [ReservationState.COMMITTED], ReservationState.RETURNED,
                                          busy=False, session=session)
            if doc is not None:
                for item in doc["items"]:
                    await self.levels.put_back(item["isbn"], item["quantity"], session)
            return doc
        doc = await self.transaction(work)
        if doc is None:
            return await self._outcome(order_id)
        return self.view(doc)

    async def sweep(self) -> int:
        """Expire held reservations past their time and finish work abandoned by a dead worker."""
        import datetime
        now = self.clock()
        count = 0
        for doc in await self.headers.expired(now):
            moved = await self.headers.move(doc["_id"], [ReservationState.HELD], ReservationState.EXPIRED,
                                            busy=True, lock_seconds=self.LOCK_SECONDS)
            if moved is not None:  # another instance may have won it; then it is theirs
                await self._finish(moved)
                count += 1
        for doc in await self.headers.stale(now - datetime.timedelta(seconds=self.LOCK_SECONDS)):
            taken = await self.headers.take_over(doc["_id"], self.LOCK_SECONDS)
            if taken is None:
                continue
            if taken["state"] == ReservationState.RESERVING.value:
                # abandoned half-way: give back what it held rather than guess
                for item in taken["items"]:
                    await self.levels.unhold(item["isbn"], taken["_id"], item["quantity"], sold=False)
                await self.headers.move(taken["_id"], [ReservationState.RESERVING], ReservationState.REJECTED,
                                        busy=False, short=[], reason="abandoned")
            else:
                await self._finish(taken)
            count += 1
        return count

    @staticmethod
    def view(doc: dict) -> dict:
        out = {"order_id": doc["_id"], "state": doc["state"], "items": doc["items"]}
        if doc.get("short"):
            out["short"] = doc["short"]
        if doc.get("expires_at") is not None:
            out["expires_at"] = doc["expires_at"].isoformat(timespec="seconds")
        return out


class NotFoundError(LookupError):
    """No reservation for that order."""
