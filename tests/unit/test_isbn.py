import pytest

from bookshop.services.errors import InvalidInput
from bookshop.services import isbn as isbn_module
from bookshop.services.isbn import is_valid_isbn, isbn13_check_digit, normalize_isbn, normalized


@pytest.mark.parametrize("raw, expected", [
    ("0-306-40615-2", "9780306406157"),
    ("0306406152", "9780306406157"),
    ("978-0-306-40615-7", "9780306406157"),
    ("9780306406157", "9780306406157"),
    ("080442957X", "9780804429573"),
    ("080442957x", "9780804429573"),
    ("0-8044-2957-X", "9780804429573"),
    ("979-10-90636-07-1", "9791090636071"),
])
def test_valid_isbns_normalise_to_isbn13(raw, expected):
    assert normalize_isbn(raw) == expected
    assert is_valid_isbn(raw)


def test_check_digit_helper():
    assert isbn13_check_digit("978030640615") == "7"
    assert isbn13_check_digit("978080442957") == "3"
    # 9*1 + 7*3 + 8*1 = 38 -> 2; the 12th digit has weight 3: 38 + 2*3 = 44 -> 6.
    assert isbn13_check_digit("978000000000") == "2"
    assert isbn13_check_digit("978000000002") == "6"
    with pytest.raises(ValueError):
        isbn13_check_digit("97803064061")
    with pytest.raises(ValueError):
        isbn13_check_digit("97803064061X")


def test_check_digit_zero_case():
    first12 = "978000000004"  # 38 + 4*3 = 50
    digit = isbn13_check_digit(first12)
    assert digit == "0"
    assert normalize_isbn(first12 + digit) == first12 + "0"


@pytest.mark.parametrize("raw", [
    "0-306-40615-3",        # ISBN-10 bad checksum
    "9780306406158",        # ISBN-13 bad checksum
    "0804429573",           # check digit should be X
])
def test_bad_checksum(raw):
    with pytest.raises(InvalidInput) as exc:
        normalize_isbn(raw)
    assert exc.value.code == "invalid_field"
    assert exc.value.details == {"field": "isbn"}
    assert exc.value.message == "isbn: not a valid ISBN-10 or ISBN-13 (checksum)"
    assert not is_valid_isbn(raw)


@pytest.mark.parametrize("raw", [
    "0 306 40615 2",        # spaces are not allowed
    "0306406152 ",
    " 0306406152",
    "978-0-306-40615-7\n",
    "97803064O6157",        # letter O instead of zero
    "X306406152",           # X only allowed as the last character
    "03064X6152",
    "978030640615X",        # X is not an ISBN-13 check digit
    "-0306406152",
    "0306406152-",
    "0306--406152",
    "0306_406152",
    "٠٣٠٦٤٠٦١٥٢",           # Arabic-Indic digits are not ASCII digits
    "",
    "-",
])
def test_bad_characters(raw):
    with pytest.raises(InvalidInput) as exc:
        normalize_isbn(raw)
    assert exc.value.details == {"field": "isbn"}
    assert not is_valid_isbn(raw)


@pytest.mark.parametrize("raw", ["123456789", "97803064061570", "030640615", "12345678901", "1" * 20])
def test_wrong_length(raw):
    with pytest.raises(InvalidInput) as exc:
        normalize_isbn(raw)
    assert "(length)" in exc.value.message


def test_absurdly_long_input_is_rejected_quickly():
    with pytest.raises(InvalidInput) as exc:
        normalize_isbn("9" * 10_000_000)
    assert "(length)" in exc.value.message


def test_isbn13_needs_bookland_prefix():
    first12 = "977030640615"
    with pytest.raises(InvalidInput) as exc:
        normalize_isbn(first12 + isbn13_check_digit(first12))
    assert "(prefix)" in exc.value.message


@pytest.mark.parametrize("raw", [None, 9780306406157, 306406152.0, b"0306406152", ["0306406152"], True])
def test_non_string(raw):
    with pytest.raises(InvalidInput):
        normalize_isbn(raw)
    assert not is_valid_isbn(raw)


def test_error_names_the_given_field():
    with pytest.raises(InvalidInput) as exc:
        normalize_isbn("nope", field="items[2].isbn")
    assert exc.value.details == {"field": "items[2].isbn"}
    assert exc.value.message.startswith("items[2].isbn: not a valid ISBN-10 or ISBN-13")


def test_normalized_remembers_accepted_values_and_refuses_as_normalize_isbn(monkeypatch):
    monkeypatch.setattr(isbn_module, "_normalized", {})
    monkeypatch.setattr(isbn_module, "REMEMBERED", 3)
    assert normalized("0-306-40615-2") == normalized("0-306-40615-2") == "9780306406157"
    assert normalized("9780306406157") == "9780306406157"
    for bad in ("9780306406158", "x", 9780306406157, "9" * 100):
        with pytest.raises(InvalidInput) as exc:
            normalized(bad, field="isbns[0]")
        assert exc.value.details == {"field": "isbns[0]"}
    assert set(isbn_module._normalized) == {"0-306-40615-2", "9780306406157"}  # refusals are not kept
    first12 = "979000000000"
    for i in range(5):  # bounded: forgotten all at once when full
        value = first12[:-1] + str(i)
        normalized(value + isbn13_check_digit(value))
        assert len(isbn_module._normalized) <= 3
