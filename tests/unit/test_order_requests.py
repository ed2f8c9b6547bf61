"""What an Idempotency-Key remembers of its request: the fingerprint covers the body with the card reduced to
its last four digits and expiry (no I/O)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys

import pytest

from bookshop.services import errors
from bookshop.services.checkout import (
    Gate, first_answer, local_prefix, owner_is_gone, process_identity, request_fingerprint,
)

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


# -- the first answer, kept in the order ---------------------------------------------------------------------------
def _order(history, answer, payment="charged"):
    return {"_id": "o1", "status": history[-1]["status"], "history": history,
            "payment": {"status": payment, "last4": "4242"}, "idem": {"key": "k", "fp": "f", "answer": answer}}


def test_the_first_answer_is_the_order_as_it_was_then():
    pending = {"status": "PENDING", "at": 1, "by": "u1"}
    confirmed = {"status": "CONFIRMED", "at": 2, "by": "system"}
    shipped = {"status": "SHIPPED", "at": 3, "by": "staff"}
    cancelled = {"status": "CANCELLED", "at": 4, "by": "u1", "reason": "cancelled_by_request"}
    # answered 201 when confirmed; shipped since: a replay still shows it CONFIRMED and charged
    view = first_answer(_order([pending, confirmed, shipped], 2))
    assert view["status"] == "CONFIRMED" and view["history"] == [pending, confirmed]
    assert view["payment"] == {"status": "charged", "last4": "4242"}
    # answered 202 while pending; confirmed and cancelled (refunded) since: a replay is that 202
    view = first_answer(_order([pending, confirmed, cancelled], 1, payment="refunded"))
    assert view["status"] == "PENDING" and view["history"] == [pending] and view["payment"]["status"] == "none"
    # the answer is the order as it stands when nothing came after it
    doc = _order([pending, confirmed], 2)
    assert first_answer(doc) is doc


# -- who runs a saga -----------------------------------------------------------------------------------------------
def test_only_a_gone_process_of_this_host_is_taken_for_dead():
    me = process_identity()
    prefix = local_prefix(me)
    assert me.startswith(prefix) and me.endswith(f"|{os.getpid()}")
    assert not owner_is_gone(me, me)
    assert not owner_is_gone(f"{prefix}{os.getppid()}", me)  # alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert owner_is_gone(f"{prefix}{child.pid}", me)  # exited and reaped
    assert not owner_is_gone(f"another-host|{prefix.split('|')[1]}|{child.pid}", me)  # not ours to judge
    assert not owner_is_gone(f"{prefix}not-a-pid", me)


# -- the gate in front of the saga ---------------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_the_gate_runs_so_many_lets_so_many_wait_and_refuses_the_rest():
    gate = Gate(running=2, waiting=1)
    await gate.enter(1)
    await gate.enter(1)
    third = asyncio.ensure_future(gate.enter(5))
    await asyncio.sleep(0)
    assert gate.active == 2 and gate.waiting == 1 and gate.full
    with pytest.raises(errors.Unavailable):
        gate.refuse_if_full()
    with pytest.raises(errors.Unavailable) as info:  # nobody else may wait: a 503 at once
        await gate.enter(5)
    assert info.value.retry_after and info.value.code == "checkout_busy"
    gate.leave()  # a checkout ends: the waiting one takes its place
    await asyncio.wait_for(third, 1)
    assert gate.active == 2 and gate.waiting == 0 and not gate.full
    gate.refuse_if_full()
    with pytest.raises(errors.Unavailable):  # waited too long: a 503, and its place is not lost
        await gate.enter(0.05)
    gate.leave()
    gate.leave()
    assert gate.active == 0
    await gate.enter(1)
    assert gate.active == 1
