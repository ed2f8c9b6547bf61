import datetime

import pytest

from bookshop.services.cards import (
    DECLINED, INSUFFICIENT_FUNDS, card_decision, last4, luhn_valid, normalize_number, validate_card,
)
from bookshop.services.errors import InvalidInput

TODAY = datetime.date(2025, 6, 15)
GOOD = "4242424242424242"


def test_luhn():
    assert luhn_valid(GOOD)
    assert not luhn_valid("4242424242424241")
    assert luhn_valid(DECLINED)
    assert luhn_valid(INSUFFICIENT_FUNDS)
    assert luhn_valid("5555555555554444")
    assert luhn_valid("378282246310005")      # 15 digits (Amex test card)


@pytest.mark.parametrize("number", [
    "", "0", "42424242424",                   # too short (11 digits)
    "4" * 20,                                 # too long
    "4242 4242 4242 4242", "4242-4242-4242-4242", " 4242424242424242",
    "४२४२४२४२४२४२४२४२",                       # non-ASCII digits
    None, 4242424242424242,
])
def test_luhn_rejects_bad_shapes(number):
    assert not luhn_valid(number)


def test_luhn_length_bounds():
    # 12 zeros and 19 zeros pass the checksum; 11 and 20 are out of range.
    assert luhn_valid("0" * 12)
    assert luhn_valid("0" * 19)
    assert not luhn_valid("0" * 11)
    assert not luhn_valid("0" * 20)


def test_card_decision():
    assert card_decision(GOOD) == "approved"
    assert card_decision(DECLINED) == "declined"
    assert card_decision(INSUFFICIENT_FUNDS) == "insufficient_funds"


def test_last4():
    assert last4(GOOD) == "4242"
    assert last4(INSUFFICIENT_FUNDS) == "9995"


def _error(**kwargs):
    args = {"number": GOOD, "exp_month": 12, "exp_year": 2027, "cvc": "123", "today": TODAY}
    args.update(kwargs)
    with pytest.raises(InvalidInput) as exc:
        validate_card(**args)
    err = exc.value
    assert err.code == "invalid_field"
    assert err.details["field"] in err.message
    return err


def test_valid_card_passes_and_comes_back_as_digits():
    assert validate_card(GOOD, 12, 2027, "123", TODAY) == GOOD
    assert validate_card(GOOD, 1, 2030, "1234", TODAY) == GOOD


@pytest.mark.parametrize("number", [
    "4242 4242 4242 4242", "4242-4242-4242-4242", "4242 4242-4242 4242", "4242424242424242",
    "42424242 42424242", "3782 822463 10005",
])
def test_grouped_card_numbers_are_accepted_and_the_separators_ignored(number):
    digits = number.replace(" ", "").replace("-", "")
    assert normalize_number(number) == digits
    assert validate_card(number, 12, 2027, "123", TODAY) == digits


@pytest.mark.parametrize("number", [
    "4242  4242 4242 4242", "4242--4242-4242-4242", "4242 -4242 4242 4242",   # doubled separators
    " 4242424242424242", "4242424242424242 ", "-4242424242424242",           # leading / trailing
    "4242.4242.4242.4242", "4242_4242_4242_4242", "4242\t4242424242424",     # other separators
    "4242\u00a04242424242424", "४२४२ ४२४२ ४२४२ ४२४२",                          # non-ASCII
    "4242 4242 424", "4242 4242 4242 4242 4242",                              # 11 and 20 digits
    "", "abc", None, 4242424242424242,
])
def test_card_number_badly_grouped_or_not_digits(number):
    err = _error(number=number)
    assert err.details == {"field": "payment.card_number"}
    if isinstance(number, str) and number.strip():
        assert number not in err.message


def test_card_number_luhn_invalid_never_echoed():
    err = _error(number="4242424242424241")
    assert err.details == {"field": "payment.card_number"}
    assert "4242424242424241" not in err.message
    assert "4242424242424241" not in str(err)
    assert "4242424242424241" not in repr(err.details)


@pytest.mark.parametrize("month", [0, 13, -1, "12", 12.0, True, None])
def test_exp_month(month):
    assert _error(exp_month=month).details == {"field": "payment.exp_month"}


def test_expiry_current_month_is_still_valid():
    # Valid through the end of the expiry month, including its last day.
    assert validate_card(GOOD, 6, 2025, "123", TODAY) == GOOD
    assert validate_card(GOOD, 6, 2025, "123", datetime.date(2025, 6, 30)) == GOOD
    assert validate_card(GOOD, 12, 2025, "123", datetime.date(2025, 12, 31)) == GOOD


def test_expired_cards():
    assert _error(exp_month=5, exp_year=2025).details == {"field": "payment.exp_year"}
    assert _error(exp_month=12, exp_year=2024).details == {"field": "payment.exp_year"}
    # The first day after the expiry month.
    err = _error(exp_month=6, exp_year=2025, today=datetime.date(2025, 7, 1))
    assert err.details == {"field": "payment.exp_year"}
    assert "expired" in err.message


def test_expiry_too_far_ahead():
    assert validate_card(GOOD, 12, 2045, "123", TODAY) == GOOD
    err = _error(exp_month=1, exp_year=2046)
    assert err.details == {"field": "payment.exp_year"}


@pytest.mark.parametrize("year", ["2027", 27.0, None, False])
def test_exp_year_type(year):
    assert _error(exp_year=year).details == {"field": "payment.exp_year"}


def test_two_digit_year_is_in_the_past():
    assert _error(exp_year=27).details == {"field": "payment.exp_year"}


@pytest.mark.parametrize("cvc", ["12", "12345", "12a", "", " 123", 123, None, "١٢٣"])
def test_cvc(cvc):
    assert _error(cvc=cvc).details == {"field": "payment.cvc"}


def test_test_cards_validate():
    assert validate_card(DECLINED, 12, 2027, "123", TODAY) == DECLINED
    assert validate_card(INSUFFICIENT_FUNDS, 12, 2027, "123", TODAY) == INSUFFICIENT_FUNDS
