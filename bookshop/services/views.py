"""The JSON shapes of the shop's records as the API shows them, and its one way of writing a time."""
from __future__ import annotations

import datetime

BOOK_FIELDS = ("isbn", "title", "authors", "category", "price_cents", "currency", "description",
               "published_year", "created_at", "updated_at")


def iso_z(at: datetime.datetime | None) -> str | None:
    """A time as the API writes it: UTC, milliseconds, ``Z`` (``2026-12-02T06:30:00.000Z``); None stays None.
    Times read back from the database are naive UTC, aware ones are converted."""
    if at is None:
        return None
    if at.tzinfo is not None:
        at = at.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return at.isoformat(timespec="milliseconds") + "Z"


def book_view(doc: dict) -> dict:
    out = {k: doc.get(k) for k in BOOK_FIELDS}
    out["created_at"], out["updated_at"] = iso_z(out["created_at"]), iso_z(out["updated_at"])
    return out


def charge_view(doc: dict) -> dict:
    return {"order_id": doc["_id"], "status": doc["status"], "reason": doc.get("reason"),
            "amount_cents": doc.get("amount_cents"), "currency": doc.get("currency"), "last4": doc.get("last4"),
            "refunded": doc.get("refunded", False),
            "ledger": [{"kind": e["kind"], "amount_cents": e["amount_cents"], "at": iso_z(e["at"])}
                       for e in doc.get("ledger", [])]}
