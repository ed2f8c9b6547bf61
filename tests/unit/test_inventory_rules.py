"""Stock rules without a server: quantities, merged reservation lines, reservation states, level views."""
from __future__ import annotations

import pytest

from bookshop.services.errors import InvalidInput
from bookshop.services.inventory import (MAX_LINES, MAX_QUANTITY, ReservationState, check_quantity, levels_view,
                                         merge_lines)

A, B, C = "9780306406157", "9780804429573", "9791090636071"


@pytest.mark.parametrize("quantity", [1, 7, MAX_QUANTITY])
def test_quantities_from_one_to_the_maximum_are_accepted(quantity):
    assert check_quantity(quantity) == quantity


@pytest.mark.parametrize("quantity", [0, -1, -MAX_QUANTITY, MAX_QUANTITY + 1])
def test_other_quantities_are_refused_naming_the_field(quantity):
    with pytest.raises(InvalidInput) as err:
        check_quantity(quantity, "items[3].quantity")
    assert err.value.message.startswith("items[3].quantity:")
    assert err.value.details == {"field": "items[3].quantity"}


def test_merge_adds_quantities_per_isbn_and_sorts_by_isbn():
    assert merge_lines([(C, 1), (A, 2), (C, 3), (B, 1), (A, 1)]) == [(A, 3), (B, 1), (C, 4)]
    assert merge_lines([(B, 5)]) == [(B, 5)]


def test_merge_sorts_so_concurrent_orders_touch_items_in_one_order():
    assert merge_lines([(B, 1), (A, 1)]) == merge_lines([(A, 1), (B, 1)])


@pytest.mark.parametrize("count", [0, MAX_LINES + 1])
def test_merge_refuses_empty_or_too_many_lines(count):
    with pytest.raises(InvalidInput) as err:
        merge_lines([(A, 1)] * count)
    assert err.value.details == {"field": "items"}


def test_merge_accepts_the_maximum_number_of_lines():
    assert merge_lines([(A, 1)] * MAX_LINES) == [(A, MAX_LINES)]


def test_every_state_but_reserving_is_an_answer_a_caller_can_be_given():
    final = {s for s in ReservationState if s.final}
    assert final == {ReservationState.HELD, ReservationState.REJECTED, ReservationState.COMMITTED,
                     ReservationState.RELEASED, ReservationState.EXPIRED, ReservationState.RETURNED}
    assert not ReservationState.RESERVING.final


def test_states_are_their_stored_strings():
    assert ReservationState("held") is ReservationState.HELD
    assert ReservationState.COMMITTED == "committed"
    assert {s.value for s in ReservationState} == {
        "reserving", "held", "rejected", "committed", "released", "expired", "returned"}


def test_returned_entries_stay_in_their_document_while_the_other_decisions_leave_at_once():
    assert set(ReservationState.moved_out_at_once()) == {
        ReservationState.COMMITTED, ReservationState.RELEASED, ReservationState.EXPIRED, ReservationState.REJECTED}


def test_levels_view_of_a_never_restocked_book_is_zero():
    assert levels_view(A, None) == {"isbn": A, "on_hand": 0, "reserved": 0, "available": 0}


def test_levels_view_derives_available():
    doc = {"_id": A, "on_hand": 10, "reserved": 3, "holds": [{"order": "o1", "qty": 3}], "pending": []}
    assert levels_view(A, doc) == {"isbn": A, "on_hand": 10, "reserved": 3, "available": 7}
