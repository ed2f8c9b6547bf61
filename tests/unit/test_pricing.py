"""Pricing, the "buy two, get one free" promotion, order lines (no I/O; the order state machine is
decided by the saga: tests/unit/test_checkout_saga.py, tests/integration/test_checkout.py)."""
import pytest

from bookshop.services.errors import Conflict, InvalidInput
from bookshop.services.orders import (
    MAX_COPIES_PER_LINE, MAX_LINES, PricedLine, check_chargeable, merge_lines, price, promotion_discount,
    qualifies_for_promotion,
)

A, B, C = "9780000000001", "9780000000002", "9780000000003"
BOOKS = {
    A: {"isbn": A, "title": "Alpha", "price_cents": 1500, "currency": "EUR"},
    B: {"isbn": B, "title": "Beta", "price_cents": 990, "currency": "EUR"},
    C: {"isbn": C, "title": "Gamma", "price_cents": 2000, "currency": "EUR"},
}


def line(price_cents: int, quantity: int, isbn: str = A) -> PricedLine:
    return PricedLine(isbn, "t", quantity, price_cents)


# -- price() ----------------------------------------------------------------------------------------------
def test_price_uses_catalogue_prices_and_titles():
    p = price([(A, 2), (B, 1)], BOOKS, "EUR", with_promotion=False)
    assert [i.as_dict() for i in p.items] == [
        {"isbn": A, "title": "Alpha", "quantity": 2, "unit_price_cents": 1500},
        {"isbn": B, "title": "Beta", "quantity": 1, "unit_price_cents": 990},
    ]
    assert (p.subtotal_cents, p.discount_cents, p.total_cents, p.currency) == (3990, 0, 3990, "EUR")
    assert p.copies == 3
    assert p.promotion_applied is False


def test_price_with_promotion_takes_the_cheapest_copy_off():
    p = price([(A, 2), (B, 1), (C, 1)], BOOKS, "EUR", with_promotion=True)
    assert p.subtotal_cents == 1500 * 2 + 990 + 2000
    assert p.discount_cents == 990
    assert p.total_cents == p.subtotal_cents - 990
    assert p.promotion_applied is True


def test_price_with_promotion_but_too_few_copies_gives_nothing():
    p = price([(A, 1), (B, 1)], BOOKS, "EUR", with_promotion=True)
    assert p.discount_cents == 0 and p.promotion_applied is False


def test_price_of_a_book_not_for_sale_is_a_conflict_naming_it():
    with pytest.raises(Conflict) as info:
        price([(A, 1), ("9780000000099", 1)], BOOKS, "EUR", with_promotion=False)
    assert info.value.code == "book_unavailable"
    assert info.value.details == {"isbns": ["9780000000099"]}


def test_price_in_another_currency_is_refused():
    books = {**BOOKS, B: {**BOOKS[B], "currency": "USD"}}
    with pytest.raises(Conflict) as info:
        price([(A, 1), (B, 1)], books, "EUR", with_promotion=False)
    assert info.value.code == "book_unavailable"
    assert info.value.details == {"isbns": [B]}


# -- promotion_discount() ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lines, expected", [
    ([line(1000, 1)], 0),
    ([line(1000, 2)], 0),
    ([line(1000, 1), line(500, 1)], 0),
    ([line(1000, 3)], 1000),                                   # three copies of one book: one free
    ([line(1000, 2), line(500, 1)], 500),                      # the cheapest copy, not the cheapest line total
    ([line(300, 1), line(1000, 5), line(700, 1)], 300),
    ([line(1000, 6)], 1000),                                   # six copies: still one free copy (once)
    ([line(1000, 9), line(200, 9)], 200),
    ([line(0, 1), line(1000, 2)], 0),                          # a free book is the cheapest copy
])
def test_promotion_discount(lines, expected):
    assert promotion_discount(lines) == expected


def test_qualifies_for_promotion_counts_copies_not_lines():
    assert not qualifies_for_promotion([(A, 2)])
    assert qualifies_for_promotion([(A, 3)])
    assert qualifies_for_promotion([(A, 1), (B, 1), (C, 1)])
    assert not qualifies_for_promotion([(A, 1), (B, 1)])


# -- merge_lines() -------------------------------------------------------------------------------------------
def test_merge_lines_adds_quantities_in_first_seen_order():
    assert merge_lines([(B, 1), (A, 2), (B, 3)]) == [(B, 4), (A, 2)]


def test_merge_lines_limits():
    assert merge_lines([(A, MAX_COPIES_PER_LINE)]) == [(A, MAX_COPIES_PER_LINE)]
    many = [(f"978{i:010d}", 1) for i in range(MAX_LINES)]
    assert len(merge_lines(many)) == MAX_LINES


@pytest.mark.parametrize("lines, field", [
    ([], "items"),
    ([(f"978{i:010d}", 1) for i in range(MAX_LINES + 1)], "items"),
    ([(A, 0)], "items[0].quantity"),
    ([(A, 1), (B, -1)], "items[1].quantity"),
    ([(A, MAX_COPIES_PER_LINE + 1)], "items[0].quantity"),
    ([(A, 60), (A, 41)], "items"),                            # merged, one book passes the limit
])
def test_merge_lines_rejects(lines, field):
    with pytest.raises(InvalidInput) as info:
        merge_lines(lines)
    assert info.value.details["field"] == field
    assert info.value.message.startswith(field)


def test_a_total_above_the_processors_limit_is_invalid_items():
    books = {A: {**BOOKS[A], "price_cents": 50_000_000}, B: {**BOOKS[B], "price_cents": 1}}
    check_chargeable(price([(A, 2)], books, "EUR", with_promotion=False))  # exactly the limit: fine
    with pytest.raises(InvalidInput) as info:
        check_chargeable(price([(A, 2), (B, 1)], books, "EUR", with_promotion=False))
    assert info.value.code == "invalid_field" and info.value.details == {"field": "items"}
    # the limit applies to what would be charged, after the promotion
    check_chargeable(price([(A, 2), (B, 1)], books, "EUR", with_promotion=True))
