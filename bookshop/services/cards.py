"""Card checks for the (simulated) payment service.

No real card is ever charged. A few well-known test numbers pick the outcome; every other Luhn-valid
number is approved. The card number never appears in a message, a log line or an error detail: only
its last four digits may be shown, through :func:`last4`.
"""
from __future__ import annotations

import datetime
import re

from bookshop.services.errors import InvalidInput

DECLINED = "4000000000000002"
INSUFFICIENT_FUNDS = "4000000000009995"

APPROVED = "approved"
DECLINED_DECISION = "declined"
INSUFFICIENT_FUNDS_DECISION = "insufficient_funds"

MIN_LENGTH = 12
MAX_LENGTH = 19
MAX_YEARS_AHEAD = 20
# the (simulated) processor's limit for one charge; orders refuse a larger total before anything is made
MAX_CHARGE_CENTS = 100_000_000
# digit groups separated by single spaces or hyphens (``4242 4242 4242 4242``, ``4242-4242-4242-4242``)
_GROUPED = re.compile(r"[0-9]+(?:[ -][0-9]+)*")


def _ascii_digits(value: object) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit()


def luhn_valid(number: str) -> bool:
    """True for a string of 12..19 ASCII digits whose Luhn checksum is right."""
    if not _ascii_digits(number) or not MIN_LENGTH <= len(number) <= MAX_LENGTH:
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def normalize_number(number: object) -> str:
    """The card number as plain digits: single spaces or hyphens between digit groups are dropped.

    Raises InvalidInput (naming ``payment.card_number``, never echoing the number) for anything else:
    other characters, doubled, leading or trailing separators, or fewer than 12 / more than 19 digits.
    """
    if not isinstance(number, str) or _GROUPED.fullmatch(number) is None:
        raise _invalid("payment.card_number", "must be digits, optionally grouped by single spaces or hyphens")
    digits = number.replace(" ", "").replace("-", "")
    if not MIN_LENGTH <= len(digits) <= MAX_LENGTH:
        raise _invalid("payment.card_number", f"must have {MIN_LENGTH} to {MAX_LENGTH} digits")
    return digits


def card_decision(number: str) -> str:
    """``"approved"``, ``"declined"`` or ``"insufficient_funds"`` for a (Luhn-valid) card number."""
    if number == DECLINED:
        return DECLINED_DECISION
    if number == INSUFFICIENT_FUNDS:
        return INSUFFICIENT_FUNDS_DECISION
    return APPROVED


def last4(number: str) -> str:
    """The last four characters of the card number, the only part that may be shown or stored."""
    return str(number)[-4:]


def _invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", code="invalid_field", details={"field": field})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_card(number: str, exp_month: int, exp_year: int, cvc: str, today: datetime.date | None) -> str:
    """Raise InvalidInput naming the first bad field; return the card number as plain digits when the card
    may be charged.

    The number may be grouped (see :func:`normalize_number`). A card is valid through the last day of its
    expiry month. ``exp_month`` and ``exp_year`` must be ints (four-digit year); ``cvc`` a string of 3 or 4
    digits. ``today`` None checks the card's form only, not its dates (a replayed request is judged by its
    first answer, not by today's calendar).
    """
    number = normalize_number(number)
    if not luhn_valid(number):
        raise _invalid("payment.card_number", "not a valid card number")
    if not _is_int(exp_month) or not 1 <= exp_month <= 12:
        raise _invalid("payment.exp_month", "must be an integer from 1 to 12")
    if not _is_int(exp_year):
        raise _invalid("payment.exp_year", "must be an integer (four-digit year)")
    if today is not None and (exp_year, exp_month) < (today.year, today.month):
        raise _invalid("payment.exp_year", "the card has expired")
    if today is not None and exp_year > today.year + MAX_YEARS_AHEAD:
        raise _invalid("payment.exp_year", f"more than {MAX_YEARS_AHEAD} years ahead")
    if not _ascii_digits(cvc) or len(cvc) not in (3, 4):
        raise _invalid("payment.cvc", "must be a string of 3 or 4 digits")
    return number
