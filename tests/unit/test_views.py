"""The API's one time format and the record views (bookshop/services/views.py)."""
from __future__ import annotations

import datetime

from bookshop.services.views import book_view, charge_view, iso_z

UTC = datetime.timezone.utc


def test_times_are_utc_milliseconds_and_z_whatever_zone_they_come_in():
    at = datetime.datetime(2026, 12, 2, 6, 30, 0, 123456, tzinfo=UTC)
    assert iso_z(at) == "2026-12-02T06:30:00.123Z"
    assert iso_z(at) == at.isoformat(timespec="milliseconds").replace("+00:00", "Z")  # what the views wrote
    paris = datetime.timezone(datetime.timedelta(hours=1))
    assert iso_z(at.astimezone(paris)) == "2026-12-02T06:30:00.123Z"
    assert iso_z(at.replace(tzinfo=None)) == "2026-12-02T06:30:00.123Z"  # naive: taken as UTC
    assert iso_z(None) is None


def test_a_book_shows_its_public_fields_only():
    at = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    doc = {"_id": "9780000000019", "isbn": "9780000000019", "title": "Dune", "words": ["dune"], "deleted_at": None,
           "created_at": at, "updated_at": at}
    view = book_view(doc)
    assert view["title"] == "Dune" and view["created_at"] == "2026-01-01T00:00:00.000Z"
    assert "words" not in view and "deleted_at" not in view and view["description"] is None


def test_a_charge_shows_its_ledger_with_times():
    at = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    view = charge_view({"_id": "o1", "status": "charged", "amount_cents": 100, "currency": "EUR", "last4": "4242",
                        "refunded": False, "ledger": [{"kind": "charge", "amount_cents": 100, "at": at}]})
    assert view == {"order_id": "o1", "status": "charged", "reason": None, "amount_cents": 100, "currency": "EUR",
                    "last4": "4242", "refunded": False,
                    "ledger": [{"kind": "charge", "amount_cents": 100, "at": "2026-01-01T00:00:00.000Z"}]}
