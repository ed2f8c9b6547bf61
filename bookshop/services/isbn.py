"""ISBN validation and normalisation.

Every ISBN the shop stores is the 13 digits of its ISBN-13, without hyphens. Clients may send an
ISBN-10 or an ISBN-13, with or without hyphens; nothing else is accepted: no spaces, no other
separators, no non-ASCII digits. Hyphens may only sit between two characters (no leading, trailing
or doubled hyphens). An ``X`` (or ``x``) is allowed only as the check digit of an ISBN-10.
"""
from __future__ import annotations

import re

from bookshop.services.errors import InvalidInput

# An ISBN with hyphens is at most 17 characters (13 digits + 4 hyphens); anything much longer is
# rejected before any regular expression or arithmetic runs on it.
MAX_RAW_LENGTH = 20

_SHAPE = re.compile(r"[0-9]+(?:-[0-9]+)*(?:-?[Xx])?")


def isbn13_check_digit(first12: str) -> str:
    """Check digit (one character, ``"0"``..``"9"``) of an ISBN-13 whose first 12 digits are given."""
    if not isinstance(first12, str) or len(first12) != 12 or not first12.isascii() or not first12.isdigit():
        raise ValueError("isbn13_check_digit needs exactly 12 ASCII digits")
    # weights 1, 3, 1, 3, ...; summed over the ASCII codes (48 is "0"): the gateway checks an ISBN per request
    codes = first12.encode()
    total = sum(codes[0::2]) + 3 * sum(codes[1::2]) - 4 * 6 * 48
    return str((10 - total % 10) % 10)


def _isbn10_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(digits):
        value = 10 if ch in "Xx" else int(ch)
        total += value * (10 - i)
    return total % 11 == 0


def _invalid(field: str, reason: str) -> InvalidInput:
    return InvalidInput(f"{field}: not a valid ISBN-10 or ISBN-13 ({reason})",
                        code="invalid_field", details={"field": field})


def normalize_isbn(value: str, field: str = "isbn") -> str:
    """Return the 13 ISBN-13 digits of ``value`` (an ISBN-10 or ISBN-13), or raise InvalidInput.

    An ISBN-10 is converted: prefix ``978``, drop its check digit, compute the ISBN-13 check digit.
    """
    if not isinstance(value, str):
        raise _invalid(field, "not a string")
    if len(value) > MAX_RAW_LENGTH:
        raise _invalid(field, "length")
    if not _SHAPE.fullmatch(value):
        raise _invalid(field, "characters")
    digits = value.replace("-", "")
    if len(digits) == 10:
        if not _isbn10_valid(digits):
            raise _invalid(field, "checksum")
        first12 = "978" + digits[:9]
        return first12 + isbn13_check_digit(first12)
    if len(digits) == 13:
        if digits[-1] in "Xx":
            raise _invalid(field, "characters")
        if not digits.startswith(("978", "979")):
            raise _invalid(field, "prefix")
        if isbn13_check_digit(digits[:12]) != digits[12]:
            raise _invalid(field, "checksum")
        return digits
    raise _invalid(field, "length")


def is_valid_isbn(value: object) -> bool:
    """True when ``normalize_isbn`` would accept ``value``."""
    try:
        normalize_isbn(value)  # type: ignore[arg-type]
    except InvalidInput:
        return False
    return True


#: how many accepted values ``normalized`` remembers before it starts again from empty
REMEMBERED = 4096
_normalized: dict[str, str] = {}


def normalized(value: str, field: str = "isbn") -> str:
    """``normalize_isbn(value, field)``, remembering the values it accepted (at most ``REMEMBERED``, then
    forgotten all at once): a route that checks the ISBN of every request pays the arithmetic once per
    ISBN. Refusals are not remembered, so they raise exactly as ``normalize_isbn`` does."""
    if type(value) is str:
        isbn = _normalized.get(value)
        if isbn is not None:
            return isbn
    isbn = normalize_isbn(value, field)
    if len(_normalized) >= REMEMBERED:
        _normalized.clear()
    _normalized[value] = isbn
    return isbn
