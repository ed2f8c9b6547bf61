"""Inventory service routes: public levels, staff restock, internal reservations for the orders service."""
from __future__ import annotations

import logging

from bookshop.deps import InventoryDeps
from bookshop.handlers.base import BaseHandler
from bookshop.handlers.bodies import Line
from bookshop.handlers.catalog import ISBN
from bookshop.handlers.common import int_arg
from bookshop.services import errors
from bookshop.services.inventory import MAX_LINES, NotFoundError, check_quantity, levels_view
from bookshop.services.isbn import normalize_isbn
from bookshop.validation import StrictModel

log = logging.getLogger(__name__)


class InventoryBase(BaseHandler):
    """Base of the inventory routes: their collaborators are ``self.deps``."""
    deps: InventoryDeps


class Restock(StrictModel):
    quantity: int


class ReserveRequest(StrictModel):
    order_id: str
    items: list[Line]


class Where(StrictModel):
    """The optional body of commit, release and put-back: the order's ISBNs, if the caller knows them (then
    only their level documents are read; the answer is the same without)."""
    isbns: list[str]


def _where(handler: InventoryBase) -> list[str] | None:
    if not handler.body:
        return None
    isbns = handler.json_body(Where).isbns
    if not 1 <= len(isbns) <= MAX_LINES:
        raise errors.InvalidInput(f"isbns: give 1 to {MAX_LINES}", code="invalid_field", details={"field": "isbns"})
    return sorted({normalize_isbn(isbn, f"isbns[{i}]") for i, isbn in enumerate(isbns)})


async def known_book(deps: InventoryDeps, isbn: str) -> None:
    if await deps.catalog.book(isbn) is None:
        raise errors.NotFound("no such book", code="book_not_found")


class LevelsHandler(InventoryBase):
    public = {"GET"}

    async def get(self, raw_isbn):
        isbn = normalize_isbn(raw_isbn)
        doc = await self.deps.levels.get(isbn)
        if doc is None:
            await known_book(self.deps, isbn)  # catalogued but never restocked: 0/0/0
        self.write_json(levels_view(isbn, doc))


class RestockHandler(InventoryBase):
    async def post(self, raw_isbn):
        self.require("staff")
        isbn = normalize_isbn(raw_isbn)
        quantity = check_quantity(self.json_body(Restock).quantity)
        if await self.deps.levels.get(isbn) is None:
            await known_book(self.deps, isbn)
        levels = await self.deps.levels.restock(isbn, quantity)
        self.ctx.metrics.count("restocks")
        log.info("restocked %s by %d", isbn, quantity)
        self.write_json(levels)


class AllLevelsHandler(InventoryBase):
    """``GET /internal/levels?after=ISBN&limit=N`` (service): levels in ISBN order, for snapshots."""

    async def get(self):
        self.require("service")
        limit = int_arg(self, "limit", 1000, 1, 1000)
        after = self.get_query_argument("after", None)
        seq = await self.ctx.event_log.latest_seq()  # read first: later events are newer than the snapshot
        epoch = await self.ctx.event_log.epoch()
        docs = await self.deps.levels.list(after, limit)
        self.write_json({"items": [levels_view(d["_id"], d) for d in docs], "seq": seq, "epoch": epoch})


def _order_id(raw: str) -> str:
    if not 1 <= len(raw) <= 64 or not raw.replace("-", "").replace("_", "").isalnum():
        raise errors.InvalidInput("order_id: 1 to 64 letters, digits, - or _", code="invalid_field",
                                  details={"field": "order_id"})
    return raw


class ReservationsHandler(InventoryBase):
    async def post(self):
        self.require("service")
        body = self.json_body(ReserveRequest)
        order_id = _order_id(body.order_id)
        items = [(normalize_isbn(line.isbn, f"items[{i}].isbn"),
                  check_quantity(line.quantity, f"items[{i}].quantity"))
                 for i, line in enumerate(body.items)]
        result = await self.deps.reservations.reserve(order_id, items)
        self.ctx.metrics.count(f"reservations_{result['state']}")
        self.write_json(result)


class ReservationActionHandler(InventoryBase):
    async def post(self, order_id, action):
        self.require("service")
        reservations = self.deps.reservations
        order_id, isbns = _order_id(order_id), _where(self)
        try:
            if action == "commit":
                result = await reservations.commit(order_id, isbns)
            elif action == "release":
                result = await reservations.release(order_id, isbns)
            else:
                result = await reservations.put_back(order_id, isbns)
        except NotFoundError:
            raise errors.NotFound("no reservation for this order", code="reservation_not_found") from None
        wanted = {"commit": "committed", "release": "released", "put-back": "returned"}[action]
        if result["state"] != wanted and not (action == "release" and result["state"] in ("expired", "released")):
            raise errors.Conflict(f"reservation is {result['state']}", code="reservation_not_held",
                                  details=result)
        self.write_json(result)

    async def get(self, order_id, action):
        raise errors.NotFound()


class ReservationHandler(InventoryBase):
    async def get(self, order_id):
        self.require("service")
        reservation = await self.deps.reservations.look(_order_id(order_id))
        if reservation is None:
            raise errors.NotFound("no reservation for this order", code="reservation_not_found")
        self.write_json(reservation.view())


def routes() -> list[tuple]:
    return [
        (rf"/api/v1/inventory/{ISBN}", LevelsHandler),
        (rf"/api/v1/inventory/{ISBN}/restock", RestockHandler),
        (r"/internal/levels", AllLevelsHandler),
        (r"/internal/reservations", ReservationsHandler),
        (r"/internal/reservations/([A-Za-z0-9_-]{1,64})", ReservationHandler),
        (r"/internal/reservations/([A-Za-z0-9_-]{1,64})/(commit|release|put-back)", ReservationActionHandler),
    ]
