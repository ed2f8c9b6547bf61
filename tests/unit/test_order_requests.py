"""What an Idempotency-Key remembers of its request: the fingerprint covers the body with the card reduced to
its last four digits and expiry (no I/O)."""
from __future__ import annotations

import hashlib
import hmac
import json

from bookshop.services.checkout import request_fingerprint

SECRET = "s3cret"
BODY = {"items": [{"isbn": "9780000000001", "quantity": 1}],
        "shipping_address": {"name": "Ann", "line1": "1 Book Street", "city": "Lyon", "postal_code": "69001",
                             "country": "FR"},
        "payment": {"card_number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}}


def with_card(**card) -> dict:
    return {**BODY, "payment": {**BODY["payment"], **card}}


def test_another_card_with_the_same_last_four_and_expiry_is_the_same_request():
    first = request_fingerprint(BODY, SECRET)
    assert request_fingerprint(with_card(card_number="4000020000004242"), SECRET) == first
    assert request_fingerprint(with_card(cvc="999"), SECRET) == first
    assert request_fingerprint(with_card(card_number="4242 4242 4242 4242"), SECRET) == first
    assert request_fingerprint(json.loads(json.dumps(BODY)), SECRET) == first  # key order does not matter


def test_anything_else_in_the_body_makes_another_request():
    first = request_fingerprint(BODY, SECRET)
    assert request_fingerprint(with_card(card_number="4000000000000002"), SECRET) != first  # other last four
    assert request_fingerprint(with_card(exp_month=11), SECRET) != first
    assert request_fingerprint(with_card(exp_year=2036), SECRET) != first
    assert request_fingerprint({**BODY, "items": [{"isbn": "9780000000001", "quantity": 2}]}, SECRET) != first
    assert request_fingerprint({**BODY, "expected_total_cents": 1000}, SECRET) != first
    assert request_fingerprint(BODY, "another secret") != first


def test_nothing_derived_from_the_full_number_or_the_cvc():
    fingerprint = request_fingerprint(BODY, SECRET)
    whole_body = hmac.new(SECRET.encode(), json.dumps(BODY, sort_keys=True).encode(), hashlib.sha256).hexdigest()
    assert fingerprint != whole_body
    # the fingerprint is exactly the HMAC of the reduced body: the full number and the CVC never went in
    reduced = {**BODY, "payment": {"last4": "4242", "exp_month": 12, "exp_year": 2035}}
    expected = hmac.new(SECRET.encode(), json.dumps(reduced, sort_keys=True, separators=(",", ":")).encode(),
                        hashlib.sha256).hexdigest()
    assert fingerprint == expected
    assert "4242424242424242" not in fingerprint
