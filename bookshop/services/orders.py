"""Orders: statuses and their transitions, pricing with the "buy two, get one free" promotion."""
from __future__ import annotations

import dataclasses
import enum

from bookshop.services.cards import MAX_CHARGE_CENTS
from bookshop.services.errors import Conflict, InvalidInput
from bookshop.services.views import iso_z

MAX_COPIES_PER_LINE = 100
MAX_LINES = 50
PROMOTION_MIN_COPIES = 3


class OrderStatus(str, enum.Enum):
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    SHIPPED = "SHIPPED"
    CANCELLED = "CANCELLED"


class PaymentStatus(str, enum.Enum):
    NONE = "none"
    CHARGED = "charged"
    DECLINED = "declined"
    # cancelled while a charge exists or may exist, and the processor has not yet confirmed its refund or void
    REFUND_PENDING = "refund_pending"
    REFUNDED = "refunded"


SYSTEM = "system"  # who acted, in history entries, for the saga and recovery


@dataclasses.dataclass(frozen=True)
class PricedLine:
    isbn: str
    title: str
    quantity: int
    unit_price_cents: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Price:
    items: tuple[PricedLine, ...]
    subtotal_cents: int
    discount_cents: int
    currency: str

    @property
    def total_cents(self) -> int:
        return self.subtotal_cents - self.discount_cents

    @property
    def copies(self) -> int:
        return sum(line.quantity for line in self.items)

    @property
    def promotion_applied(self) -> bool:
        return self.discount_cents > 0


def merge_lines(lines: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """One line per ISBN, in first-seen order; quantities checked."""
    if not 1 <= len(lines) <= MAX_LINES:
        raise InvalidInput(f"items: give 1 to {MAX_LINES} lines", code="invalid_field", details={"field": "items"})
    merged: dict[str, int] = {}
    for i, (isbn, qty) in enumerate(lines):
        if not 1 <= qty <= MAX_COPIES_PER_LINE:
            raise InvalidInput(f"items[{i}].quantity: must be an integer from 1 to {MAX_COPIES_PER_LINE}",
                               code="invalid_field", details={"field": f"items[{i}].quantity"})
        merged[isbn] = merged.get(isbn, 0) + qty
    if any(q > MAX_COPIES_PER_LINE for q in merged.values()):
        raise InvalidInput(f"items: at most {MAX_COPIES_PER_LINE} copies of one book", code="invalid_field",
                           details={"field": "items"})
    return list(merged.items())


def promotion_discount(lines: list[PricedLine]) -> int:
    """Buy two, get one free: with three or more copies in total, the cheapest copy is free."""
    if sum(line.quantity for line in lines) < PROMOTION_MIN_COPIES:
        return 0
    return min(line.unit_price_cents for line in lines)


def price(lines: list[tuple[str, int]], books: dict[str, dict], currency: str, with_promotion: bool) -> Price:
    """Price order lines from the catalogue's current books (never from the client)."""
    missing = [isbn for isbn, _ in lines if isbn not in books]
    if missing:
        raise Conflict("some books are not for sale", code="book_unavailable", details={"isbns": missing})
    priced = []
    for isbn, qty in lines:
        book = books[isbn]
        if book["currency"] != currency:
            raise Conflict("a book is priced in another currency", code="book_unavailable",
                           details={"isbns": [isbn]})
        priced.append(PricedLine(isbn, book["title"], qty, book["price_cents"]))
    subtotal = sum(line.unit_price_cents * line.quantity for line in priced)
    discount = promotion_discount(priced) if with_promotion else 0
    return Price(tuple(priced), subtotal, discount, currency)


def check_chargeable(priced: Price) -> None:
    """An order the processor could not charge in one go is refused as the customer sent it (its items)."""
    if priced.total_cents > MAX_CHARGE_CENTS:
        raise InvalidInput(f"items: the order total would exceed {MAX_CHARGE_CENTS} cents, the most one "
                           "payment can take", code="invalid_field", details={"field": "items"})


def qualifies_for_promotion(lines: list[tuple[str, int]]) -> bool:
    return sum(q for _, q in lines) >= PROMOTION_MIN_COPIES


def order_view(doc: dict) -> dict:
    """An order as the API shows it."""
    return {
        "id": doc["_id"], "user_id": doc["user_id"], "status": doc["status"],
        "items": doc["items"], "subtotal_cents": doc["subtotal_cents"], "discount_cents": doc["discount_cents"],
        "total_cents": doc["total_cents"], "currency": doc["currency"],
        "promotion_applied": doc["promotion_applied"], "shipping_address": doc["shipping_address"],
        "payment": {"status": doc["payment"]["status"], "last4": doc["payment"].get("last4")},
        "history": [{k: (iso_z(v) if k == "at" else v) for k, v in h.items()} for h in doc["history"]],
        "created_at": iso_z(doc["created_at"]),
    }
